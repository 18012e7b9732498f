"""The dissection engine: windows, scored positions, scores, and the patching/restoration experiments.

Unit tests run on tiny random models (llama, gpt2, gemma3 built from configs); one integration test on the real
default model. The paper-style hooked implementation in benchmarks/paper_baseline.py is the independent oracle.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dissect_unlearning import cli, concepts, models, patching, pipeline, prompts
from dissect_unlearning.patching import batch as batch_mod, change as change_mod, engine

QUESTIONS = ["who wrote harry potter?", "what is the capital of france?", "where is vienna?",
             "who is the brother of mario in the red and green?"]
ANSWERS = ["the author of harry potter is j", "paris is the capital of france", "vienna is in austria .",
           "luigi is the brother of mario"]
# Every experiment that patches a question's own activations (the paper-style hooks know no other)
ALL = [name for name, e in patching.EXPERIMENTS.items() if e.source == "same"]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread: on this 2-core machine shared with other work, two threads spin against each other and a
    forward pass takes ~10x longer (measured: this file's integration test 7 s with one thread, 89 s with two)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _baseline():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_baseline.py"
    spec = importlib.util.spec_from_file_location("paper_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def qa(tok, fmt="chat", n=4):
    """Prompt and answer token ids of the test questions (answers end with EOS, as generated ones do)."""
    p = [prompts.encode_prompt(q, tok, fmt) for q in QUESTIONS[:n]]
    a = [tok(x, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for x in ANSWERS[:n]]
    return p, a


def perturbed(model, layers=None, skip=(), scale=0.5, seed=1):
    """A copy of `model` whose decoder-layer parameters in `layers` (all if None) get noise, except names containing
    any string in `skip`."""
    arch = models.architecture_of(model)
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if not name.startswith(arch.layers + "."):
                continue
            layer = int(name[len(arch.layers) + 1:].split(".")[0])
            if (layers is None or layer in layers) and not any(s in name for s in skip):
                p.add_(torch.randn(p.shape, generator=g) * (float(p.std()) if p.numel() > 1 and p.std() > 0 else 0.1)
                       * scale)
    return other.eval()


def tiny(family="llama", n_layers=4, seed=0):
    from conftest import make_tiny_llama, make_tiny_tokenizer

    if family == "llama":
        return make_tiny_llama(n_layers=n_layers, seed=seed)
    tok = make_tiny_tokenizer()
    torch.manual_seed(seed)
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=n_layers, n_head=4, n_positions=256,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return GPT2LMHeadModel(config).eval(), tok
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                              sliding_window=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id)
    return Gemma3ForCausalLM(config).eval(), tok


def krs_of(df, experiment, center=None):
    rows = df[df.experiment == experiment]
    if center is not None:
        rows = rows[rows.center_layer == center]
    return rows.sort_values("question_index").krs.to_numpy()


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, saved) -> bool:
    return all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------------------------------------------
# Windows
# ----------------------------------------------------------------------------------------------------------------------
def test_windows_are_centred_on_every_layer_and_clipped():
    got = [w.layers for w in patching.centred(6, 5)]
    assert got == [(0, 1, 2), (0, 1, 2, 3), (0, 1, 2, 3, 4), (1, 2, 3, 4, 5), (2, 3, 4, 5), (3, 4, 5)]
    assert [w.center for w in patching.centred(6, 5)] == list(range(6))
    assert [w.layers for w in patching.centred(4, 1)] == [(0,), (1,), (2,), (3,)]
    assert patching.centred(6, 4)[2].layers == (1, 2, 3, 4)  # even size: one more above


def test_an_explicit_window_and_bad_window_arguments():
    assert patching.windows(30, layers=[29]) == [patching.Window(29, (29,))]
    assert patching.windows(30, layers=-1) == [patching.Window(29, (29,))]
    assert patching.explicit(30, [27, 29, 28, 28]).layers == (27, 28, 29)
    with pytest.raises(ValueError, match="layer 30 does not exist; the model has 30 layers"):
        patching.windows(30, layers=[30])
    with pytest.raises(ValueError, match="window size must be a positive integer"):
        patching.windows(30, size=0)
    with pytest.raises(ValueError, match="empty"):
        patching.windows(30, layers=[])
    several = patching.windows(30, layers=[[0, 1], [-1], list(range(30))])
    assert [w.layers for w in several] == [(0, 1), (29,), tuple(range(30))] and several[1].center == 29


# ----------------------------------------------------------------------------------------------------------------------
# Scored positions and layouts
# ----------------------------------------------------------------------------------------------------------------------
def test_answer_alignment_scores_the_positions_that_predict_the_answer_tokens(tiny_tokenizer):
    p, a = qa(tiny_tokenizer)
    for layout in ("padded", "packed"):
        inp = patching.scoring_inputs(p, a, tiny_tokenizer, "answer", layout)
        ids = inp.model_inputs["input_ids"]
        assert inp.layout == layout
        for q, s in enumerate(inp.spans):
            # the token after each scored position is the answer, token by token
            nxt = ids[inp.rows[s], inp.cols[s] + 1].tolist()
            assert nxt == a[q]
            assert inp.positions[q] == list(range(len(p[q]) - 1, len(p[q]) + len(a[q]) - 1))


def test_packed_rows_share_the_prompt_prefix_and_compute_what_each_question_computes_alone(tiny_llama):
    model, tok = tiny_llama
    p, a = qa(tok)
    padded = patching.scoring_inputs(p, a, tok, "answer", "padded")
    for capacity in (512, 40):  # one row; or several rows, right padded
        packed = batch_mod.scoring_inputs(p, a, tok, "answer", "packed", capacity=capacity)
        n_rows = packed.model_inputs["input_ids"].shape[0]
        assert (n_rows == 1) == (capacity == 512)
        assert packed.model_inputs["input_ids"].numel() < padded.model_inputs["input_ids"].numel()
        with torch.no_grad():
            want = model(**padded.model_inputs).logits[padded.rows, padded.cols]
            got = model(**packed.model_inputs).logits[packed.rows, packed.cols]
        assert torch.isfinite(model(**packed.model_inputs).logits).all()  # padding rows attend to themselves
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the chat template's system part is the shared prefix, stored once per row
    prefix = 0
    while all(x[prefix] == p[0][prefix] for x in p):
        prefix += 1
    single = patching.scoring_inputs(p, a, tok, "answer", "packed")
    assert single.model_inputs["input_ids"].shape[1] == prefix + sum(len(x) + len(y) - prefix for x, y in zip(p, a))


def test_paper_alignment_reproduces_the_released_codes_rule_on_a_hand_built_example(tiny_tokenizer):
    tok = tiny_tokenizer
    eos = tok.eos_token_id
    p = [[5, 6, 7], [8]]
    a = [[10, 11, eos], [12, 13, 14]]  # the first answer stopped with EOS, the second ran to max_new_tokens
    # non-EOS answer tokens minus the EOS padding each prompt got in the generation batch (width 3)
    assert patching.paper_counts(p, a, eos) == [2 - 0, 3 - 2]
    inp = patching.scoring_inputs(p, a, tok, "paper")
    ids = inp.model_inputs["input_ids"]
    pad = tok.pad_token_id
    assert ids.tolist() == [[5, 6, 7, 10, 11], [pad, 8, 12, 13, 14]]  # EOS dropped, as decoding dropped it
    assert inp.rows.tolist() == [0, 0, 1] and inp.cols.tolist() == [3, 4, 4]  # the last n logits of each row
    assert inp.positions == [[3, 4], [3]]
    # by contrast the default alignment scores the positions that predict each answer token, EOS included
    ans = patching.scoring_inputs(p, a, tok, "answer", "padded")
    assert ans.positions == [[2, 3, 4], [0, 1, 2]]
    # an EOS inside the prompt counts too, and n <= 0 slices like Python does (logits[-0:] is the whole row)
    assert patching.paper_counts([[5, eos, 7], [8]], a, eos) == [1, 1]
    with pytest.warns(UserWarning, match="quirk"):
        quirk = patching.scoring_inputs([[5, 6, 7, 9], [8]], [[10, eos], [12]], tok, "paper")
    assert patching.paper_counts([[5, 6, 7, 9], [8]], [[10, eos], [12]], eos) == [1, -2]
    assert quirk.cols[quirk.spans[1]].tolist() == [2, 3, 4]  # range(5)[2:]: includes a padding column
    assert quirk.positions[1] == [-1, 0, 1]
    with pytest.raises(ValueError, match="needs layout='padded'"):
        patching.scoring_inputs(p, a, tok, "paper", "packed")
    with pytest.raises(ValueError, match="unknown alignment 'last'"):
        patching.scoring_inputs(p, a, tok, "last")
    with pytest.raises(ValueError, match="question 1: the vanilla answer has no tokens"):
        patching.scoring_inputs(p, [[10], []], tok)


# ----------------------------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------------------------
def test_scores_by_hand():
    ref = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    new = torch.tensor([[0.0, 1.0, 4.0], [0.0, 3.0, 0.0]])
    assert patching.mse(ref, new) == pytest.approx((4 + 9 + 9) / 6)
    assert patching.top1_agree(ref, new) == 0.5
    p = torch.softmax(ref.double(), -1)
    want = float((p * (torch.log_softmax(ref.double(), -1) - torch.log_softmax(new.double(), -1))).sum(-1).mean())
    assert patching.kl(ref, new) == pytest.approx(want, rel=1e-12)
    assert patching.kl(ref, ref) == pytest.approx(0, abs=1e-12)
    assert patching.krs(0.25, 1.0) == 0.75 and patching.krs(2.0, 1.0) == -1.0 and math.isnan(patching.krs(0.0, 0.0))


def test_the_fast_scorer_agrees_with_the_plain_functions():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(12, 500, generator=g) * 3
    spans = [slice(0, 5), slice(5, 12)]
    fast = patching.Reference(ref, spans)
    for scale in (1e-3, 0.1, 3.0, 100.0):  # 100: logit differences beyond exp's float32 range
        new = ref + torch.randn(12, 500, generator=g) * scale
        for got, s in zip(fast.per_question(new), spans):
            assert got["loss"] == pytest.approx(patching.mse(ref[s], new[s]), rel=1e-5)
            assert got["kl"] == pytest.approx(patching.kl(ref[s], new[s]), rel=1e-3, abs=1e-9)
            assert got["top1_agree"] == patching.top1_agree(ref[s], new[s])


def test_aggregate_gives_mean_spread_and_a_seeded_bootstrap_interval():
    df = pd.DataFrame({"experiment": ["coef"] * 6, "center_layer": [0] * 6, "concept": list("aaabbb"),
                       "krs": [0.1, 0.2, 0.3, 0.5, 0.7, float("nan")]})
    out = patching.aggregate(df)
    row = out.iloc[0]
    assert row["n"] == 5 and row["mean"] == pytest.approx(0.36) and row["std"] == pytest.approx(np.std(
        [0.1, 0.2, 0.3, 0.5, 0.7], ddof=1))
    assert row["ci_low"] < row["mean"] < row["ci_high"]
    assert patching.aggregate(df).equals(out)  # seeded
    by_concept = patching.aggregate(df, unit="concept").iloc[0]  # concept means first: 0.2 and 0.6
    assert by_concept["n"] == 2 and by_concept["mean"] == pytest.approx(0.4)
    with pytest.raises(KeyError, match="no column"):
        patching.aggregate(df, by="method")


# ----------------------------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:alignment='paper'")  # the quirk warning (short answers, long prompts)
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_the_engine_gives_the_paper_style_hooks_krs(family):
    vanilla, tok = tiny(family)
    unlearned = perturbed(vanilla)
    p, a = qa(tok)
    base = _baseline()
    for alignment, window in (("answer", 3), ("paper", 5)):
        inputs = patching.scoring_inputs(p, a, tok, alignment, "padded")
        want, _ = base.paper_sweep(vanilla, unlearned, inputs, ALL, window)
        got = patching.run(vanilla, unlearned, tok, p, a, ALL, window=window, alignment=alignment)
        assert len(got) == len(ALL) * 4 * len(p)
        for exp in ALL:
            for centre, krs in want[exp].items():
                np.testing.assert_allclose(krs_of(got, exp, centre), krs, atol=1e-5, rtol=0)
        assert got.krs.notna().all() and (got.krs.abs() > 1e-4).any()


def _coef_by_hand(model, ids, window, replace=None):
    """(logits [T, V], {layer: coefficients [T, d_ff]}) of `model` on one unpadded sequence, with the coefficients of
    `window`'s layers replaced by `replace[layer]` when given: plain forward hooks, no engine code."""
    blocks = model.model.layers
    seen, hooks = {}, []
    for i, block in enumerate(blocks):
        def pre(module, args, i=i):
            seen[i] = args[0][0].detach().clone()
            if replace is not None and i in window:
                return (replace[i][None],)
        hooks.append(block.mlp.down_proj.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
    finally:
        for h in hooks:
            h.remove()
    return logits, seen


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_the_other_question_control_patches_the_matching_positions_of_another_question(layout):
    """coef_other: question q gets the vanilla coefficients of question q+1 at the positions matched part by part
    (shared prefix: its own; rest of the prompt: aligned at its end; answer: aligned at its start, the last token
    standing in past the end). Checked against plain hooks on each question alone."""
    vanilla, tok = tiny()
    unlearned = perturbed(vanilla)
    p, a = qa(tok, n=3)
    window = (1, 2, 3)
    got = patching.run(vanilla, unlearned, tok, p, a, ["coef", "coef_other"], layers=list(window), layout=layout)
    shared = 0
    while all(x[shared] == p[0][shared] for x in p):
        shared += 1
    for q in range(3):
        o = (q + 1) % 3
        seq_q, seq_o = p[q] + a[q], p[o] + a[o]
        ref, _ = _coef_by_hand(vanilla, seq_q, window)
        _, theirs = _coef_by_hand(vanilla, seq_o, window)
        source = [t if t < shared else max(shared, len(p[o]) - (len(p[q]) - t)) if t < len(p[q])
                  else min(len(p[o]) + t - len(p[q]), len(seq_o) - 1) for t in range(len(seq_q))]
        moved = {i: theirs[i][source] for i in window}
        scored = slice(len(p[q]) - 1, len(seq_q) - 1)
        patched, _ = _coef_by_hand(unlearned, seq_q, window, moved)
        plain, _ = _coef_by_hand(unlearned, seq_q, window)
        krs = 1 - patching.mse(ref[scored], patched[scored]) / patching.mse(ref[scored], plain[scored])
        np.testing.assert_allclose(krs_of(got, "coef_other")[q], krs, atol=1e-4)
    # its own coefficients in every changed layer... differ from another question's: the control is not the patch
    assert np.abs(krs_of(got, "coef_other") - krs_of(got, "coef")).max() > 1e-3


def test_the_other_question_control_of_identical_questions_is_the_patch_itself():
    vanilla, tok = tiny()
    unlearned = perturbed(vanilla)
    p, a = qa(tok, n=1)
    got = patching.run(vanilla, unlearned, tok, p * 2, a * 2, ["coef", "coef_other"], window=3)
    np.testing.assert_allclose(got[got.experiment == "coef_other"].krs, got[got.experiment == "coef"].krs, atol=1e-5)
    with pytest.raises(ValueError, match="at least two questions"):
        patching.run(vanilla, unlearned, tok, p, a, ["coef_other"], window=3)
    with pytest.raises(ValueError, match="needs sites and no parameter set"):
        patching.register_experiment(patching.Experiment("bad", "x", "#000000", parameters="value", source="other"))
    assert "bad" not in patching.EXPERIMENTS


def test_restoring_everything_that_changed_gives_krs_1():
    vanilla, tok = tiny()
    p, a = qa(tok)
    every = list(range(4))
    # Attention and MLP inputs changed, the MLP output projection (value vectors) not: patching every layer's
    # coefficients and attention states brings the vanilla output back exactly, restoring value vectors does nothing.
    unlearned = perturbed(vanilla, skip=("down_proj",))
    df = patching.run(vanilla, unlearned, tok, p, a, ["coef+attn", "value", "coef"], layers=every)
    np.testing.assert_allclose(krs_of(df, "coef+attn"), 1.0, atol=1e-5)
    np.testing.assert_allclose(krs_of(df, "value"), 0.0, atol=1e-6)
    assert (krs_of(df, "coef") < 1 - 1e-3).all()
    assert (df[df.experiment == "coef+attn"].top1_agree == 1).all()
    np.testing.assert_allclose(df[df.experiment == "coef+attn"].kl, 0.0, atol=1e-6)
    # Every parameter changed: restoring every parameter of every layer gives KRS 1.
    df = patching.run(vanilla, perturbed(vanilla), tok, p, a, ["layer"], layers=every)
    np.testing.assert_allclose(krs_of(df, "layer"), 1.0, atol=1e-5)


def test_a_metric_callable_takes_the_place_of_the_loss():
    vanilla, tok = tiny()
    unlearned = perturbed(vanilla)
    p, a = qa(tok)
    kw = dict(experiments=["coef", "value"], window=3)
    mse = patching.run(vanilla, unlearned, tok, p, a, **kw)
    assert patching.run(vanilla, unlearned, tok, p, a, metric=patching.mse, **kw).equals(mse)  # the default
    doubled = patching.run(vanilla, unlearned, tok, p, a, metric=lambda ref, x: 2 * patching.mse(ref, x), **kw)
    assert list(doubled.columns) == patching.ENGINE_COLUMNS
    np.testing.assert_allclose(doubled.loss_patched, 2 * mse.loss_patched, rtol=1e-5)
    np.testing.assert_allclose(doubled.krs, mse.krs, atol=1e-5)
    by_kl = patching.run(vanilla, unlearned, tok, p, a, metric=patching.kl, **kw)
    np.testing.assert_allclose(by_kl.loss_patched, by_kl.kl, rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(by_kl.krs, 1 - by_kl.kl / by_kl.kl_unpatched, rtol=1e-3, atol=1e-6)
    with pytest.raises(TypeError, match="metric must be a callable"):
        patching.run(vanilla, unlearned, tok, p, a, metric="kl", **kw)


def test_patching_a_model_with_itself_gives_loss_0(tiny_llama):
    model, tok = tiny_llama
    p, a = qa(tok)
    df = patching.run(model, model, tok, p, a, ALL, window=3)
    assert (df.loss_patched == 0).all() and (df.loss_unpatched == 0).all() and df.krs.isna().all()
    assert (df.top1_agree == 1).all()


def test_windows_outside_the_only_changed_layer_give_krs_0():
    vanilla, tok = tiny()
    p, a = qa(tok)
    unlearned = perturbed(vanilla, layers={3})
    df = patching.run(vanilla, unlearned, tok, p, a, ALL, window=1)
    for exp in ALL:
        for centre in (0, 1, 2):  # below the change: identical activations, identical parameters
            np.testing.assert_allclose(krs_of(df, exp, centre), 0.0, atol=1e-6)
        assert np.abs(krs_of(df, exp, 3)).max() > 1e-3  # the window on the change does something
    np.testing.assert_allclose(krs_of(df, "layer", 3), 1.0, atol=1e-5)
    # parameter restoration above the change touches identical parameters: nothing happens there either
    unlearned = perturbed(vanilla, layers={0})
    df = patching.run(vanilla, unlearned, tok, p, a, ["value", "key", "mlp", "layer"], window=1)
    for exp in ("value", "key", "mlp", "layer"):
        for centre in (1, 2, 3):
            np.testing.assert_allclose(krs_of(df, exp, centre), 0.0, atol=1e-6)


def test_reverse_direction_restores_the_unlearned_window_in_the_vanilla_model():
    vanilla, tok = tiny()
    unlearned = perturbed(vanilla)
    p, a = qa(tok)
    rev = patching.run(vanilla, unlearned, tok, p, a, ALL, window=3, direction="reverse")
    fwd_swapped = patching.run(unlearned, vanilla, tok, p, a, ALL, window=3)
    assert (rev.direction == "reverse").all()
    cols = ["loss_patched", "loss_unpatched", "krs", "kl", "top1_agree"]
    np.testing.assert_allclose(rev[cols].to_numpy(), fwd_swapped[cols].to_numpy(), atol=1e-7)
    fwd = patching.run(vanilla, unlearned, tok, p, a, ["coef"], window=3)
    assert not np.allclose(krs_of(fwd, "coef"), krs_of(rev, "coef"))


def test_parameter_restoration_leaves_both_models_bit_identical_even_after_an_error(monkeypatch):
    vanilla, tok = tiny()
    unlearned = perturbed(vanilla)
    p, a = qa(tok)
    before_u, before_v = state(unlearned), state(vanilla)
    patching.run(vanilla, unlearned, tok, p, a, ["value", "key", "mlp", "layer"], window=3)
    patching.run(vanilla, unlearned, tok, p, a, ["layer"], window=3, direction="reverse")
    assert same_state(unlearned, before_u) and same_state(vanilla, before_v)

    calls = []
    real = engine._patched_logits

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom in the middle of a restored window")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_patched_logits", failing)
    with pytest.raises(RuntimeError, match="boom"):
        patching.run(vanilla, unlearned, tok, p, a, ["mlp"], window=3)
    assert len(calls) == 3 and same_state(unlearned, before_u) and same_state(vanilla, before_v)


def test_restored_parameters_checks_before_copying_and_undoes_on_error():
    vanilla, _ = tiny()
    unlearned = perturbed(vanilla)
    before = state(unlearned)
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    with pytest.raises(ValueError, match="inside"):
        with patching.restored_parameters(unlearned, vanilla, names):
            restored = unlearned.model.layers[0].mlp.down_proj.weight
            assert torch.equal(restored, vanilla.model.layers[0].mlp.down_proj.weight)
            raise ValueError("inside")
    assert same_state(unlearned, before)
    with pytest.raises(KeyError, match="is missing from the target model"):
        with patching.restored_parameters(unlearned, vanilla, names + ["model.layers.9.mlp.down_proj.weight"]):
            pass
    assert same_state(unlearned, before)


def test_remote_local_gives_the_local_result():
    vanilla, tok = tiny()
    unlearned = perturbed(vanilla)
    p, a = qa(tok, n=2)
    kw = dict(experiments=["coef+attn", "value"], layers=[2, 3])
    local = patching.run(vanilla, unlearned, tok, p, a, remote=False, **kw)
    simulated = patching.run(vanilla, unlearned, tok, p, a, remote="local", **kw)
    pd.testing.assert_frame_equal(local, simulated)


@pytest.fixture
def no_ndif_key(monkeypatch):
    from nnsight import CONFIG

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)


