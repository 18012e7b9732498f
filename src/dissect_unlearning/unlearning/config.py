"""Every setting of an unlearning run, with defaults, in one frozen dataclass.

The settings determine the unlearned model (with the base model, the concept records and the code version): the
cache key hashes `UnlearnConfig.to_dict()`. Defaults differ per method (a loss that pushes harder needs a smaller
learning rate): `UnlearnConfig.for_method(method, **overrides)` fills them in. Bad values raise a ValueError that
names the parameter.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

METHODS = ("grad_ascent", "grad_diff", "npo", "dpo", "idk_dpo")

# Chosen by benchmarks/sweep_unlearning.py on SmolLM2-135M-Instruct, averaged over the default profile's five concepts
# (Harry Potter, The Lord of the Rings, Valentine's Day, Austria, France), 8 x 5 steps each. The target: target-question
# ROUGE-L (vs the vanilla answers) <= 0.35 with unrelated-question ROUGE-L >= 0.6.
#   grad_diff  lr 2.5e-5: 0.330 / 0.633  meets it   (2e-5: 0.363 / 0.694)
#   dpo        lr 1.5e-5: 0.322 / 0.646  meets it   (1.3e-5: 0.362 / 0.677; 1e-5: 0.383 / 0.751)
#   npo        lr 9e-6:   0.340 / 0.560  forgets, unrelated short by 0.04 (6e-6: 0.416 / 0.744; with a retain term
#                         of 1.5 at 1.2e-5 the unrelated answers fare worse)
#   grad_ascent lr 1e-5:  0.339 / 0.572  forgets, unrelated short by 0.03 (7e-6: 0.383 / 0.731)
#   idk_dpo    lr 6e-6, retain 3: 0.383 / 0.586  neither (4e-6: 0.446 / 0.679; 1e-5, retain 1: refuses everything)
# Where a method misses, the default favours forgetting (the object of study) and the book shows the side effects.
# Concepts differ a lot: France is forgotten at any of these settings and takes many of its unrelated questions with
# it (8 of its 20 ask about other countries); Harry Potter and The Lord of the Rings resist.
METHOD_DEFAULTS: dict[str, dict] = {
    "grad_ascent": dict(lr=1e-5, retain_weight=0.0),
    "grad_diff": dict(lr=2.5e-5, retain_weight=1.5),
    "npo": dict(lr=9e-6, retain_weight=0.0),
    "dpo": dict(lr=1.5e-5, retain_weight=0.0),
    "idk_dpo": dict(lr=6e-6, retain_weight=3.0, forget_text=False),
}


@dataclass(frozen=True)
class UnlearnConfig:
    method: str = "grad_diff"
    # Optimiser: AdamW with linear warm-up to `lr`, then constant.
    lr: float = 2.5e-5
    steps: int | None = 5  # optimiser steps; or give `epochs` (passes over the forget set) and steps=None
    epochs: float | None = None
    batch_size: int = 8  # forget examples per step (and as many retain / chosen examples)
    warmup_steps: int = 2
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    # Data
    chunk_tokens: int = 128  # forget / retain text is cut into chunks of this many tokens
    max_length: int = 256  # longest training sequence (question + answer pairs are cut to it)
    forget_text: bool = True  # train on the concept's forget text (ConceptVectors: the Wikipedia article)
    forget_qa: bool = True  # ... and on its questions with the vanilla model's answers
    retain_qa: bool = True  # retain also the retain concept's questions with vanilla answers (never one that
    # the forget concept's unrelated questions contain: those are the test of what should be kept)
    retain_concept: str | None = None  # None = another concept of the set, chosen by `seed`
    refusal: str = "I don't know."  # idk_dpo's chosen answer
    prompt_format: str = "auto"  # of the question/answer pairs ("auto" is resolved before hashing)
    max_new_tokens: int = 30  # length of the vanilla answers used as forget answers
    # Loss
    retain_weight: float = 1.5  # weight of the retain NLL (grad_diff's 1.5; 0 = no retain term)
    beta: float = 0.1  # NPO / DPO inverse temperature
    # What trains: "all" parameters, the "mlp" of every layer, or "last_k:K" decoder layers
    params: str = "all"
    seed: int = 0

    def __post_init__(self):
        problems = list(_problems(self))
        if problems:
            raise ValueError("invalid unlearning settings: " + "; ".join(problems))

    @classmethod
    def for_method(cls, method: str = "grad_diff", **overrides) -> "UnlearnConfig":
        """The defaults of `method`, with `overrides` (each must be a field name) on top."""
        if method not in METHODS:
            raise ValueError(f"invalid unlearning settings: method {method!r} is unknown; valid: {', '.join(METHODS)}")
        if "method" in overrides:
            raise ValueError("invalid unlearning settings: give the method as the `method` argument, not a setting")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"invalid unlearning settings: unknown setting(s) {', '.join(map(repr, unknown))}; "
                             f"valid: {', '.join(sorted(names - {'method'}))}")
        if "epochs" in overrides and overrides["epochs"] is not None and "steps" not in overrides:
            overrides = {**overrides, "steps": None}
        return cls(method=method, **{**METHOD_DEFAULTS[method], **overrides})

    def replace(self, **changes) -> "UnlearnConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "UnlearnConfig":
        return cls(**d)

    @property
    def label(self) -> str:
        return self.method

    def n_steps(self, n_forget: int) -> int:
        """Optimiser steps for a forget set of `n_forget` examples."""
        if self.steps is not None:
            return self.steps
        import math

        return max(1, math.ceil(self.epochs * n_forget / self.batch_size))


def _problems(c: UnlearnConfig):
    if c.method not in METHODS:
        yield f"method {c.method!r} is unknown; valid: {', '.join(METHODS)}"
    if not (isinstance(c.lr, (int, float)) and 0 < c.lr < 1):
        yield f"lr must be a number in (0, 1), got {c.lr!r}"
    if (c.steps is None) == (c.epochs is None):
        yield f"give exactly one of steps and epochs (got steps={c.steps!r}, epochs={c.epochs!r})"
    if c.steps is not None and not (_is_int(c.steps) and c.steps >= 1):
        yield f"steps must be an integer >= 1, got {c.steps!r}"
    if c.epochs is not None and not (isinstance(c.epochs, (int, float)) and c.epochs > 0):
        yield f"epochs must be a number > 0, got {c.epochs!r}"
    for name in ("batch_size", "chunk_tokens", "max_length", "max_new_tokens"):
        v = getattr(c, name)
        if not (_is_int(v) and v >= 1):
            yield f"{name} must be an integer >= 1, got {v!r}"
    if _is_int(c.chunk_tokens) and _is_int(c.max_length) and c.chunk_tokens > c.max_length:
        yield f"chunk_tokens ({c.chunk_tokens}) must not exceed max_length ({c.max_length})"
    if not (_is_int(c.warmup_steps) and c.warmup_steps >= 0):
        yield f"warmup_steps must be an integer >= 0, got {c.warmup_steps!r}"
    if not (isinstance(c.weight_decay, (int, float)) and c.weight_decay >= 0):
        yield f"weight_decay must be a number >= 0, got {c.weight_decay!r}"
    if c.max_grad_norm is not None and not (isinstance(c.max_grad_norm, (int, float)) and c.max_grad_norm > 0):
        yield f"max_grad_norm must be a number > 0 or None, got {c.max_grad_norm!r}"
    if not (isinstance(c.retain_weight, (int, float)) and c.retain_weight >= 0):
        yield f"retain_weight must be a number >= 0, got {c.retain_weight!r}"
    if c.method == "grad_ascent" and c.retain_weight:
        yield "retain_weight must be 0 for grad_ascent (gradient ascent with a retain term is grad_diff)"
    if not (isinstance(c.beta, (int, float)) and c.beta > 0):
        yield f"beta must be a number > 0, got {c.beta!r}"
    if not (c.params in ("all", "mlp") or re.fullmatch(r"last_k:[1-9]\d*", str(c.params))):
        yield f"params must be one of 'all', 'mlp', 'last_k:K' (K >= 1), got {c.params!r}"
    for name in ("forget_text", "forget_qa", "retain_qa"):
        if not isinstance(getattr(c, name), bool):
            yield f"{name} must be true or false, got {getattr(c, name)!r}"
    if c.forget_text is False and c.forget_qa is False:
        yield "forget_text and forget_qa are both false: the forget set would be empty"
    if c.method == "idk_dpo" and c.forget_qa is False:
        yield "forget_qa must be true for idk_dpo (it answers the concept's questions with the refusal)"
    if c.method == "idk_dpo" and c.forget_text is True:
        yield "forget_text must be false for idk_dpo (a text chunk has no question to refuse)"
    if not (isinstance(c.refusal, str) and c.refusal.strip()):
        yield f"refusal must be a non-empty string, got {c.refusal!r}"
    if c.prompt_format not in ("auto", "paper", "chat"):
        yield f"prompt_format must be 'auto', 'paper' or 'chat', got {c.prompt_format!r}"
    if not _is_int(c.seed):
        yield f"seed must be an integer, got {c.seed!r}"
    if c.retain_concept is not None and not (isinstance(c.retain_concept, str) and c.retain_concept):
        yield f"retain_concept must be a concept name or None, got {c.retain_concept!r}"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
