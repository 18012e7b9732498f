"""Unlearning: losses, data, trainer, lossless storage, the cached pipeline stage and the CLI."""
from __future__ import annotations

import json
import math
import threading

import pytest
import torch
import torch.nn.functional as F

from dissect_unlearning import cache, concepts, pipeline
from dissect_unlearning.unlearning import (METHODS, UnlearnConfig, data as udata, grad_ascent, grad_diff, methods,
                                           npo, storage, trainer)
from dissect_unlearning.unlearning.logprobs import sequence_logprobs

TEXTS = {
    "Harry Potter": "harry potter is a wizard . the author of harry potter is rowling . harry potter went to the school "
                    "hogwarts . his friend is ron and his enemy is voldemort . " * 3,
    "Paris": "paris is the capital city of france . the eiffel tower is in paris . paris is on the seine . " * 3,
    "Super Mario": "mario is a plumber . his brother is luigi . mario was made by nintendo . " * 3,
    "Star Wars": "star wars has the jedi . luke is a jedi . the ring is not in star wars . " * 3,
}


def records(names=tuple(TEXTS), dup=False):
    recs = []
    for i, name in enumerate(names):
        recs.append({"Concept": name, "Layer": 1, "Dim": i, "QA": [f"who is {name}?", f"what is {name}?"],
                     "QA_answers": [[name], [name]],
                     "text_completion": [{"First_half": f"{name} is", "Second_half": "a thing"}],
                     "unrelated_QA": ["what is the capital of france?"], "wikipedia_content": TEXTS[name]})
    if dup:  # the same concept stored at a second location
        recs.append({**recs[0], "Dim": 99})
    return recs


@pytest.fixture
def cset():
    return concepts.parse(records(), "test")


def tiny_data(tok, cset, method="grad_diff", n_questions=2, **kw):
    cfg = UnlearnConfig.for_method(method, **{"chunk_tokens": 8, "batch_size": 2, "steps": 3, **kw})
    forget = cset.get("Harry Potter")
    qa = [(f"question {i}", tok(f"question {i}")["input_ids"], tok(" harry potter is a wizard")["input_ids"])
          for i in range(n_questions)]
    # The retain concept's questions: the second is one of the forget concept's unrelated questions (held out).
    retain_qa = [("who is paris?", tok("who is paris ?")["input_ids"], tok("paris is a city")["input_ids"]),
                 ("what is the capital of france?", tok("what is the capital of france ?")["input_ids"],
                  tok("paris")["input_ids"])]
    return cfg, udata.build(tok, forget, cset.get("Paris"), cfg, qa=qa, retain_qa=retain_qa)


def batch_of(data, parts, index, pad_id):
    return trainer.make_batch(data, parts, index, pad_id)


# ---------------------------------------------------------------------------------------------------- losses
def hand_nll(model, part):
    """Mean per-token NLL over the labelled tokens, computed the long way."""
    logits = model(input_ids=part.input_ids, attention_mask=part.attention_mask).logits
    total, count = 0.0, 0
    for b in range(part.input_ids.shape[0]):
        for t in range(1, part.input_ids.shape[1]):
            if part.labels[b, t] != -100:
                total += -torch.log_softmax(logits[b, t - 1], -1)[part.labels[b, t]].item()
                count += 1
    return total / count


def test_grad_ascent_and_grad_diff_values_match_a_hand_computation(tiny_llama, cset):
    model, tok = tiny_llama
    cfg, data = tiny_data(tok, cset)
    batch = batch_of(data, ("forget", "retain"), [0, len(data.forget) - 1], tok.pad_token_id)
    f, r = hand_nll(model, batch["forget"]), hand_nll(model, batch["retain"])
    assert grad_ascent.loss(model, batch).loss.item() == pytest.approx(-f, rel=1e-5)
    assert grad_diff.loss(model, batch, retain_weight=1.5).loss.item() == pytest.approx(-f + 1.5 * r, rel=1e-5)
    assert grad_diff.loss(model, batch, retain_weight=0.0).loss.item() == pytest.approx(-f, rel=1e-5)


def test_npo_and_dpo_at_the_reference_equal_2_over_beta_log_2(tiny_llama, cset):
    """With the model equal to its reference the log-ratio is 0: loss = (2/beta) * log 2, for any beta."""
    model, tok = tiny_llama
    for method in ("npo", "dpo"):
        mod = methods.get(method)
        cfg, data = tiny_data(tok, cset, method)
        idx = [0, 1]
        ref = trainer.reference_logprobs(model, data, mod.reference, set(idx), tok.pad_token_id, 2)
        batch = batch_of(data, mod.parts, idx, tok.pad_token_id)
        for beta in (0.1, 0.5):
            out = mod.loss(model, batch, {k: v[idx] for k, v in ref.items()}, beta=beta)
            assert out.loss.item() == pytest.approx(2 / beta * math.log(2), rel=1e-4), (method, beta)


def test_npo_matches_its_formula_off_the_reference(tiny_llama, cset):
    model, tok = tiny_llama
    _, data = tiny_data(tok, cset, "npo")
    batch = batch_of(data, methods.get("npo").parts, [0, 1], tok.pad_token_id)
    logp, _ = sequence_logprobs(model, batch["forget"])
    ref = logp.detach() + torch.tensor([1.0, -2.0])  # pretend the reference was more / less likely
    nll_theta, nll_ref = -logp.detach(), -ref
    expected = (2 / 0.1) * -F.logsigmoid(0.1 * (nll_theta - nll_ref)).mean()
    assert npo.loss(model, batch, {"forget": ref}, beta=0.1).loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_a_step_on_each_loss_lowers_it_and_raises_the_forget_nll(tiny_llama, cset, method):
    model, tok = tiny_llama
    mod = methods.get(method)
    _, data = tiny_data(tok, cset, method)
    idx = list(range(len(data.forget)))
    ref = trainer.reference_logprobs(model, data, mod.reference, set(idx), tok.pad_token_id, 4)
    ref = {k: v[idx] for k, v in ref.items()}
    batch = batch_of(data, mod.parts, idx, tok.pad_token_id)
    hyper = {"retain_weight": 0.0} if "retain_weight" in mod.settings else {}
    before = mod.loss(model, batch, ref, **hyper)
    nll_before = before.forget_nll.item()
    before.loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad
    after = mod.loss(model, batch, ref, **hyper)
    assert after.loss.item() < before.loss.item()
    if mod.text == "unrelated":  # the control learns its (unrelated) text
        assert after.forget_nll.item() < nll_before
    else:  # every unlearning method makes the forget answers less likely
        assert after.forget_nll.item() > nll_before


