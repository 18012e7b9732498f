"""Lossless, compact storage of a fine-tuned model as a difference from the model it was fine-tuned from.

A float32 SmolLM2-135M is 540 MB; an unlearning run moves every weight a little, so a plain copy per (concept,
method) would fill a disk fast. Fine-tuning leaves sign and exponent of almost every weight as they were and moves
the mantissa by a few thousand units in the last place, so we store, per weight, the *integer difference of the
float bit patterns* (wrap-around uint arithmetic, so it is exactly invertible whatever the values), zig-zag coded so
small negative differences are small numbers too. Split into byte planes (all lowest bytes, then all next bytes...),
the high planes are almost all zeros and zstandard shrinks them to nearly nothing; the low planes are the real
information. Decoding adds the differences back to the vanilla bit patterns: bit-exact, so outputs do not change.

One more trick, free because the decoder has the vanilla weights too: a weight's change in units in the last place
depends on its magnitude (a unit in the last place of 0.5 is 2^10 times that of 0.0005), so before compressing we
order the values by the exponent of their *vanilla* weight (a stable sort the decoder can repeat). zstandard then sees
long runs of similar numbers: on SmolLM2-135M after grad_diff (lr 2e-5, 10 steps) 290 MB -> 265 MB; the low byte is
random either way, so this is close to the entropy of the change.
(`encoding="xor"` - XOR of the bit patterns - is the other lossless choice: 297 vs 276 MB without the ordering.)
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ..state import STATE

FORMAT = "dissect-unlearning-delta/1"
ENCODINGS = ("zigzag", "xor")
MANIFEST = "delta.json"
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_INT = {2: np.int16, 4: np.int32, 8: np.int64}


def _bits(model) -> tuple[list[tuple[str, torch.nn.Parameter]], np.ndarray, torch.dtype]:
    """The parameters (tied ones once) and all their bit patterns, concatenated, as unsigned integers."""
    named = list(model.named_parameters())
    dtypes = {p.dtype for _, p in named}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise ValueError(f"delta storage needs all parameters in one float dtype, got {sorted(map(str, dtypes))}")
    dtype = next(iter(dtypes))
    # Bit patterns are handled on the CPU (numpy, zstandard): each parameter is copied off a GPU one at a time, so
    # the GPU never holds a second full copy of the model (.cpu() returns a CPU tensor itself, no copy).
    flat = torch.cat([p.detach().reshape(-1).cpu() for _, p in named])
    size = flat.element_size()
    return named, flat.view(getattr(torch, f"int{8 * size}")).numpy().view(_UINT[size]), dtype


def _encode(u: np.ndarray, v: np.ndarray, encoding: str) -> np.ndarray:
    """The code of bit patterns `u` given `v` (in place where possible: these arrays are hundreds of MB)."""
    if encoding == "xor":
        return np.bitwise_xor(u, v)
    d = np.subtract(u, v).view(_INT[u.itemsize])  # wraps around: exact for any pair of bit patterns
    sign = np.right_shift(d, 8 * u.itemsize - 1)  # 0 or -1
    np.left_shift(d, 1, out=d)
    np.bitwise_xor(d, sign, out=d)  # zig-zag: 0 -> 0, -1 -> 1, 1 -> 2, -2 -> 3, ...
    return d.view(u.dtype)


def _decode(code: np.ndarray, v: np.ndarray, encoding: str) -> np.ndarray:
    """Inverse of _encode (overwrites `code`)."""
    if encoding == "xor":
        return np.bitwise_xor(code, v, out=code)
    negative = np.bitwise_and(code, 1).view(_INT[code.itemsize])
    np.negative(negative, out=negative)  # 0 or -1 (all bits set)
    np.right_shift(code, 1, out=code)
    np.bitwise_xor(code, negative.view(code.dtype), out=code)
    return np.add(code, v, out=code)


def _exponent_order(v: np.ndarray) -> np.ndarray:
    """A permutation grouping values by the exponent of the vanilla weights (stable: a radix sort of one byte).

    The key is the 8 bits after the sign bit: the exponent of float32 and bfloat16 (most of it for float16/64). Any
    key would decode exactly - encoder and decoder compute the same permutation - this one compresses well."""
    key = (v >> (8 * v.itemsize - 9)).astype(np.uint8)  # the cast keeps the low 8 bits: the sign is dropped
    return np.argsort(key, kind="stable")


# A chapter loads dozens of unlearned models of one base model, and each load needs the vanilla weights' checksum and
# exponent order (~4 s of a ~10 s load). They are kept per process for the last base model seen, with a copy of its
# bit patterns: comparing against the copy is exact and ~10x cheaper than hashing again. (state.STATE.vanilla holds
# them, with the process's other state.)
def _vanilla_order(v: np.ndarray, expected_sha256: str | None) -> np.ndarray:
    """_exponent_order(v), after checking that v hashes to `expected_sha256` (None: no check); remembered."""
    memo = STATE.vanilla
    hit = memo.get("sha256")
    if hit is not None and expected_sha256 in (None, hit) and np.array_equal(memo["bits"], v):
        return memo["order"]
    digest = sha256(v)
    if expected_sha256 is not None and digest != expected_sha256:
        raise _VanillaMismatch
    order = _exponent_order(v)
    memo.clear()  # the previous base model's copy goes before the new one is made: one copy in memory at a time
    memo.update(sha256=digest, bits=v.copy(), order=order)
    return order


class _VanillaMismatch(Exception):
    pass


def sha256(a: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(a)).cast("B")).hexdigest()


def save_delta(model, vanilla, folder: Path, *, encoding: str = "zigzag", order: bool = True, level: int = 3) -> dict:
    """Write `model` as a difference from `vanilla` (same architecture) into `folder`; return the manifest.

    order=False skips the exponent ordering: ~10% larger, a few seconds faster to write and to read."""
    import zstandard

    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    named, u, dtype = _bits(model)
    vnamed, v, vdtype = _bits(vanilla)
    shapes = [(n, list(p.shape)) for n, p in named]
    if shapes != [(n, list(p.shape)) for n, p in vnamed] or dtype != vdtype:
        raise ValueError("delta storage: the model and its vanilla model have different parameters")
    code = _encode(u, v, encoding)
    if order:
        code = code[_vanilla_order(v, None)]
    planes = code.view(np.uint8).reshape(-1, code.itemsize)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    compressor = zstandard.ZstdCompressor(level=level, threads=-1)
    sizes = []
    for k in range(code.itemsize):
        blob = compressor.compress(np.ascontiguousarray(planes[:, k]).tobytes())
        (folder / f"plane{k}.zst").write_bytes(blob)
        sizes.append(len(blob))
    manifest = {
        "format": FORMAT, "encoding": encoding, "order": "vanilla-exponent" if order else "none", "dtype": str(dtype).removeprefix("torch."), "byteorder": sys.byteorder,
        "params": shapes, "n_values": int(u.size), "plane_bytes": sizes,
        "sha256": sha256(u), "vanilla_sha256": STATE.vanilla["sha256"] if order else sha256(v),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def apply_delta(model, folder: Path, *, verify: bool = True):
    """Turn `vanilla` (loaded fresh, modified in place) into the stored model; bit-exact, checked by sha256."""
    import zstandard

    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{folder / 'delta.json'}: unknown format {manifest.get('format')!r}")
    if manifest["byteorder"] != sys.byteorder:
        raise ValueError(f"{folder}: written on a {manifest['byteorder']}-endian machine, this one is {sys.byteorder}")
    named, v, dtype = _bits(model)
    if [(n, list(p.shape)) for n, p in named] != [tuple(x) for x in manifest["params"]] or \
            str(dtype).removeprefix("torch.") != manifest["dtype"]:
        raise ValueError(f"{folder}: the stored delta does not fit this model's parameters")
    ordered = manifest.get("order", "none") == "vanilla-exponent"
    try:
        if ordered:
            order = _vanilla_order(v, manifest["vanilla_sha256"] if verify else None)
        elif verify and sha256(v) != manifest["vanilla_sha256"]:
            raise _VanillaMismatch
    except _VanillaMismatch:
        raise ValueError(f"{folder}: the base model's weights are not the ones this delta was made from "
                         f"(was the base model re-provisioned differently?)") from None
    dec = zstandard.ZstdDecompressor()
    planes = np.empty((v.size, v.itemsize), dtype=np.uint8)
    for k in range(v.itemsize):
        planes[:, k] = np.frombuffer(dec.decompress((folder / f"plane{k}.zst").read_bytes()), dtype=np.uint8)
    if ordered:
        code = np.empty_like(v)
        code[order] = planes.view(v.dtype).reshape(-1)
    else:
        code = planes.view(v.dtype).reshape(-1)
    u = _decode(code, v, manifest["encoding"])
    if verify and sha256(u) != manifest["sha256"]:
        raise ValueError(f"{folder}: decoded weights do not match the stored checksum (corrupt entry)")
    values = torch.from_numpy(u.view(_INT[v.itemsize])).view(dtype)
    offset = 0
    with torch.no_grad():
        for _, p in named:
            p.copy_(values[offset:offset + p.numel()].view_as(p))  # copy_ moves the CPU values to p's device
            offset += p.numel()
    return model
