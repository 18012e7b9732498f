"""Greedy generation inside an nnsight request: the vanilla model's answers, or the unlearned model's, on NDIF.

prompts.greedy_generate calls generate() on a model loaded here. A model hosted on NDIF is not loaded here: it runs
only inside a request, and the unlearned model of the adapter path exists only there too, as the hosted weights plus
a low-rank adapter applied as an intervention (unlearning/adapter.py). So this is the same greedy decoding written
as a request:

    lm = patching.wrap(model, tok)                  # a model loaded here, or
    lm, tok = models.remote_model("org/name")       # one NDIF hosts (no weights here)
    answers = generation.greedy_generate(lm, prompt_ids, 30, prompts.eos_ids(tok, lm), prompts.pad_id(tok),
                                         batch_size=16, by_length=True, adapter=None or an Adapter, remote=True)

The batches, the generate() options and the cut of each row are prompts.greedy_generate's own (generate_batches,
generate_options, cut_continuation), so the same prompts give the same batches and, on the same model and machine,
the same tokens: without an adapter exactly those of greedy_generate, with one those of greedy_generate on the model
with the adapter merged (adapter.merge) up to float rounding, as x A (scale B) added to W x is not bit for bit
(W + scale (A B)^T) x (tests/test_remote_generation.py). NDIF runs its own hardware and dtype (bfloat16), so its
answers are its own: compare answers generated in the same place.

One request for all batches: one generate() per batch inside one session, so NDIF queues the job once and only the
generated ids come back. In each generate() the adapter's term is added to every adapted module's output at every
step (the forward over the prompt, then one per new token): a `for step in tracer.all()` loop, which follows the
decoding until it ends. That loop cannot know the number of steps in advance (a batch stops early once every row
has met a stop token), so it ends by waiting for a step that never comes; nnsight then unwinds it (with a warning,
silenced here) and nothing after the loop in its block runs. So the generated ids are read in a second invoke of
the same generate(), which shares the first one's batch: nnsight's own pattern for what follows such a loop. Pinning
the step count instead would change the answers (min_new_tokens forbids the stop tokens) or cost steps (no stop at
all).

The request's body holds only envoys, tensors, builtins and torch: every module and adapter tensor is resolved before
the session starts, so no code of this package runs on NDIF (which runs whitelisted modules only). The adapter's
terms travel as they are (on the CPU) and are moved to each activation's device and dtype inside the body, since
NDIF's devices and dtype are not known here.
"""
from __future__ import annotations

import warnings

import torch

from . import models, prompts as prompts_mod

REMOTE_CHOICES = (False, True, "local")  # patching.common's, which this layer does not import

# nnsight's warning when a `tracer.all()` loop outlives the decoding, which is how such a loop ends by design.
_LOOP_END = r".*was never reached: the loop asked for a step the run did not make"


def greedy_generate(lm, prompts: list[list[int]], max_new_tokens: int | list[int], stop: set[int], pad_token: int,
                    batch_size: int = 16, by_length: bool = False, *, adapter=None, remote="local"
                    ) -> list[list[int]]:
    """prompts.greedy_generate through nnsight, in one request: the greedy continuation of each prompt (token ids),
    at most max_new_tokens[i] tokens (one int: the same for all), cut after the first token in `stop` (kept).

    lm: an nnsight model: patching.wrap(model, tok) for a model loaded here, models.remote_model(hub_id)[0] for one
    that NDIF hosts. adapter: None (the vanilla model) or an unlearning.adapter.Adapter made for lm's shape, whose
    terms are added at every generation step (the unlearned model). remote: True (NDIF), "local" (nnsight's offline
    simulation of the request: serialised and deserialised as for NDIF, then run here) or False (the same traces
    run here directly). batch_size and by_length form the batches as prompts.greedy_generate does."""
    if remote not in REMOTE_CHOICES:
        raise ValueError(f"remote must be True (run on NDIF), 'local' (nnsight's offline simulation of an NDIF "
                         f"request) or False (run here), got {remote!r}")
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts):
        raise ValueError(f"max_new_tokens has {len(budgets)} budgets for {len(prompts)} prompts")
    terms = _terms(lm, adapter)
    batches = prompts_mod.generate_batches(prompts, batch_size, by_length)
    jobs = []
    for batch in batches:
        ids, mask = prompts_mod.pad([prompts[i] for i in batch], pad_token, "left")
        longest = max(budgets[i] for i in batch)
        if longest < 1:  # generate() refuses it too, but inside the request: after the queue, on NDIF
            raise ValueError(f"max_new_tokens must be at least 1 for some prompt of each batch; batch {batch} has "
                             f"{[budgets[i] for i in batch]}")
        jobs.append((dict(input_ids=ids, attention_mask=mask), prompts_mod.generate_options(longest, stop, pad_token)))
    generated = _session(lm, jobs, terms, remote) if jobs else []
    out: list[list[int]] = [[] for _ in prompts]
    for batch, (inputs, _), ids in zip(batches, jobs, generated):
        width = inputs["input_ids"].shape[1]
        for row, i in enumerate(batch):
            out[i] = prompts_mod.cut_continuation(ids[row, width:].tolist(), budgets[i], stop)
    return out


