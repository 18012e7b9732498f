"""Adapter unlearning (params="lora"): settings, training, storage, and the adapter applied inside nnsight traces."""
from __future__ import annotations

import contextlib

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
    # text only: every step's batch then holds the same chunks, so the forget loss of the first and the last step
    # compare (with questions in the forget set the batches differ from step to step)
    forget_data = "qa" if method == "idk_dpo" else "text"
    cfg, data = tiny_data(tok, cset, method, params="lora", lora_rank=2, lr=1e-2, steps=3, forget_data=forget_data)
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


# ------------------------------------------------------------------------------------------------------ dissection
from dissect_unlearning import patching  # noqa: E402
from dissect_unlearning.patching import adapted, remote as remote_mod  # noqa: E402
from test_patching import qa  # noqa: E402


def krs_gap(a, b):
    cols = ["loss_patched", "loss_unpatched", "krs", "kl", "top1_agree"]
    assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0
    assert (a[["experiment", "center_layer", "question_index"]].values == b[["experiment", "center_layer",
                                                                            "question_index"]].values).all()
    return {c: float((a[c] - b[c]).abs().max()) for c in cols}


# Every experiment that patches a question's own activations; ALL adds the other-question control (coef_other)
OWN = [name for name, e in patching.EXPERIMENTS.items() if e.source == "same"]
ALL = list(patching.EXPERIMENTS)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_the_adapter_in_the_trace_gives_the_krs_of_the_merged_weights(direction):
    """Every experiment (site patches, and restorations as switched-off / switched-on adapter terms), through the
    simulated remote session, against the local engine on the merged model."""
    model, tok = make_tiny_llama()
    a = random_adapter(model)
    merged = adapter_mod.merge(copy.deepcopy(model), a).eval()
    p, ans = qa(tok, n=3)
    kw = dict(experiments=ALL, window=3, direction=direction)
    local = patching.run(model, merged, tok, p, ans, layout="padded", **kw)
    simulated = patching.run(model, a, tok, p, ans, remote="local", **kw)
    gap = krs_gap(local, simulated)
    assert gap["krs"] < 1e-4 and gap["loss_patched"] < 1e-6 and gap["top1_agree"] == 0, gap
    assert local.krs.abs().max() > 0.05  # something is recovered: the comparison is not of zeros
    plain = patching.run(model, a, tok, p, ans, remote=False, **kw)  # no session backend: the same traces here
    assert krs_gap(plain, simulated)["krs"] < 1e-9


def test_a_run_is_one_session_and_only_the_per_question_scores_come_back(monkeypatch):
    from nnsight.intervention.backends.local import LocalSimulationBackend

    model, tok = make_tiny_llama()
    a = random_adapter(model)
    p, ans = qa(tok, n=2)
    calls = []
    real = LocalSimulationBackend.__call__

    def counted(self, tracer):
        calls.append(type(tracer).__name__)
        return real(self, tracer)

    monkeypatch.setattr(LocalSimulationBackend, "__call__", counted)
    table = patching.run(model, a, tok, p, ans, experiments=["coef", "value"], window=3, remote="local")
    assert len(calls) == 1, calls  # one request for 2 experiments x 4 windows + 2 passes
    assert len(table) == 2 * 4 * 2


def test_the_trace_bodies_need_no_code_of_the_package(monkeypatch):
    """The simulated server runs the request with dissect_unlearning unimportable and not shipped by value, and no
    function of the package may run while it executes (NDIF runs whitelisted modules only)."""
    model, tok = make_tiny_llama()
    a = random_adapter(model)
    p, ans = qa(tok, n=2)
    with package_hidden_from_the_server(monkeypatch) as ran:
        table = patching.run(model, a, tok, p, ans, experiments=ALL, window=3, remote="local")
    assert ran == [] and table.krs.notna().all()
    # and the watch works: a request whose body calls a function of the package fails on the simulated server
    from dissect_unlearning import models

    lm = patching.wrap(model, tok)
    with pytest.raises(Exception, match="dissect_unlearning"):
        with torch.no_grad(), lm.trace(torch.tensor([[5, 6, 7]]), remote="local"):
            models.n_layers(model)
            lm.output.logits.save()


