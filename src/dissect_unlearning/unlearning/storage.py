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

Memory matters as much as disk: a worker loads unlearned models next to the models it already holds. So nothing is
concatenated or sorted whole: bit patterns are read parameter by parameter (checksums streamed over them), the order
comes from a counting sort in chunks (int32), the planes are gathered and scattered one at a time. Besides the models,
a call holds the code (one model's size) and one plane, and the process keeps the vanilla memo described below.
"""
from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..state import STATE

FORMAT = "dissect-unlearning-delta/1"
ENCODINGS = ("zigzag", "xor")
MANIFEST = "delta.json"
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_INT = {2: np.int16, 4: np.int32, 8: np.int64}
# Values per block of the element-wise passes and of the exponent sort: their temporaries stay this small (16-32 MB)
# whatever the model's size, and a block is still long enough for numpy's per-call overhead not to show.
_CHUNK = 1 << 22


class _Bits(Sequence):
    """The bit patterns of each parameter as unsigned integers, made when asked for.

    Bit patterns are handled on the CPU (numpy, zstandard). A parameter on the CPU is seen through a view (.cpu()
    returns the tensor itself), one on a GPU is copied off it when asked for, one at a time: reading the bit patterns
    never makes a second full copy of the model on either device. Passes over all of them go parameter by parameter."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self._params = params
        size = params[0].element_size()
        self._int, self.dtype = getattr(torch, f"int{8 * size}"), _UINT[size]

    def __len__(self) -> int:
        return len(self._params)

    def __getitem__(self, i: int) -> np.ndarray:
        return self._params[i].detach().reshape(-1).cpu().view(self._int).numpy().view(self.dtype)


def _bits(model) -> tuple[list[tuple[str, torch.nn.Parameter]], _Bits, torch.dtype]:
    """The parameters (tied ones once), each one's bit patterns as unsigned integers, and their one dtype."""
    named = list(model.named_parameters())
    dtypes = {p.dtype for _, p in named}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise ValueError(f"delta storage needs all parameters in one float dtype, got {sorted(map(str, dtypes))}")
    return named, _Bits([p for _, p in named]), next(iter(dtypes))


def _pieces(a) -> Sequence[np.ndarray]:
    """An array, or a sequence of arrays that stand for their concatenation (one per parameter), as the latter."""
    return [a] if isinstance(a, np.ndarray) else a


def _encode(u: np.ndarray, v: np.ndarray, encoding: str, out: np.ndarray) -> np.ndarray:
    """The code of bit patterns `u` given `v`, written into `out` (block by block: a parameter can be 100s of MB)."""
    for s in range(0, u.size, _CHUNK):
        b = slice(s, s + _CHUNK)
        if encoding == "xor":
            np.bitwise_xor(u[b], v[b], out=out[b])
            continue
        d = np.subtract(u[b], v[b], out=out[b]).view(_INT[u.itemsize])  # wraps around: exact for any pair
        sign = np.right_shift(d, 8 * u.itemsize - 1)  # 0 or -1
        np.left_shift(d, 1, out=d)
        np.bitwise_xor(d, sign, out=d)  # zig-zag: 0 -> 0, -1 -> 1, 1 -> 2, -2 -> 3, ...
    return out


def _decode(code: np.ndarray, v: np.ndarray, encoding: str) -> np.ndarray:
    """Inverse of _encode (overwrites `code`, block by block)."""
    for s in range(0, code.size, _CHUNK):
        c, w = code[s:s + _CHUNK], v[s:s + _CHUNK]
        if encoding == "xor":
            np.bitwise_xor(c, w, out=c)
            continue
        negative = np.bitwise_and(c, 1).view(_INT[c.itemsize])
        np.negative(negative, out=negative)  # 0 or -1 (all bits set)
        np.right_shift(c, 1, out=c)
        np.bitwise_xor(c, negative.view(c.dtype), out=c)
        np.add(c, w, out=c)
    return code


def _exponent_order(v: np.ndarray, chunk: int | None = None) -> np.ndarray:
    """A permutation grouping values by the exponent of the vanilla weights: exactly np.argsort(key, kind="stable")
    of the key below (ties stay in index order), as int32 below 2**31 values.

    The key is the 8 bits after the sign bit: the exponent of float32 and bfloat16 (most of it for float16/64). Any
    key would decode exactly - encoder and decoder compute the same permutation - this one compresses well.
    A counting sort, `chunk` values at a time, rather than one argsort: that would cost an int64 result and as much
    workspace again (~2 GB for SmolLM2-135M); this costs the int32 result and a chunk's temporaries (chunk: values
    per chunk, default _CHUNK)."""
    n, shift, chunk = v.size, 8 * v.itemsize - 9, chunk or _CHUNK

    def key(a: int) -> np.ndarray:
        return (v[a:a + chunk] >> shift).astype(np.uint8)  # the cast keeps the low 8 bits: the sign is dropped

    counts = np.zeros(256, dtype=np.int64)
    for a in range(0, n, chunk):
        counts += np.bincount(key(a), minlength=256)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])  # where each key's run begins in the result
    order = np.empty(n, dtype=np.int32 if n < 2 ** 31 else np.int64)
    for a in range(0, n, chunk):
        k = key(a)
        within = np.argsort(k, kind="stable")  # the chunk's values of each key, in index order, one run per key
        within += a
        run = 0
        for b, c in enumerate(np.bincount(k, minlength=256)):
            if c:  # chunks go in index order, so each chunk's run of a key follows the previous chunks' runs
                order[start[b]:start[b] + c] = within[run:run + c]
                start[b] += c
                run += c
    return order


