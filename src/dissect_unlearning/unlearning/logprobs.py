"""Per-sequence log-likelihood of the labelled tokens: the one quantity every unlearning loss is built from."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import prompts

if TYPE_CHECKING:  # data builds batches with the registry's methods, which import the losses, which import this
    from .data import Part


@dataclass
class Losses:
    """What a loss function returns: the objective to minimise, and two numbers to watch.

    forget_nll / retain_nll: mean per-token NLL of the forget / retain batch (None where the method does not compute
    it). Unlearning pushes the first up and should leave the second where it was.
    """

    loss: torch.Tensor
    forget_nll: torch.Tensor | None = None
    retain_nll: torch.Tensor | None = None


def sequence_logprobs(model, part: Part) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(token) over the labelled tokens of each sequence [B], number of labelled tokens [B]), on the
    model's device: batches are collated on the CPU and moved here, the one place every loss reads them."""
    part = part.to(next(model.parameters()).device)
    logp = prompts.token_logprobs(model, part.input_ids, part.attention_mask, part.labels)
    return logp.sum(-1), (part.labels[:, 1:] != prompts.IGNORE).sum(-1)


def mean_nll(logp: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Mean per-token NLL over a batch (every labelled token weighs the same, as in a language-model loss)."""
    return -logp.sum() / n_tokens.sum().clamp(min=1)