# ---------------------------------------------------------------------------------------------------- data
def test_retain_concept_is_never_the_forget_concept():
    cset = concepts.parse(records(dup=True), "test")
    chosen = set()
    for forget in cset:
        for seed in range(40):
            r = udata.choose_retain(cset, forget, seed)
            assert r.name != forget.name
            chosen.add(r.name)
    assert chosen == set(TEXTS)  # the seed spreads the choice over all the others
    assert udata.choose_retain(cset, cset[0], 3) == udata.choose_retain(cset, cset[0], 3)
    with pytest.raises(ValueError, match="retain_concept"):
        udata.choose_retain(cset, cset[0], 0, name="Harry Potter#4")  # same name, other location
    lonely = concepts.parse(records(names=("Paris",)), "one")
    with pytest.raises(ValueError, match="no concept other than"):
        udata.choose_retain(lonely, lonely[0], 0)


def test_forget_set_is_text_chunks_plus_answers_and_retain_is_repeated_to_its_length(tiny_llama, cset):
    _, tok = tiny_llama
    chunks = udata.text_chunks(tok, TEXTS["Harry Potter"], 8)
    cfg, text = tiny_data(tok, cset, forget_data="text")  # the paper's forget data: the text alone
    assert [e.source for e in text.forget] == [f"text:{i}" for i in range(len(chunks))]
    cfg, data = tiny_data(tok, cset)  # the default: the text and the first half of the questions
    assert cfg.forget_data == "text+qa"
    # of the two questions only the first is trained on: the other is the one the book scores
    assert [e.source for e in data.forget] == [f"text:{i}" for i in range(len(chunks))] + ["qa:0"]
    assert all(len(e.input_ids) <= 8 for e in data.forget[:len(chunks)])
    qa = data.forget[-1]
    n_answer = len(tok(" harry potter is a wizard")["input_ids"])
    assert sum(label != udata.IGNORE for label in qa.labels) == n_answer  # loss on the answer only
    assert len(data.retain) == len(data.forget) and data.retain_concept == "Paris"
    # Text is paired with text, questions with the retain concept's questions - never a held-out unrelated one.
    n_text = len(chunks)
    assert all(e.source.startswith("text:") for e in data.retain[:n_text])
    assert [e.input_ids for e in data.retain[n_text:]] == [tuple(tok("who is paris ?")["input_ids"]
                                                                 + tok("paris is a city")["input_ids"])]
    retain_ids = [t for e in data.retain[:n_text] for t in e.input_ids]
    assert set(retain_ids) <= set(tok(TEXTS["Paris"])["input_ids"])
    _, text_only = tiny_data(tok, cset, retain_qa=False, forget_data="text")
    assert all(e.source.startswith("text:") for e in text_only.retain)
    _, idk = tiny_data(tok, cset, "idk_dpo")
    assert [e.source for e in idk.forget] == ["qa:0"]
    assert idk.chosen[0].input_ids[:len(tok("question 0")["input_ids"])] == idk.forget[0].input_ids[:len(tok("question 0")["input_ids"])]
    refusal = tok("I don't know.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert [t for t, lab in zip(idk.chosen[0].input_ids, idk.chosen[0].labels) if lab != -100] == refusal
    with pytest.raises(ValueError, match="at least 2 questions"):
        tiny_data(tok, cset, forget_data="qa", n_questions=1)


def test_old_records_map_onto_forget_data():
    base = UnlearnConfig().to_dict()
    base.pop("forget_data")
    for text, qa, want in ((True, True, "text+qa"), (True, False, "text"), (False, True, "qa")):
        assert UnlearnConfig.from_dict({**base, "forget_text": text, "forget_qa": qa}).forget_data == want


def test_collate_right_pads_and_sequence_logprobs_sum_the_labelled_tokens(tiny_llama):
    model, tok = tiny_llama
    examples = [udata.text_example([5, 6, 7, 8], "text:0"), udata.qa_example([9, 10], [11, 12, 13], 16, "qa:0"),
                udata.text_example([14, 15], "text:1")]
    part = udata.collate(examples, [4, 7, 9], pad_id=tok.pad_token_id)
    pad = tok.pad_token_id
    assert part.input_ids.tolist() == [[5, 6, 7, 8, pad], [9, 10, 11, 12, 13], [14, 15, pad, pad, pad]]
    assert part.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    ig = udata.IGNORE
    assert part.labels.tolist() == [[5, 6, 7, 8, ig], [ig, ig, 11, 12, 13], [14, 15, ig, ig, ig]]
    assert part.index.tolist() == [4, 7, 9]
    with torch.no_grad():
        logp, n = sequence_logprobs(model, part)
        alone = [torch.log_softmax(model(torch.tensor([e.input_ids])).logits[0, :-1], -1) for e in examples]
    by_hand = [sum(lp[t - 1, label].item() for t, label in enumerate(e.labels) if t and label != ig)
               for lp, e in zip(alone, examples)]
    assert n.tolist() == [3, 3, 1]  # the first token of a sequence is predicted by nothing
    assert logp.tolist() == pytest.approx(by_hand, rel=1e-5)


@pytest.mark.parametrize("bad, field", [
    ({"lr": -1.0}, "lr"), ({"steps": 0}, "steps"), ({"batch_size": 0}, "batch_size"),
    ({"params": "attention"}, "params"), ({"chunk_tokens": 512, "max_length": 256}, "chunk_tokens"),
    ({"beta": 0}, "beta"), ({"retain_weight": -1}, "retain_weight"), ({"steps": 3, "epochs": 2}, "epochs"),
    ({"warmup_steps": -1}, "warmup_steps"), ({"forget_data": "questions"}, "forget_data"),
    ({"prompt_format": "xml"}, "prompt_format"), ({"colour": "red"}, "colour"),
])
def test_config_errors_name_the_parameter(bad, field):
    with pytest.raises(ValueError, match=field):
        UnlearnConfig.for_method("grad_diff", **bad)


def test_config_method_rules_and_json_round_trip():
    with pytest.raises(ValueError, match="method"):
        UnlearnConfig.for_method("forget_everything")
    with pytest.raises(ValueError, match="retain_weight"):
        UnlearnConfig.for_method("grad_ascent", retain_weight=1.0)
    with pytest.raises(ValueError, match="forget_data must be 'qa' for idk_dpo"):
        UnlearnConfig.for_method("idk_dpo", forget_data="text+qa")
    cfg = UnlearnConfig.for_method("npo", lr=3e-5, epochs=2)
    assert cfg.steps is None and cfg.n_steps(10) == math.ceil(2 * 10 / cfg.batch_size)
    assert UnlearnConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(dataclasses_frozen_error()):
        cfg.lr = 1.0


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


# ---------------------------------------------------------------------------------------------------- trainer
def trained(seed=0, method="grad_diff", params="all", steps=4):
    from conftest import make_tiny_llama

    model, tok = make_tiny_llama()
    cset = concepts.parse(records(), "test")
    cfg, data = tiny_data(tok, cset, method, seed=seed, params=params, steps=steps, lr=1e-3)
    return model, tok, trainer.train(model, tok, data, cfg, progress=False)


def test_same_seed_gives_identical_weights_and_another_seed_does_not():
    a, _, ra = trained(seed=0)
    b, _, rb = trained(seed=0)
    c, _, _ = trained(seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert ra.loss_curve[-1]["loss"] == rb.loss_curve[-1]["loss"]
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_trainer_records_the_curve_and_trains_only_the_chosen_parameters():
    from conftest import make_tiny_llama

    vanilla, _ = make_tiny_llama()
    model, _, result = trained(params="last_k:1", steps=3)
    assert [r["step"] for r in result.loss_curve] == [1, 2, 3]
    assert result.loss_curve[0]["lr"] < result.loss_curve[-1]["lr"]  # linear warm-up
    assert result.loss_curve[-1]["forget_loss"] > result.loss_curve[0]["forget_loss"]
    assert not model.training and all(p.requires_grad for p in model.parameters())
    for (name, p), q in zip(model.named_parameters(), vanilla.parameters()):
        assert torch.equal(p, q) == (".layers.3." not in name), name
    mlp = {n for n, _ in trainer.trainable_parameters(model, "mlp")}
    assert mlp and all(".mlp." in n for n in mlp)


def test_periodic_checkpoints_wait_for_their_time_and_bad_settings_are_named(tmp_path, monkeypatch):
    from conftest import make_tiny_llama

    written = []
    monkeypatch.setattr(trainer, "write_checkpoint", lambda folder, state: written.append(state["step"]))

    def run():
        written.clear()
        model, tok = make_tiny_llama()
        cfg, data = tiny_data(tok, concepts.parse(records(), "test"), steps=5, lr=1e-3)
        trainer.train(model, tok, data, cfg, progress=False, checkpoint=tmp_path / "ck")
        return list(written)

    monkeypatch.delenv(trainer.CHECKPOINT_SECONDS_ENV, raising=False)
    assert trainer.checkpoint_seconds() == trainer.CHECKPOINT_SECONDS > 0
    assert run() == []  # a run shorter than CHECKPOINT_SECONDS is not worth a checkpoint
    monkeypatch.setenv(trainer.CHECKPOINT_SECONDS_ENV, "0")
    assert run() == [2, 4]  # every CHECKPOINT_EVERY steps, never after the last one
    monkeypatch.setenv(trainer.CHECKPOINT_SECONDS_ENV, "soon")
    with pytest.raises(ValueError, match=f"{trainer.CHECKPOINT_SECONDS_ENV} must be a number of seconds >= 0, "
                                         f"got 'soon'"):
        run()


def test_no_step_holds_the_last_steps_gradients_through_its_forward_pass(monkeypatch):
    """The gradients are freed as soon as the optimiser has used them: a forward pass that held them would need a
    model's size more memory at its peak (1 GB for Gemma 3 270M)."""
    from conftest import make_tiny_llama

    from dissect_unlearning.unlearning import methods

    model, tok = make_tiny_llama()
    cfg, data = tiny_data(tok, concepts.parse(records(), "test"), steps=3, lr=1e-3)
    method = methods.get(cfg.method)
    held = []
    real = method.loss

    def spying(m, *args, **kwargs):
        held.append(sum(p.grad is not None for p in m.parameters()))
        return real(m, *args, **kwargs)

    import dataclasses

    spied = dataclasses.replace(method, loss=spying)
    monkeypatch.setattr(methods, "get", lambda name: spied)
    result = trainer.train(model, tok, data, cfg, progress=False)
    assert len(held) == 3 and held == [0, 0, 0], held
    assert result.loss_curve[-1]["forget_loss"] > result.loss_curve[0]["forget_loss"]  # and it still unlearns


def test_a_tokenizer_is_loaded_once_per_process_and_again_when_its_files_change(tiny_checkpoint):
    import os
    from pathlib import Path

    from dissect_unlearning import models

    first = models.load_tokenizer(str(tiny_checkpoint))
    assert models.load_tokenizer(str(tiny_checkpoint)) is first
    config = Path(tiny_checkpoint) / "tokenizer_config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    again = models.load_tokenizer(str(tiny_checkpoint))
    assert again is not first and again.padding_side == "left" and again.pad_token is not None


# ---------------------------------------------------------------------------------------------------- storage
@pytest.mark.parametrize("encoding, order", [("zigzag", True), ("zigzag", False), ("xor", True)])
def test_delta_storage_is_bit_exact_and_logits_are_unchanged(tmp_path, encoding, order):
    from conftest import make_tiny_llama

    model, tok, _ = trained()
    vanilla, _ = make_tiny_llama()
    with torch.no_grad():  # a weight that changes sign, and a subnormal: wrap-around must stay exact
        next(model.parameters()).view(-1)[0] = -next(vanilla.parameters()).view(-1)[0]
        next(model.parameters()).view(-1)[1] = 1e-42
    manifest = storage.save_delta(model, vanilla, tmp_path, encoding=encoding, order=order)
    assert manifest["encoding"] == encoding and (manifest["order"] == "none") != order
    restored, _ = make_tiny_llama()
    storage.apply_delta(restored, tmp_path)
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), restored.parameters()))
    ids = tok("harry potter is a wizard", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, restored(ids).logits)
    other, _ = make_tiny_llama(seed=1)
    with pytest.raises(ValueError, match="base model"):
        storage.apply_delta(other, tmp_path)


