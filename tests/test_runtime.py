"""The runtime setting (models.set_runtime): device and dtype for every stage, and what it does to cache keys.

Tiny random models on the CPU; the dtype path (bfloat16) is exercised end to end here. A GPU run of the same stages
needs a CUDA machine (not part of this suite).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dissect_unlearning import cache, concepts, metrics, models, pipeline, prompts

TEXTS = {
    "Harry Potter": "harry potter is a wizard . the author of harry potter is rowling . harry potter went to the "
                    "school hogwarts . his friend is ron and his enemy is voldemort . " * 3,
    "Paris": "paris is the capital city of france . paris is on the river . paris is in france . " * 3,
    "Super Mario": "mario is a plumber . his brother is luigi . mario was made by nintendo . " * 3,
}
QUESTIONS = {"Harry Potter": ["who wrote harry potter?", "where is the school of harry potter?"],
             "Paris": ["what is the capital of france?", "where is paris?"],
             "Super Mario": ["who is the brother of mario?", "what is mario?"]}
FAST = dict(steps=2, batch_size=2, chunk_tokens=8, max_new_tokens=4, lr=1e-3)


@pytest.fixture(autouse=True)
def _one_thread_and_default_runtime():
    """One torch thread (a shared 2-core machine), and every test starts and ends with the default runtime."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    models.set_runtime()
    yield
    models.set_runtime()
    torch.set_num_threads(old)


@pytest.fixture
def cset():
    return concepts.parse([
        {"Concept": name, "Layer": 1, "Dim": i, "QA": QUESTIONS[name], "QA_answers": [[name], [name]],
         "text_completion": [{"First_half": f"{name} is", "Second_half": "a thing"}],
         "unrelated_QA": ["what is the capital of france?"], "wikipedia_content": TEXTS[name]}
        for i, name in enumerate(TEXTS)], "test")


def dtypes(model) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters()}


# ---------------------------------------------------------------------------------------------------- the setting
@pytest.mark.parametrize("kwargs, match", [
    (dict(device="gpu"), r"device must be None or one of cpu, cuda, cuda:N, mps, auto .*got 'gpu'"),
    (dict(device="cuda:x"), r"device must be .*got 'cuda:x'"),
    (dict(device=0), r"device must be .*got 0"),
    (dict(dtype="fp16"),
     r"dtype must be None \(the model's default\) or one of float32, float16, bfloat16, got 'fp16'"),
    (dict(dtype="float64"), r"dtype must be .*got 'float64'"),
])
def test_set_runtime_rejects_bad_values_naming_the_parameter_and_the_choices(kwargs, match):
    models.set_runtime(device="cpu", dtype="float16")
    with pytest.raises(ValueError, match=match):
        models.set_runtime(**kwargs)
    assert models.runtime() == ("cpu", "float16")  # a rejected call changes nothing


def test_set_runtime_accepts_every_documented_value():
    for device in (None, "cpu", "cuda", "cuda:1", "mps", "auto"):
        for dtype in (None, "float32", "float16", "bfloat16"):
            assert models.set_runtime(device, dtype) == models.runtime() == (device, dtype)
    assert models.set_runtime() == (None, None)
    assert models.runtime().device is None and models.runtime().dtype is None


def test_using_runtime_restores_the_previous_setting_even_after_an_error():
    models.set_runtime("cpu", "float16")
    with models.using_runtime("auto", "bfloat16") as inside:
        assert inside == models.runtime() == ("auto", "bfloat16")
        with models.using_runtime(None, None):
            assert models.runtime() == (None, None)
        assert models.runtime() == ("auto", "bfloat16")
    assert models.runtime() == ("cpu", "float16")
    with pytest.raises(RuntimeError, match="boom"):
        with models.using_runtime(dtype="bfloat16"):
            raise RuntimeError("boom")
    assert models.runtime() == ("cpu", "float16")
    with pytest.raises(ValueError, match="dtype must be"):
        with models.using_runtime(dtype="half"):
            pass
    assert models.runtime() == ("cpu", "float16")


# ---------------------------------------------------------------------------------------------------- loading
def test_load_follows_the_runtime_dtype_and_its_own_arguments_win(tiny_checkpoint):
    assert dtypes(models.load(tiny_checkpoint)[0]) == {torch.float32}  # the default, as before
    with models.using_runtime(dtype="bfloat16"):
        model, _ = models.load(tiny_checkpoint)
        assert dtypes(model) == {torch.bfloat16} and not model.training
        assert dtypes(models.load(tiny_checkpoint, dtype="float32")[0]) == {torch.float32}
    with models.using_runtime(dtype="float16"):
        assert dtypes(models.load(tiny_checkpoint)[0]) == {torch.float16}
    with pytest.raises(ValueError, match="dtype must be"):
        models.load(tiny_checkpoint, dtype="int8")


