"""DPO with the forget text as the rejected side, as in ConceptVectors:

    -(2 / beta) * log sigmoid(beta * [(log p(chosen) - log p(rejected)) - (same under ref)])

The chosen side is the retain text (ConceptVectors has no refusal answers); sequence log-probs are summed over tokens;
ref = the vanilla model. `idk_dpo` reuses `dpo_term` with refusal answers as the chosen side.
"""
from __future__ import annotations

import torch.nn.functional as F

from .logprobs import Losses, mean_nll, sequence_logprobs


def dpo_term(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta: float):
    margin = (logp_chosen - logp_rejected) - (ref_chosen - ref_rejected)
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


def loss(model, batch, ref, beta: float = 0.1, retain_weight: float = 0.0) -> Losses:
    lp_c, n_c = sequence_logprobs(model, batch["chosen"])
    lp_r, n_r = sequence_logprobs(model, batch["forget"])
    total = dpo_term(lp_c, lp_r, ref["chosen"], ref["forget"], beta)
    retain = mean_nll(lp_c, n_c)  # the chosen side *is* the retain text
    if retain_weight:
        total = total + retain_weight * retain
    return Losses(total, forget_nll=mean_nll(lp_r, n_r).detach(), retain_nll=retain.detach())
