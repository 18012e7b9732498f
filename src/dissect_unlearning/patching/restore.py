"""Parameter restoration that always puts the patched model back exactly as it was.

The window's tensors are copied aside first; the source's values are copied in place (the Parameter objects stay the
same, so nnsight wrappers and optimisers keep pointing at them); whatever happens inside the block, even an
exception halfway through copying, the saved copies are written back bit for bit.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def restored_parameters(target: torch.nn.Module, source: torch.nn.Module, names: list[str]) -> Iterator[None]:
    """Inside the block, `target`'s parameters `names` hold `source`'s values; afterwards their own again."""
    dst = dict(target.named_parameters())
    src = dict(source.named_parameters())
    for name in names:  # check everything before touching anything
        if name not in dst or name not in src:
            where = "target" if name not in dst else "source"
            raise KeyError(f"parameter {name!r} is missing from the {where} model")
        if dst[name].shape != src[name].shape or dst[name].dtype != src[name].dtype:
            raise ValueError(f"parameter {name!r}: shape/dtype {tuple(src[name].shape)}/{src[name].dtype} in the "
                             f"source but {tuple(dst[name].shape)}/{dst[name].dtype} in the target")
    if target is source:
        yield  # restoring a model's parameters into itself changes nothing
        return
    with torch.no_grad():
        saved = {name: dst[name].detach().clone() for name in names}
    try:
        with torch.no_grad():
            for name in names:
                dst[name].copy_(src[name])
        yield
    finally:
        with torch.no_grad():
            for name in names:
                dst[name].copy_(saved[name])
