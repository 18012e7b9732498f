"""storage.py's lean delta code against a frozen copy of the code it replaced: the same files byte for byte, the same
weights bit for bit, the same exponent order as a stable argsort, the same refusals."""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dissect_unlearning.state import STATE
from dissect_unlearning.unlearning import storage


# ---------------------------------------------------------------------------------------------------- frozen reference
# The implementation before the lean rewrite (concatenated bit patterns, one argsort), verbatim but for the names: the
# files it writes are the format's reference.
def _old_bits(model):
    named = list(model.named_parameters())
    dtypes = {p.dtype for _, p in named}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise ValueError(f"delta storage needs all parameters in one float dtype, got {sorted(map(str, dtypes))}")
    dtype = next(iter(dtypes))
    flat = torch.cat([p.detach().reshape(-1).cpu() for _, p in named])
    size = flat.element_size()
    return named, flat.view(getattr(torch, f"int{8 * size}")).numpy().view(storage._UINT[size]), dtype


def _old_encode(u, v, encoding):
    if encoding == "xor":
        return np.bitwise_xor(u, v)
    d = np.subtract(u, v).view(storage._INT[u.itemsize])
    sign = np.right_shift(d, 8 * u.itemsize - 1)
    np.left_shift(d, 1, out=d)
    np.bitwise_xor(d, sign, out=d)
    return d.view(u.dtype)


def _old_decode(code, v, encoding):
    if encoding == "xor":
        return np.bitwise_xor(code, v, out=code)
    negative = np.bitwise_and(code, 1).view(storage._INT[code.itemsize])
    np.negative(negative, out=negative)
    np.right_shift(code, 1, out=code)
    np.bitwise_xor(code, negative.view(code.dtype), out=code)
    return np.add(code, v, out=code)


def _old_exponent_order(v):
    key = (v >> (8 * v.itemsize - 9)).astype(np.uint8)
    return np.argsort(key, kind="stable")


class _OldMismatch(Exception):
    pass


def _old_vanilla_order(v, expected_sha256):
    memo = STATE.vanilla
    hit = memo.get("sha256")
    if hit is not None and expected_sha256 in (None, hit) and np.array_equal(memo["bits"], v):
        return memo["order"]
    digest = _old_sha256(v)
    if expected_sha256 is not None and digest != expected_sha256:
        raise _OldMismatch
    order = _old_exponent_order(v)
    memo.clear()
    memo.update(sha256=digest, bits=v.copy(), order=order)
    return order


def _old_sha256(a):
    return hashlib.sha256(memoryview(np.ascontiguousarray(a)).cast("B")).hexdigest()