@contextlib.contextmanager
def package_hidden_from_the_server(monkeypatch):
    """Inside the block, nnsight's simulated server runs requests with dissect_unlearning unimportable and not
    shipped by value; yields the list of the package's functions that ran while it executed a request."""
    import sys
    import threading

    import cloudpickle.cloudpickle as cp
    import nnsight.ndif
    from nnsight.intervention.backends.local import LocalSimulationBackend

    import dissect_unlearning

    root = dissect_unlearning.__name__
    codes = _package_code_objects(root)
    monkeypatch.setattr(nnsight.ndif, "_PULLED_ENV", True)
    monkeypatch.setattr(cp, "_PICKLE_BY_VALUE_MODULES", {m for m in cp._PICKLE_BY_VALUE_MODULES
                                                         if m.split(".")[0] != root})

    class Unimportable:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == root:
                raise ImportError(f"{name} is not installed on the simulated server")
            return None

    ran = []
    real = LocalSimulationBackend.__call__

    def hidden(self, tracer):
        saved = {n: sys.modules.pop(n) for n in list(sys.modules) if n.split(".")[0] == root}
        blocker = Unimportable()
        sys.meta_path.insert(0, blocker)

        def profile(frame, event, arg):
            if event == "call" and frame.f_code in codes:
                ran.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

        sys.setprofile(profile)
        threading.setprofile(profile)
        try:
            return real(self, tracer)
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
            sys.meta_path.remove(blocker)
            sys.modules.update(saved)

    monkeypatch.setattr(LocalSimulationBackend, "__call__", hidden)
    yield ran


def _package_code_objects(root: str) -> set:
    import sys
    import types
    from pathlib import Path

    codes, stack = set(), []
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] != root or module is None:
            continue
        for obj in vars(module).values():
            if isinstance(obj, types.FunctionType) and obj.__module__ == name:
                stack.append(obj.__code__)
            elif isinstance(obj, type) and obj.__module__ == name:
                for member in vars(obj).values():
                    fn = getattr(member, "__func__", member)
                    fn = getattr(fn, "fget", fn)
                    if isinstance(fn, types.FunctionType):
                        stack.append(fn.__code__)
    home = str(Path(sys.modules[root].__file__).parent)
    while stack:
        code = stack.pop()
        if code not in codes and code.co_filename.startswith(home):  # not a decorator's wrapper (contextlib)
            codes.add(code)
            stack += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return codes


def test_a_zero_adapter_is_refused_rather_than_scoring_vanilla_against_vanilla():
    model, tok = make_tiny_llama()
    fresh = adapter_mod.init(model, lora_config())  # B = 0: the vanilla model
    p, ans = qa(tok, n=1)
    with pytest.raises(adapted.ZeroAdapterError, match="compare the vanilla model with itself"):
        patching.run(model, fresh, tok, p, ans, experiments=["coef"], remote="local")


def test_a_full_fine_tuned_model_is_still_refused_with_remote_true(monkeypatch):
    model, tok = make_tiny_llama()
    changed = adapter_mod.merge(copy.deepcopy(model), random_adapter(model))
    p, ans = qa(tok, n=1)
    monkeypatch.setenv("NDIF_API_KEY", "not-a-real-key")
    with pytest.raises(patching.RemoteLocalModelError, match="vanilla model with itself"):
        patching.run(model, changed, tok, p, ans, ["coef"], remote=True)


# ------------------------------------------------------------------------------------------------------ preflight
class FakeNdif:
    """nnsight's service calls, answered offline."""

    def __init__(self, running=True, remote_nnsight=None):
        import nnsight

        self.running, self.asked = running, []
        self.remote_nnsight = remote_nnsight or nnsight.__version__

    def is_model_running(self, name, *a, **k):
        self.asked.append(name)
        return self.running

    def compare(self):
        import nnsight
        from nnsight.ndif import EnvComparison

        return EnvComparison({"packages": {"nnsight": nnsight.__version__}},
                             {"packages": {"nnsight": self.remote_nnsight}})


@pytest.fixture
def hosted(monkeypatch):
    model, tok = make_tiny_llama()
    model.config._name_or_path = "org/tiny-llama"  # as a hub id NDIF could host
    return model, tok


