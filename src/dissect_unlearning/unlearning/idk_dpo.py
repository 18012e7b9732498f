"""Refusal DPO (TOFU's IdkDPO): for each of the concept's questions, prefer a refusal ("I don't know.") to the
vanilla model's answer; plus retain_weight * NLL(retain text) to hold the rest of the model in place."""
from __future__ import annotations

from .dpo import dpo_term
from .logprobs import Losses, mean_nll, sequence_logprobs


def loss(model, batch, ref, beta: float = 0.1, retain_weight: float = 1.0) -> Losses:
    lp_c, _ = sequence_logprobs(model, batch["chosen"])
    lp_r, n_r = sequence_logprobs(model, batch["forget"])
    total = dpo_term(lp_c, lp_r, ref["chosen"], ref["forget"], beta)
    retain = None
    if retain_weight:
        retain = mean_nll(*sequence_logprobs(model, batch["retain"]))
        total = total + retain_weight * retain
    return Losses(total, forget_nll=mean_nll(lp_r, n_r).detach(), retain_nll=retain)
