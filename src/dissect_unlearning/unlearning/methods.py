"""The unlearning methods, one registry entry each: the loss, what it reads, its default settings, its data, its colour.

A loss lives in a module of its own (grad_ascent, grad_diff, npo, dpo, idk_dpo) as a function
loss(model, batch, ref, **settings) -> logprobs.Losses. Its keyword arguments are UnlearnConfig fields: the trainer
passes their values from the run's settings. The entry here says the rest:
  parts      which batch parts the loss reads: "forget", "retain", "chosen" (data.UnlearningData)
  reference  the parts whose reference (vanilla) sequence log-probs it needs (computed once, before training)
  defaults   the UnlearnConfig settings that differ from the dataclass defaults for this method
  chosen     what the chosen side of a preference loss is: None (no chosen side), "retain" (the retain set) or
             "refusal" (UnlearnConfig.refusal as the answer to each of the concept's questions, which makes the
             forget set the questions alone)
  label, colour  for the book's charts (the same colour in every chapter)
  text       whose text the forget set holds: "concept" (the target's own) or "unrelated" (a concept unrelated to
             the target, as the control fine-tune has: it learns that text instead of unlearning anything)

To add a method: a loss module, and its Method entry in REGISTRY here (or config.register_method(Method(...))
from your own code: the checks there read the settings of UnlearnConfig, which imports this module).
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Callable

from . import control, dpo, grad_ascent, grad_diff, idk_dpo, npo

PARTS = ("forget", "retain", "chosen")
CHOSEN = (None, "retain", "refusal")
TEXTS = ("concept", "unrelated")


@dataclass(frozen=True)
class Method:
    name: str
    loss: Callable  # loss(model, batch, ref, **settings) -> Losses
    parts: tuple[str, ...]
    reference: tuple[str, ...]
    label: str
    colour: str
    defaults: dict = field(default_factory=dict)
    chosen: str | None = None
    text: str = "concept"

    @property
    def settings(self) -> tuple[str, ...]:
        """The UnlearnConfig fields the loss takes: its arguments after (model, batch, ref)."""
        return tuple(list(inspect.signature(self.loss).parameters)[3:])

    @property
    def retain_term(self) -> bool:
        """Does the loss weigh in the retain set (can retain_weight change anything)?"""
        return "retain_weight" in self.settings


# Default learning rates and retain weights, chosen by benchmarks/sweep_unlearning.py on SmolLM2-135M-Instruct,
# averaged over the default profile's five concepts (Harry Potter, The Lord of the Rings, Valentine's Day, Austria,
# France), 8 x 5 steps each. The target: target-question ROUGE-L (vs the vanilla answers) <= 0.35 with
# unrelated-question ROUGE-L >= 0.6.
#   grad_diff  lr 2.5e-5: 0.330 / 0.633  meets it   (2e-5: 0.363 / 0.694)
#   dpo        lr 1.5e-5: 0.322 / 0.646  meets it   (1.3e-5: 0.362 / 0.677; 1e-5: 0.383 / 0.751)
#   npo        lr 9e-6:   0.340 / 0.560  forgets, unrelated short by 0.04 (6e-6: 0.416 / 0.744; with a retain term
#                         of 1.5 at 1.2e-5 the unrelated answers fare worse)
#   grad_ascent lr 1e-5:  0.339 / 0.572  forgets, unrelated short by 0.03 (7e-6: 0.383 / 0.731)
#   idk_dpo    lr 6e-6, retain 3: 0.383 / 0.586  neither (4e-6: 0.446 / 0.679; 1e-5, retain 1: refuses everything)
# Those scores were of questions the models had trained on. Measured again on the tuning concepts the book does not
# report on, scored on held-out questions (docs/tuning.md), no rate forgets selectively: grad_diff at 2.5e-5 / 5e-5 /
# 1e-4 gives 0.705 / 0.738, 0.553 / 0.600, 0.412 / 0.383 (target / unrelated), dpo 0.726 / 0.738, npo 0.712 / 0.600;
# so the rates are kept, and chapter 3 reports what they do.
# Where a method misses, the default favours forgetting (the object of study) and the book shows the side effects.
# Concepts differ a lot: France is forgotten at any of these settings and takes many of its unrelated questions with
# it (8 of its 20 ask about other countries); Harry Potter and The Lord of the Rings resist.
REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("grad_ascent", grad_ascent.loss, parts=("forget",), reference=(), label="Gradient Ascent",
           colour="#8c564b", defaults=dict(lr=1e-5, retain_weight=0.0)),
    Method("grad_diff", grad_diff.loss, parts=("forget", "retain"), reference=(), label="Gradient Difference",
           colour="#1f77b4", defaults=dict(lr=2.5e-5, retain_weight=1.5)),
    Method("npo", npo.loss, parts=("forget", "retain"), reference=("forget",), label="NPO", colour="#2ca02c",
           defaults=dict(lr=9e-6, retain_weight=0.0)),
    Method("dpo", dpo.loss, parts=("forget", "chosen"), reference=("forget", "chosen"), label="DPO",
           colour="#d62728", defaults=dict(lr=1.5e-5, retain_weight=0.0), chosen="retain"),
    Method("idk_dpo", idk_dpo.loss, parts=("forget", "chosen", "retain"), reference=("forget", "chosen"),
           label="DPO (\"I don't know\")", colour="#9467bd",
           defaults=dict(lr=6e-6, retain_weight=3.0, forget_data="qa"), chosen="refusal"),
    # The control, not an unlearning method: Gradient Difference's optimiser, steps and retain data, with an unrelated
    # concept's text learned instead of the target's unlearned (control.py)
    Method("control", control.loss, parts=("forget", "retain"), reference=(), label="Control fine-tune",
           colour="#7f7f7f", defaults=dict(lr=2.5e-5, retain_weight=1.5, forget_data="text"), text="unrelated"),
)}


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"method {name!r} is unknown; valid: {', '.join(REGISTRY)}")
    return REGISTRY[name]