def old_save_delta(model, vanilla, folder, *, encoding="zigzag", order=True, level=3):
    import zstandard

    if encoding not in storage.ENCODINGS:
        raise ValueError(f"encoding must be one of {storage.ENCODINGS}, got {encoding!r}")
    named, u, dtype = _old_bits(model)
    vnamed, v, vdtype = _old_bits(vanilla)
    shapes = [(n, list(p.shape)) for n, p in named]
    if shapes != [(n, list(p.shape)) for n, p in vnamed] or dtype != vdtype:
        raise ValueError("delta storage: the model and its vanilla model have different parameters")
    code = _old_encode(u, v, encoding)
    if order:
        code = code[_old_vanilla_order(v, None)]
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
        "format": storage.FORMAT, "encoding": encoding, "order": "vanilla-exponent" if order else "none",
        "dtype": str(dtype).removeprefix("torch."), "byteorder": sys.byteorder,
        "params": shapes, "n_values": int(u.size), "plane_bytes": sizes,
        "sha256": _old_sha256(u), "vanilla_sha256": STATE.vanilla["sha256"] if order else _old_sha256(v),
    }
    (folder / storage.MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def old_apply_delta(model, folder, *, verify=True):
    import zstandard

    folder = Path(folder)
    manifest = json.loads((folder / storage.MANIFEST).read_text())
    named, v, dtype = _old_bits(model)
    ordered = manifest.get("order", "none") == "vanilla-exponent"
    if ordered:
        order = _old_vanilla_order(v, manifest["vanilla_sha256"] if verify else None)
    elif verify and _old_sha256(v) != manifest["vanilla_sha256"]:
        raise _OldMismatch
    dec = zstandard.ZstdDecompressor()
    planes = np.empty((v.size, v.itemsize), dtype=np.uint8)
    for k in range(v.itemsize):
        planes[:, k] = np.frombuffer(dec.decompress((folder / f"plane{k}.zst").read_bytes()), dtype=np.uint8)
    if ordered:
        code = np.empty_like(v)
        code[order] = planes.view(v.dtype).reshape(-1)
    else:
        code = planes.view(v.dtype).reshape(-1)
    u = _old_decode(code, v, manifest["encoding"])
    if verify and _old_sha256(u) != manifest["sha256"]:
        raise ValueError(f"{folder}: decoded weights do not match the stored checksum (corrupt entry)")
    values = torch.from_numpy(u.view(storage._INT[v.itemsize])).view(dtype)
    offset = 0
    with torch.no_grad():
        for _, p in named:
            p.copy_(values[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    return model


# ---------------------------------------------------------------------------------------------------- models
def make_model(seed=0, dtype=torch.float32):
    """A small random Llama (~110k values; lm_head not tied, so no parameter is shared)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype).eval()


def fine_tuned(vanilla):
    """A copy of `vanilla` moved a little, as fine-tuning does, plus the awkward cases: unchanged parameters, a weight
    that changes sign, a subnormal, an exact zero."""
    import copy

    model = copy.deepcopy(vanilla)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers.1.self_attn." in name:
                continue  # left as it was: a zero code
            noise = torch.randn(p.shape, generator=g) * 1e-3 * p.float().abs().mean()
            p.copy_((p.float() + noise).to(p.dtype))
        w = next(model.parameters()).view(-1)
        w[0] = -next(vanilla.parameters()).view(-1)[0]
        w[1] = 1e-40
        w[2] = 0.0
    return model


def params_equal(a, b) -> bool:
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(pa, pb))


@pytest.fixture(autouse=True)
def _clean_memo():
    STATE.vanilla.clear()
    yield
    STATE.vanilla.clear()


DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module", params=DTYPES, ids=["float32", "bfloat16"])
def pair(request):
    """(vanilla, fine-tuned) of one dtype."""
    vanilla = make_model(0, request.param)
    return vanilla, fine_tuned(vanilla)


# ---------------------------------------------------------------------------------------------------- 1. same files
@pytest.mark.parametrize("chunk", [None, 4099], ids=["default-chunk", "small-chunk"])
@pytest.mark.parametrize("order", [True, False], ids=["ordered", "unordered"])
@pytest.mark.parametrize("encoding", ["zigzag", "xor"])
def test_save_delta_writes_the_files_of_the_old_implementation_byte_for_byte(pair, encoding, order, chunk, tmp_path,
                                                                              monkeypatch):
    vanilla, model = pair
    if chunk:  # blocks and order chunks that split parameters and do not divide anything evenly
        monkeypatch.setattr(storage, "_CHUNK", chunk)
    old = old_save_delta(model, vanilla, tmp_path / "old", encoding=encoding, order=order)
    STATE.vanilla.clear()
    new = storage.save_delta(model, vanilla, tmp_path / "new", encoding=encoding, order=order)
    assert new == old
    names = sorted(p.name for p in (tmp_path / "old").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "new").iterdir())
    assert len(names) == 1 + next(model.parameters()).element_size()
    for name in names:
        assert (tmp_path / "new" / name).read_bytes() == (tmp_path / "old" / name).read_bytes(), name
    # a warm memo (left by the save above) changes nothing either
    storage.save_delta(model, vanilla, tmp_path / "again", encoding=encoding, order=order)
    for name in names:
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "old" / name).read_bytes(), name
    if order:  # the memo: the vanilla checksum, its bit patterns, the order in int32 (same values as the old int64)
        _, v, _ = _old_bits(vanilla)
        assert STATE.vanilla["sha256"] == old["vanilla_sha256"] == _old_sha256(v)
        assert np.array_equal(STATE.vanilla["bits"], v) and STATE.vanilla["bits"].dtype == v.dtype
        assert STATE.vanilla["order"].dtype == np.int32
        assert np.array_equal(STATE.vanilla["order"], _old_exponent_order(v))
    else:
        assert STATE.vanilla == {}  # unordered deltas never needed the memo


def test_sha256_of_the_parameters_is_that_of_their_concatenation():
    model = make_model(0)
    named, bits, _ = storage._bits(model)
    assert len(bits) == len(named) and all(isinstance(x, np.ndarray) for x in bits)
    assert bits[0].base is not None  # a view of the parameter, not a copy
    _, flat, _ = _old_bits(model)
    assert storage.sha256(bits) == storage.sha256(flat) == _old_sha256(flat)
    assert storage.sha256([flat[:0], flat[:10], flat[10:]]) == _old_sha256(flat)  # empty pieces add nothing


# ---------------------------------------------------------------------------------------------------- 2. same weights
@pytest.mark.parametrize("order", [True, False], ids=["ordered", "unordered"])
@pytest.mark.parametrize("encoding", ["zigzag", "xor"])
def test_apply_delta_restores_the_model_bit_for_bit_whatever_the_memo_holds(pair, encoding, order, tmp_path):
    vanilla, model = pair
    dtype = next(vanilla.parameters()).dtype
    manifest = storage.save_delta(model, vanilla, tmp_path, encoding=encoding, order=order)

    def restore(**kw):
        fresh = make_model(0, dtype)
        assert params_equal(fresh, vanilla) and not params_equal(fresh, model)
        assert storage.apply_delta(fresh, tmp_path, **kw) is fresh
        assert params_equal(fresh, model)

    restore()  # warm: the memo save_delta left (ordered), or none (unordered)
    restore(verify=False)
    STATE.vanilla.clear()
    restore()  # cold
    for verify in (True, False):  # the memo of another base model: replaced, not trusted
        other = make_model(1, dtype)
        storage._vanilla_order(storage._bits(other)[1], None)
        other_sha = STATE.vanilla["sha256"]
        assert other_sha != manifest["vanilla_sha256"]
        restore(verify=verify)
        if order:
            assert STATE.vanilla["sha256"] == manifest["vanilla_sha256"]
        else:
            assert STATE.vanilla["sha256"] == other_sha  # an unordered delta leaves the memo alone, as before
    # the old decoder reads the new files (they are the same bytes; this checks the round trip through both)
    STATE.vanilla.clear()
    fresh = make_model(0, dtype)
    old_apply_delta(fresh, tmp_path)
    assert params_equal(fresh, model)


def test_a_memo_of_the_same_values_in_another_width_is_not_a_hit(tmp_path):
    # all-zero models: float32 and bfloat16 bit patterns of the same values compare equal as numbers
    zero32, zero16 = make_model(0), make_model(0, torch.bfloat16)
    with torch.no_grad():
        for p in [*zero32.parameters(), *zero16.parameters()]:
            p.zero_()
    model = fine_tuned(zero16)
    manifest = storage.save_delta(model, zero16, tmp_path)
    storage._vanilla_order(storage._bits(zero32)[1], None)
    assert STATE.vanilla["bits"].dtype == np.uint32
    fresh = make_model(0, torch.bfloat16)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    storage.apply_delta(fresh, tmp_path)
    assert params_equal(fresh, model) and STATE.vanilla["sha256"] == manifest["vanilla_sha256"]


# ---------------------------------------------------------------------------------------------------- 3. the order
@pytest.mark.parametrize("uint", [np.uint16, np.uint32, np.uint64])
@pytest.mark.parametrize("chunk", [1, 7, 1000, 4096, 10 ** 6])
def test_chunked_exponent_order_is_the_stable_argsort(uint, chunk):
    rng = np.random.default_rng(chunk)
    bits = 8 * np.dtype(uint).itemsize
    n = 5003 if chunk > 1 else 300
    # few distinct keys (exponents near 2^0, a zero, both signs): long runs of ties, spread over every chunk
    key = rng.choice(np.array([0, 120, 121, 126, 127, 255], dtype=np.uint64), n)
    sign = rng.integers(0, 2, n, dtype=np.uint64)
    rest = rng.integers(0, 2 ** (bits - 9), n, dtype=np.uint64)
    v = ((sign << np.uint64(bits - 1)) | (key << np.uint64(bits - 9)) | rest).astype(uint)
    reference = np.argsort((v >> (bits - 9)).astype(np.uint8), kind="stable")
    order = storage._exponent_order(v, chunk=chunk)
    assert order.dtype == np.int32
    assert np.array_equal(order, reference)
    assert np.array_equal(order, _old_exponent_order(v))
    assert np.array_equal(storage._exponent_order(v), reference)  # the default chunk


def test_exponent_order_of_nothing_and_of_one_key():
    assert storage._exponent_order(np.array([], dtype=np.uint32), chunk=4).size == 0
    same = np.full(50, 0x3F800000, dtype=np.uint32)
    assert np.array_equal(storage._exponent_order(same, chunk=8), np.arange(50))


# ---------------------------------------------------------------------------------------------------- 4. refusals
@pytest.mark.parametrize("order", [True, False], ids=["ordered", "unordered"])
def test_a_delta_applied_to_another_base_model_is_refused_naming_the_folder(order, tmp_path):
    vanilla = make_model(0)
    folder = tmp_path / "entry"
    storage.save_delta(fine_tuned(vanilla), vanilla, folder, order=order)
    for memo in ("warm", "cold"):
        if memo == "cold":
            STATE.vanilla.clear()
        other = make_model(1)
        with pytest.raises(ValueError, match=re.escape(str(folder)) + ".*base model's weights are not the ones"):
            storage.apply_delta(other, folder)
        assert params_equal(other, make_model(1))  # left as it was
    nearly = make_model(0)
    with torch.no_grad():
        next(nearly.parameters()).view(-1)[5] += 1.0  # one weight differs: the piece-by-piece comparison catches it
    with pytest.raises(ValueError, match=re.escape(str(folder))):
        storage.apply_delta(nearly, folder)
    with pytest.raises(ValueError, match=re.escape(str(folder)) + ".*does not fit"):
        storage.apply_delta(make_model(0, torch.bfloat16), folder)


def _flip_middle(path: Path):
    blob = bytearray(path.read_bytes())
    for i in range(len(blob) // 3, len(blob) // 3 + 8):
        blob[i] ^= 0xFF
    path.write_bytes(bytes(blob))


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[:-7])


def _other_bytes(path: Path, n: int):
    import zstandard

    path.write_bytes(zstandard.ZstdCompressor().compress(np.random.default_rng(0).bytes(n)))


def _short_frame(path: Path, n: int):
    import zstandard

    path.write_bytes(zstandard.ZstdCompressor().compress(bytes(n - 1)))


@pytest.mark.parametrize("corrupt", ["flip", "truncate", "other-bytes", "short-frame"])
@pytest.mark.parametrize("order", [True, False], ids=["ordered", "unordered"])
def test_a_corrupted_plane_is_a_value_error_naming_the_folder(corrupt, order, tmp_path):
    vanilla = make_model(0)
    folder = tmp_path / "entry"
    manifest = storage.save_delta(fine_tuned(vanilla), vanilla, folder, order=order)
    plane = folder / "plane0.zst"  # the low bytes: the plane with the most information
    {"flip": lambda: _flip_middle(plane), "truncate": lambda: _truncate(plane),
     "other-bytes": lambda: _other_bytes(plane, manifest["n_values"]),
     "short-frame": lambda: _short_frame(plane, manifest["n_values"])}[corrupt]()
    fresh = make_model(0)
    with pytest.raises(ValueError, match=re.escape(str(folder))):
        storage.apply_delta(fresh, folder)
    assert params_equal(fresh, vanilla)  # checks fail before the model is touched
    if corrupt == "other-bytes":
        with pytest.raises(ValueError, match="decoded weights do not match the stored checksum"):
            storage.apply_delta(fresh, folder)


def test_the_old_refusals_are_kept(tmp_path):
    vanilla = make_model(0)
    with pytest.raises(ValueError, match="encoding must be one of"):
        storage.save_delta(vanilla, vanilla, tmp_path, encoding="plain")
    with pytest.raises(ValueError, match="different parameters"):
        storage.save_delta(make_model(0, torch.bfloat16), vanilla, tmp_path)
    with pytest.raises(ValueError, match="one float dtype"):
        storage.save_delta(vanilla, _mixed(), tmp_path)
    folder = tmp_path / "entry"
    storage.save_delta(fine_tuned(vanilla), vanilla, folder)
    manifest = json.loads((folder / storage.MANIFEST).read_text())
    (folder / storage.MANIFEST).write_text(json.dumps({**manifest, "byteorder": "middle"}))
    with pytest.raises(ValueError, match=re.escape(f"{folder}: written on a middle-endian machine")):
        storage.apply_delta(make_model(0), folder)
    (folder / storage.MANIFEST).write_text(json.dumps({**manifest, "format": "other/1"}))
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'delta.json'}: unknown format 'other/1'")):
        storage.apply_delta(make_model(0), folder)


def _mixed():
    model = make_model(0)
    model.lm_head.to(torch.float64)
    return model