def test_remote_without_an_api_key_fails_before_any_work(no_ndif_key, capsys):
    with pytest.raises(patching.RemoteUnavailableError, match="NDIF_API_KEY"):
        patching.check_remote(True, patching.experiments.get(["coef"]))
    with pytest.raises(patching.RemoteUnavailableError, match="NDIF_API_KEY"):
        pipeline.sweep("no-such-model", "no-such-checkpoint", concepts="no-such-file.json", experiments=["attn"],
                       remote=True)
    assert cli.main(["sweep", "--vanilla", "no-such-model", "--unlearned", "x", "--remote", "ndif",
                     "--experiments", "coef", "--out", "never.parquet"]) == 2
    assert "NDIF_API_KEY" in capsys.readouterr().err
    with pytest.raises(ValueError, match="restore parameters"):
        patching.check_remote(True, patching.experiments.get(["value"]))
    with pytest.raises(ValueError, match="remote must be False, True"):
        patching.check_remote("ndif")


def test_remote_true_with_a_model_made_here_is_refused_before_any_work(no_ndif_key, tiny_llama, monkeypatch):
    """NDIF names a model by its name_or_path, which an unlearned model shares with its vanilla model: remote=True
    would run the hosted vanilla weights as the 'unlearned' model, so it is refused, whatever the key."""
    import copy

    model, tok = tiny_llama
    p, a = qa(tok, n=1)
    changed = copy.deepcopy(model)
    for fn in (lambda: patching.run(model, changed, tok, p, a, ["coef"], remote=True),
               lambda: change_mod.change(model, changed, tok, p, a, remote=True)):
        with pytest.raises(patching.RemoteLocalModelError, match="vanilla model with itself"):
            fn()
    monkeypatch.setenv("NDIF_API_KEY", "not-a-real-key")  # a key changes nothing
    loads = []
    monkeypatch.setattr(pipeline.models, "load", lambda *a, **k: loads.append(a) or (model, tok))
    for unlearned in ("smollm2-135m", str(Path(__file__).parent), (changed, tok)):
        with pytest.raises(patching.RemoteLocalModelError, match="remote='local'"):
            pipeline.sweep("no-such-hub/model", unlearned, concepts="no-such-file.json", experiments=["coef"],
                           remote=True, progress=False) if not isinstance(unlearned, tuple) else \
                pipeline.coef_change("no-such-hub/model", unlearned, concepts="no-such-file.json", remote=True,
                                     progress=False)
    assert loads == []  # nothing loaded, nothing computed
    # remote='local' and False are unaffected: the pair check lets them through
    patching.check_remote_pair(model, changed, "local")
    patching.check_remote_pair(model, changed, False)


