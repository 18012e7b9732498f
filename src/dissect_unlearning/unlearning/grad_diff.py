"""Gradient Difference: -NLL(forget) + retain_weight * NLL(retain) (ConceptVectors: weight 1.5)."""
from __future__ import annotations

from .logprobs import Losses, mean_nll, sequence_logprobs


def loss(model, batch, ref=None, retain_weight: float = 1.5) -> Losses:
    forget = mean_nll(*sequence_logprobs(model, batch["forget"]))
    retain = mean_nll(*sequence_logprobs(model, batch["retain"]))
    return Losses(-forget + retain_weight * retain, forget_nll=forget, retain_nll=retain)
