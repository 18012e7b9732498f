"""Greedy generation inside an nnsight request (generation.py) and a model whose weights stay on NDIF
(models.remote_model): the tokens of prompts.greedy_generate, with and without an adapter, in nnsight's offline
simulation of an NDIF request."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_tiny_llama
from dissect_unlearning import generation, models, patching, prompts
from dissect_unlearning.unlearning import UnlearnConfig, adapter as adapter_mod
from test_adapter import package_hidden_from_the_server, random_adapter

BUDGETS = [6, 3, 8, 1, 5, 8, 4]


def wide_tiny_llama():
    """A tiny random Llama with wider weights than the default init, whose greedy answers repeat one token: here
    they vary, so a wrong step or a wrong cut changes them."""
    model, tok = make_tiny_llama()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
    return model, tok


def tiny_prompts(tok, lengths=(3, 7, 2, 5, 4, 6, 1)) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [[tok.bos_token_id] + torch.randint(6, len(tok), (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def tiny():
    model, tok = wide_tiny_llama()
    a = random_adapter(model)
    merged = adapter_mod.merge(copy.deepcopy(model), a).eval()
    return model, tok, a, merged, tiny_prompts(tok)


def stops_of(answers: list[list[int]], rows) -> set[int]:
    """A stop set that cuts the free answers of `rows` after their second token."""
    return {answers[r][1] for r in rows}


def test_without_an_adapter_the_tokens_are_greedy_generates(tiny):
    model, tok, _, _, ps = tiny
    lm = patching.wrap(model, tok)
    free = prompts.greedy_generate(model, ps, 8, set(), tok.pad_token_id, batch_size=3)
    stop = stops_of(free, [0, 4])
    for by_length in (False, True):
        expected = prompts.greedy_generate(model, ps, BUDGETS, stop, tok.pad_token_id, batch_size=3,
                                           by_length=by_length)
        got = generation.greedy_generate(lm, ps, BUDGETS, stop, tok.pad_token_id, batch_size=3,
                                         by_length=by_length, remote="local")
        assert got == expected
    assert generation.greedy_generate(lm, ps, 8, set(), tok.pad_token_id, batch_size=3, remote="local") == free
    # remote=False: the same traces, run here without serialising them
    assert generation.greedy_generate(lm, ps, 8, set(), tok.pad_token_id, batch_size=3, remote=False) == free


def test_with_an_adapter_the_tokens_are_those_of_the_merged_model_at_every_step(tiny):
    model, tok, a, merged, ps = tiny
    lm = patching.wrap(model, tok)
    free = prompts.greedy_generate(merged, ps, 8, set(), tok.pad_token_id, batch_size=3)
    stop = stops_of(free, [1, 5])
    for by_length in (False, True):
        expected = prompts.greedy_generate(merged, ps, BUDGETS, stop, tok.pad_token_id, batch_size=3,
                                           by_length=by_length)
        got = generation.greedy_generate(lm, ps, BUDGETS, stop, tok.pad_token_id, batch_size=3,
                                         by_length=by_length, adapter=a, remote="local")
        assert got == expected
    vanilla = prompts.greedy_generate(model, ps, 8, set(), tok.pad_token_id, batch_size=3)
    # the adapter is applied at every step, not only on the prompt: that would give other answers here
    first_step_only = _greedy_with_adapter_on_the_prompt_only(model, a, ps, 8, tok.pad_token_id)
    assert sum(f != v for f, v in zip(free, vanilla)) >= 5 and free != first_step_only
    assert generation.greedy_generate(lm, ps, 8, set(), tok.pad_token_id, batch_size=3, adapter=a,
                                      remote="local") == free
    # a fresh adapter (B = 0) adds exact zeros: the vanilla answers
    fresh = adapter_mod.init(model, UnlearnConfig.for_method("grad_diff", params="lora", lora_rank=3))
    assert generation.greedy_generate(lm, ps, 8, set(), tok.pad_token_id, batch_size=3, adapter=fresh,
                                      remote="local") == vanilla


def _greedy_with_adapter_on_the_prompt_only(model, a, ps, n, pad_token):
    """prompts.greedy_generate with the adapter's terms in the forward over the prompt only (not in the steps that
    follow, which see one new token each)."""
    def hook(name):
        def add(module, args, out):
            if args[0].shape[1] == 1:
                return out
            return out + a.scale * ((args[0] @ a.a[name]) @ a.b[name])
        return add

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in a.names()]
    try:
        return prompts.greedy_generate(model, ps, n, set(), pad_token, batch_size=3)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("with_adapter", [False, True])
def test_stop_tokens_and_budgets_cut_as_greedy_generate_does(tiny, with_adapter):
    """Rows cut by their own budget inside a batch of a larger one, rows cut after a stop token (kept), and a batch
    whose every row stops before its largest budget (the decoding, and the adapter's loop, end early)."""
    model, tok, a, merged, ps = tiny
    reference = merged if with_adapter else model
    lm = patching.wrap(model, tok)
    budgets = [6, 2, 8, 8, 8, 8, 3]
    free = prompts.greedy_generate(reference, ps, 8, set(), tok.pad_token_id, batch_size=3)
    stop = {free[0][1], free[1][3], free[2][0]}
    expected = prompts.greedy_generate(reference, ps, budgets, stop, tok.pad_token_id, batch_size=3)
    # the case is what it is meant to be: in batch [0, 1, 2] row 0 is cut by a stop token before its budget, row 1
    # by its budget of 2 (its stop token comes later), row 2 right after its first token, and every row of the
    # batch meets a stop token before 8 tokens, so the batch's decoding ends before its largest budget
    assert expected[0][-1] in stop and len(expected[0]) < budgets[0]
    assert expected[1] == free[1][:2] and not stop & set(free[1][:2])
    assert expected[2] == free[2][:1]
    assert all(stop & set(free[r][:7]) for r in (0, 1, 2))
    assert expected[6] == free[6][:len(expected[6])]
    got = generation.greedy_generate(lm, ps, budgets, stop, tok.pad_token_id, batch_size=3,
                                     adapter=a if with_adapter else None, remote="local")
    assert got == expected


def test_an_adapter_kept_in_float32_runs_on_a_bfloat16_model(tiny):
    """NDIF runs its models in bfloat16 on its GPUs, and an adapter made for a model with no weights here stays on
    the CPU in float32 (adapter.init): the request moves each term to its activations' dtype and device."""
    model, tok, a, _, ps = tiny
    half = copy.deepcopy(model).to(torch.bfloat16)
    lm = patching.wrap(half, tok)
    cast = copy.deepcopy(a)
    for name in cast.names():
        cast.a[name], cast.b[name] = cast.a[name].bfloat16(), cast.b[name].bfloat16()
    got = generation.greedy_generate(lm, ps, 5, set(), tok.pad_token_id, batch_size=3, adapter=a, remote="local")
    assert a.a[a.names()[0]].dtype == torch.float32
    assert got == generation.greedy_generate(lm, ps, 5, set(), tok.pad_token_id, batch_size=3, adapter=cast,
                                             remote="local")
    assert got != generation.greedy_generate(lm, ps, 5, set(), tok.pad_token_id, batch_size=3, remote="local")


def test_all_batches_go_in_one_request(tiny, monkeypatch):
    from nnsight.intervention.backends.local import LocalSimulationBackend

    model, tok, a, _, ps = tiny
    calls = []
    real = LocalSimulationBackend.__call__

    def counted(self, tracer):
        calls.append(type(tracer).__name__)
        return real(self, tracer)

    monkeypatch.setattr(LocalSimulationBackend, "__call__", counted)
    got = generation.greedy_generate(patching.wrap(model, tok), ps, 4, set(), tok.pad_token_id, batch_size=2,
                                     adapter=a, remote="local")
    assert len(calls) == 1 and len(got) == len(ps) == 7  # 4 batches, one request


def test_the_request_needs_no_code_of_the_package(tiny, monkeypatch):
    model, tok, a, merged, ps = tiny
    lm = patching.wrap(model, tok)
    expected = prompts.greedy_generate(merged, ps, 5, set(), tok.pad_token_id, batch_size=3)
    with package_hidden_from_the_server(monkeypatch) as ran:
        got = generation.greedy_generate(lm, ps, 5, set(), tok.pad_token_id, batch_size=3, adapter=a,
                                         remote="local")
        assert ran == [] and got == expected
        # and the watch works: a request whose body calls a function of the package is caught
        with torch.no_grad(), lm.session(remote="local"):
            with lm.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2) as tracer:
                prompts.pad([[1]], 0)
                tracer.result.save()
        assert any(r.endswith("prompts.py:pad") for r in ran)