def test_auto_device_is_cuda_only_where_there_is_one(tiny_checkpoint):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert models.resolve_device("auto") == expected and models.resolve_device(None) is None
    with models.using_runtime(device="auto"):
        model, _ = models.load(tiny_checkpoint)
    assert next(model.parameters()).device.type == expected
    if not torch.cuda.is_available():
        with models.using_runtime(device="cuda"):
            with pytest.raises(models.ModelError, match="device 'cuda': torch sees no CUDA GPU.*'auto' or 'cpu'"):
                models.load(tiny_checkpoint)


# ---------------------------------------------------------------------------------------------------- cache keys
def test_identity_is_unchanged_by_the_default_runtime_and_records_another_dtype(tiny_checkpoint):
    before = {"kind": "local", "fingerprint": models.checkpoint_fingerprint(Path(tiny_checkpoint))}  # as before
    assert cache.canonical_json(models.identity(tiny_checkpoint)) == cache.canonical_json(before)
    with models.using_runtime("auto", "float32"):  # float32 is a checkpoint folder's default; devices never count
        assert models.identity(tiny_checkpoint) == before
    with models.using_runtime("cpu", "bfloat16"):
        bf16 = models.identity(tiny_checkpoint)
    assert bf16 == {**before, "dtype": "bfloat16"}
    assert cache.key("answers", {"model": bf16}) != cache.key("answers", {"model": before})
    # A hub id loads in its stored dtype by default ("auto"), so any dtype set is recorded (no network needed).
    with models.using_runtime(dtype="float32"):
        assert models.identity("owner/some-model") == {"kind": "hub", "id": "owner/some-model", "dtype": "float32"}
    assert models.identity("owner/some-model") == {"kind": "hub", "id": "owner/some-model"}


def test_answers_are_cached_per_dtype_and_the_default_entry_is_shared_with_float32(tiny_checkpoint, cset,
                                                                                    monkeypatch):
    one = cset.select(["Paris"])
    kw = dict(max_new_tokens=4, include_unrelated=False, progress=False)
    f32 = pipeline.answers(tiny_checkpoint, one, **kw)
    generated = []
    real = prompts.generate_answers

    def spy(model, *a, **k):
        generated.append(dtypes(model))
        return real(model, *a, **k)

    monkeypatch.setattr(prompts, "generate_answers", spy)
    with models.using_runtime(dtype="float32"):
        again = pipeline.answers(tiny_checkpoint, one, **kw)
    assert generated == []  # float32 = the default: same key, read from the cache
    with models.using_runtime(dtype="bfloat16"):
        bf16 = pipeline.answers(tiny_checkpoint, one, **kw)
    assert generated == [{torch.bfloat16}]  # a new entry, generated by a bfloat16 model
    assert again.answer_ids.map(list).tolist() == f32.answer_ids.map(list).tolist()
    assert list(bf16.question) == list(f32.question) and (bf16.n_answer_tokens > 0).all()