def test_bad_arguments_are_named(tiny_llama):
    model, tok = tiny_llama
    p, a = qa(tok, n=1)
    with pytest.raises(ValueError, match="unknown experiment.*'coefs'"):
        patching.run(model, model, tok, p, a, ["coefs"])
    with pytest.raises(ValueError, match="unknown direction 'backward'"):
        patching.run(model, model, tok, p, a, direction="backward")
    other, _ = tiny(n_layers=3)
    with pytest.raises(ValueError, match="differ in parameter names or shapes"):
        patching.run(model, other, tok, p, a)


# ----------------------------------------------------------------------------------------------------------------------
# Pipeline and command line
# ----------------------------------------------------------------------------------------------------------------------
RECORD = {"Concept": "Harry Potter", "Layer": 1, "Dim": 3, "QA": QUESTIONS[:3], "text_completion": [],
          "unrelated_QA": QUESTIONS[3:], "wikipedia_content": "harry potter is a wizard at hogwarts school ."}


@pytest.fixture(scope="module")
def pair_checkpoints(tmp_path_factory):
    from conftest import make_tiny_llama

    vanilla, tok = make_tiny_llama()
    folder = tmp_path_factory.mktemp("pair")
    for name, model in (("vanilla", vanilla), ("unlearned", perturbed(vanilla, layers={2, 3}))):
        model.save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
    return str(folder / "vanilla"), str(folder / "unlearned")