def test_an_adapter_of_another_shape_is_refused_before_the_request(tiny):
    model, tok, a, _, ps = tiny
    other, _ = make_tiny_llama(n_layers=3)
    lm = patching.wrap(other, tok)
    with pytest.raises(ValueError, match="the adapter has 4 layers, the model 3"):
        generation.greedy_generate(lm, ps, 3, set(), tok.pad_token_id, adapter=a, remote="local")
    narrow = copy.deepcopy(a)
    name = narrow.names()[0]
    narrow.a[name] = narrow.a[name][:-1]
    with pytest.raises(ValueError, match=f"the adapter's module '{name}' maps 31 to"):
        generation.greedy_generate(patching.wrap(model, tok), ps, 3, set(), tok.pad_token_id, adapter=narrow)
    with pytest.raises(ValueError, match="remote must be"):
        generation.greedy_generate(patching.wrap(model, tok), ps, 3, set(), tok.pad_token_id, remote="ndif")
    with pytest.raises(ValueError, match="at least 1"):
        generation.greedy_generate(patching.wrap(model, tok), ps[:2], [0, 0], set(), tok.pad_token_id)


# ------------------------------------------------------------------------------------------- a model kept on NDIF
@pytest.fixture
def tiny_folder(tmp_path):
    """A tiny random Llama saved as a checkpoint folder: a model named by its location, as a hub id names one."""
    model, tok = wide_tiny_llama()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return str(tmp_path)


