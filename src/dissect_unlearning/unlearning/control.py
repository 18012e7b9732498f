"""Control fine-tune: NLL(another concept's text) + retain_weight * NLL(retain). Not an unlearning method.

"Any fine-tune would do that too" is a fair objection to several of the paper's findings (the last layers change
most, unrelated answers drift, perplexity moves). This loss answers it: the same optimiser, steps and retain data as
Gradient Difference, but the forget set is replaced by the text of a concept unrelated to the target
(pipeline.unlearned chooses it, the same way relearning chooses its unrelated text) and is *learned* with the plain
language-model loss. What a chapter finds in the unlearned models and also in this one is not unlearning's doing.
"""
from __future__ import annotations

from .logprobs import Losses, mean_nll, sequence_logprobs


def loss(model, batch, ref=None, retain_weight: float = 1.5) -> Losses:
    text = mean_nll(*sequence_logprobs(model, batch["forget"]))
    retain = mean_nll(*sequence_logprobs(model, batch["retain"]))
    return Losses(text + retain_weight * retain, forget_nll=text, retain_nll=retain)