# A chapter loads dozens of unlearned models of one base model, and each load needs the vanilla weights' checksum and
# exponent order (~4 s of a ~10 s load). They are kept per process for the last base model seen, with a copy of its
# bit patterns: comparing against the copy is exact and ~10x cheaper than hashing again. (state.STATE.vanilla holds
# them, with the process's other state.)
def _vanilla_order(v, expected_sha256: str | None) -> np.ndarray:
    """_exponent_order of the bit patterns `v` (an array, or one per parameter: their concatenation), after checking
    that they hash to `expected_sha256` (None: no check); remembered, with the copy of `v`, in STATE.vanilla."""
    memo, pieces = STATE.vanilla, _pieces(v)
    hit = memo.get("sha256")
    if hit is not None and expected_sha256 in (None, hit) and _same(memo["bits"], pieces):
        return memo["order"]
    digest, n, dtype = _digest(pieces)
    if expected_sha256 is not None and digest != expected_sha256:
        raise _VanillaMismatch
    memo.clear()  # the previous base model's copy goes before the new one is made: one copy in memory at a time
    bits = np.empty(n, dtype)
    a = 0
    for x in pieces:
        bits[a:a + x.size] = x
        a += x.size
    memo.update(sha256=digest, bits=bits, order=_exponent_order(bits))
    return memo["order"]


def _same(flat: np.ndarray, pieces: Sequence[np.ndarray]) -> bool:
    """Whether `pieces`, one after another, are exactly `flat` (compared piece by piece: no concatenated copy)."""
    a = 0
    for x in pieces:
        # the dtype too: equal values in another width are other bit patterns, with another exponent order
        if x.dtype != flat.dtype or a + x.size > flat.size or not np.array_equal(flat[a:a + x.size], x):
            return False
        a += x.size
    return a == flat.size


class _VanillaMismatch(Exception):
    pass


def _digest(pieces: Sequence[np.ndarray]) -> tuple[str, int, np.dtype | None]:
    """sha256 of the pieces' bytes one after another (that of their concatenation), their total size and dtype."""
    h, n, dtype = hashlib.sha256(), 0, None
    for x in pieces:
        if x.size:  # a memoryview with a zero in its shape cannot be cast to bytes; it adds none anyway
            h.update(memoryview(np.ascontiguousarray(x)).cast("B"))
        n, dtype = n + x.size, x.dtype
    return h.hexdigest(), n, dtype