def test_a_remote_model_has_no_weights_here_and_an_adapter_is_made_for_it(tiny_folder):
    lm, tok = models.remote_model(tiny_folder)
    module = models.torch_module(lm)
    assert not lm.dispatched
    assert all(p.is_meta for p in module.parameters()) and sum(p.numel() for p in module.parameters()) > 0
    assert models.n_layers(lm) == models.n_layers(module) == 4
    assert models.architecture_of(lm).family == "llama"
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    config = UnlearnConfig.for_method("grad_diff", params="lora", lora_rank=3, seed=7)
    a = adapter_mod.init(lm, config)
    loaded, _ = models.load(tiny_folder)
    here = adapter_mod.init(loaded, config)  # the same seed on the loaded model: the same adapter
    assert a.names() == here.names() and a.targets == here.targets
    for name in a.names():
        assert a.a[name].device.type == "cpu" and a.a[name].dtype == torch.float32
        assert torch.equal(a.a[name], here.a[name]) and not a.b[name].any()
        assert a.b[name].shape == here.b[name].shape and a.b[name].device.type == "cpu"
    adapter_mod.fits(a, lm)
    assert not lm.dispatched and all(p.is_meta for p in module.parameters())  # still nothing loaded


def test_a_remote_true_request_is_written_without_loading_any_weight(tiny_folder, monkeypatch):
    """remote=True up to the point where the request would leave this machine: it is serialised (adapter terms
    included), and the model is still weightless."""
    import nnsight.modeling.huggingface as hf
    from nnsight import CONFIG
    from nnsight.intervention.backends.remote import RemoteBackend

    lm, tok = models.remote_model(tiny_folder)
    monkeypatch.setitem(hf._ID_CACHE, tiny_folder, "org/tiny-llama")  # the hub's canonical id, without the hub
    sent = {}

    class Sent(Exception):
        pass

    def request(self, request, tracer):
        sent["model_key"], sent["bytes"] = self.model_key, len(self._serialize(tracer))
        raise Sent

    monkeypatch.setattr(RemoteBackend, "request", request)
    monkeypatch.setattr(CONFIG.API, "COMPRESS", False)  # sizes as written
    a = adapter_mod.init(lm, UnlearnConfig.for_method("grad_diff", params="lora", lora_rank=3))
    ps = tiny_prompts(tok)
    size = {}
    for adapter in (None, a):
        with pytest.raises(Sent):
            generation.greedy_generate(lm, ps, 4, {tok.eos_token_id}, tok.pad_token_id, batch_size=3,
                                       adapter=adapter, remote=True)
        size[adapter is None] = sent["bytes"]
        assert '"repo_id": "org/tiny-llama"' in sent["model_key"]
    # the adapter's terms travel with the request
    assert size[False] - size[True] >= sum(t.numel() * t.element_size() for _, t in a.named_parameters())
    assert not lm.dispatched and all(p.is_meta for p in models.torch_module(lm).parameters())


