"""Negative Preference Optimisation (Zhang et al. 2024), as in ConceptVectors / TOFU:

    (2 / beta) * -log sigmoid(beta * (NLL_theta(forget) - NLL_ref(forget)))

with sequence NLLs (summed over tokens) and ref = the vanilla model. Unlike gradient ascent the push fades once the
model is less likely than the reference to produce the forget text, so it diverges more slowly.
"""
from __future__ import annotations

import torch.nn.functional as F

from .logprobs import Losses, mean_nll, sequence_logprobs


def npo_term(logp, ref_logp, beta: float):
    # NLL_theta - NLL_ref = ref_logp - logp
    return -(2.0 / beta) * F.logsigmoid(beta * (ref_logp - logp)).mean()


def loss(model, batch, ref, beta: float = 0.1, retain_weight: float = 0.0) -> Losses:
    logp, n = sequence_logprobs(model, batch["forget"])
    total = npo_term(logp, ref["forget"], beta)
    retain = None
    if retain_weight:
        retain = mean_nll(*sequence_logprobs(model, batch["retain"]))
        total = total + retain_weight * retain
    return Losses(total, forget_nll=mean_nll(logp, n).detach(), retain_nll=retain)
