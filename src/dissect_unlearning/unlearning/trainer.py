"""One trainer for every unlearning method: AdamW with linear warm-up, seeded batches, a progress bar, a loss curve.

The data set is fixed, so the reference (vanilla) log-probs that NPO and DPO need are computed once, before the
first step, for exactly the examples the schedule will visit: no second model in memory and no second forward per
step, which halves their cost on a CPU. A run given a checkpoint folder saves its whole state every few steps and
when interrupted, and a killed run started again resumes from it with the weights it would have had anyway.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import cache, models, progress as dissect_progress, prompts, validate
from . import adapter as adapter_mod, data as data_mod, methods
from .config import UnlearnConfig


CHECKPOINT_EVERY = 2  # steps between checkpoints of a run given a checkpoint folder
# ... and at least this many seconds of training since the last one (or the start). Writing the default model's
# state (1.6 GB) takes 5-6 s, 10% of its 5-step run, to protect at most 2 minutes of work: short runs write none, a
# run of slow steps (a larger model) still writes one every CHECKPOINT_EVERY steps. The environment variable
# overrides it (0: every CHECKPOINT_EVERY steps, as the interruption tests want).
CHECKPOINT_SECONDS = 120.0
CHECKPOINT_SECONDS_ENV = "DISSECT_UNLEARNING_CHECKPOINT_SECONDS"
CHECKPOINT_FILE = "state.pt"
# An interrupted run writes a checkpoint of its last complete step only when that is quick: writing one delays the
# stop, by 5-7 s for the default model (1.6 GB of weights and optimiser state, two workers writing at once). A larger
# run loses the steps since its last periodic checkpoint instead.
INTERRUPT_CHECKPOINT_BYTES = 256 * 2**20


@dataclass
class TrainResult:
    loss_curve: list[dict]  # one row per step: step, loss, forget_loss, retain_loss, lr, grad_norm, seconds
    seconds: float  # wall time of the whole run (reference log-probs included)
    n_steps: int
    n_forget: int  # forget examples (text chunks + question/answer pairs)
    n_trainable: int  # trained parameters
    forget_concept: str
    retain_concept: str
    reference_seconds: float = 0.0  # of `seconds`: the up-front reference log-probs (NPO, DPO)
    adapter: adapter_mod.Adapter | None = None  # the trained adapter of a params="lora" run (the model is vanilla)


@contextlib.contextmanager
def recomputed_activations(model):
    """Gradient checkpointing inside the block: each decoder layer keeps only its input for the backward pass and
    recomputes the rest there. About a third more compute per step, for 3 GB less memory with the default model's
    batch (the activations of 30 layers x 4,096 tokens), which lets a 16 GB laptop train while the book builds.
    The gradients are bit for bit those of a plain backward pass (tests/test_unlearning.py checks it)."""
    # transformers 5 calls it activation checkpointing (the gradient_ names are deprecated aliases)
    new = callable(getattr(model, "activation_checkpointing_enable", None))
    prefix = "activation" if new else "gradient"
    enable = getattr(model, f"{prefix}_checkpointing_enable", None)
    if not callable(enable) or not getattr(model, "supports_gradient_checkpointing", False):
        yield  # a model without the switch trains the plain way
        return
    was = bool(getattr(model, f"is_{prefix}_checkpointing", False))
    config = getattr(model, "config", None)
    cache_was = getattr(config, "use_cache", None)
    enable(**{f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}})
    if cache_was:
        config.use_cache = False  # a training pass keeps no key/value cache (and transformers warns if asked to)
    try:
        yield
    finally:
        if cache_was:
            config.use_cache = cache_was
        if not was:
            getattr(model, f"{prefix}_checkpointing_disable")()


def trainable_parameters(model, params: str) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters an unlearning run updates: 'all', every layer's 'mlp', or the 'last_k:K' decoder layers (a
    'lora' run updates an adapter's, adapter.init)."""
    named = list(model.named_parameters())
    if params == "all":
        return named
    arch = models.architecture_of(model)
    layers = models.get_module(model, arch.layers)
    if params == "mlp":
        chosen = {id(p) for layer in layers for p in models.get_module(layer, arch.mlp).parameters()}
    elif params.startswith("last_k:"):
        k = int(params.split(":", 1)[1])
        if k > len(layers):
            raise ValueError(f"params {params!r}: the model has only {len(layers)} layers")
        chosen = {id(p) for layer in list(layers)[-k:] for p in layer.parameters()}
    else:
        raise ValueError(f"params must be 'all', 'mlp' or 'last_k:K', got {params!r}")
    return [(n, p) for n, p in named if id(p) in chosen]