def test_repeated_loads_reuse_the_vanilla_order_but_still_refuse_another_base(tmp_path, monkeypatch):
    from conftest import make_tiny_llama

    model, _, _ = trained()
    vanilla, _ = make_tiny_llama()
    storage.save_delta(model, vanilla, tmp_path)
    calls = []
    real = storage._exponent_order
    monkeypatch.setattr(storage, "_exponent_order", lambda v: calls.append(1) or real(v))
    for _ in range(3):  # the base model is loaded fresh each time, as Unlearned.load() does
        restored, _ = make_tiny_llama()
        storage.apply_delta(restored, tmp_path)
        assert all(torch.equal(x, y) for x, y in zip(model.parameters(), restored.parameters()))
    assert len(calls) == 0  # save_delta computed it for this very base model
    other, _ = make_tiny_llama(seed=1)  # another base: the remembered order must not be used for it
    with pytest.raises(ValueError, match="base model"):
        storage.apply_delta(other, tmp_path)
    nearly, _ = make_tiny_llama()
    with torch.no_grad():
        next(nearly.parameters()).view(-1)[5] += 1.0  # one weight differs: the copy comparison catches it
    with pytest.raises(ValueError, match="base model"):
        storage.apply_delta(nearly, tmp_path)


# ---------------------------------------------------------------------------------------------------- pipeline
@pytest.fixture
def concept_file(tmp_path):
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps(records()))
    return str(path)


