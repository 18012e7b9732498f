"""Remote adapter training (unlearning/remote.py): the optimiser steps run inside nnsight requests, here through
nnsight's offline simulation of NDIF (remote="local"), and must give trainer.train's adapter."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import make_tiny_llama
from dissect_unlearning import concepts, prompts
from dissect_unlearning.unlearning import METHODS, UnlearnConfig, adapter as adapter_mod, methods, trainer
from dissect_unlearning.unlearning import remote as rt
from test_unlearning import records, tiny_data


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread, as tests/test_patching.py: on a 2-core machine shared with other work two threads spin
    against each other (measured: a 4-step tiny run 0.1-0.8 s with one thread, 2-13 s with two)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def run_data(tok, method, **kw):
    """A tiny run of `method` with an adapter: 2 examples per batch (4 questions, of which 2 are trained on)."""
    # the refusal DPO trains on questions only; the control learns text only (config's checks)
    forget_data = {"idk_dpo": "qa", "control": "text"}.get(method, "text+qa")
    settings = dict(params="lora", lora_rank=2, lr=1e-2, steps=4, forget_data=forget_data)
    return tiny_data(tok, concepts.parse(records(), "test"), method, n_questions=4, **{**settings, **kw})


def adapter_gap(a, b) -> float:
    return max(float((x - y).abs().max()) for n in a.names() for x, y in ((a.a[n], b.a[n]), (a.b[n], b.b[n])))


def curve_gap(mine, theirs) -> float:
    """The largest relative difference of two loss curves (NaN where both are NaN counts as equal)."""
    assert [r["step"] for r in mine] == [r["step"] for r in theirs]
    worst = 0.0
    for r, q in zip(mine, theirs):
        assert r["lr"] == q["lr"]
        for key in ("loss", "forget_loss", "retain_loss", "grad_norm"):
            if math.isnan(r[key]) or math.isnan(q[key]):
                assert math.isnan(r[key]) and math.isnan(q[key]), (key, r, q)
                continue
            worst = max(worst, abs(r[key] - q[key]) / max(abs(q[key]), 1e-12))
    return worst


@pytest.fixture
def requests(monkeypatch):
    """The requests the simulated NDIF receives, counted; `fail_at` makes request number k (1-based) raise."""
    from nnsight.intervention.backends.local import LocalSimulationBackend

    real = LocalSimulationBackend.__call__

    class Counter:
        calls = 0
        fail_at = None

    def counted(self, tracer):
        Counter.calls += 1
        if Counter.calls == Counter.fail_at:
            raise ConnectionError("simulated: the request was lost")
        return real(self, tracer)

    monkeypatch.setattr(LocalSimulationBackend, "__call__", counted)
    return Counter


# ------------------------------------------------------------------------------------------------------ the maths
def random_start(model, config, seed=1):
    """An adapter with B drawn too: at a fresh one (B = 0) A's gradient is zero and would prove nothing."""
    a = adapter_mod.init(model, config)
    g = torch.Generator().manual_seed(seed)
    for name in a.names():
        a.b[name] = torch.randn(a.b[name].shape, generator=g) * 0.3
    return a


@pytest.mark.parametrize("method", METHODS)
def test_one_step_in_a_request_has_the_gradients_of_the_local_loss(method):
    """The request's inline loss, differentiated on the simulated server, against the method's own loss function
    (methods.REGISTRY) with the adapter hooked in locally, as trainer.train computes a step."""
    model, tok = make_tiny_llama()
    kw = {"retain_weight": 0.7} if methods.get(method).retain_term else {}
    cfg, data = run_data(tok, method, **kw)
    start = random_start(model, cfg)
    method_ = methods.get(method)
    index = [0, 1]
    pad = prompts.pad_id(tok)
    ref = trainer.reference_logprobs(model, data, method_.reference, set(index), pad, cfg.batch_size)

    # locally: the method's loss through adapter.attached's hooks, plain backward
    for _, t in start.named_parameters():
        t.requires_grad_(True)
    hyper = {name: getattr(cfg, name) for name in method_.settings}
    with adapter_mod.attached(model, start):
        losses = method_.loss(model, trainer.make_batch(data, method_.parts, index, pad),
                              {p: v[index] for p, v in ref.items()}, **hyper)
        losses.loss.backward()
    local = torch.cat([t.grad.reshape(-1) for _, t in start.named_parameters()])

    # in one simulated request
    plan = rt._Plan(model, tok, start, cfg)
    state = rt._State(0, {n: t.detach().clone() for n, t in start.named_parameters()}, {}, {}, [],
                      {p: v.cpu() for p, v in ref.items()}, 0.0, 0.0)
    batches = [[rt._inputs(trainer.make_batch(data, [part], index, pad)[part]) for part in plan.passes]]
    refs = [{p: v[index] for p, v in ref.items()}]
    with rt._as_hosted(model, "local"):
        out = rt._chunk(plan, state, batches, refs, [cfg.lr], "local", keep_grads=True)
    (remote_grad,) = out.grads
    assert local.abs().max() > 1e-3  # the gradients are not all zero, so the comparison means something
    worst = float((remote_grad - local).abs().max() / local.abs().max())
    assert worst < 1e-4, worst
    # and the loss row is the local loss
    expected = float(losses.loss.detach())
    assert abs(float(out.rows[0, 0]) - expected) <= 1e-6 * max(1.0, abs(expected))