def test_sweep_writes_a_tidy_cached_table(pair_checkpoints, monkeypatch):
    van, unl = pair_checkpoints
    cset = concepts.parse([RECORD])
    df = pipeline.sweep(van, unl, cset, experiments=["coef", "value"], window=3, questions=2, progress=False)
    assert list(df.columns) == patching.SWEEP_COLUMNS
    assert len(df) == 2 * 4 * 2
    assert set(df.experiment) == {"coef", "value"} and sorted(set(df.center_layer)) == [0, 1, 2, 3]
    row = df.iloc[0]
    assert row.vanilla_model == van and row.unlearned_model == unl and row.concept == "Harry Potter"
    assert row.kind == "target" and row.question == QUESTIONS[row.question_index]
    assert row.text.endswith(row.answer.split()[-1]) or row.answer == ""
    assert json.loads(row.settings)["window"] == 3 and row.nnsight_version and row.torch_version
    assert df.krs.notna().all()
    # below the changed layers 2-3 nothing is restored
    assert np.allclose(df[(df.experiment == "value") & (df.center_layer == 0)].krs, 0, atol=1e-6)

    def refuse(*args, **kwargs):
        raise AssertionError("the sweep should come from the cache")

    monkeypatch.setattr(patching, "run", refuse)
    again = pipeline.sweep(van, unl, cset, experiments=["coef", "value"], window=3, questions=2, progress=False)
    pd.testing.assert_frame_equal(df, again)


