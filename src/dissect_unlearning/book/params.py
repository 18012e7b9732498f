"""The parameter schema: every parameter a chapter may declare, with its allowed values.

Kept here (not per notebook) so that a profile shared by all chapters is checked once, and so that the same name
means the same thing in every chapter. The vocabularies (methods, restorations, prompt formats, ...) are read from
the modules that define them; methods and restorations when a value is checked, since their registries can grow
after import (patching.experiments.register_experiment).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from .. import unlearning, validate
from ..patching import experiments
from ..patching.batch import ALIGNMENTS
from ..prompts import FORMATS
from ..unlearning.relearn import KINDS as RELEARN_DATA
from .project import BookError

PROMPT_FORMATS = ("auto", *FORMATS)
UNLEARNING_SETTINGS = tuple(f.name for f in dataclasses.fields(unlearning.UnlearnConfig) if f.name != "method")
PATH_PARAMETERS = ("model", "concept_set", "second_model")  # may name a local file or folder


def methods() -> tuple[str, ...]:
    """The unlearning methods."""
    return tuple(unlearning.METHODS)


def restorations() -> tuple[str, ...]:
    """The experiments that restore parameters, as registered now."""
    return tuple(name for name, e in experiments.EXPERIMENTS.items() if e.restores_parameters)


@dataclass(frozen=True)
class ParamSpec:
    words: str | Callable[[], str]  # the allowed values in words; a function where they come from a registry
    check: Callable[[Any], Any]  # returns the (normalised) value or raises ValueError saying why

    @property
    def allowed(self) -> str:
        """The allowed values, in words (shown in errors and in the book)."""
        return self.words() if callable(self.words) else self.words


# The checks below raise a bare ValueError: check_value() replaces it with a message that names the parameter, where
# its value came from, and the allowed values in words.
def _int(lo: int | None = None, hi: int | None = None, none_ok: bool = False):
    def check(v):
        if v is None and none_ok:
            return None
        if not validate.int_in_range(v, lo, hi):
            raise ValueError("not an integer in range")
        return v
    return check


def _choice(options, none_ok: bool = False):
    def check(v):
        if v is None and none_ok:
            return None
        if v not in options:
            raise ValueError("not one of the allowed values")
        return v
    return check


def _subset(options: Callable[[], tuple], none_ok: bool = False):
    def check(v):
        if v is None and none_ok:
            return None
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, (list, tuple)) or not v or any(x not in options() for x in v):
            raise ValueError("not a non-empty list of allowed values")
        return list(dict.fromkeys(v))
    return check


def _nonempty_str(v):
    if not isinstance(v, str) or not v.strip():
        raise ValueError("not a non-empty string")
    return v


def _str_or_none(v):
    return None if v is None else _nonempty_str(v)


def _concept_selection(none_ok: bool = False):
    def check(v):
        if v is None and none_ok:
            return None
        if v == "all" or validate.int_in_range(v, 1):
            return v
        v = [v] if isinstance(v, str) else v
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, str) and x.strip() for x in v):
            return list(v)
        raise ValueError("not 'all', a positive integer or a list of concept names")
    return check


def _layers(v):
    if v is None:
        return None
    if isinstance(v, (list, tuple)) and v and all(validate.is_int(x) for x in v):
        return list(dict.fromkeys(v))
    raise ValueError("not null or a list of layer numbers")


def check_together(values: dict, where: str) -> dict:
    """A chapter's resolved values against each other, the concept set and the model (window and layers against its
    layer count, read from its config): Study.check, the check every study runs, here before the build computes
    anything. Offline: a hub concept set and the NDIF key are left to the chapter. A BookError naming `where`."""
    from .. import study
    from ..models import ModelError

    try:
        study.check_params(values, offline=True)
    except (ValueError, KeyError, ModelError) as exc:
        raise BookError(f"{where}: {validate.one_line(exc)}") from None
    return values


def _steps(v):
    if isinstance(v, (list, tuple)) and v and all(validate.int_in_range(x, 0, 1000) for x in v):
        return sorted(set(v))
    raise ValueError("not a non-empty list of step counts")


def _relearn_data(v):
    v = [v] if isinstance(v, str) else v
    if isinstance(v, (list, tuple)) and all(x in RELEARN_DATA for x in v):
        return list(dict.fromkeys(v))
    raise ValueError("not a list of relearning data kinds")


def _forget_regimes(v):
    from ..unlearning.config import FORGET_DATA

    v = [v] if isinstance(v, str) else v
    if isinstance(v, (list, tuple)) and v and all(x in FORGET_DATA for x in v):
        return list(dict.fromkeys(v))
    raise ValueError("not a non-empty list of forget data regimes")


def _seeds(v):
    v = [v] if validate.is_int(v) else v
    if isinstance(v, (list, tuple)) and v and all(validate.int_in_range(x, 0) for x in v) and len(set(v)) == len(v):
        return list(v)
    raise ValueError("not a non-empty list of distinct seeds")


def _learning_rate(v):
    if validate.is_number(v) and 0 < v < 1:
        return float(v)
    raise ValueError("not a number in (0, 1)")


def _unlearning_settings(v):
    if v is None:
        return {}
    if isinstance(v, dict) and all(isinstance(k, str) and k in UNLEARNING_SETTINGS for k in v):
        return dict(v)
    raise ValueError("not a mapping of unlearning setting names to values")


def _adapter_settings(v):
    return None if v is None else _unlearning_settings(v)


def _remote(v):
    if isinstance(v, bool) or v == "local":
        return v
    raise ValueError("not true, false or 'local'")


PARAMETERS: dict[str, ParamSpec] = {
    "model": ParamSpec("a registry name (smollm2-135m, gemma3-270m), a checkpoint folder, or a Hugging Face id "
                       "'owner/name'", _nonempty_str),
    "concept_set": ParamSpec("'builtin', a JSON file of ConceptVectors records, or 'hub:owner/dataset'",
                             _nonempty_str),
    "concepts": ParamSpec("'all', N (the first N concepts of the set), or a list of concept names",
                          _concept_selection()),
    "n_questions": ParamSpec("null (all of a concept's questions) or an integer >= 1", _int(1, none_ok=True)),
    "n_unrelated": ParamSpec("null (all unrelated questions) or an integer >= 0", _int(0, none_ok=True)),
    "prompt_format": ParamSpec(" | ".join(PROMPT_FORMATS), _choice(PROMPT_FORMATS)),
    "max_new_tokens": ParamSpec("an integer from 1 to 512", _int(1, 512)),
    "batch_size": ParamSpec("an integer >= 1", _int(1)),
    "methods": ParamSpec(lambda: "a non-empty list of " + ", ".join(methods()), _subset(methods)),
    "unlearning": ParamSpec("a mapping of unlearning settings (unlearning.UnlearnConfig; unset ones take the "
                            "method's defaults), any of: " + ", ".join(UNLEARNING_SETTINGS), _unlearning_settings),
    "restorations": ParamSpec(lambda: "a non-empty list of " + ", ".join(restorations()), _subset(restorations)),
    "window": ParamSpec("an integer from 1 to 99 (layers per patched window), at most the model's layer count",
                        _int(1, 99)),
    "layers": ParamSpec("null (slide the window over every layer) or a list of layer numbers patched together as "
                        "one window (negative numbers count from the end: [-1] = the last layer), each a layer of "
                        "the model", _layers),
    "alignment": ParamSpec("'answer' (positions predicting the answer) or 'paper' (the released code's count)",
                           _choice(ALIGNMENTS)),
    "remote": ParamSpec("true (every model in NDIF requests: vanilla answers, adapter unlearning, scores and "
                        "traces; needs unlearning {params: lora} and NDIF_API_KEY), false, or 'local' (nnsight's "
                        "offline simulation of NDIF's requests)", _remote),
    "adapter_unlearning": ParamSpec("null (no comparison) or a mapping of unlearning settings for the low-rank "
                                    "adapter set beside full fine-tuning (params is 'lora' whatever it says), any "
                                    "of: " + ", ".join(UNLEARNING_SETTINGS), _adapter_settings),
    "device": ParamSpec("null (the model's default), " + ", ".join(validate.DEVICES[:-1]) + " or "
                        + validate.DEVICES[-1], validate.check_device),
    "dtype": ParamSpec("null (the model's default) or one of " + ", ".join(validate.DTYPES), validate.check_dtype),
    "question": ParamSpec("an integer >= 0: which of the concept's scored questions (those the unlearned model was "
                          "not trained on, in order) the mechanics chapter dissects", _int(0)),
    "seed": ParamSpec("an integer >= 0", _int(0)),
    "seeds": ParamSpec("a non-empty list of distinct integers >= 0: the unlearning seeds of each (concept, method) of "
                       "beyond_concepts, one unlearned model per seed (the other pairs use the first seed)", _seeds),
    "second_concepts": ParamSpec("null (the same concepts as the first model), 'all', N (the first N concepts of "
                                 "the set) or a list of concept names", _concept_selection(none_ok=True)),
    "second_methods": ParamSpec(lambda: "null (the same methods as the first model) or a non-empty list of "
                                + ", ".join(methods()), _subset(methods, none_ok=True)),
    "beyond_concepts": ParamSpec("null (the same concepts as `concepts`), 'all', N (the first N concepts of the "
                                 "set) or a list of concept names", _concept_selection(none_ok=True)),
    "relearn_steps": ParamSpec("a non-empty list of step counts from 0 to 1000 (0 = the unlearned model itself)",
                               _steps),
    "relearn_data": ParamSpec("a list (empty = skip relearning) of 'unrelated' (text of a concept neither forgotten "
                              "nor retained) and 'partial' (half of the target questions; the other half is scored)",
                              _relearn_data),
    "forget_regimes": ParamSpec("a non-empty list of forget data regimes shown side by side: 'text' (the "
                                "concept's text, the paper's), 'qa' (half its questions, the other half scored), "
                                "'text+qa'", _forget_regimes),
    "relearn_lr": ParamSpec("a number in (0, 1): the relearning fine-tune's learning rate", _learning_rate),
    "second_model": ParamSpec("null (skip) or a model (as for `model`) of another family, dissected the same way",
                              _str_or_none),
}


def check_value(name: str, value, where: str) -> Any:
    """The normalised value of parameter `name`, or BookError naming `where` and the allowed values."""
    spec = PARAMETERS.get(name)
    if spec is None:
        raise BookError(f"{where}: unknown parameter {name!r}; valid names: {', '.join(sorted(PARAMETERS))}")
    try:
        return spec.check(value)
    except ValueError:
        raise BookError(f"{where}: bad value {value!r} for parameter {name!r}; allowed: {spec.allowed}") from None


def parse_assignment(text: str) -> tuple[str, Any]:
    """'key=value' from the command line; the value is read as YAML (3, true, null, [a, b], text)."""
    if "=" not in text:
        raise BookError(f"-p {text!r}: expected key=value, e.g. -p model=gemma3-270m or -p methods=[grad_diff,dpo]")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value
