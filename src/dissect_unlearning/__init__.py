"""Dissecting fine-tuning unlearning: an executable companion to Hong et al. (EMNLP 2024)."""
import os as _os

__version__ = "0.1.0"

# torch's OpenMP threads spin while they wait for work. When more threads than cores are busy (a build's workers
# beside a chapter kernel, or anything else the machine runs), the spinning threads take the cores from the ones
# with work: greedy generation of 5 answers x 30 tokens with 2 threads took 30-58 s under load against 6.5-7.4 s with
# sleeping waiters (OMP_WAIT_POLICY=PASSIVE), the same numbers either way. Read by the OpenMP runtime when torch
# loads, so it only takes effect if this package is imported first (the command line, the chapters, the build's
# workers and kernels, which inherit it); a value set by the user wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def __getattr__(name: str):
    # `from dissect_unlearning import Study` for the notebooks, without making every import (e.g. the command line's
    # start-up) pay for pandas and torch
    if name == "Study":
        from .study import Study

        return Study
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
