"""Every setting of an unlearning run, with defaults, in one frozen dataclass.

The settings determine the unlearned model (with the base model, the concept records and the code version): the
cache key hashes `UnlearnConfig.to_dict()`. Defaults differ per method (a loss that pushes harder needs a smaller
learning rate): `UnlearnConfig.for_method(method, **overrides)` fills them in from the method's registry entry
(methods.py). Bad values raise a ValueError that names the parameter.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

from .. import validate

from . import methods


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
    # What the forget set holds: "text" (the paper's: the concept's forget text, ConceptVectors' Wikipedia article,
    # in chunks), "qa" (its questions with the vanilla model's answers) or "text+qa". A run that trains on questions
    # trains on the first half of them only (trained_questions), and the book scores it on the other half: a
    # model is never scored on a sequence it was trained on.
    # The default is "text+qa", not the paper's "text": on the default model, text alone does not make the model
    # forget its answers any more than the unrelated ones, at the default budget nor at two or four times its
    # learning rate (measured on concepts the book does not report on, benchmarks/sweep_unlearning.py; the numbers
    # are in docs/tuning.md), and chapter 3 shows the regimes side by side.
    forget_data: str = "text+qa"
    retain_qa: bool = True  # retain also the retain concept's questions with vanilla answers (never one that
    # the forget concept's unrelated questions contain: those are the test of what should be kept)
    retain_concept: str | None = None  # None = another concept of the set, chosen by `seed`
    refusal: str = "I don't know."  # the chosen answer of a method whose chosen side is a refusal (idk_dpo)
    prompt_format: str = "auto"  # of the question/answer pairs ("auto" is resolved before hashing)
    max_new_tokens: int = 30  # length of the vanilla answers used as forget answers
    # Loss
    retain_weight: float = 1.5  # weight of the retain NLL (grad_diff's 1.5; 0 = no retain term)
    beta: float = 0.1  # NPO / DPO inverse temperature
    # What trains: "all" parameters, the "mlp" of every layer, "last_k:K" decoder layers, or "lora": a low-rank
    # adapter (the weights stay vanilla; see adapter.py), which is what a request to NDIF can carry
    params: str = "all"
    seed: int = 0
    # The adapter of params="lora": out += (lora_alpha / lora_rank) * (x @ A) @ B on each target module. Ignored, and
    # left out of the settings' record and cache key, for every other `params`.
    lora_rank: int = 8
    lora_alpha: float = 16.0
    # module paths inside a decoder layer, comma-separated; "auto" = the MLP projections (gate, up, down) and the
    # attention output projection, through the architecture map (models.Architecture)
    lora_targets: str = "auto"

    def __post_init__(self):
        problems = list(_problems(self))
        if problems:
            raise ValueError("invalid unlearning settings: " + "; ".join(problems))

    @classmethod
    def for_method(cls, method: str = "grad_diff", **overrides) -> "UnlearnConfig":
        """The defaults of `method` (its registry entry), with `overrides` (each must be a field name) on top."""
        if method not in methods.REGISTRY:
            raise ValueError(f"invalid unlearning settings: method {method!r} is unknown; valid: "
                             f"{', '.join(methods.REGISTRY)}")
        if "method" in overrides:
            raise ValueError("invalid unlearning settings: give the method as the `method` argument, not a setting")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"invalid unlearning settings: unknown setting(s) {', '.join(map(repr, unknown))}; "
                             f"valid: {', '.join(sorted(names - {'method'}))}")
        if "epochs" in overrides and overrides["epochs"] is not None and "steps" not in overrides:
            overrides = {**overrides, "steps": None}
        return cls(method=method, **{**methods.get(method).defaults, **overrides})

    def replace(self, **changes) -> "UnlearnConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.params != "lora":
            # a full fine-tuning run's record and cache key stay what they were before adapters existed
            for name in LORA_SETTINGS:
                del d[name]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "UnlearnConfig":
        d = dict(d)
        if "forget_text" in d or "forget_qa" in d:  # the record of a run made before forget_data existed
            text, qa = d.pop("forget_text", True), d.pop("forget_qa", True)  # their old defaults
            d["forget_data"] = "+".join(part for part, on in (("text", text), ("qa", qa)) if on) or "text"
        return cls(**d)

    @property
    def label(self) -> str:
        return self.method

    def n_steps(self, n_forget: int) -> int:
        """Optimiser steps for a forget set of `n_forget` examples."""
        if self.steps is not None:
            return self.steps
        import math

        n = max(1, math.ceil(self.epochs * n_forget / self.batch_size))
        if n > MAX_STEPS:
            raise ValueError(f"invalid unlearning settings: epochs={self.epochs} gives {n} steps on a forget set of "
                             f"{n_forget} examples, more than {MAX_STEPS}")
        return n


FORGET_DATA = ("text", "qa", "text+qa")
PARAMS = ("all", "mlp", "last_k:K", "lora")
LORA_SETTINGS = ("lora_rank", "lora_alpha", "lora_targets")
# The most a rank can be: a rank as large as a layer is a full-rank update in a slower form, and a typo of 8000
# would only show up as memory exhausted.
MAX_LORA_RANK = 1024


def trained_questions(n: int) -> list[int]:
    """The questions (indices, of n) a run whose forget data includes "qa" trains on: the first half. The book scores
    such a model on the others only (scored_questions); relearning's 'partial' data is the same half."""
    return list(range(n // 2))


def scored_questions(config: "UnlearnConfig", n: int) -> list[int]:
    """The questions (indices, of n) the book may score a model unlearned with `config` on: the ones it was not
    trained on. Every question when its forget data is text only."""
    trained = set(trained_questions(n)) if "qa" in config.forget_data.split("+") else set()
    return [i for i in range(n) if i not in trained]


# At most this many optimiser steps. A step of the defaults takes about a second for the default model on a CPU, so
# this is already more than a day of training, and the paper's runs take tens of steps: a larger number is a typo
# (steps=1e9 would train for decades, its loss curve alone filling the record), refused before the model loads.
MAX_STEPS = 100_000


def _problems(c: UnlearnConfig):
    # Every number must be finite (validate.is_number): NaN passes no comparison and fails none of the negated
    # ones, and an infinite weight or temperature only shows up as a NaN loss, after the model has loaded.
    method = methods.REGISTRY.get(c.method) if isinstance(c.method, str) else None
    if method is None:
        yield f"method {c.method!r} is unknown; valid: {', '.join(methods.REGISTRY)}"
    if not (validate.is_number(c.lr) and 0 < c.lr < 1):
        yield f"lr must be a finite number in (0, 1), got {c.lr!r}"
    if (c.steps is None) == (c.epochs is None):
        yield f"give exactly one of steps and epochs (got steps={c.steps!r}, epochs={c.epochs!r})"
    if c.steps is not None and not validate.int_in_range(c.steps, 1, MAX_STEPS):
        yield f"steps must be {validate.int_words(1, MAX_STEPS)} (more is more than a day of training), got {c.steps!r}"
    if c.epochs is not None and not (validate.is_number(c.epochs) and 0 < c.epochs <= MAX_STEPS):
        yield f"epochs must be a finite number > 0 and at most {MAX_STEPS}, got {c.epochs!r}"
    for name in ("batch_size", "chunk_tokens", "max_length", "max_new_tokens"):
        v = getattr(c, name)
        if not (validate.is_int(v) and v >= 1):
            yield f"{name} must be an integer >= 1, got {v!r}"
    if validate.is_int(c.chunk_tokens) and validate.is_int(c.max_length) and c.chunk_tokens > c.max_length:
        yield f"chunk_tokens ({c.chunk_tokens}) must not exceed max_length ({c.max_length})"
    if not (validate.is_int(c.warmup_steps) and c.warmup_steps >= 0):
        yield f"warmup_steps must be an integer >= 0, got {c.warmup_steps!r}"
    if not (validate.is_number(c.weight_decay) and c.weight_decay >= 0):
        yield f"weight_decay must be a finite number >= 0, got {c.weight_decay!r}"
    if c.max_grad_norm is not None and not (validate.is_number(c.max_grad_norm) and c.max_grad_norm > 0):
        yield f"max_grad_norm must be a finite number > 0 or None, got {c.max_grad_norm!r}"
    if not (validate.is_number(c.retain_weight) and c.retain_weight >= 0):
        yield f"retain_weight must be a finite number >= 0, got {c.retain_weight!r}"
    if method is not None and not method.retain_term and c.retain_weight:
        yield f"retain_weight must be 0 for {c.method} (its loss has no retain term)"
    if not (validate.is_number(c.beta) and c.beta > 0):
        yield f"beta must be a finite number > 0, got {c.beta!r}"
    if not (c.params in ("all", "mlp", "lora") or re.fullmatch(r"last_k:[1-9]\d*", str(c.params))):
        yield f"params must be one of 'all', 'mlp', 'last_k:K' (K >= 1), 'lora', got {c.params!r}"
    if c.params == "lora":
        yield from _lora_problems(c)
    if not isinstance(c.retain_qa, bool):
        yield f"retain_qa must be true or false, got {c.retain_qa!r}"
    if c.forget_data not in FORGET_DATA:
        yield f"forget_data must be one of {', '.join(FORGET_DATA)}, got {c.forget_data!r}"
    elif method is not None and method.chosen == "refusal" and c.forget_data != "qa":
        yield (f"forget_data must be 'qa' for {c.method} (it answers the concept's questions with the refusal; a "
               f"text chunk has no question to refuse)")
    elif method is not None and method.text == "unrelated" and c.forget_data != "text":
        yield (f"forget_data must be 'text' for {c.method} (it learns the text of a concept unrelated to the target; "
               f"the target's questions are what it must leave alone)")
    if not (isinstance(c.refusal, str) and c.refusal.strip()):
        yield f"refusal must be a non-empty string, got {c.refusal!r}"
    if c.prompt_format not in ("auto", "paper", "chat"):
        yield f"prompt_format must be 'auto', 'paper' or 'chat', got {c.prompt_format!r}"
    if not validate.is_int(c.seed):
        yield f"seed must be an integer, got {c.seed!r}"
    if c.retain_concept is not None and not (isinstance(c.retain_concept, str) and c.retain_concept):
        yield f"retain_concept must be a concept name or None, got {c.retain_concept!r}"


def _lora_problems(c: UnlearnConfig):
    if not validate.int_in_range(c.lora_rank, 1, MAX_LORA_RANK):
        yield f"lora_rank must be {validate.int_words(1, MAX_LORA_RANK)}, got {c.lora_rank!r}"
    if not (validate.is_number(c.lora_alpha) and c.lora_alpha > 0):
        yield f"lora_alpha must be a finite number > 0 (the adapter's scale is lora_alpha / lora_rank), got {c.lora_alpha!r}"
    if not isinstance(c.lora_targets, str) or not c.lora_targets.strip():
        yield f"lora_targets must be 'auto' or module paths inside a decoder layer, comma-separated, got {c.lora_targets!r}"
    elif c.lora_targets != "auto":
        paths = [t.strip() for t in c.lora_targets.split(",")]
        bad = [t for t in paths if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_0-9]\w*)*", t)]
        if bad:
            yield (f"lora_targets: {bad} are not module paths inside a decoder layer (e.g. 'mlp.down_proj'); give "
                   f"'auto' or paths separated by commas")
        elif len(set(paths)) != len(paths):
            yield f"lora_targets names a module twice: {c.lora_targets!r}"


def register_method(method: methods.Method) -> methods.Method:
    """Add a method to methods.REGISTRY after checking it against the settings UnlearnConfig has; return it."""
    if method.name in methods.REGISTRY:
        raise ValueError(f"unlearning method {method.name!r} exists already")
    if not method.name.isidentifier():
        raise ValueError(f"unlearning method name {method.name!r}: use letters, digits and '_' (it names cache "
                         f"entries and command-line choices)")
    for what, parts in (("parts", method.parts), ("reference", method.reference)):
        unknown = [p for p in parts if p not in methods.PARTS]
        if unknown:
            raise ValueError(f"unlearning method {method.name!r}: {what} {unknown} are not batch parts {methods.PARTS}")
    if not set(method.reference) <= set(method.parts):
        raise ValueError(f"unlearning method {method.name!r}: reference {method.reference} must be among the parts "
                         f"it reads {method.parts}")
    if method.text not in methods.TEXTS:
        raise ValueError(f"unlearning method {method.name!r}: text must be one of {methods.TEXTS}, got {method.text!r}")
    if method.chosen not in methods.CHOSEN:
        raise ValueError(f"unlearning method {method.name!r}: chosen must be one of {methods.CHOSEN}, got {method.chosen!r}")
    if ("chosen" in method.parts) != (method.chosen is not None):
        raise ValueError(f"unlearning method {method.name!r}: a loss that reads the 'chosen' part needs chosen= "
                         f"(and only such a loss)")
    settings = {f.name for f in dataclasses.fields(UnlearnConfig)} - {"method"}
    unknown = sorted((set(method.defaults) | set(method.settings)) - settings)
    if unknown:
        raise ValueError(f"unlearning method {method.name!r}: {unknown} are not UnlearnConfig settings (its defaults "
                         f"and the keyword arguments of its loss must be)")
    if not (method.label and method.colour):
        raise ValueError(f"unlearning method {method.name!r}: give a label and a colour (for the book's charts)")
    methods.REGISTRY[method.name] = method
    return method


def unregister_method(name: str) -> None:
    del methods.REGISTRY[name]