FAST = dict(steps=2, batch_size=2, chunk_tokens=8, max_new_tokens=4)


def test_unlearned_is_cached_and_exports_a_loadable_checkpoint(tiny_checkpoint, concept_file, tmp_path, monkeypatch):
    calls = []
    real_train = trainer.train
    monkeypatch.setattr(trainer, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    u = pipeline.unlearned(tiny_checkpoint, concept_file, "Paris", "npo", progress=False, **FAST)
    again = pipeline.unlearned(tiny_checkpoint, concept_file, "Paris", "npo", progress=False, **FAST)
    assert calls == [1] and again.folder == u.folder
    assert u.method == u.label == "npo" and u.concept == "Paris" and u.retain_concept != "Paris"
    assert list(u.loss_curve.columns[:5]) == ["step", "forget_loss", "retain_loss", "loss", "lr"]
    assert len(u.loss_curve) == 2 and u.settings["steps"] == 2 and u.train_seconds > 0
    assert u.identity()["method"] == "npo" and u.size_bytes > 0
    model, tok = u.load()
    assert not model.training

    from transformers import AutoModelForCausalLM

    out = u.export(tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("paris is the capital", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids).logits, atol=1e-5)
    assert json.loads((out / "unlearning.json").read_text())["settings"]["method"] == "npo"
    other = pipeline.unlearned(tiny_checkpoint, concept_file, "Paris", "npo", progress=False, **{**FAST, "seed": 1})
    assert other.folder != u.folder


def test_keep_loaded_rebuilds_once_and_hands_out_independent_copies(tiny_checkpoint, concept_file, monkeypatch):
    from dissect_unlearning.unlearning import artefact

    u = pipeline.unlearned(tiny_checkpoint, concept_file, "Paris", "grad_diff", progress=False, **FAST)
    fresh, _ = u.load()
    rebuilds = []
    real = storage.apply_delta
    monkeypatch.setattr(storage, "apply_delta", lambda *a, **k: rebuilds.append(1) or real(*a, **k))
    with artefact.keep_loaded():
        first, _ = u.load()
        with torch.no_grad():
            for p in first.parameters():
                p.add_(1.0)  # what restoration or relearning might do to a loaded model
        second, _ = u.load()
        assert rebuilds == [1] and second is not first and not second.training
        assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), second.parameters()))
    u.load()
    assert rebuilds == [1, 1]  # outside the block nothing is kept


def test_a_model_trained_inside_keep_loaded_is_kept_and_equals_its_rebuild(tiny_checkpoint, concept_file,
                                                                           monkeypatch):
    """The stages after training start from the trained model itself (no rebuild), which is bit for bit the model
    its stored delta rebuilds; shared=True hands out the kept model itself, a plain load a copy."""
    from dissect_unlearning.unlearning import artefact

    rebuilds = []
    real = storage.apply_delta
    monkeypatch.setattr(storage, "apply_delta", lambda *a, **k: rebuilds.append(1) or real(*a, **k))
    with artefact.keep_loaded():
        u = pipeline.unlearned(tiny_checkpoint, concept_file, "Star Wars", "grad_diff", progress=False, **FAST)
        kept, _ = u.load(shared=True)
        again, _ = u.load(shared=True)
        copy_, _ = u.load()
        assert rebuilds == [] and kept is again and copy_ is not kept and not kept.training
    rebuilt, _ = u.load()
    assert rebuilds == [1]
    assert all(torch.equal(a, b) for a, b in zip(kept.parameters(), rebuilt.parameters()))
    assert all(a.requires_grad for a in kept.parameters())


