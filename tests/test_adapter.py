"""Adapter unlearning (params="lora"): settings, training, storage, and the adapter applied inside nnsight traces."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_tiny_llama
from dissect_unlearning import concepts, pipeline
from dissect_unlearning.unlearning import METHODS, UnlearnConfig, adapter as adapter_mod, trainer
from test_unlearning import FAST, records, tiny_data


def lora_config(**kw):
    return UnlearnConfig.for_method(kw.pop("method", "grad_diff"), params="lora", **kw)


def random_adapter(model, seed=1, rank=3, alpha=6.0, targets="auto"):
    """An adapter with B drawn too (a fresh one has B = 0 and changes nothing)."""
    a = adapter_mod.init(model, lora_config(lora_rank=rank, lora_alpha=alpha, lora_targets=targets, seed=seed))
    g = torch.Generator().manual_seed(seed + 100)
    for name in a.names():
        a.b[name] = torch.randn(a.b[name].shape, generator=g) * 0.2
    return a


# ------------------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("bad, field", [
    (dict(lora_rank=0), "lora_rank"), (dict(lora_rank=2.5), "lora_rank"), (dict(lora_rank=10**6), "lora_rank"),
    (dict(lora_alpha=0), "lora_alpha"), (dict(lora_alpha=float("nan")), "lora_alpha"),
    (dict(lora_targets=""), "lora_targets"), (dict(lora_targets="mlp..down"), "lora_targets"),
    (dict(lora_targets="mlp.up_proj,mlp.up_proj"), "lora_targets"),
])
def test_adapter_settings_are_checked_and_the_error_names_the_setting(bad, field):
    with pytest.raises(ValueError, match=field):
        lora_config(**bad)
    UnlearnConfig.for_method("grad_diff", **bad)  # ignored (and unchecked) unless params="lora"


def test_a_full_fine_tuning_record_keeps_its_old_keys_and_an_adapter_record_has_its_settings():
    full = UnlearnConfig.for_method("grad_diff").to_dict()
    assert not any(k.startswith("lora_") for k in full)  # cache keys of full runs are what they were
    assert UnlearnConfig.from_dict(full) == UnlearnConfig.for_method("grad_diff")
    lora = lora_config(lora_rank=4).to_dict()
    assert lora["params"] == "lora" and lora["lora_rank"] == 4 and lora["lora_targets"] == "auto"
    assert UnlearnConfig.from_dict(lora) == lora_config(lora_rank=4)


def test_targets_default_to_the_mlp_projections_and_o_proj_in_forward_order_and_bad_ones_are_named():
    model, _ = make_tiny_llama()
    assert adapter_mod.resolve_targets(model, "auto") == ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                          "mlp.down_proj")
    with pytest.raises(ValueError, match="lora_targets: layer 0 .* no module 'mlp.nope'"):
        adapter_mod.resolve_targets(model, "mlp.nope")
    with pytest.raises(ValueError, match="lora_targets: 'mlp' is a LlamaMLP, not a linear layer"):
        adapter_mod.resolve_targets(model, "mlp")


# ------------------------------------------------------------------------------------------------------ the maths
def test_a_fresh_adapter_is_seeded_and_changes_nothing():
    model, tok = make_tiny_llama()
    a, b = (adapter_mod.init(model, lora_config(seed=3)) for _ in range(2))
    c = adapter_mod.init(model, lora_config(seed=4))
    assert all(torch.equal(a.a[n], b.a[n]) for n in a.names())
    assert not all(torch.equal(a.a[n], c.a[n]) for n in a.names())
    assert all(not t.any() for t in a.b.values())
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        plain = model(ids).logits
        with adapter_mod.attached(model, a):
            adapted = model(ids).logits
    assert torch.equal(plain, adapted)


def test_adapter_logits_equal_those_of_the_merged_weights():
    model, tok = make_tiny_llama()
    a = random_adapter(model)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        vanilla = model(ids).logits
        with adapter_mod.attached(model, a):
            adapted = model(ids).logits
        merged = adapter_mod.merge(copy.deepcopy(model), a)(ids).logits
    assert (adapted - vanilla).abs().max() > 1e-2  # the adapter does change the model
    assert (adapted - merged).abs().max() < 1e-5


def test_one_training_step_has_the_gradients_of_plain_torch():
    """The trainer's hooks give A and B the gradients of the merged weights W + scale (A B)^T, differentiated by
    plain torch (torch.func.functional_call, no hooks)."""
    cset = concepts.parse(records(), "test")
    model, tok = make_tiny_llama()
    cfg, data = tiny_data(tok, cset, "grad_diff", params="lora", lora_rank=2)
    a = random_adapter(model, rank=2, alpha=cfg.lora_alpha)
    batch = trainer.make_batch(data, ("forget", "retain"), [0, 1], 1)
    from dissect_unlearning.unlearning import methods

    loss_fn = methods.get("grad_diff").loss
    for t in list(a.a.values()) + list(a.b.values()):
        t.requires_grad_(True)
    with adapter_mod.attached(model, a):
        loss_fn(model, batch, {}, retain_weight=cfg.retain_weight).loss.backward()
    hooked = {n: (a.a[n].grad.clone(), a.b[n].grad.clone()) for n in a.names()}

    A = {n: a.a[n].detach().clone().requires_grad_(True) for n in a.names()}
    B = {n: a.b[n].detach().clone().requires_grad_(True) for n in a.names()}
    weights = dict(model.named_parameters())
    merged = {f"{n}.weight": weights[f"{n}.weight"].detach() + a.scale * (A[n] @ B[n]).T for n in a.names()}

    class Merged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(()))  # the losses read the device off a parameter

        def forward(self, input_ids, attention_mask, **kw):
            out = torch.func.functional_call(model, merged, (), {"input_ids": input_ids,
                                                                  "attention_mask": attention_mask}, strict=False)
            return out

    wrapper = Merged()
    wrapper.config = model.config
    loss_fn(wrapper, batch, {}, retain_weight=cfg.retain_weight).loss.backward()
    worst = 0.0
    for n in a.names():  # the two sum the same products in another order: float32 rounding apart
        for mine, theirs in zip(hooked[n], (A[n].grad, B[n].grad)):
            worst = max(worst, float((mine - theirs).abs().max() / theirs.abs().max()))
    assert worst < 1e-4, worst
    assert any(g[0].abs().max() > 0 for g in hooked.values())


# ------------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_an_adapter_and_leaves_the_weights_vanilla(method):
    cset = concepts.parse(records(), "test")
    model, tok = make_tiny_llama()
    before = copy.deepcopy(model.state_dict())
    cfg, data = tiny_data(tok, cset, method, params="lora", lora_rank=2, lr=1e-2, steps=3)
    result = trainer.train(model, tok, data, cfg, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the weights are untouched
    a = result.adapter
    # rank 2 on o_proj (32 -> 32), gate and up (32 -> 64), down (64 -> 32), in each of 4 layers
    assert a is not None and result.n_trainable == a.numel() == 4 * 2 * (64 + 96 + 96 + 96)
    assert any(t.abs().max() > 0 for t in a.b.values())  # it learnt something
    assert not any(t.requires_grad for _, t in a.named_parameters())
    curve = result.loss_curve
    if method in ("grad_ascent", "grad_diff"):
        assert curve[-1]["forget_loss"] > curve[0]["forget_loss"]


def test_adapter_training_is_deterministic():
    cset = concepts.parse(records(), "test")
    runs = []
    for _ in range(2):
        model, tok = make_tiny_llama()
        cfg, data = tiny_data(tok, cset, "npo", params="lora", lora_rank=2, lr=1e-2)
        runs.append(trainer.train(model, tok, data, cfg, progress=False).adapter)
    assert all(torch.equal(runs[0].b[n], runs[1].b[n]) for n in runs[0].names())


@pytest.fixture
def concept_file(tmp_path):
    import json

    path = tmp_path / "concepts.json"
    path.write_text(json.dumps(records()))
    return str(path)


def test_an_adapter_run_is_cached_small_and_loads_as_the_merged_model(tiny_checkpoint, concept_file):
    settings = dict(FAST, params="lora", lora_rank=2, lr=1e-2)
    u = pipeline.unlearned(tiny_checkpoint, concept_file, "Paris", "grad_diff", progress=False, **settings)
    again = pipeline.unlearned(tiny_checkpoint, concept_file, "Paris", "grad_diff", progress=False, **settings)
    full = pipeline.unlearned(tiny_checkpoint, concept_file, "Paris", "grad_diff", progress=False, **FAST)
    assert again.folder == u.folder != full.folder
    assert u.is_adapter and not full.is_adapter
    assert u.record["storage"]["encoding"] == "adapter" and u.settings["lora_rank"] == 2
    assert {"adapter.json", "adapter.safetensors", "unlearning.json"} <= {p.name for p in u.folder.iterdir()}
    # no weight delta: A and B alone (float32) and a header
    assert not list(u.folder.glob("plane*")) and (u.folder / "adapter.safetensors").stat().st_size < 4 * u.adapter().numel() + 8192
    model, tok = u.load()
    from dissect_unlearning import models

    vanilla, _ = models.load(tiny_checkpoint)
    expected = adapter_mod.merge(vanilla, u.adapter())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), expected.parameters()))
    with pytest.raises(ValueError, match="params='lora'"):
        full.adapter()