def fake(monkeypatch, **kw):
    import nnsight

    service = FakeNdif(**kw)
    monkeypatch.setattr(nnsight, "is_model_running", service.is_model_running)
    monkeypatch.setattr(nnsight, "compare", service.compare)
    return service


def no_key(monkeypatch):
    from nnsight import CONFIG

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)


def test_preflight_names_every_problem_in_one_message_before_any_work(hosted, monkeypatch):
    model, tok = hosted
    no_key(monkeypatch)
    service = fake(monkeypatch, running=False, remote_nnsight="0.0.1")
    monkeypatch.setattr(patching.engine, "wrap", lambda *a: pytest.fail("work started"))
    monkeypatch.setattr(adapted, "as_lm", lambda *a: pytest.fail("work started"))
    p, ans = qa(tok, n=1)
    with pytest.raises(patching.RemoteUnavailableError) as err:
        patching.run(model, random_adapter(model), tok, p, ans, ["coef"], remote=True)
    message = str(err.value)
    assert "NDIF_API_KEY" in message and "'org/tiny-llama' is not running" in message
    assert "nnsight==0.0.1" in message and service.asked == ["org/tiny-llama"]


@pytest.mark.parametrize("problem, expected", [
    (dict(key=False), "NDIF_API_KEY"), (dict(running=False), "is not running"),
    (dict(remote_nnsight="9.9.9"), "nnsight==9.9.9"),
])
def test_preflight_refuses_each_problem_alone_and_passes_when_all_is_well(hosted, monkeypatch, problem, expected):
    model, _ = hosted
    problem = dict(problem)
    if problem.pop("key", True):
        monkeypatch.setenv("NDIF_API_KEY", "a-key")
    else:
        no_key(monkeypatch)
    fake(monkeypatch, **problem)
    with pytest.raises(patching.RemoteUnavailableError, match=expected) as err:
        remote_mod.preflight(model)
    assert "a-key" not in str(err.value)  # the key itself is never written anywhere
    monkeypatch.setenv("NDIF_API_KEY", "a-key")
    fake(monkeypatch)
    remote_mod.preflight(model)  # no problem: no error


def test_preflight_refuses_a_model_of_this_machine(tiny_checkpoint, monkeypatch):
    from dissect_unlearning import models

    model, _ = models.load(tiny_checkpoint)
    fake(monkeypatch)
    with pytest.raises(ValueError, match="hub id NDIF hosts"):
        remote_mod.preflight(model)


def test_the_change_measure_of_an_adapter_equals_that_of_its_merged_weights():
    from dissect_unlearning.patching import change as change_mod

    model, tok = make_tiny_llama()
    a = random_adapter(model, targets="mlp.down_proj,self_attn.o_proj")  # gate/up untouched: their change is 0
    merged = adapter_mod.merge(copy.deepcopy(model), a).eval()
    p, ans = qa(tok, n=2)
    local = change_mod.change(model, merged, tok, p, ans)
    simulated = change_mod.change(model, a, tok, p, ans, remote="local")
    assert (local[["layer", "quantity"]].values == simulated[["layer", "quantity"]].values).all()
    assert float((local.norm_vanilla - simulated.norm_vanilla).abs().max()) < 1e-6
    assert float((local.rel_change - simulated.rel_change).abs().max()) < 1e-5
    assert (simulated[simulated.quantity == "key"].norm_diff == 0).all()
    assert (simulated[simulated.quantity.isin(["coef", "value"])].norm_diff > 0).all()


def test_pipeline_sweeps_an_adapter_run_through_the_request_and_asks_ndif_first(tiny_checkpoint, concept_file,
                                                                                monkeypatch):
    settings = dict(FAST, params="lora", lora_rank=2, lr=1e-2)
    u = pipeline.unlearned(tiny_checkpoint, concept_file, "Paris", "grad_diff", progress=False, **settings)
    kw = dict(concepts=concept_file, concept="Paris", experiments=["coef", "value"], window=3, progress=False)
    here = pipeline.sweep(tiny_checkpoint, u, remote=False, **kw)  # the merged model, local engine
    request = pipeline.sweep(tiny_checkpoint, u, remote="local", **kw)  # the adapter inside the simulated request
    assert float((here.krs - request.krs).abs().max()) < 1e-4 and len(here) == len(request) > 0
    change = pipeline.coef_change(tiny_checkpoint, u, concepts=concept_file, concept="Paris", remote="local",
                                  progress=False)
    assert (change.rel_change[change.quantity == "value"] > 0).all()
    # remote=True is no longer refused as a local model: the adapter travels; the vanilla model must be NDIF's
    fake(monkeypatch)
    monkeypatch.setenv("NDIF_API_KEY", "a-key")
    with pytest.raises(ValueError, match="hub id NDIF hosts"):
        pipeline.sweep(tiny_checkpoint, u, remote=True, **kw)


