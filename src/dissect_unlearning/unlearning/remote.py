"""Adapter unlearning of a model that is not ours to change: the optimiser runs inside nnsight requests (NDIF).

NDIF runs the weights it hosts, frozen, and cannot load or edit ours (unlearning/adapter.py). What a request can do
is make tensors of its own, run the hosted model with interventions that read them, differentiate through the model
and update them. So a params="lora" run here is a sequence of `model.session(remote=...)` requests, each of which

  1. takes the adapter's A and B and AdamW's moments where the previous request left them (leaves of its own),
  2. runs `chunk_steps` optimiser steps: per step, one trace per batch part with the adapter applied on each target
     module (out + scale * (x @ A) @ B, as patching/adapted.py applies it), the method's loss from the traces'
     logits, backward, gradient clipping, AdamW at the step's learning rate,
  3. sends back the new A, B and moments and one loss row per step.

The client keeps everything else: the seeded schedule and its batches (trainer.schedule / make_batch), the warm-up
learning rates, the reference log-probs (one request of adapter-off passes before the first step, for exactly the
examples the schedule visits, as trainer.train computes them), the loss curve and the checkpoint. Nothing in a step
is random, so there is no RNG state to carry. The maths is trainer.train's for params="lora": with remote="local"
(nnsight's offline simulation of a request) the adapter and the loss curve come out bit for bit those of
trainer.train on a CPU, for every method (tests/test_remote_training.py).

No code of this package runs inside a request: NDIF deserializes a request with only whitelisted modules
importable, and a reference to any function of ours fails there ("Module X is not whitelisted"). Everything is
resolved beforehand into flat lists of envoys, tensors, numbers and strings, and the session bodies use only
builtins and torch. That includes the losses: each method's loss (methods.REGISTRY, one module per loss) is written
out a second time, inline, in `_chunk`'s body, and REMOTE_METHODS lists the methods that have that form; the tests
check each against the method's own loss function, gradient for gradient. What nnsight 0.8.1 allows, tried on a
simulated server stricter than its own (tests/test_remote_training.py: pickled with the package importable, run as
deserialized with it unimportable): a module-level function of this package travels by reference and fails to
deserialize, as on NDIF; a lambda travels by value (its source), and runs if everything its globals reach is torch
or builtins. The loss functions are module-level and call prompts.token_logprobs, so they cannot travel; torch-only
lambdas would be the same second copy of the losses, in a form NDIF's own deserializer was never tried with here.

Where a remote run differs from trainer.train by construction:
  - the model runs as it is hosted: in eval mode (trainer.train uses train mode; the same for a model without
    dropout, such as Llama or SmolLM2, which have none) and, on NDIF, in bfloat16 under autocast;
  - A, B and AdamW's moments stay where the request's tensors arrive (the server's CPU) and each pass moves A and B
    to its activations' device and dtype: no hosted weight is read to find out where a module lives (a model split
    over several GPUs needs nothing more), and the adapter keeps its own dtype under NDIF's bfloat16;
  - no gradient checkpointing and no LM head in pieces (prompts.token_logprobs): memory is the server's, and with
    remote="local" the server is this machine (about 3 GB more than trainer.train for the default model's
    batch: recomputing activations would rerun the request's interventions in the backward pass);
  - a loss row's `seconds` is the run's wall time when its request came back (a request reports no timing per step).
A request is one job: if it fails (a lost connection, NDIF's job time limit, a server restart) its steps are lost
and the run, started again with the same checkpoint folder, resumes after the last request that came back.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import models, progress as dissect_progress, prompts, validate
from . import adapter as adapter_mod, data as data_mod, methods, trainer

# Optimiser steps per request. NDIF ends a job after 3600 s (its default job timeout; the client's 600 s read timeout
# is for uploading the request and downloading the result, not for the job, which it awaits on a websocket). A step
# at the default settings (UnlearnConfig: 8 forget + 8 retain or chosen sequences of at most 256 tokens, at most ~6k
# tokens with idk_dpo's three parts) is a forward pass and a backward pass that computes activation gradients only
# (the weights are frozen): about 4 x n_params x tokens FLOPs, 2e14 for an 8B model (seconds on one of NDIF's GPUs),
# 1.7e15 for a 70B one, 1e16 for a 405B one (about 100 s at 100 TFLOP/s). Five steps of the largest hosted model are
# then minutes, and the default model (SmolLM2-135M, not hosted on NDIF: it trains in remote="local" requests here)
# took 32 s per step of 4 + 4 sequences of 128 tokens on one core of this project's shared 2-core CPU, so a chunk of
# five full default steps is at most ~10 minutes even there. Every case stays several times under the limit. Larger
# chunks save NDIF's per-request overhead (queueing, deserializing); smaller ones lose less when a request fails.
# Five is also the default number of steps: a default run is one request (plus one for the reference log-probs of NPO
# and DPO).
CHUNK_STEPS = 5
REMOTE_CHOICES = (True, "local")
# The methods whose loss `_chunk` computes inline (every method of methods.REGISTRY as shipped)
REMOTE_METHODS = ("grad_ascent", "grad_diff", "npo", "dpo", "idk_dpo", "control")
FORMAT = "dissect-unlearning/remote-lora-1"  # of a checkpoint's state: fingerprints differ from trainer.train's


def passes(method: str, retain_weight: float) -> tuple[str, ...]:
    """The batch parts whose forward pass a step of `method` runs, in the order its loss module runs them (a retain
    pass only where the loss reads it: NPO and the refusal DPO skip it when retain_weight is 0)."""
    return {
        "grad_ascent": ("forget",),
        "grad_diff": ("forget", "retain"),
        "control": ("forget", "retain"),
        "npo": ("forget", "retain") if retain_weight else ("forget",),
        "dpo": ("chosen", "forget"),
        "idk_dpo": ("chosen", "forget", "retain") if retain_weight else ("chosen", "forget"),
    }[method]


def check_settings(config, remote, chunk_steps) -> None:
    """Raise a ValueError naming the setting unless a remote run of `config` can start."""
    if config.params != "lora":
        raise ValueError(f"params must be 'lora' for remote training (NDIF's weights are frozen: only an adapter of "
                         f"our own can be trained in a request), got {config.params!r}; trainer.train trains the "
                         f"other kinds locally")
    if remote not in REMOTE_CHOICES:
        raise ValueError(f"remote must be True (train on NDIF) or 'local' (nnsight's offline simulation of NDIF's "
                         f"requests), got {remote!r}; a local run is trainer.train(..., params='lora')")
    if not validate.int_in_range(chunk_steps, 1, None):
        raise ValueError(f"chunk_steps (optimiser steps per request) must be {validate.int_words(1)}, got "
                         f"{chunk_steps!r}")
    if config.method not in REMOTE_METHODS:
        raise ValueError(f"method {config.method!r} has no remote form (a request cannot call its loss function: "
                         f"see unlearning/remote.py); remote training knows {', '.join(REMOTE_METHODS)}")


@dataclass
class _State:
    """A run after `step` steps: what a checkpoint holds and the next request starts from (CPU tensors)."""

    step: int
    params: dict[str, torch.Tensor]  # A and B by Adapter.named_parameters() name
    exp_avg: dict[str, torch.Tensor]  # AdamW's moments (empty before the first step)
    exp_avg_sq: dict[str, torch.Tensor]
    curve: list[dict]
    ref: dict[str, torch.Tensor]  # the reference log-probs per part (NaN where the schedule never looks)
    seconds: float
    reference_seconds: float


def train_remote(model, tok, data: data_mod.UnlearningData, config, remote=True, chunk_steps: int = CHUNK_STEPS,
                 checkpoint: Path | None = None, progress: bool = True) -> trainer.TrainResult:
    """Train the params="lora" adapter of `config` on `model` in requests of `chunk_steps` optimiser steps each.

    model: the vanilla HF model. With remote=True only its structure and name are used here (NDIF runs the model it
    hosts under config._name_or_path; call patching.remote.preflight(model) first, as the pipeline does before a
    remote sweep), so it may be on the meta device. With remote="local" it is the model the simulated requests run:
    it is frozen and in eval mode during the run (as NDIF's is) and left as it was found.
    checkpoint: a folder unique to the run (as trainer.train's); the state after each request that came back is
    written there atomically, and a run started again with it resumes after that request, ending with the adapter an
    uninterrupted run would have had. The caller removes it (trainer.discard_checkpoint) once the result is stored.

    Returns trainer.train's TrainResult: `adapter` holds the trained adapter (on the device of the model's weights,
    the CPU for a model on the meta device), `loss_curve` one row per step with trainer.train's columns.
    """
    from tqdm.auto import tqdm

    check_settings(config, remote, chunk_steps)
    t0 = time.time()
    method = methods.get(config.method)
    pad_id = prompts.pad_id(tok)
    n_steps = config.n_steps(len(data.forget))
    steps = trainer.schedule(len(data.forget), n_steps, config.batch_size, config.seed)
    on_meta = next(model.parameters()).device.type == "meta"
    lora = adapter_mod.init(model, config, device="cpu" if on_meta else None)
    trained = lora.named_parameters()
    fingerprint = _fingerprint(data, config, n_steps, trained, model, remote)
    saved = trainer._load_checkpoint(checkpoint, fingerprint) if checkpoint is not None else None
    plan = _Plan(model, tok, lora, config)

    with _as_hosted(model, remote):
        if saved is not None:
            state = _State(saved["step"], saved["params"], saved["exp_avg"], saved["exp_avg_sq"], list(saved["curve"]),
                           saved["ref"], saved["seconds"], saved["reference_seconds"])
            t0 -= state.seconds  # the curve's and the result's seconds count the time before the interruption too
            print(f"[dissect-unlearning] unlearn {data.forget_concept} ({config.method}, remote): resuming at step "
                  f"{state.step}/{n_steps} from {checkpoint}", file=sys.stderr, flush=True)
        else:
            ref = {}
            if method.reference:
                dissect_progress.detail("reference log-probs (one request)")
                visited = sorted({i for s in steps for i in s})
                ref = _reference(plan, data, method.reference, visited, pad_id, config.batch_size, remote)
            state = _State(0, {n: t.detach().to("cpu") for n, t in trained}, {}, {}, [], ref, 0.0, time.time() - t0)
            if checkpoint is not None and method.reference:
                _save(checkpoint, fingerprint, state, t0)  # the reference request is not repeated either

        bar = tqdm(total=n_steps, initial=state.step, desc=f"unlearn {data.forget_concept} ({config.method}, remote)",
                   disable=not progress, unit="step")
        try:
            with dissect_progress.stop_on_signals():
                while state.step < n_steps:
                    first = state.step
                    index = steps[first:first + chunk_steps]
                    dissect_progress.detail(f"steps {first + 1}-{first + len(index)}/{n_steps} (one request)")
                    batches = [[_inputs(trainer.make_batch(data, [part], i, pad_id)[part]) for part in plan.passes]
                               for i in index]
                    refs = [{part: state.ref[part][i] for part in method.reference} for i in index]
                    lrs = [config.lr * min(1.0, (s + 1) / (config.warmup_steps + 1))  # LambdaLR's, in trainer.train
                           for s in range(first, first + len(index))]
                    out = _chunk(plan, state, batches, refs, lrs, remote)
                    state = _advance(plan, state, out, lrs, time.time() - t0, config)
                    bar.update(len(index))
                    if checkpoint is not None:
                        _save(checkpoint, fingerprint, state, t0)
        finally:
            bar.close()

    like = {n: t for n, t in trained}
    result = adapter_mod.Adapter(lora.layers, lora.n_layers, lora.targets, lora.rank, lora.alpha, {}, {})
    for name in lora.names():
        result.a[name] = state.params[f"{name}.lora_a"].to(like[f"{name}.lora_a"].device)
        result.b[name] = state.params[f"{name}.lora_b"].to(like[f"{name}.lora_b"].device)
    return trainer.TrainResult(state.curve, time.time() - t0, n_steps, len(data.forget), lora.numel(),
                               data.forget_concept, data.retain_concept, state.reference_seconds, result)


# ---------------------------------------------------------------------------------------------------------- plan
class _Plan:
    """What every request of a run needs, resolved before any starts: the wrapped model, the adapted modules'
    envoys with the positions of their A and B among the trained tensors, and the loss's settings as plain values."""

    def __init__(self, model, tok, lora: adapter_mod.Adapter, config):
        self.lm = _wrap(model, tok)
        self.names = [n for n, _ in lora.named_parameters()]  # the order of the leaves: A, B of each module
        self.shapes = [tuple(t.shape) for _, t in lora.named_parameters()]
        envoys = [models.get_module(self.lm, name) for name in lora.names()]  # in forward order (adapter.names)
        self.sites = [(envoy, 2 * k) for k, envoy in enumerate(envoys)]  # A at 2k, B at 2k + 1
        self.scale = lora.scale
        self.method = config.method
        self.passes = passes(config.method, config.retain_weight)
        self.settings = {"beta": float(config.beta), "retain_weight": float(config.retain_weight),
                         "weight_decay": float(config.weight_decay),
                         "max_grad_norm": None if not config.max_grad_norm else float(config.max_grad_norm)}


def _wrap(model, tok):
    """An nnsight LanguageModel around the loaded model (patching.common.wrap's twin: this layer does not import
    the patching package)."""
    from nnsight import LanguageModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "LanguageModel is a deprecated alias of TransformersModel"
        return LanguageModel(model, tokenizer=tok)


def _inputs(part: data_mod.Part) -> tuple:
    return part.input_ids, part.attention_mask, part.labels


@contextlib.contextmanager
def _as_hosted(model, remote):
    """With remote="local", the simulated server's model as NDIF's is: frozen (gradients reach only the request's
    own tensors, and no weight accumulates a .grad) and in eval mode. Restored afterwards."""
    if remote != "local":
        yield
        return
    grad = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in grad:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, g in grad:
            p.requires_grad_(g)
        model.train(was_training)


# ------------------------------------------------------------------------------------------------------ requests
def _reference(plan: _Plan, data, parts, visited: list[int], pad_id: int, batch_size: int, remote) -> dict:
    """trainer.reference_logprobs in one request: the adapter-off sequence log-probs of the examples in `visited`,
    in the batches trainer.reference_logprobs uses (so the same numbers), NaN elsewhere, per part."""
    batches = [_inputs(trainer.make_batch(data, [part], visited[s:s + batch_size], pad_id)[part])
               for part in parts for s in range(0, len(visited), batch_size)]
    values = _reference_session(plan.lm, batches, remote, prompts.IGNORE)
    out, k = {}, 0
    for part in parts:
        column = torch.full((len(data.forget),), float("nan"))
        column[visited] = values[k:k + len(visited)]
        out[part] = column
        k += len(visited)
    return out


def _reference_session(lm, batches, remote, ignore) -> torch.Tensor:
    """The summed log-prob of the labelled tokens of each sequence of `batches`, adapter off, concatenated."""
    with lm.session(remote=remote):
        with torch.no_grad():
            values = []
            for ids, mask, labels in batches:
                with lm.trace(input_ids=ids, attention_mask=mask):
                    logits = lm.output.logits
                lg = logits[:, :-1].float()
                y = labels[:, 1:].to(lg.device)
                nll = F.cross_entropy(lg.flatten(0, 1), y.flatten(), ignore_index=ignore, reduction="none")
                values.append((-nll.view(y.shape)).sum(-1).cpu())
            reference = torch.cat(values).save()
    return reference


@dataclass
class _ChunkOut:
    rows: torch.Tensor  # [steps evaluated, 4]: loss, forget NLL, retain NLL (NaN: none), grad norm (NaN: no clipping)
    state: torch.Tensor  # flat: the leaves, then exp_avg, then exp_avg_sq (empty after a non-finite loss)
    grads: torch.Tensor  # [steps, n] each step's gradient before clipping, flat (keep_grads only)


def _chunk(plan: _Plan, state: _State, batches, refs, lrs, remote, keep_grads: bool = False) -> _ChunkOut:
    """One request: len(batches) optimiser steps from `state`. batches[s]: (input_ids, attention_mask, labels) per
    pass of plan.passes; refs[s]: the reference log-probs of the step's examples per reference part; lrs[s]: its
    learning rate. keep_grads: also send back each step's gradient (A and B, before clipping), which is how the tests
    hold the inline losses to the methods' own."""
    start = [state.params[n].detach().to("cpu") for n in plan.names]
    first = [state.exp_avg[n].detach().to("cpu") for n in plan.names] if state.exp_avg else []
    second = [state.exp_avg_sq[n].detach().to("cpu") for n in plan.names] if state.exp_avg_sq else []
    adam_step = float(state.step)
    lm, sites, scale = plan.lm, plan.sites, plan.scale
    method, part_names = plan.method, plan.passes
    beta, retain_weight = plan.settings["beta"], plan.settings["retain_weight"]
    weight_decay, max_grad_norm = plan.settings["weight_decay"], plan.settings["max_grad_norm"]
    ignore = prompts.IGNORE
    # Everything in the session runs on the server: builtins and torch only (see the module docstring). The body is
    # one statement per line, with no blank or comment-only line (comments go at line ends): nnsight 0.8.1 ships it
    # as ast.unparse's text, and the simulated server (remote="local") looks each inner trace up by its line number
    # in this file, so a line that unparsing removes or joins (a comment line, a statement over two lines) before a
    # trace moves it, and the request fails with "nnsight found no `with` statement".
    with lm.session(remote=remote):
        leaves = [t.clone().requires_grad_(True) for t in start]  # the request's own copies, where they arrived
        optimiser = torch.optim.AdamW(leaves, lr=lrs[0], weight_decay=weight_decay, foreach=True)
        for p, m1, m2 in zip(leaves, first, second):  # AdamW as the last request left it (no state before step 1)
            optimiser.state[p] = {"step": torch.tensor(adam_step), "exp_avg": m1.clone(), "exp_avg_sq": m2.clone()}
        rows, grads, finite = [], [], True
        for s in range(len(batches)):
            logp, count = {}, {}
            for part, (ids, mask, labels) in zip(part_names, batches[s]):
                with lm.trace(input_ids=ids, attention_mask=mask):
                    for m, k in sites:
                        x = m.input  # a module's input before its output: nnsight meets them in this order
                        a, b = leaves[k].to(x), leaves[k + 1].to(x)  # to the activation's device and dtype
                        m.output = m.output + scale * ((x @ a) @ b)  # adapter.attached's term
                    logits = lm.output.logits
                lg = logits[:, :-1].float()  # prompts.token_logprobs, then logprobs.sequence_logprobs
                y = labels[:, 1:].to(lg.device)
                nll = F.cross_entropy(lg.flatten(0, 1), y.flatten(), ignore_index=ignore, reduction="none")
                logp[part] = (-nll.view(y.shape)).sum(-1)
                count[part] = (y != ignore).sum(-1)
            mean = {part: -logp[part].sum() / count[part].sum().clamp(min=1) for part in logp}  # logprobs.mean_nll
            ref = {part: value.to(logp[part].device) for part, value in refs[s].items()}
            retain = None
            if method == "grad_ascent":  # each loss as its module (grad_ascent.py, grad_diff.py, ...) computes it
                forget = mean["forget"]
                loss = -forget
            elif method == "grad_diff":
                forget, retain = mean["forget"], mean["retain"]
                loss = -forget + retain_weight * retain
            elif method == "control":
                forget, retain = mean["forget"], mean["retain"]
                loss = forget + retain_weight * retain
            elif method == "npo":
                forget = mean["forget"].detach()
                loss = -(2.0 / beta) * F.logsigmoid(beta * (ref["forget"] - logp["forget"])).mean()
                if retain_weight:
                    retain = mean["retain"]
                    loss = loss + retain_weight * retain
            else:  # dpo and idk_dpo: dpo.dpo_term, the chosen side preferred to the forget side
                margin = (logp["chosen"] - logp["forget"]) - (ref["chosen"] - ref["forget"])
                loss = -(2.0 / beta) * F.logsigmoid(beta * margin).mean()
                forget = mean["forget"].detach()
                if method == "dpo":
                    retain = mean["chosen"]  # dpo's chosen side is the retain text
                    if retain_weight:
                        loss = loss + retain_weight * retain
                elif retain_weight:
                    retain = mean["retain"]
                    loss = loss + retain_weight * retain
            nan = torch.tensor(float("nan"))
            row = [loss.detach().cpu(), forget.detach().cpu(), nan if retain is None else retain.detach().cpu()]
            if not bool(torch.isfinite(loss)):  # no step: the client raises trainer.train's error
                rows.append(torch.stack(row + [nan]))
                finite = False
                break
            optimiser.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            if keep_grads:
                grads.append(torch.cat([p.grad.detach().reshape(-1).cpu() for p in leaves]))
            norm = torch.nn.utils.clip_grad_norm_(leaves, max_grad_norm).detach().cpu() if max_grad_norm else nan
            for group in optimiser.param_groups:
                group["lr"] = lrs[s]  # LambdaLR's warm-up, computed by the client
            optimiser.step()
            rows.append(torch.stack(row + [norm]))
        moments = [optimiser.state[p][key] for key in ("exp_avg", "exp_avg_sq") for p in leaves] if finite else []
        trained = torch.cat([t.detach().reshape(-1).cpu() for t in leaves + moments]) if finite else torch.zeros(0)
        trained = trained.save()
        losses = torch.stack(rows).save()
        gradients = (torch.stack(grads) if grads else torch.zeros(0)).save()
    return _ChunkOut(losses, trained, gradients)


def _advance(plan: _Plan, state: _State, out: _ChunkOut, lrs, seconds: float, config) -> _State:
    """The run after a request came back: its rows appended to the curve, its tensors unpacked by name."""
    curve = list(state.curve)
    for s, (loss, forget, retain, norm) in enumerate(out.rows.tolist()):
        step = state.step + s + 1
        if not math.isfinite(loss):  # trainer.train's error, word for word
            raise FloatingPointError(f"{config.method}: the loss became {loss} at step {step}; lower lr (now "
                                     f"{config.lr})")
        curve.append({"step": step, "loss": loss, "forget_loss": forget, "retain_loss": retain, "lr": lrs[s],
                      "grad_norm": norm, "seconds": seconds})
    sizes = [math.prod(shape) for shape in plan.shapes]
    pieces = torch.split(out.state, sizes * 3)
    n = len(plan.names)

    def unpack(k: int) -> dict[str, torch.Tensor]:  # the k-th block of n tensors: leaves, exp_avg, exp_avg_sq
        block = pieces[k * n:(k + 1) * n]
        return {name: t.view(shape).clone() for name, shape, t in zip(plan.names, plan.shapes, block)}

    return _State(state.step + len(out.rows), unpack(0), unpack(1), unpack(2), curve, state.ref, seconds,
                  state.reference_seconds)


# ---------------------------------------------------------------------------------------------------- checkpoints
def _fingerprint(data, config, n_steps: int, trained, model, remote) -> str:
    """trainer's fingerprint (settings, examples, trained tensors) plus where the requests run: NDIF's bfloat16
    model and the local simulation give different numbers, so neither resumes the other's run."""
    where = "local" if remote == "local" else f"ndif:{getattr(model.config, '_name_or_path', '')}"
    base = trainer._fingerprint(data, config, n_steps, trained)
    return hashlib.sha256(f"{FORMAT}|{where}|{base}".encode()).hexdigest()


def _save(checkpoint: Path, fingerprint: str, state: _State, t0: float) -> None:
    trainer.write_checkpoint(checkpoint, {
        "fingerprint": fingerprint, "step": state.step, "seconds": time.time() - t0, "curve": state.curve,
        "ref": state.ref, "reference_seconds": state.reference_seconds, "params": state.params,
        "exp_avg": state.exp_avg, "exp_avg_sq": state.exp_avg_sq})