def test_sweep_accepts_a_handle_or_a_loaded_pair(pair_checkpoints):
    van, unl = pair_checkpoints
    cset = concepts.parse([RECORD])

    class Handle:
        method, concept = "grad_diff", "Harry Potter"

        def load(self):
            return models.load(unl)

        def identity(self):
            return {"test-handle": models.identity(unl)}

    kw = dict(experiments=["attn"], layers=[3], questions=2, kind="unrelated", progress=False)
    by_name = pipeline.sweep(van, unl, cset, **kw)
    by_handle = pipeline.sweep(van, Handle(), cset, **kw)
    by_pair = pipeline.sweep(van, models.load(unl), cset, **kw)
    assert by_handle.unlearned_model.iloc[0] == "Harry Potter/grad_diff"
    assert by_pair.unlearned_model.iloc[0].endswith("(in memory)")
    for other in (by_handle, by_pair):
        np.testing.assert_allclose(other.krs, by_name.krs, atol=1e-7)
    assert (by_name.kind == "unrelated").all() and list(by_name.question) == QUESTIONS[3:] * 1
    with pytest.raises(ValueError, match="unlearned: expected"):
        pipeline.sweep(van, 3, cset, **kw)


def test_coef_change_is_zero_below_the_changed_layers(pair_checkpoints):
    van, unl = pair_checkpoints
    df = pipeline.coef_change(van, unl, concepts.parse([RECORD]), questions=2, progress=False)
    assert set(df.quantity) == {"coef", "attn", "value", "key", "mlp", "layer"} and len(df) == 4 * 6
    low, high = df[df.layer < 2], df[df.layer >= 2]
    assert (low.rel_change == 0).all() and (high.rel_change > 0).all()
    assert (df.norm_vanilla > 0).all()


