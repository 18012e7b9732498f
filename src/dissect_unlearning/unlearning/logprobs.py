"""Per-sequence log-likelihood of the labelled tokens: the one quantity every unlearning loss is built from."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import IGNORE, Part


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
    logits = model(input_ids=part.input_ids, attention_mask=part.attention_mask).logits
    # The logits at position t predict token t + 1.
    logits = logits[:, :-1].float()
    labels = part.labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                          reduction="none").view(labels.shape)
    return -nll.sum(-1), (labels != IGNORE).sum(-1)


def mean_nll(logp: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Mean per-token NLL over a batch (every labelled token weighs the same, as in a language-model loss)."""
    return -logp.sum() / n_tokens.sum().clamp(min=1)