# ---------------------------------------------------------------------------------------------------- end to end
def test_bfloat16_runs_unlearning_a_sweep_and_relearning_end_to_end(tiny_checkpoint, cset):
    # only the MLPs change, so restoring them all gives the vanilla model; trained on text, scored on every question
    settings = {**FAST, "params": "mlp", "forget_data": "text"}
    with models.using_runtime("auto", "bfloat16"):
        u = pipeline.unlearned(tiny_checkpoint, cset, "Paris", "grad_diff", progress=False, **settings)
        assert u.identity()["model"] == models.identity(tiny_checkpoint) and \
            u.identity()["model"]["dtype"] == "bfloat16"
        assert json.loads((u.folder / "delta.json").read_text())["dtype"] == "bfloat16"
        model, tok = u.load()
        vanilla, _ = models.load(tiny_checkpoint)
        assert dtypes(model) == dtypes(vanilla) == {torch.bfloat16}
        changed = {n for (n, p), q in zip(model.named_parameters(), vanilla.parameters()) if not torch.equal(p, q)}
        assert changed and all(".mlp." in n for n in changed)  # the stored bfloat16 delta was applied

        sweep = pipeline.sweep(tiny_checkpoint, u, cset, "Paris", experiments=["coef", "mlp"], layers=[0, 1, 2, 3],
                               progress=False)
        change = pipeline.coef_change(tiny_checkpoint, u, cset, "Paris", progress=False)
        relearned = pipeline.relearn(tiny_checkpoint, cset, "Paris", "grad_diff", steps=(0, 1), data="partial",
                                     settings=settings, progress=False)
        ppl, n = metrics.perplexity(model, tok, [TEXTS["Paris"]])

    # The tables come back as plain CPU float64 numbers, as in float32.
    assert sweep.krs.dtype == np.float64 and sweep.loss_unpatched.gt(0).all() and sweep.krs.notna().all()
    assert set(sweep.experiment) == {"coef", "mlp"} and len(sweep) == 2 * len(QUESTIONS["Paris"])
    # every changed parameter restored from the vanilla model: the vanilla output, exactly
    assert (sweep[sweep.experiment == "mlp"].krs == 1.0).all()
    assert set(change.quantity) == {"coef", "attn", "value", "key", "mlp", "layer"}
    assert (change[change.quantity == "mlp"].rel_change > 0).all()
    assert (change[change.quantity == "layer"].norm_diff == change[change.quantity == "mlp"].norm_diff.values).all()
    assert list(relearned.step.unique()) == [0, 1] and relearned.value.notna().all()
    assert np.isfinite(ppl) and n > 0

    # The handle loads in the dtype it was trained in, whatever the runtime says now (its delta fits no other).
    assert dtypes(u.load()[0]) == {torch.bfloat16}
    # Under the default runtime the same request is another model (another key): trained afresh in float32.
    u32 = pipeline.unlearned(tiny_checkpoint, cset, "Paris", "grad_diff", progress=False, **settings)
    assert u32.folder != u.folder and dtypes(u32.load()[0]) == {torch.float32}
    assert "dtype" not in u32.identity()["model"]


def test_bfloat16_patching_uses_the_padded_layout_without_a_warning_and_agrees_with_float32():
    from conftest import make_tiny_llama

    from dissect_unlearning import patching

    vanilla, tok = make_tiny_llama()
    other, _ = make_tiny_llama(seed=1)
    with torch.no_grad():  # an "unlearned" model: the vanilla one with its top two layers replaced
        for name, p in other.named_parameters():
            if not name.startswith(("model.layers.2.", "model.layers.3.")):
                p.copy_(dict(vanilla.named_parameters())[name])
    questions = ["who wrote harry potter?", "what is the capital of france?", "where is vienna?"]
    p = [prompts.encode_prompt(q, tok, "chat") for q in questions]
    a = [tok("paris is the capital of france")["input_ids"] + [tok.eos_token_id]] * 3
    exps = ["attn", "coef+attn"]
    ref = patching.run(vanilla, other, tok, p, a, exps, window=3)
    vanilla.to(torch.bfloat16), other.to(torch.bfloat16)  # in place
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "the packed layout changes the logits" fallback warning
        low = patching.run(vanilla, other, tok, p, a, exps, window=3)
        padded = patching.run(vanilla, other, tok, p, a, exps, window=3, layout="padded")
    np.testing.assert_array_equal(low.krs.to_numpy(), padded.krs.to_numpy())  # "auto" = padded in 16-bit
    np.testing.assert_allclose(low.krs.to_numpy(), ref.krs.to_numpy(), atol=0.05)  # and close to float32
    with pytest.raises(ValueError, match="vanilla model's parameters are bfloat16 but the unlearned model's float32"):
        patching.run(vanilla, other.float(), tok, p, a, ["attn"], window=3)


# ---------------------------------------------------------------------------------------------------- process state
def test_state_holds_the_process_state_and_reset_clears_all_three_pieces():
    from conftest import make_tiny_llama

    from dissect_unlearning import state
    from dissect_unlearning.unlearning import artefact, storage

    models.set_runtime("cpu", "bfloat16")
    assert state.STATE.runtime == models.runtime() == ("cpu", "bfloat16")
    model, _ = make_tiny_llama()
    _, bits, _ = storage._bits(model)
    storage._vanilla_order(bits, None)  # what save_delta / apply_delta remember of a base model
    assert state.STATE.vanilla["sha256"] == storage.sha256(bits)
    state.STATE.vanilla["order"] = sentinel = np.arange(3)
    assert storage._vanilla_order(bits, None) is sentinel  # storage reads its memo from the state too
    with artefact.keep_loaded():
        assert state.STATE.kept == {}
        state.STATE.kept["a model"] = "kept"
        state.reset()
        assert state.STATE.kept is None  # nothing kept, even inside the block
        assert models.runtime() == (None, None) and state.STATE.vanilla == {}
    assert state.STATE.kept is None
    assert state.reset() is state.STATE  # reset changes the one object in place: references stay current