@pytest.mark.parametrize("method", METHODS)
def test_a_chunked_remote_run_ends_with_the_adapter_and_curve_of_the_local_trainer(method, requests):
    model, tok = make_tiny_llama()
    cfg, data = run_data(tok, method)
    local = trainer.train(model, tok, data, cfg, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = requests.calls
    remote = rt.train_remote(model, tok, data, cfg, remote="local", chunk_steps=2, progress=False)
    # 4 steps in 2 requests, plus one for the reference log-probs of a method that has them
    assert requests.calls - calls == 2 + bool(methods.get(method).reference)
    assert adapter_gap(local.adapter, remote.adapter) <= 1e-6
    assert adapter_gap(local.adapter, adapter_mod.init(model, cfg)) > 1e-3  # it did train
    assert curve_gap(remote.loss_curve, local.loss_curve) <= 1e-6
    assert set(remote.loss_curve[0]) == set(local.loss_curve[0])
    assert (remote.n_steps, remote.n_trainable, remote.forget_concept) == (4, local.n_trainable, local.forget_concept)
    # the simulated server's model is left as it was: weights, gradient flags, mode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    assert not any(t.requires_grad for _, t in remote.adapter.named_parameters())


def test_the_reference_log_probs_come_from_a_request_for_exactly_the_visited_examples(tmp_path, requests):
    model, tok = make_tiny_llama()
    cfg, data = run_data(tok, "dpo", steps=1, batch_size=2)
    rt.train_remote(model, tok, data, cfg, remote="local", checkpoint=tmp_path / "ck", progress=False)
    assert requests.calls == 2  # the reference passes, then the step
    saved = torch.load(tmp_path / "ck" / trainer.CHECKPOINT_FILE, weights_only=True)
    visited = set(trainer.schedule(len(data.forget), 1, 2, cfg.seed)[0])
    assert len(data.forget) > len(visited)  # some examples are never visited: their values must stay NaN
    local = trainer.reference_logprobs(model, data, ("forget", "chosen"), visited, prompts.pad_id(tok), 2)
    for part in ("forget", "chosen"):
        got = saved["ref"][part]
        assert [i for i in range(len(got)) if not math.isnan(got[i])] == sorted(visited)
        assert torch.allclose(got[sorted(visited)], local[part][sorted(visited)], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ NDIF's rules
@pytest.fixture
def package_hidden(monkeypatch):
    """A stricter simulated NDIF than nnsight's own: the request is pickled on the client with the package
    importable (as on a user's machine, so a function of ours would travel by reference), then deserialized and run
    *as deserialized* (nnsight's simulation runs the client's own objects) with dissect_unlearning unimportable, and
    the saved values pushed back. The list it yields records any function of the package that runs meanwhile."""
    import linecache
    import sys
    import threading

    import cloudpickle.cloudpickle as cp
    import nnsight.ndif
    from nnsight.intervention.backends.local import LocalSimulationBackend
    from nnsight.schema.request import RequestModel
    from nnsight.tracing import tracer as tracing
    from nnsight.tracing.util import push

    import dissect_unlearning
    from test_adapter import _package_code_objects

    root = dissect_unlearning.__name__
    codes = _package_code_objects(root)
    monkeypatch.setattr(nnsight.ndif, "_PULLED_ENV", True)  # nothing of the package is shipped by value
    monkeypatch.setattr(cp, "_PICKLE_BY_VALUE_MODULES", {m for m in cp._PICKLE_BY_VALUE_MODULES
                                                         if m.split(".")[0] != root})

    class Unimportable:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == root:
                raise ImportError(f"{name} is not installed on the simulated server")
            return None

    ran = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in codes:
            ran.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    def as_a_server(self, tracer):
        blob = RequestModel.serialize(tracer)
        filename = tracer.info.frame.f_code.co_filename
        source_line = linecache.cache.get(filename)
        modules = {n: sys.modules.pop(n) for n in list(sys.modules) if n.split(".")[0] == root}
        blocker = Unimportable()
        sys.meta_path.insert(0, blocker)
        sys.setprofile(profile)
        threading.setprofile(profile)
        try:
            restored = RequestModel.deserialize(blob, self.model._remoteable_persistent_objects())
            restored.execute(restored.info.code)  # the session body, against the deserialized values
            saves = tracing._saves()
            found = {k: v for k, v in restored.info.frame.f_locals.items() if id(v) in saves}
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
            sys.meta_path.remove(blocker)
            sys.modules.update(modules)
            if source_line is not None:
                linecache.cache[filename] = source_line
            else:
                linecache.cache.pop(filename, None)
        push(tracer.info.frame, found)

    monkeypatch.setattr(LocalSimulationBackend, "__call__", as_a_server)
    return ran


@pytest.mark.parametrize("method", ["npo", "idk_dpo"])
def test_the_requests_need_no_code_of_the_package(method, package_hidden):
    """The reference request and the training requests run with the package hidden, and give the adapter they
    give with it importable (npo: a reference part and an optional retain pass; idk_dpo: three passes)."""
    model, tok = make_tiny_llama()
    cfg, data = run_data(tok, method, retain_weight=1.0)
    result = rt.train_remote(model, tok, data, cfg, remote="local", chunk_steps=2, progress=False)
    assert package_hidden == []
    expected = trainer.train(model, tok, data, cfg, progress=False)
    assert adapter_gap(result.adapter, expected.adapter) <= 1e-6
    # and the watch works: a request whose body calls a function of the package fails on the simulated server
    from dissect_unlearning import models

    lm = rt._wrap(model, tok)
    with pytest.raises(Exception, match="dissect_unlearning"):
        with lm.session(remote="local"):
            n = models.n_layers(model)
            with lm.trace(torch.tensor([[5, 6, 7]])):
                out = lm.output.logits.save()


# ------------------------------------------------------------------------------------------------------ resuming
def test_a_run_that_fails_in_its_second_request_resumes_after_the_first(tmp_path, requests):
    model, tok = make_tiny_llama()
    cfg, data = run_data(tok, "npo", steps=6)  # requests: references, steps 1-2, 3-4, 5-6
    uninterrupted = rt.train_remote(model, tok, data, cfg, remote="local", chunk_steps=2, progress=False)
    assert requests.calls == 4

    folder = tmp_path / "run"
    requests.calls, requests.fail_at = 0, 3  # the request of steps 3-4 is lost
    with pytest.raises(ConnectionError, match="simulated"):
        rt.train_remote(model, tok, data, cfg, remote="local", chunk_steps=2, checkpoint=folder, progress=False)
    assert torch.load(folder / trainer.CHECKPOINT_FILE, weights_only=True)["step"] == 2

    requests.calls, requests.fail_at = 0, None
    resumed = rt.train_remote(model, tok, data, cfg, remote="local", chunk_steps=2, checkpoint=folder, progress=False)
    assert requests.calls == 2  # steps 3-4 and 5-6 only: neither the references nor steps 1-2 again
    assert adapter_gap(resumed.adapter, uninterrupted.adapter) == 0.0
    assert curve_gap(resumed.loss_curve, uninterrupted.loss_curve) == 0.0
    # a finished run's checkpoint makes no request at all; another run's checkpoint is not resumed
    requests.calls = 0
    again = rt.train_remote(model, tok, data, cfg, remote="local", chunk_steps=2, checkpoint=folder, progress=False)
    assert requests.calls == 0 and adapter_gap(again.adapter, uninterrupted.adapter) == 0.0
    other = rt.train_remote(model, tok, data, cfg.replace(lr=2e-2), remote="local", chunk_steps=2, checkpoint=folder,
                            progress=False)
    assert requests.calls == 4 and adapter_gap(other.adapter, uninterrupted.adapter) > 1e-4


def test_a_checkpoint_resumes_with_another_chunk_size(tmp_path, requests):
    """Chunks are only where the state travels: a run may resume with another chunk_steps and end the same."""
    model, tok = make_tiny_llama()
    cfg, data = run_data(tok, "grad_diff", steps=5)
    whole = rt.train_remote(model, tok, data, cfg, remote="local", chunk_steps=5, progress=False)
    requests.calls, requests.fail_at = 0, 2
    with pytest.raises(ConnectionError):
        rt.train_remote(model, tok, data, cfg, remote="local", chunk_steps=3, checkpoint=tmp_path / "r", progress=False)
    requests.calls, requests.fail_at = 0, None
    resumed = rt.train_remote(model, tok, data, cfg, remote="local", chunk_steps=1, checkpoint=tmp_path / "r",
                              progress=False)
    assert requests.calls == 2 and [r["step"] for r in resumed.loss_curve] == [1, 2, 3, 4, 5]
    assert adapter_gap(resumed.adapter, whole.adapter) == 0.0


# ------------------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("change, remote, chunk_steps, name", [
    (dict(params="all"), "local", 2, "params"),
    (dict(params="last_k:1"), "local", 2, "params"),
    ({}, False, 2, "remote"),
    ({}, "http://example.invalid", 2, "remote"),
    ({}, "local", 0, "chunk_steps"),
    ({}, "local", 1.5, "chunk_steps"),
    ({}, "local", True, "chunk_steps"),
])
def test_bad_settings_are_refused_before_any_request_naming_the_setting(change, remote, chunk_steps, name, requests):
    model, tok = make_tiny_llama()
    cfg, data = run_data(tok, "grad_diff", **change)
    with pytest.raises(ValueError, match=rf"^{name} "):
        rt.train_remote(model, tok, data, cfg, remote=remote, chunk_steps=chunk_steps, progress=False)
    assert requests.calls == 0