def test_an_interrupted_run_leaves_no_entry(tiny_checkpoint, concept_file, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.unlearned(tiny_checkpoint, concept_file, "Super Mario", "grad_ascent", progress=False, **FAST)
    root = cache.cache_root() / "unlearned"
    assert not [p for p in root.iterdir() if not p.name.endswith(".lock")
                and json.loads((p / "inputs.json").read_text())["inputs"]["method"] == "grad_ascent"] \
        if root.exists() else True
    assert not list(root.glob(".tmp~*")) if root.exists() else True  # no temporary folder left behind


def test_two_callers_at_once_train_once(tiny_checkpoint, concept_file, monkeypatch):
    calls = []
    real_train = trainer.train
    monkeypatch.setattr(trainer, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    folders = []

    def ask():
        folders.append(pipeline.unlearned(tiny_checkpoint, concept_file, "Star Wars", "dpo", progress=False,
                                          **FAST).folder)

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(folders) == 2 and folders[0] == folders[1]


def test_behaviour_table_is_tidy_and_scores_are_consistent(tiny_checkpoint, concept_file):
    df = pipeline.behaviour(tiny_checkpoint, concept_file, select=["Paris"], methods=("grad_diff",),
                            settings=FAST, progress=False)
    assert list(df.columns) == pipeline.BEHAVIOUR_COLUMNS
    assert set(df.stage) == {"vanilla", "unlearned"}
    assert {"target", "unrelated", "completion", "forget_text", "heldout_text"} <= set(df.split)
    assert not df.duplicated(["concept", "method", "stage", "split", "metric"]).any()
    van = df[df.stage == "vanilla"].set_index(["split", "metric"]).value
    # The vanilla answers scored against themselves: ROUGE-L is 1 exactly (BLEU is below 1 for short answers).
    assert van["target", "rougeL"] == pytest.approx(1.0)
    assert df[df.metric == "perplexity"].value.gt(1).all()
    again = pipeline.behaviour(tiny_checkpoint, concept_file, select=["Paris"], methods=("grad_diff",),
                               settings=FAST, progress=False)
    assert again.equals(df)


# ---------------------------------------------------------------------------------------------------- integration
@pytest.mark.slow
def test_cli_unlearn_writes_a_checkpoint_that_reloads_with_the_same_logits(default_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from dissect_unlearning import cli, models

    out = tmp_path / "hp-unlearned"
    rc = cli.main(["unlearn", "--model", models.DEFAULT_MODEL, "--concept", "Harry Potter", "--method", "grad_diff",
                   "--steps", "2", "--batch-size", "1", "--chunk-tokens", "64", "--set", "forget_data=text",
                   "--set", "retain_qa=false", "--quiet", "--out", str(out)])  # text only: no answers to generate
    assert rc == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "unlearning.json"):
        assert (out / name).is_file(), name
    record = json.loads((out / "unlearning.json").read_text())
    assert record["settings"]["steps"] == 2 and len(record["loss_curve"]) == 2 and record["versions"]["torch"]
    u = pipeline.unlearned(models.DEFAULT_MODEL, "builtin", "Harry Potter", "grad_diff", progress=False,
                           steps=2, batch_size=1, chunk_tokens=64, forget_data="text", retain_qa=False)  # cached
    assert u.train_seconds == record["train_seconds"]  # the very run the CLI made, not a second one
    assert u.size_bytes < 300e6
    mine, tok = u.load()
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    vanilla = default_model[0]
    ids = tok("Who wrote the Harry Potter books?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b, v = mine(ids).logits, hf(ids).logits, vanilla(ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, v, atol=1e-5)  # it did change


# ---------------------------------------------------------------------------------------------------- relearning
def test_relearn_table_starts_at_the_unlearned_model(tiny_checkpoint, concept_file):
    from dissect_unlearning import metrics, prompts

    df = pipeline.relearn(tiny_checkpoint, concept_file, "Paris", "grad_diff", steps=(0, 2), data="partial",
                          lr=1e-3, batch_size=1, progress=False, settings=FAST)
    assert list(df.columns) == pipeline.RELEARN_COLUMNS
    assert sorted(df.step.unique()) == [0, 2] and set(df.metric) == {"rougeL", "accuracy"}
    assert (df[df.metric == "rougeL"].n == 1).all()  # 'partial' scores the half of the questions not shown
    # Step 0 is the unlearned model itself, scored on question 1 against the vanilla answer.
    u = pipeline.unlearned(tiny_checkpoint, concept_file, "Paris", "grad_diff", progress=False, **FAST)
    model, tok = u.load()
    van = pipeline.answers(tiny_checkpoint, concepts.load(concept_file).select(["Paris"]), prompt_format="chat",
                           max_new_tokens=4, include_unrelated=False, progress=False)
    mine = prompts.generate_answers(model, tok, [van.question.iloc[1]], "chat", 30)[0].answer_text
    step0 = df[(df.step == 0) & (df.metric == "rougeL")].value.item()
    assert step0 == pytest.approx(metrics.rouge_l(mine, van.answer_text.iloc[1]))
    with pytest.raises(ValueError, match="relearning data"):
        pipeline.relearn(tiny_checkpoint, concept_file, "Paris", "grad_diff", steps=(0,), data="everything",
                         progress=False, settings=FAST)


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_behaviour_writes_the_table_and_bad_settings_name_the_parameter(tiny_checkpoint, concept_file, tmp_path,
                                                                             capsys):
    import pandas as pd

    from dissect_unlearning import cli

    out = tmp_path / "table.parquet"
    args = ["--model", tiny_checkpoint, "--concepts", concept_file, "--steps", "2", "--batch-size", "2",
            "--chunk-tokens", "8", "--set", "max_new_tokens=4", "--quiet"]
    assert cli.main(["behaviour", "--concept", "Paris", "--method", "grad_diff", *args, "--out", str(out)]) == 0
    df = pd.read_parquet(out)
    assert set(df.stage) == {"vanilla", "unlearned"} and set(df.method) == {"grad_diff"}
    assert "rougeL" in capsys.readouterr().out
    assert cli.main(["unlearn", "--concept", "Paris", "--method", "npo", *args, "--lr", "-3"]) == 2
    assert "lr must be" in capsys.readouterr().err
    assert cli.main(["unlearn", "--concept", "Atlantis", *args]) == 2
    assert "Atlantis" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- memory savers
def test_recomputed_activations_train_the_same_weights_bit_for_bit(monkeypatch):
    """Gradient checkpointing saves memory only: a run with it and a run without end with identical weights."""
    import contextlib

    with_it, _, r1 = trained(seed=0, steps=3)
    monkeypatch.setattr(trainer, "recomputed_activations", lambda model: contextlib.nullcontext())
    without, _, r2 = trained(seed=0, steps=3)
    assert all(torch.equal(x, y) for x, y in zip(with_it.parameters(), without.parameters()))
    assert [r["loss"] for r in r1.loss_curve] == [r["loss"] for r in r2.loss_curve]
    assert not with_it.is_activation_checkpointing and with_it.config.use_cache  # switched back off afterwards


def test_relearning_with_or_without_recomputed_activations_ends_with_the_same_weights():
    """relearn(recompute=...) changes the cost only: the weights of three steps are bit for bit the same."""
    import copy

    from conftest import make_tiny_llama
    from dissect_unlearning.unlearning import data as data_mod, relearn as relearn_mod

    model, tok = make_tiny_llama()
    g = torch.Generator().manual_seed(0)
    train = [data_mod.text_example(torch.randint(6, len(tok), (12,), generator=g).tolist(), f"text:{i}")
             for i in range(6)]
    ends = []
    for recompute in (True, False):
        m = copy.deepcopy(model)
        rows = relearn_mod.relearn(m, tok, train, [1, 3], lambda m, k: [{"k": k}], batch_size=2, lr=1e-3,
                                   progress=False, recompute=recompute)
        assert rows == [{"step": 1, "k": 1}, {"step": 3, "k": 3}] and not m.training
        ends.append(m)
    assert all(torch.equal(x, y) for x, y in zip(ends[0].parameters(), ends[1].parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(model.parameters(), ends[1].parameters()))  # it trained


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_chunked_log_probs_equal_the_plain_ones_and_their_gradients_agree(monkeypatch, family):
    """Above the logit budget the LM head runs a few positions at a time: the same log-probs, gradients equal up
    to float rounding (gemma2: the final logit soft-capping is applied in the chunks too)."""
    import transformers as T

    from dissect_unlearning import prompts

    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8)
    model = (T.LlamaForCausalLM(T.LlamaConfig(**common)) if family == "llama" else
             T.Gemma2ForCausalLM(T.Gemma2Config(**common, final_logit_softcapping=3.0)))
    ids = torch.randint(0, 97, (3, 11))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100

    def run():
        model.zero_grad()
        logp = prompts.token_logprobs(model, ids, mask, labels)
        (logp.sum()).backward()
        return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, plain_grads = run()
    monkeypatch.setattr(prompts, "LOGIT_BUDGET", 4 * 3 * 97 * 4)  # 4 positions a piece: 3 pieces
    chunked, chunked_grads = run()
    assert torch.allclose(chunked, plain, atol=1e-6, rtol=0) and (chunked[labels[:, 1:] == -100] == 0).all()
    for n in plain_grads:
        assert torch.allclose(chunked_grads[n], plain_grads[n], atol=1e-6, rtol=1e-5), n
    with torch.no_grad():  # the reference log-probs of NPO / DPO take the same path without a graph
        assert torch.allclose(prompts.token_logprobs(model, ids, mask, labels), plain, atol=1e-6, rtol=0)


def test_unrelated_relearning_text_gives_away_none_of_the_answers():
    """The 'unrelated' text is checked for the target's answers: one that names them is passed over, and what the
    chosen one shares is reported."""
    from dissect_unlearning.unlearning import relearn as relearn_mod

    recs = records()
    recs[1]["wikipedia_content"] += " a fan of harry potter lives in paris . "  # Paris' text names the answer
    cset = concepts.parse(recs, "test")
    hp = cset.get("Harry Potter")
    paris, mario = cset.get("Paris"), cset.get("Super Mario")
    assert relearn_mod.leaks(hp, paris.forget_text)["leaked"] == [0, 1]
    clean = relearn_mod.leaks(hp, mario.forget_text)
    assert clean["leaked"] == [] and 0 <= clean["overlap"] < 1
    chosen, leak = relearn_mod.unrelated_concept(hp, [paris, mario])
    assert chosen is mario and leak == clean
    chosen, leak = relearn_mod.unrelated_concept(hp, [paris])  # none clean: the least leaky, reported
    assert chosen is paris and len(leak["leaked"]) == 2
    with pytest.raises(ValueError, match="neither forgotten nor retained"):
        relearn_mod.unrelated_concept(hp, [])
    # without accepted answers, the vanilla answers' words are compared (no phrase match)
    hp_plain = concepts.parse([{k: v for k, v in r.items() if k != "QA_answers"} for r in records()[:1]],
                              "t").get("Harry Potter")
    # answer words of three letters or more: was, rowling, wizard; the text has one of them
    assert relearn_mod.leaks(hp_plain, "rowling wrote it", ["It was Rowling.", "A wizard"])["overlap"] == 1 / 3


def test_a_model_trained_on_questions_is_scored_only_on_the_others(tiny_checkpoint, concept_file):
    """With questions in the forget data, every table the book reads leaves out the questions the model was trained
    on: sweeps, the change measure, behaviour and relearning score the held-out half only."""
    settings = {**FAST, "forget_data": "text+qa"}
    u = pipeline.unlearned(tiny_checkpoint, concept_file, "Paris", "grad_diff", progress=False, **settings)
    cset = concepts.load(concept_file)
    tok = models_load_tokenizer(tiny_checkpoint)
    retain = cset.get(u.retain_concept)
    van = pipeline.vanilla_qa(tiny_checkpoint, [cset.get("Paris"), retain], u.config.prompt_format,
                              FAST["max_new_tokens"])
    data = udata.build(tok, cset.get("Paris"), retain, u.config, qa=van["Paris"], retain_qa=van[retain.label])
    trained = {int(e.source.split(":")[1]) for e in data.forget if e.source.startswith("qa:")}
    assert trained == {0}
    sweep = pipeline.sweep(tiny_checkpoint, u, concept_file, "Paris", experiments=["coef"], layers=[-1],
                           progress=False)
    assert set(sweep.question_index) == {1}
    behaviour = pipeline.behaviour(tiny_checkpoint, concept_file, ["Paris"], ["grad_diff"], settings=settings,
                                   progress=False)
    target = behaviour[(behaviour.split == "target") & (behaviour.metric == "rougeL")]
    assert set(target.n) == {1}  # one scored question, for the vanilla model too
    relearned = pipeline.relearn(tiny_checkpoint, concept_file, "Paris", "grad_diff", steps=(0,), data="unrelated",
                                 progress=False, settings=settings)
    assert set(relearned[relearned.metric == "rougeL"].n) == {1}
    text_only = pipeline.unlearned(tiny_checkpoint, concept_file, "Paris", "grad_diff", progress=False,
                                   **{**FAST, "forget_data": "text"})
    assert set(pipeline.sweep(tiny_checkpoint, text_only, concept_file, "Paris", experiments=["coef"], layers=[-1],
                              progress=False).question_index) == {0, 1}  # trained on text: every question


def models_load_tokenizer(name):
    from dissect_unlearning import models

    return models.load_tokenizer(name)


# ---------------------------------------------------------------------------------------------------- the control
def test_the_control_loss_is_the_plain_lm_loss_on_its_text_plus_the_retain_term(tiny_llama, cset):
    from dissect_unlearning.unlearning import control

    model, tok = tiny_llama
    cfg, data = tiny_data(tok, cset, "control")
    batch = batch_of(data, ("forget", "retain"), [0, len(data.forget) - 1], tok.pad_token_id)
    f, r = hand_nll(model, batch["forget"]), hand_nll(model, batch["retain"])
    assert control.loss(model, batch, retain_weight=1.5).loss.item() == pytest.approx(f + 1.5 * r, rel=1e-5)
    with pytest.raises(ValueError, match="forget_data must be 'text' for control"):
        UnlearnConfig.for_method("control", forget_data="text+qa")


def test_the_control_learns_an_unrelated_concepts_text_with_the_targets_retain_data(tiny_checkpoint, tmp_path):
    """Same retain concept and settings as the target's unlearning; the forget text is another concept's, one that
    is neither retained nor read as held-out text, and whose text gives away none of the target's answers."""
    extra = {"Zelda": "zelda is a princess . link has a sword . hyrule is a kingdom . " * 3,
             "Tetris": "tetris has falling blocks . a full row is cleared . it came from moscow . " * 3}
    recs = records() + [{**records()[0], "Concept": name, "Dim": 10 + i, "QA": [f"who is {name}?", f"what is {name}?"],
                         "QA_answers": [[name], [name]], "wikipedia_content": text}
                        for i, (name, text) in enumerate(extra.items())]
    recs[-1]["wikipedia_content"] += " harry potter . "  # Tetris' text names the target's answer: passed over
    path = tmp_path / "six.json"
    path.write_text(json.dumps(recs))
    cset6 = concepts.load(str(path))
    ctl = pipeline.unlearned(tiny_checkpoint, str(path), "Harry Potter", "control", progress=False,
                             **{**FAST, "steps": 4, "lr": 1e-3})
    gd = pipeline.unlearned(tiny_checkpoint, str(path), "Harry Potter", "grad_diff", progress=False, **FAST)
    hp = cset6.get("Harry Potter")
    retain = cset6.get(ctl.retain_concept)
    assert ctl.retain_concept == gd.retain_concept and ctl.concept == "Harry Potter"
    held = {h.name for h in pipeline.heldout_concepts(cset6, hp, retain)}
    text_of = {c.content_hash(): c.name for c in cset6}
    chosen = text_of[ctl.identity()["text_concept"]]
    assert chosen not in held | {"Harry Potter", retain.name, "Tetris"}
    assert "text_concept" not in gd.identity()
    # the run trained on that text: its NLL went down, where unlearning's forget NLL goes up
    curve = ctl.loss_curve
    assert curve["forget_loss"].iloc[-1] < curve["forget_loss"].iloc[0]
    with pytest.raises(ValueError, match="control fine-tune of 'Harry Potter'.*no other"):
        four = tmp_path / "four.json"
        four.write_text(json.dumps(records()))
        pipeline.unlearned(tiny_checkpoint, str(four), "Harry Potter", "control", progress=False, **FAST)


# ---------------------------------------------------------------------------------------- never-known control
NEVER_KNOWN = {"Concept": "Atlantis", "Layer": None, "Dim": None, "never_known": True,
               "QA": ["what is the capital of atlantis ?", "who is the author of atlantis ?",
                      "what is the school of atlantis ?", "which city is atlantis ?", "where is the star of atlantis ?",
                      "when was the ring of atlantis ?"],
               "QA_answers": [["red"], ["blue"], ["green", "the green"], ["seven"], ["nine"], ["ten"]],
               "unrelated_QA": [], "text_completion": [], "wikipedia_content": "atlantis is a city . " * 10}


def four_question_concepts(tmp_path) -> str:
    recs = records()
    paris = next(r for r in recs if r["Concept"] == "Paris")
    paris["QA"] = ["what is paris ?", "who is paris ?", "where is paris ?", "which country is paris in ?"]
    paris["QA_answers"] = [["city"], ["city"], ["france"], ["france"]]
    path = tmp_path / "four.json"
    path.write_text(json.dumps(recs))
    return str(path)


def test_the_never_known_control_trains_on_the_first_half_and_scores_the_other(tiny_checkpoint, tmp_path,
                                                                              monkeypatch):
    from dissect_unlearning import metrics, prompts
    from dissect_unlearning.unlearning import relearn as relearn_mod

    target_file = four_question_concepts(tmp_path)
    nk_file = tmp_path / "never.json"
    nk_file.write_text(json.dumps([NEVER_KNOWN]))
    runs = []
    real = relearn_mod.relearn

    def spy(model, tok, train, checkpoints, evaluate, **kw):
        runs.append((tok, train, sorted(checkpoints), kw))
        return real(model, tok, train, checkpoints, evaluate, **kw)

    monkeypatch.setattr(relearn_mod, "relearn", spy)
    common = dict(steps=(0, 2), lr=1e-3, batch_size=1, progress=False, settings=FAST)
    df = pipeline.relearn(tiny_checkpoint, target_file, "Paris", "grad_diff", data="never_known",
                          never_known=str(nk_file), **common)
    assert list(df.columns) == pipeline.RELEARN_COLUMNS
    assert set(df.split) == {"never_known"} and set(df.text_concept) == {"Atlantis"} and set(df.concept) == {"Paris"}
    assert sorted(df.step.unique()) == [0, 2] and set(df.metric) == {"rougeL", "accuracy"}
    # as many questions as the target (4 of the 6): the first half trained on, with the first gold answer and EOS
    assert all(q == [2, 3] for q in df.questions) and (df.n == 2).all()
    (tok, train, checkpoints, kw), = runs
    nk = concepts.never_known(4, nk_file)
    assert [e.source for e in train] == ["qa:0", "qa:1"]
    for e, i in zip(train, (0, 1)):
        prompt = prompts.encode_prompt(nk.questions[i], tok, "chat")
        gold = tok(nk.answers[i][0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert list(e.input_ids) == prompt + gold and list(e.labels) == [udata.IGNORE] * len(prompt) + gold
    for i in (2, 3):  # no scored question is a training sequence
        prompt = prompts.encode_prompt(nk.questions[i], tok, "chat")
        assert not any(list(e.input_ids[:len(prompt)]) == prompt for e in train)
    # step 0 is the unlearned model scored against the gold answers (the best of the accepted ones)
    u = pipeline.unlearned(tiny_checkpoint, target_file, "Paris", "grad_diff", progress=False, **FAST)
    model, _ = u.load()
    texts = [a.answer_text for a in prompts.generate_answers(model, tok, nk.questions[2:4], "chat", 30)]
    step0 = df[(df.step == 0) & (df.metric == "rougeL")].iloc[0]
    assert step0.per_question == pytest.approx([max(metrics.rouge_l(t, a) for a in nk.answers[i])
                                                for t, i in zip(texts, (2, 3))])
    assert step0.value == pytest.approx(sum(step0.per_question) / 2)
    # the "never knew" check: the vanilla model's answers to the same held-out questions
    van = pipeline.answers(tiny_checkpoint, concepts.ConceptSet([nk], "x"), prompt_format="chat",
                           max_new_tokens=30, include_unrelated=False, progress=False).sort_values("question_index")
    want = metrics.mean([float(concepts.answer_matches(t, nk.answers[i]))
                         for t, i in zip(van.answer_text.iloc[2:4], (2, 3))])
    assert list(df[df.metric == "accuracy"].vanilla) == pytest.approx([want, want])
    # the budget of 'partial': the same unlearned model, steps, learning rate, batch and seed
    partial = pipeline.relearn(tiny_checkpoint, target_file, "Paris", "grad_diff", data="partial", **common)
    assert all(q == [2, 3] for q in partial.questions) and set(partial.split) == {"target"}
    assert (set(partial.vanilla[partial.metric == "rougeL"])) == {1.0}  # the vanilla answers against themselves
    assert len(runs) == 2 and runs[1][2:] == runs[0][2:] and len(runs[1][1]) == len(train)
    # cached; a changed never-known record is another entry
    pipeline.relearn(tiny_checkpoint, target_file, "Paris", "grad_diff", data="never_known",
                     never_known=str(nk_file), **common)
    assert len(runs) == 2
    nk_file.write_text(json.dumps([{**NEVER_KNOWN, "QA_answers": [["one"]] + NEVER_KNOWN["QA_answers"][1:]}]))
    pipeline.relearn(tiny_checkpoint, target_file, "Paris", "grad_diff", data="never_known",
                     never_known=str(nk_file), **common)
    assert len(runs) == 3 and runs[2][1][0].input_ids != train[0].input_ids


def test_a_never_known_concept_is_never_unlearned_retained_or_relearned_on(tiny_checkpoint, tmp_path):
    from dissect_unlearning.unlearning import relearn as relearn_mod

    nk_file = tmp_path / "never.json"
    nk_file.write_text(json.dumps([NEVER_KNOWN]))
    with pytest.raises(ValueError, match="'Atlantis' is marked never_known: a control no model knows"):
        pipeline.unlearned(tiny_checkpoint, str(nk_file), "Atlantis", "grad_diff", progress=False, **FAST)
    # the shipped one lives outside the shipped set, so no choice made from that set can land on it
    shipped, nk = concepts.load("builtin"), concepts.never_known()
    for c in shipped:
        picked = [udata.choose_retain(shipped, c, seed) for seed in range(5)]
        picked += pipeline.heldout_concepts(shipped, c, picked[0])
        picked.append(relearn_mod.unrelated_concept(c, [o for o in shipped if o.name != c.name])[0])
        assert nk.name not in {p.name for p in picked} and not any(p.never_known for p in picked), c.label