def schedule(n_examples: int, n_steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Example indices of each step: passes over the forget set, each in a fresh seeded order."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < n_steps * batch_size:
        epoch = list(range(n_examples))
        rng.shuffle(epoch)
        order += epoch
    return [order[s * batch_size:(s + 1) * batch_size] for s in range(n_steps)]


def make_batch(data: data_mod.UnlearningData, parts, index: list[int], pad_id: int) -> dict[str, data_mod.Part]:
    sets = {"forget": data.forget, "retain": data.retain, "chosen": data.chosen}
    return {p: data_mod.collate([sets[p][i] for i in index], index, pad_id) for p in parts}


@torch.no_grad()
def reference_logprobs(model, data, parts, indices, pad_id: int, batch_size: int) -> dict[str, torch.Tensor]:
    """Vanilla sequence log-probs of the examples in `indices` (NaN elsewhere), per part."""
    from .logprobs import sequence_logprobs

    out = {}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device  # kept where the losses compare them with the model's log-probs
    for part in parts:
        values = torch.full((len(data.forget),), float("nan"), device=device)
        idx = sorted(indices)
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            logp, _ = sequence_logprobs(model, make_batch(data, [part], chunk, pad_id)[part])
            values[chunk] = logp
        out[part] = values
    model.train(was_training)
    return out


def train(model, tok, data: data_mod.UnlearningData, config: UnlearnConfig, progress: bool = True,
          checkpoint: Path | None = None) -> TrainResult:
    """Unlearn in place: `model` leaves in eval mode with the unlearned weights. With params="lora" the model's
    weights stay vanilla and the result's `adapter` holds what was learnt (adapter.py).

    `checkpoint`: a folder for the run's state (trained weights, optimiser, scheduler, RNG, step, loss curve),
    written atomically every CHECKPOINT_EVERY steps once checkpoint_seconds() of training have passed since the
    last one, and, for a small state, when the run is interrupted (Ctrl-C,
    SIGTERM). A run given a folder that holds the state of this very run (same settings, data and trained
    parameters) resumes from it and ends with the weights an uninterrupted run would have had, bit for bit on a
    CPU. Its name must be unique to the run (artefact.build keys it by the cache key); the caller removes it once
    the result is stored.
    """
    from tqdm.auto import tqdm

    t0 = time.time()
    torch.manual_seed(config.seed)
    method = methods.get(config.method)
    pad_id = prompts.pad_id(tok)
    n_steps = config.n_steps(len(data.forget))
    steps = schedule(len(data.forget), n_steps, config.batch_size, config.seed)
    lora = adapter_mod.init(model, config) if config.params == "lora" else None
    if lora is not None:
        # the adapter's tensors are the trained parameters: leaves of their own, the model's weights frozen below
        for name, t in lora.named_parameters():
            t.requires_grad_(True)
        trained = lora.named_parameters()
    else:
        trained = trainable_parameters(model, config.params)
    fingerprint = _fingerprint(data, config, n_steps, trained)
    saved = _load_checkpoint(checkpoint, fingerprint) if checkpoint is not None else None
    if saved is not None:
        device = next(model.parameters()).device
        ref = {part: values.to(device) for part, values in saved["ref"].items()}
        ref_seconds = saved["reference_seconds"]
        t0 -= saved["seconds"]  # the curve's and the result's seconds count the time before the interruption too
    else:
        if method.reference:
            dissect_progress.detail("reference log-probs")
        ref = reference_logprobs(model, data, method.reference, {i for s in steps for i in s}, pad_id,
                                 config.batch_size)
        ref_seconds = time.time() - t0

    trained_ids = {id(p) for _, p in trained}
    was_grad = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained_ids)
    params = [p for _, p in trained]
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    warm = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / (warm + 1)))
    hyper = {name: getattr(config, name) for name in method.settings}

    curve: list[dict] = []
    if saved is not None:
        _restore(saved, trained, optimiser, scheduler)
        curve = list(saved["curve"])
        print(f"[dissect-unlearning] unlearn {data.forget_concept} ({config.method}): resuming at step "
              f"{saved['step']}/{n_steps} from {checkpoint}", file=sys.stderr, flush=True)

    def save(step: int, rng: dict) -> None:
        dissect_progress.detail(f"step {step}/{n_steps}, saving a checkpoint")
        write_checkpoint(checkpoint, {
            "fingerprint": fingerprint, "step": step, "seconds": time.time() - t0, "curve": curve, "rng": rng,
            "ref": ref, "reference_seconds": ref_seconds, "params": {n: p.detach() for n, p in trained},
            "optimiser": optimiser.state_dict(), "scheduler": scheduler.state_dict()})

    # `done`: the steps whose update is complete. Model, optimiser, scheduler, curve and `rng` (the RNG state
    # then) all describe the run after step `done`, except while `updating`: an interruption then leaves no state
    # worth saving, and the last checkpoint stands.
    done = saved["step"] if saved is not None else 0
    saved_step = done
    every_seconds = checkpoint_seconds()
    saved_at = time.time()
    rng = _rng_state()
    updating = False
    # A backward pass is one long call into C++, during which Python runs no signal handler: Ctrl-C or SIGTERM
    # would wait for its end, many seconds on a CPU. A hook on each trained parameter is Python code that runs as
    # its gradient is ready, so an interruption is raised within about a layer's time. The hooks change nothing.
    hooks = [p.register_hook(_let_signals_in) for p in params]
    recompute = recomputed_activations(model)
    recompute.__enter__()
    hooked = adapter_mod.attached(model, lora) if lora is not None else contextlib.nullcontext()
    hooked.__enter__()
    model.train()
    bar = tqdm(steps[done:], desc=f"unlearn {data.forget_concept} ({config.method})", disable=not progress,
               unit="step", initial=done, total=n_steps)
    try:
        with dissect_progress.stop_on_signals():
            try:
                for step, index in enumerate(bar, start=done + 1):
                    dissect_progress.detail(f"step {step}/{n_steps}")
                    batch = make_batch(data, method.parts, index, pad_id)
                    batch_ref = {part: ref[part][index] for part in ref}
                    lr = optimiser.param_groups[0]["lr"]
                    losses = method.loss(model, batch, batch_ref, **hyper)
                    if not torch.isfinite(losses.loss):
                        raise FloatingPointError(f"{config.method}: the loss became {losses.loss.item()} at step "
                                                 f"{step}; lower lr (now {config.lr})")
                    optimiser.zero_grad(set_to_none=True)
                    losses.loss.backward()
                    grad_norm = (torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm).item()
                                 if config.max_grad_norm else math.nan)
                    updating = True
                    optimiser.step()
                    # The gradients are spent: freed now, not at the next step's zero_grad, so that the next forward
                    # pass does not hold them (a model's size less at its peak: Gemma 3 270M, 1 GB)
                    optimiser.zero_grad(set_to_none=True)
                    scheduler.step()
                    row = {"step": step, "loss": losses.loss.item(), "forget_loss": _item(losses.forget_nll),
                           "retain_loss": _item(losses.retain_nll), "lr": lr, "grad_norm": grad_norm,
                           "seconds": time.time() - t0}
                    curve.append(row)
                    rng = _rng_state()
                    done = step
                    updating = False
                    bar.set_postfix(forget=f"{row['forget_loss']:.2f}", retain=f"{row['retain_loss']:.2f}",
                                    loss=f"{row['loss']:.2f}")
                    if (checkpoint is not None and step % CHECKPOINT_EVERY == 0 and step < n_steps
                            and time.time() - saved_at >= every_seconds):
                        save(step, rng)
                        saved_step, saved_at = step, time.time()
            except KeyboardInterrupt:
                state_bytes = 3 * sum(p.numel() * p.element_size() for p in params)  # weights + two AdamW moments
                if (checkpoint is not None and not updating and done > saved_step
                        and state_bytes <= INTERRUPT_CHECKPOINT_BYTES):
                    save(done, rng)
                raise
    finally:
        hooked.__exit__(None, None, None)
        recompute.__exit__(None, None, None)
        for hook in hooks:
            hook.remove()
        bar.close()
        model.zero_grad(set_to_none=True)
        del optimiser
        for p in model.parameters():
            p.requires_grad_(was_grad[id(p)])
        model.eval()
        if lora is not None:
            for _, t in lora.named_parameters():
                t.requires_grad_(False)
                t.grad = None
    return TrainResult(curve, time.time() - t0, n_steps, len(data.forget), sum(p.numel() for p in params),
                       data.forget_concept, data.retain_concept, ref_seconds, lora)