def _terms(lm, adapter) -> list[tuple]:
    """[(envoy, A, scale B)] for every adapted module of lm, in forward order (the order a trace must touch them
    in); [] without an adapter. Raises a ValueError for an adapter made for another shape, here rather than as an
    error from inside the request."""
    if adapter is None:
        return []
    if adapter.n_layers != models.n_layers(lm):
        raise ValueError(f"the adapter has {adapter.n_layers} layers, the model {models.n_layers(lm)}")
    terms = []
    for name in adapter.names():
        try:
            envoy = models.get_module(lm, name)
        except (AttributeError, IndexError):
            raise ValueError(f"the adapter adapts {name!r}, which the model does not have") from None
        a, b = adapter.a[name].detach(), adapter.scale * adapter.b[name].detach()
        out_features, in_features = models.torch_module(envoy).weight.shape
        if (a.shape[0], b.shape[1]) != (in_features, out_features):
            raise ValueError(f"the adapter's module {name!r} maps {a.shape[0]} to {b.shape[1]} features, the "
                             f"model's {in_features} to {out_features}")
        terms.append((envoy, a, b))  # scale folded into B: one multiplication fewer per step, no float to ship
    return terms


def _session(lm, jobs: list[tuple[dict, dict]], terms: list[tuple], remote) -> list[torch.Tensor]:
    """The ids generate() returns (prompt and new tokens) for each job (inputs, generate options), from one session.

    Each `with` statement below stays on one line: nnsight 0.8.1 reads a block's code from its source, and a `with`
    header that spans lines inside a session fails there ("Cannot access `result` outside of interleaving")."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_LOOP_END)
        with torch.no_grad(), lm.session(remote=remote):
            results = list().save()
            for inputs, options in jobs:
                with lm.generate(**options) as tracer:
                    with tracer.invoke(**inputs):
                        # no adapter: no loop (an open loop that asks for nothing would never end)
                        for _ in (tracer.all() if terms else ()):
                            for module, a, b in terms:
                                x = module.input  # before the output: nnsight serves them in forward order
                                module.output = module.output + (x @ a.to(x)) @ b.to(x)
                    with tracer.invoke():  # the whole batch's ids, once the decoding has ended
                        results.append(tracer.result)
    return [r.cpu() for r in results]


class Hosted:
    """A model that runs only inside nnsight requests, as the stages that generate and score text see it.

    lm: an nnsight model (patching.wrap of a model loaded here, or models.remote_model of one NDIF hosts); adapter:
    None (the vanilla model) or an unlearning.adapter.Adapter, applied inside every request (the unlearned model of
    the adapter path); remote: True (NDIF), "local" (nnsight's offline simulation) or False.

    prompts.greedy_generate (hence prompts.generate_answers and metrics.greedy_continuations) and metrics.perplexity
    accept it in place of a loaded model: the same batches, generate() options and sums, computed in one request
    per call, so a behaviour table of the adapter path is computed as the local one is."""

    def __init__(self, lm, adapter=None, remote="local"):
        if remote not in REMOTE_CHOICES:
            raise ValueError(f"remote must be True, 'local' or False, got {remote!r}")
        _terms(lm, adapter)  # an adapter of another shape fails here, not inside a request
        self.lm, self.adapter, self.remote = lm, adapter, remote

    @property
    def generation_config(self):  # prompts.eos_ids reads the stop tokens from it
        return getattr(models.torch_module(self.lm), "generation_config", None)

    def greedy(self, prompts: list[list[int]], max_new_tokens, stop: set[int], pad_token: int, batch_size: int = 16,
               by_length: bool = False) -> list[list[int]]:
        return greedy_generate(self.lm, prompts, max_new_tokens, stop, pad_token, batch_size, by_length,
                               adapter=self.adapter, remote=self.remote)

    def nll_sums(self, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[float]:
        """For each teacher-forced batch (input_ids, attention_mask, labels with prompts.IGNORE where unscored): the
        summed negative log-likelihood of its labels, as prompts.token_logprobs(reduction="sum") computes it (float32
        cross-entropy summed inside cross_entropy), all batches in one request."""
        # Plain names in the body (not self: the request would carry this class, which NDIF cannot import)
        lm, remote, terms = self.lm, self.remote, _terms(self.lm, self.adapter)
        ignore = prompts_mod.IGNORE
        with torch.no_grad(), lm.session(remote=remote):
            sums = list().save()
            for ids, mask, labels in batches:
                with lm.trace(input_ids=ids, attention_mask=mask):
                    for module, a, b in terms:
                        x = module.input
                        module.output = module.output + (x @ a.to(x)) @ b.to(x)
                    logits = lm.output.logits[:, :-1].float()
                    target = labels[:, 1:].to(logits.device)
                    flat = logits.reshape(-1, logits.shape[-1])
                    sums.append(torch.nn.functional.cross_entropy(flat, target.reshape(-1), ignore_index=ignore,
                                                                  reduction="sum"))
        return [float(s) for s in sums]