def test_a_remote_model_generates_in_the_simulation_as_the_loaded_model_does(tiny_folder):
    """The path of a remote=True run (a model built from its name, its own tokenizer) run by the simulation, which
    loads the weights here: the tokens of the loaded model, with and without an adapter."""
    lm, tok = models.remote_model(tiny_folder)
    loaded, _ = models.load(tiny_folder)
    a = random_adapter(loaded)
    merged = adapter_mod.merge(copy.deepcopy(loaded), a).eval()
    ps = tiny_prompts(tok)
    for reference, adapter in ((loaded, None), (merged, a)):
        free = prompts.greedy_generate(reference, ps, 6, set(), tok.pad_token_id, batch_size=4)
        stop = stops_of(free, [0, 3])
        expected = prompts.greedy_generate(reference, ps, BUDGETS, stop, tok.pad_token_id, batch_size=4)
        assert generation.greedy_generate(lm, ps, BUDGETS, stop, tok.pad_token_id, batch_size=4, adapter=adapter,
                                          remote="local") == expected


@pytest.mark.slow  # the tiny-model tests above check the same in make test; this one on the real default model
def test_on_the_default_model_the_answers_are_greedy_generates_and_the_merged_models(default_model):
    """SmolLM2-135M, 30 layers: chat answers of shipped questions, vanilla and with an unlearning-sized adapter,
    each in one simulated request of two batches, token for token against prompts.greedy_generate on the same
    batches."""
    from dissect_unlearning import concepts

    model, tok = default_model
    questions = [q for c in concepts.load("builtin")[:2] for q in c.questions[:2]]
    ps = [prompts.encode_prompt(q, tok, "chat") for q in questions]
    stop, pad = prompts.eos_ids(tok, model), prompts.pad_id(tok)
    a = random_adapter(model, rank=4, alpha=8.0)
    for name in a.names():
        a.b[name] = a.b[name] * 0.3  # as in test_adapter: logits move by whole units, not a new model
    merged = adapter_mod.merge(copy.deepcopy(model), a).eval()
    lm = patching.wrap(model, tok)
    kw = dict(batch_size=2, by_length=True)
    vanilla = prompts.greedy_generate(model, ps, 16, stop, pad, **kw)
    unlearned = prompts.greedy_generate(merged, ps, 16, stop, pad, **kw)
    assert sum(v != u for v, u in zip(vanilla, unlearned)) >= 2
    assert generation.greedy_generate(lm, ps, 16, stop, pad, remote="local", **kw) == vanilla
    # Exact: x A (scale B) added to W x differs from (W + scale (A B)^T) x by float32 rounding only, which flipped
    # no greedy choice in what was measured (42 shipped questions x 30 tokens, three such adapters, one of them at
    # full size: 0 answers of 126 differed, 3,329 tokens). A flip would show as a near-tie, never as a pattern.
    assert generation.greedy_generate(lm, ps, 16, stop, pad, adapter=a, remote="local", **kw) == unlearned


# ------------------------------------------------------------------------------------------- the behaviour stage
def test_a_hosted_model_scores_perplexity_and_answers_as_the_loaded_one(tiny, monkeypatch):
    """generation.Hosted stands in for a loaded model in the behaviour stage: metrics.perplexity (every batch's summed
    NLL in one request) and prompts.generate_answers give the loaded model's numbers without an adapter and the
    merged model's with one, with the package hidden from the simulated server."""
    from dissect_unlearning import metrics

    model, tok, a, merged, _ = tiny
    lm = patching.wrap(model, tok)
    texts = ["w1 w2 w3 w4 w5 w6 w7 w8 w9", "w3 w5 w7 w2", "w9 w8 w7 w6 w5 w4 w3 w2 w1 w2 w3"]
    for hosted, loaded in ((generation.Hosted(lm, None, "local"), model),
                           (generation.Hosted(lm, a, "local"), merged)):
        with package_hidden_from_the_server(monkeypatch) as ran:
            got = metrics.perplexity(hosted, tok, texts, chunk_tokens=4, batch_size=2)
        want = metrics.perplexity(loaded, tok, texts, chunk_tokens=4, batch_size=2)
        assert ran == [] and got[1] == want[1] > 0
        assert abs(got[0] - want[0]) < 1e-4 * want[0], (got, want)
    with pytest.raises(ValueError, match="remote must be"):
        generation.Hosted(lm, None, "ndif")