def checkpoint_seconds() -> float:
    """The least training time between two periodic checkpoints: CHECKPOINT_SECONDS, or the environment's value."""
    value, raw = validate.seconds_from_env(CHECKPOINT_SECONDS_ENV, CHECKPOINT_SECONDS)
    if not math.isfinite(value):
        raise ValueError(f"{CHECKPOINT_SECONDS_ENV} must be a number of seconds >= 0, got {raw!r}")
    return value


def discard_checkpoint(checkpoint: Path) -> None:
    """Remove a run's checkpoint folder (once what it led to is stored), out of sight first: a folder half
    removed is never mistaken for a checkpoint."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        return
    aside = checkpoint.with_name(f"{cache.TEMP_PREFIX}{checkpoint.name}~{cache.HOST}~{os.getpid()}~done")
    with contextlib.suppress(FileNotFoundError):
        os.rename(checkpoint, aside)
    shutil.rmtree(aside, ignore_errors=True)


def write_checkpoint(checkpoint: Path, state: dict) -> None:
    """Write a run's `state` into the folder `checkpoint` atomically: the folder holds the whole new state or the
    previous one, never a mix (remote.py's chunked runs share this writer and _load_checkpoint)."""
    # Without the zip's CRC: torch.load never checks it, and it costs about a second per GB, which a stop waits for.
    # The atomic folder is flushed to disk before it takes the checkpoint's name.
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        with cache.atomic_folder(checkpoint) as tmp:
            torch.save(state, tmp / CHECKPOINT_FILE)
    finally:
        torch.serialization.set_crc32_options(crc)


def _fingerprint(data: data_mod.UnlearningData, config: UnlearnConfig, n_steps: int, trained) -> str:
    """What a checkpoint must match to be resumed: the settings, the examples and the trained parameters."""
    parts = {part: [[list(e.input_ids), list(e.labels)] for e in (getattr(data, part) or [])]
             for part in ("forget", "retain", "chosen")}
    described = {"settings": config.to_dict(), "n_steps": n_steps, "data": parts,
                 "parameters": [[n, list(p.shape), str(p.dtype)] for n, p in trained],
                 "torch": torch.__version__}
    return hashlib.sha256(cache.canonical_json(described).encode()).hexdigest()


def _load_checkpoint(checkpoint: Path, fingerprint: str) -> dict | None:
    path = Path(checkpoint) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint costs a fresh start, nothing more
        print(f"[dissect-unlearning] note: ignoring the unreadable checkpoint {checkpoint} ({exc})",
              file=sys.stderr, flush=True)
        return None
    if state.get("fingerprint") != fingerprint:
        print(f"[dissect-unlearning] note: ignoring the checkpoint {checkpoint}: it is of another run",
              file=sys.stderr, flush=True)
        return None
    return state


def _restore(state: dict, trained, optimiser, scheduler) -> None:
    with torch.no_grad():
        for name, p in trained:
            p.copy_(state["params"][name])
    optimiser.load_state_dict(state["optimiser"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if state["rng"].get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def _let_signals_in(grad):
    return None


def _rng_state() -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def unlearn(model, tok, forget, retain, config: UnlearnConfig, qa=None, retain_qa=None, progress: bool = True,
            checkpoint: Path | None = None) -> TrainResult:
    """Build the data of (forget concept, retain concept) and train `model` on it in place.

    qa / retain_qa: [(question, prompt_ids, answer_ids)] of the forget / retain concept, answered by the vanilla
    model (see data.build). checkpoint: see train()."""
    return train(model, tok, data_mod.build(tok, forget, retain, config, qa, retain_qa), config, progress,
                 checkpoint)


def _item(x) -> float:
    return math.nan if x is None else float(x.detach().item() if hasattr(x, "detach") else x)