def test_on_the_default_model_the_adapter_equals_its_merged_weights(default_model):
    """SmolLM2-135M, 30 layers: logits of the adapter applied in a simulated request vs the merged weights, and the
    KRS of the paper's experiments on two windows."""
    model, tok = default_model
    a = random_adapter(model, rank=4, alpha=8.0)
    for name in a.names():
        # an unlearning-sized change (logits move by whole units; with a smaller one the losses are ~1e-6 and their
        # float32 rounding alone moves KRS by 1e-4), not a new model
        a.b[name] = a.b[name] * 0.3
    merged = adapter_mod.merge(copy.deepcopy(model), a).eval()
    p, ans = qa(tok, n=2)
    lm = patching.wrap(model, tok)
    ids = torch.tensor([p[0] + ans[0]])
    plan = adapted._Plan(lm, model, models_arch(model), a)
    ops = plan.ops({(i, t) for i in range(plan.n_layers) for t in a.targets})
    with torch.no_grad(), lm.trace(ids, remote="local"):
        for op, m, A, B, key in ops:
            x = m.input
            m.output = m.output + (x @ A) @ B
        logits = lm.output.logits.save()
    with torch.no_grad():
        expected = merged(ids).logits
        vanilla = model(ids).logits
    assert (vanilla - expected).abs().max() > 1e-2
    assert float((logits - expected).abs().max()) < 1e-5 * float(expected.abs().max()), \
        float((logits - expected).abs().max())
    kw = dict(experiments=list(patching.PAPER_EXPERIMENTS), layers=[[10, 11, 12], [27, 28, 29]])
    gap = krs_gap(patching.run(model, merged, tok, p, ans, layout="padded", **kw),
                  patching.run(model, a, tok, p, ans, remote="local", **kw))
    assert gap["krs"] < 1e-4, gap


def models_arch(model):
    from dissect_unlearning import models

    return models.architecture_of(model)


def hosted_copy(model, tok, tmp_path):
    """(nnsight model, tokenizer) of `model` as remote=True sees a hosted one: built on the meta device from a
    folder (models.remote_model), no weights here until nnsight's simulation of the request loads them."""
    from dissect_unlearning import models

    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    lm, _ = models.remote_model(str(tmp_path / "tiny"))
    assert next(models.torch_module(lm).parameters()).device.type == "meta"
    return lm


def test_a_model_with_no_weights_here_gives_the_numbers_of_the_loaded_one(tmp_path):
    """The remote=True setting: the vanilla model is an nnsight model on the meta device (its weights are NDIF's),
    the inputs stay on the CPU to travel with the request, and the weights' norms of the change measure are read
    inside the request. nnsight's simulation loads the folder's weights for it."""
    from dissect_unlearning.patching import change as change_mod

    model, tok = make_tiny_llama()
    a = random_adapter(model)
    p, ans = qa(tok, n=3)
    lm = hosted_copy(model, tok, tmp_path)
    here = patching.run(model, a, tok, p, ans, experiments=ALL, window=3, remote="local")
    there = patching.run(lm, a, tok, p, ans, experiments=ALL, window=3, remote="local")
    assert krs_gap(here, there)["krs"] < 1e-6
    here = change_mod.change(model, a, tok, p, ans, remote="local")
    there = change_mod.change(lm, a, tok, p, ans, remote="local")
    assert float((here.norm_vanilla - there.norm_vanilla).abs().max()) < 1e-6
    assert float((here.rel_change - there.rel_change).abs().max()) < 1e-6
    assert here.norm_vanilla.gt(0).all()
