"""Checks of the values a user gives: book parameters, command-line flags, the runtime, unlearning settings.

The bottom layer of the package (it imports nothing from it), so that every layer checks a device, a dtype, an
integer, a patching window or an output path the same way. The `is_*` predicates answer yes or no; the `check_*`
functions return the value or raise a ValueError that names the value, says what is allowed and what was given.
Every check here is cheap: the callers run them before any model is loaded.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

DEVICES = ("cpu", "cuda", "cuda:N", "mps", "auto")  # in words: N is a GPU number
DTYPES = ("float32", "float16", "bfloat16")
_DEVICE = re.compile(r"cpu|mps|auto|cuda(:\d+)?")


def is_int(v) -> bool:
    """An integer and not a bool (YAML's and JSON's `true` would otherwise pass as 1)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite int or float, not a bool: NaN fails every range comparison silently and infinity overflows later."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def int_in_range(v, lo: int | None = None, hi: int | None = None) -> bool:
    return is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)


def int_words(lo: int | None = None, hi: int | None = None) -> str:
    """What int_in_range(v, lo, hi) accepts, in words: 'an integer >= 1', 'an integer from 1 to 512'."""
    if lo is not None and hi is not None:
        return f"an integer from {lo} to {hi}"
    if lo is not None:
        return f"an integer >= {lo}"
    return f"an integer <= {hi}" if hi is not None else "an integer"


def is_device(v) -> bool:
    """cpu, cuda, cuda:N, mps or auto (None, the model's default, is for the caller to allow)."""
    return isinstance(v, str) and _DEVICE.fullmatch(v) is not None


def is_dtype(v) -> bool:
    return isinstance(v, str) and v in DTYPES


def check_device(v):
    """The device name, or None (the model's default)."""
    if v is None or is_device(v):
        return v
    raise ValueError(f"device must be None or one of {', '.join(DEVICES)} (N = a GPU number), got {v!r}")


def check_dtype(v):
    """The dtype name, or None (the model's default)."""
    if v is None or is_dtype(v):
        return v
    raise ValueError(f"dtype must be None (the model's default) or one of {', '.join(DTYPES)}, got {v!r}")


def check_int(v, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """The integer, or ValueError naming `name` and the allowed range."""
    if not int_in_range(v, lo, hi):
        raise ValueError(f"{name} must be {int_words(lo, hi)}, got {v!r}")
    return v


def check_window(size, n_layers: int | None = None, name: str = "window") -> int:
    """A patching window size: an integer >= 1 and, where the model's layer count is known, at most that count. A
    larger window is clipped at both ends of the model, so the centred windows overlap ever more until each covers
    the whole model: the sweep would measure something else than it was asked to, without a word."""
    if not int_in_range(size, 1):
        raise ValueError(f"{name} must be an integer >= 1 (layers patched together), got {size!r}")
    if n_layers is not None and size > n_layers:
        raise ValueError(f"{name} {size} is larger than the model, which has {n_layers} layers: give a window of "
                         f"1 to {n_layers} layers")
    return size


def check_layers(layers, n_layers: int | None = None, name: str = "layers"):
    """Explicit patching windows: None (none), a layer number, a list of them (one window) or a list of such lists
    (several windows). Negative numbers count from the end; where the model's layer count is known, every number
    must be one of its layers."""
    if layers is None:
        return None
    several = isinstance(layers, (list, tuple)) and bool(layers) and all(isinstance(x, (list, tuple)) for x in layers)
    for window in (layers if several else [layers]):
        numbers = [window] if is_int(window) else window
        if not isinstance(numbers, (list, tuple)) or not numbers:
            raise ValueError(f"{name} must be a layer number or a non-empty list of layer numbers, got {layers!r}")
        for x in numbers:
            if not is_int(x):
                raise ValueError(f"{name}: {x!r} is not a layer number (integers only)")
            if n_layers is not None and not -n_layers <= x < n_layers:
                raise ValueError(f"{name}: layer {x} does not exist; the model has {n_layers} layers (0 to "
                                 f"{n_layers - 1}, or -1 to -{n_layers} from the end)")
    return layers


def check_output_file(path, name: str = "--out") -> Path:
    """A file the caller will write once its work is done: not a folder, writable if it exists, and in a folder
    that exists or can be created. Checked first, so that a typo does not cost the work."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{name} {path}: is a folder; give the path of a file to write")
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"{name} {path}: the file exists and is not writable")
    _check_creatable(p.parent, name, path)
    return p


def check_output_folder(path, name: str = "--out", *, empty: bool = False) -> Path:
    """A folder the caller will write into: not a file, writable if it exists (and empty, with `empty`: a
    checkpoint written over another one would mix their files), or creatable."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{name} {path}: is a file, not a folder")
    if not p.exists():
        _check_creatable(p.parent, name, path)
    elif empty and any(p.iterdir()):
        raise ValueError(f"{name} {path}: the folder exists and is not empty; give a new or an empty folder")
    elif not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {path}: the folder is not writable")
    return p


def _check_creatable(folder: Path, name: str, path) -> None:
    """Missing folders can be created when the nearest one that exists is a writable folder."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{name} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {path}: the folder {existing} is not writable")


def one_line(exc: BaseException) -> str:
    """The message of an error about a user's value, for a one-line report: a KeyError's without its quotes, and a
    concept data error with a single problem as 'invalid concept data in FILE: problem' (with several, one a line)."""
    problems = getattr(exc, "problems", None)
    if isinstance(problems, list) and len(problems) == 1:
        return f"invalid concept data in {getattr(exc, 'source', '?')}: {problems[0]}"
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc)


def seconds_from_env(name: str, default: float) -> tuple[float, str]:
    """(seconds, the raw text) of the environment variable `name`: `default` when it is unset or blank, NaN when it
    is not a number >= 0 (the caller says so in its own words)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default, text
    try:
        value = float(text)
    except ValueError:
        return math.nan, text
    return (value if value >= 0 else math.nan), text
