"""What one Python process remembers between calls: the process-wide state, in one object with one reset().

Three pieces, each written and read by one module, through this one:

    runtime  the device and dtype every model load uses unless told otherwise (models.set_runtime, models.runtime)
    kept     inside artefact.keep_loaded(): the last unlearned model rebuilt, {(folder, runtime): (model, tok)};
             None outside the block (nothing is kept)
    vanilla  the last base model's weight checksum, a copy of its bit patterns and their exponent order (storage:
             every load of an unlearned model of that base needs them, ~4 s to recompute)

Holding them here, rather than as globals of those modules, gives a test or a worker one place to see them and one
call to clear them. This module knows nothing of the domain; the modules above give the pieces their meaning.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class Runtime(NamedTuple):
    """Device and dtype of model loads: None = the default (the CPU; float32, or a hub model's stored dtype)."""

    device: str | None = None
    dtype: str | None = None


@dataclass
class State:
    runtime: Runtime = Runtime()
    kept: dict | None = None
    vanilla: dict = field(default_factory=dict)


# The one instance. reset() changes it in place, so a module that holds a reference to it stays current.
STATE = State()


def reset() -> State:
    """Put every piece back to what a fresh process starts with: the default runtime, no kept model, no remembered
    base model. For tests (each starts from a clean process state) and for a worker process that runs one task
    after another and must not carry the previous task's runtime or memos (a forked worker inherits the parent's).
    Memory held by a kept model or the remembered bit patterns is released with them."""
    STATE.runtime = Runtime()
    STATE.kept = None
    STATE.vanilla = {}
    return STATE