def sha256(a) -> str:
    """sha256 of an array's bytes; of a sequence of arrays (one per parameter): that of their concatenation."""
    return _digest(_pieces(a))[0]


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
    if order:
        perm = _vanilla_order(v, None)
        flat = STATE.vanilla["bits"]  # v itself, in one array: no GPU copies to make again
    n = sum(p.numel() for _, p in named)
    code = np.empty(n, u.dtype)
    h, a = hashlib.sha256(), 0
    for i, x in enumerate(u):  # each parameter once: from a GPU, it is one copy to the CPU
        if x.size:
            h.update(memoryview(x).cast("B"))
        _encode(x, flat[a:a + x.size] if order else v[i], encoding, out=code[a:a + x.size])
        a += x.size
    planes = code.view(np.uint8).reshape(-1, code.itemsize)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    compressor = zstandard.ZstdCompressor(level=level, threads=-1)
    sizes = []
    for k in range(code.itemsize):
        # one plane at a time, gathered straight in the vanilla order: a permuted copy of the code is never made
        plane = planes[perm, k] if order else np.ascontiguousarray(planes[:, k])
        blob = compressor.compress(plane)
        del plane
        (folder / f"plane{k}.zst").write_bytes(blob)
        sizes.append(len(blob))
    manifest = {
        "format": FORMAT, "encoding": encoding, "order": "vanilla-exponent" if order else "none", "dtype": str(dtype).removeprefix("torch."), "byteorder": sys.byteorder,
        "params": shapes, "n_values": int(n), "plane_bytes": sizes,
        "sha256": h.hexdigest(), "vanilla_sha256": STATE.vanilla["sha256"] if order else sha256(v),
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
            perm = _vanilla_order(v, manifest["vanilla_sha256"] if verify else None)
            flat = STATE.vanilla["bits"]  # the model's bit patterns, checked: decoding reads them in one array
        elif verify and sha256(v) != manifest["vanilla_sha256"]:
            raise _VanillaMismatch
    except _VanillaMismatch:
        raise ValueError(f"{folder}: the base model's weights are not the ones this delta was made from "
                         f"(was the base model re-provisioned differently?)") from None
    n = sum(p.numel() for _, p in named)
    code = np.empty(n, v.dtype)
    planes = code.view(np.uint8).reshape(-1, code.itemsize)
    dec = zstandard.ZstdDecompressor()
    for k in range(code.itemsize):
        try:
            plane = np.frombuffer(dec.decompress((folder / f"plane{k}.zst").read_bytes()), dtype=np.uint8)
        except zstandard.ZstdError as e:
            raise ValueError(f"{folder}: plane{k}.zst cannot be decompressed (corrupt entry): {e}") from None
        if plane.size != n:
            raise ValueError(f"{folder}: plane{k}.zst holds {plane.size} values, not {n} (corrupt entry)")
        if ordered:
            planes[perm, k] = plane  # scattered back from the vanilla order straight into place
        else:
            planes[:, k] = plane
        del plane
    a = 0
    for i, (_, p) in enumerate(named):
        _decode(code[a:a + p.numel()], flat[a:a + p.numel()] if ordered else v[i], manifest["encoding"])
        a += p.numel()
    if verify and sha256(code) != manifest["sha256"]:
        raise ValueError(f"{folder}: decoded weights do not match the stored checksum (corrupt entry)")
    # only now into the model: a delta that fails its checks leaves the model as it was
    values = torch.from_numpy(code.view(_INT[code.itemsize])).view(dtype)
    a = 0
    with torch.no_grad():
        for _, p in named:
            p.copy_(values[a:a + p.numel()].view_as(p))  # copy_ moves the CPU values to p's device
            a += p.numel()
    return model
