"""Gradient Ascent: maximise the forget text's NLL (minimise -NLL). Nothing holds the rest of the model in place."""
from __future__ import annotations

from .logprobs import Losses, mean_nll, sequence_logprobs


def loss(model, batch, ref=None) -> Losses:
    nll = mean_nll(*sequence_logprobs(model, batch["forget"]))
    return Losses(-nll, forget_nll=nll)