def test_a_method_without_a_remote_form_is_refused_naming_it():
    from dissect_unlearning.unlearning import register_method, unregister_method
    from dissect_unlearning.unlearning.grad_ascent import loss

    def copied(model, batch, ref=None):
        return loss(model, batch, ref)

    register_method(methods.Method("ascent_copy", copied, parts=("forget",), reference=(), label="copy",
                                   colour="#000000"))
    try:
        model, tok = make_tiny_llama()
        cfg, data = run_data(tok, "ascent_copy", retain_weight=0.0)
        with pytest.raises(ValueError, match="method 'ascent_copy' has no remote form"):
            rt.train_remote(model, tok, data, cfg, remote="local", progress=False)
    finally:
        unregister_method("ascent_copy")
    assert set(rt.REMOTE_METHODS) == set(METHODS)  # every shipped method has its remote form


def test_a_non_finite_loss_raises_the_local_trainers_error_and_takes_no_step(tmp_path):
    model, tok = make_tiny_llama()
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # every logit NaN from the first step on
    cfg, data = run_data(tok, "grad_diff")
    with pytest.raises(FloatingPointError) as local:
        trainer.train(model, tok, data, cfg, progress=False)
    with pytest.raises(FloatingPointError) as remote:
        rt.train_remote(model, tok, data, cfg, remote="local", checkpoint=tmp_path / "ck", progress=False)
    assert str(remote.value) == str(local.value) and "at step 1;" in str(local.value)
    assert not (tmp_path / "ck").exists()  # nothing finished, nothing stored


