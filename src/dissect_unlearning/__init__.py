"""Dissecting fine-tuning unlearning: an executable companion to Hong et al. (EMNLP 2024)."""
__version__ = "0.1.0"


def __getattr__(name: str):
    # `from dissect_unlearning import Study` for the notebooks, without making every import (e.g. the command line's
    # start-up) pay for pandas and torch
    if name == "Study":
        from .study import Study

        return Study
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
