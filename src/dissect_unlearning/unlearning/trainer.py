"""One trainer for every unlearning method: AdamW with linear warm-up, seeded batches, a progress bar, a loss curve.

The data set is fixed, so the reference (vanilla) log-probs that NPO and DPO need are computed once, before the
first step, for exactly the examples the schedule will visit: no second model in memory and no second forward per
step, which halves their cost on a CPU.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch

from .. import models
from . import METHOD_MODULES, data as data_mod
from .config import UnlearnConfig


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


def trainable_parameters(model, params: str) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters an unlearning run updates: 'all', every layer's 'mlp', or the 'last_k:K' decoder layers."""
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


def train(model, tok, data: data_mod.UnlearningData, config: UnlearnConfig, progress: bool = True) -> TrainResult:
    """Unlearn in place: `model` leaves in eval mode with the unlearned weights."""
    from tqdm.auto import tqdm

    t0 = time.time()
    torch.manual_seed(config.seed)
    method = METHOD_MODULES[config.method]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    n_steps = config.n_steps(len(data.forget))
    steps = schedule(len(data.forget), n_steps, config.batch_size, config.seed)
    ref = reference_logprobs(model, data, method.REFERENCE, {i for s in steps for i in s}, pad_id,
                             config.batch_size)
    ref_seconds = time.time() - t0

    trained = trainable_parameters(model, config.params)
    trained_ids = {id(p) for _, p in trained}
    was_grad = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained_ids)
    params = [p for _, p in trained]
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    warm = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / (warm + 1)))
    hyper = {name: getattr(config, name) for name in method.HYPER}

    curve: list[dict] = []
    model.train()
    bar = tqdm(steps, desc=f"unlearn {data.forget_concept} ({config.method})", disable=not progress, unit="step")
    try:
        for step, index in enumerate(bar, start=1):
            batch = make_batch(data, method.PARTS, index, pad_id)
            batch_ref = {part: ref[part][index] for part in ref}
            lr = optimiser.param_groups[0]["lr"]
            losses = method.loss(model, batch, batch_ref, **hyper)
            if not torch.isfinite(losses.loss):
                raise FloatingPointError(f"{config.method}: the loss became {losses.loss.item()} at step {step}; "
                                         f"lower lr (now {config.lr})")
            optimiser.zero_grad(set_to_none=True)
            losses.loss.backward()
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm).item()
                         if config.max_grad_norm else math.nan)
            optimiser.step()
            scheduler.step()
            row = {"step": step, "loss": losses.loss.item(), "forget_loss": _item(losses.forget_nll),
                   "retain_loss": _item(losses.retain_nll), "lr": lr, "grad_norm": grad_norm,
                   "seconds": time.time() - t0}
            curve.append(row)
            bar.set_postfix(forget=f"{row['forget_loss']:.2f}", retain=f"{row['retain_loss']:.2f}",
                            loss=f"{row['loss']:.2f}")
    finally:
        bar.close()
        model.zero_grad(set_to_none=True)
        del optimiser
        for p in model.parameters():
            p.requires_grad_(was_grad[id(p)])
        model.eval()
    return TrainResult(curve, time.time() - t0, n_steps, len(data.forget), sum(p.numel() for p in params),
                       data.forget_concept, data.retain_concept, ref_seconds)


def unlearn(model, tok, forget, retain, config: UnlearnConfig, qa=None, retain_qa=None, progress: bool = True
            ) -> TrainResult:
    """Build the data of (forget concept, retain concept) and train `model` on it in place.

    qa / retain_qa: [(question, prompt_ids, answer_ids)] of the forget / retain concept, answered by the vanilla
    model (see data.build)."""
    return train(model, tok, data_mod.build(tok, forget, retain, config, qa, retain_qa), config, progress)


def _item(x) -> float:
    return math.nan if x is None else float(x.detach().item() if hasattr(x, "detach") else x)