def test_the_adapter_of_a_model_on_the_meta_device_is_made_on_the_cpu():
    """remote=True needs only the model's structure: a meta-device copy gives the adapter a CPU model gives."""
    model, _ = make_tiny_llama()
    with torch.device("meta"):
        skeleton, _ = make_tiny_llama()
    cfg = UnlearnConfig.for_method("grad_diff", params="lora", lora_rank=2)
    on_cpu, from_meta = adapter_mod.init(model, cfg), adapter_mod.init(skeleton, cfg, device="cpu")
    assert next(skeleton.parameters()).device.type == "meta"
    assert all(t.device.type == "cpu" for _, t in from_meta.named_parameters())
    assert adapter_gap(on_cpu, from_meta) == 0.0


# ------------------------------------------------------------------------------------------------------ real model
@pytest.mark.slow
def test_remote_training_on_the_default_model_matches_the_local_trainer(default_model):
    model, tok = default_model
    cfg, data = tiny_data(tok, concepts.parse(records(), "test"), "npo", params="lora", steps=2, chunk_tokens=8,
                          lr=1e-3)
    local = trainer.train(model, tok, data, cfg, progress=False)
    remote = rt.train_remote(model, tok, data, cfg, remote="local", chunk_steps=1, progress=False)
    assert adapter_gap(local.adapter, remote.adapter) <= 1e-6
    assert curve_gap(remote.loss_curve, local.loss_curve) <= 1e-6
    assert adapter_gap(local.adapter, adapter_mod.init(model, cfg)) > 0