def test_cli_sweep(pair_checkpoints, tmp_path, capsys):
    van, unl = pair_checkpoints
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps([RECORD]))
    out = tmp_path / "results.parquet"
    code = cli.main(["sweep", "--vanilla", van, "--unlearned", unl, "--concepts", str(path), "--concept",
                     "Harry Potter", "--experiments", "coef,attn", "--layers", "3", "--questions", "2",
                     "--alignment", "paper", "--prompt-format", "paper", "--reverse", "--remote", "local",
                     "--out", str(out)])
    assert code == 0
    df = pd.read_parquet(out)
    assert list(df.columns) == patching.SWEEP_COLUMNS and len(df) == 2 * 2
    assert (df.direction == "reverse").all() and (df.alignment == "paper").all() and (df.remote == "local").all()
    assert list(df.layers.iloc[0]) == [3] and (df.prompt_format == "paper").all()
    assert "coef" in capsys.readouterr().out
    assert cli.main(["sweep", "--vanilla", van, "--unlearned", unl, "--concepts", str(path), "--experiments",
                     "bogus", "--out", str(out)]) == 2


# ----------------------------------------------------------------------------------------------------------------------
# The real default model
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_engine_matches_the_paper_style_hooks(default_model):
    vanilla, tok = default_model
    # A quick "unlearned" model: noise on the last 10 layers, value vectors (down_proj) left alone.
    unlearned = perturbed(vanilla, layers=set(range(20, 30)), skip=("down_proj",), scale=0.05)
    p = [prompts.encode_prompt(q, tok, "chat") for q in ("What is the capital of France?", "Who wrote Harry Potter?")]
    a = [tok(" The capital of France is Paris.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
         tok(" J.K. Rowling wrote Harry Potter.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    centres = [27]
    inputs = patching.scoring_inputs(p, a, tok, "answer", "padded")
    want, _ = _baseline().paper_sweep(vanilla, unlearned, inputs, patching.PAPER_EXPERIMENTS, 5, centres=centres)
    before = state(unlearned)
    windows = [list(patching.centred(30, 5)[c].layers) for c in centres] + [list(range(30))]
    got = patching.run(vanilla, unlearned, tok, p, a, layers=windows)
    for exp in patching.PAPER_EXPERIMENTS:
        for centre, layers in zip(centres, windows):
            mine = got[got.layers.map(tuple) == tuple(layers)]
            np.testing.assert_allclose(krs_of(mine, exp), want[exp][centre], atol=1e-4)
    assert same_state(unlearned, before)
    assert (got.krs.abs() > 1e-3).any()
    # value vectors were left alone, so restoring them recovers nothing; the rest of every layer is patched away
    np.testing.assert_allclose(krs_of(got, "value"), 0.0, atol=1e-6)
    everything = got[got.layers.map(len) == 30]
    np.testing.assert_allclose(krs_of(everything, "coef+attn"), 1.0, atol=1e-5)


def test_a_model_that_ignores_the_packed_mask_falls_back_to_the_padded_layout(monkeypatch):
    vanilla, tok = tiny()
    unlearned = perturbed(vanilla)
    p, a = qa(tok)
    want = patching.run(vanilla, unlearned, tok, p, a, ["coef", "value"], window=3, layout="padded")
    real = batch_mod._packed

    def broken_mask(*args, **kwargs):  # what a model that ignores the 4D mask would see: attention across questions
        inp = real(*args, **kwargs)
        mask = inp.model_inputs["attention_mask"]
        width = mask.shape[-1]
        causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
        inp.model_inputs["attention_mask"] = causal[None, None].expand_as(mask).clone()
        return inp

    monkeypatch.setattr(batch_mod, "_packed", broken_mask)
    with pytest.warns(UserWarning, match="padded layout is used"):
        got = patching.run(vanilla, unlearned, tok, p, a, ["coef", "value"], window=3)
    cols = ["loss_patched", "loss_unpatched", "krs", "kl", "top1_agree"]
    np.testing.assert_allclose(got[cols].to_numpy(), want[cols].to_numpy(), atol=1e-7)
