"""The mechanics chapter's case: one question of one concept, a vanilla and an unlearned model, one window of layers.

The chapter (notebooks/02b_mechanics) shows the nnsight code of the dissection itself, short enough to type in class;
everything around that code lives here, where it is tested: which study the chapter runs (its first concept and
method), which layers it patches, the question with its tokens and scored positions, the loaded models, the engine's
KRS of the same question and window for the page's assertion, and the token-probability chart.

The positions and the score are those of the engine with alignment 'answer' (patching.batch, patching.score): the
positions whose logits predict the vanilla answer's tokens, loss = mean squared difference of the full-vocabulary
logits from the vanilla model's (computed in float64), KRS = 1 - loss(patched) / loss(unlearned).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import pandas as pd

from . import models, validate
from .study import Study

EXPERIMENTS = ("coef", "value")  # what the chapter restores by hand: MLP coefficients, then value vectors
# The engine scores each question inside a packed batch, the chapter alone in one row: the logits differ by float
# rounding (~1e-6 relative), so the two KRS agree to this much and no further.
KRS_TOLERANCE = 1e-5


def study(params: Mapping, **overrides) -> Study:
    """The chapter's study: its parameters, narrowed to the first concept of `concepts` and the first method of
    `methods` (one unlearned model). A `question` among the parameters is checked against the questions that model
    may be scored on, so that a run with too large a number fails before anything is computed."""
    if {**params, **overrides}.get("remote") is True:
        raise ValueError("remote: this chapter loads the vanilla and the unlearned model here, to show each step of "
                         "a patch by hand, so it cannot run on NDIF; use remote=False, or 'local' (nnsight's offline "
                         "simulation)")
    full = Study.from_params(params, **overrides)
    s = Study.from_params(params, **{**overrides, "concepts": full.concepts[:1], "methods": full.methods[:1]})
    question = {**params, **overrides}.get("question")
    if question is not None:
        validate.check_int(question, "question", 0)
        n = len(questions(s))
        if question >= n:
            raise ValueError(f"question: {question} is out of range; concept {s.concepts[0]!r} has {n} question(s) "
                             f"the unlearned model is not trained on (0..{n - 1})")
    return s


def questions(s: Study) -> list[int]:
    """The indices of the chapter's concept's questions its unlearned model may be scored on, in order."""
    from . import pipeline, unlearning

    config = unlearning.UnlearnConfig.for_method(s.methods[0], **s.params["unlearning"])
    return pipeline.scorable(config, s.concept_set.get(s.concepts[0]))


def window(s: Study) -> list[int]:
    """The layers the chapter patches, as non-negative layer numbers: `layers` when set, else the last `window`
    layers of the model (where the paper finds the coefficients matter most)."""
    n = models.n_layers_of(s.model)
    layers = s.params["layers"]
    if n is None:
        # A model not provisioned or downloaded yet (planning a build before it is): the same layers counted from
        # the end, which the engine resolves once the model is loaded; loading it will say what is missing
        return list(range(-s.params["window"], 0)) if layers is None else list(layers)
    if layers is None:
        validate.check_window(s.params["window"], n)
        return list(range(n - s.params["window"], n))
    validate.check_layers(layers, n)
    return sorted({x % n for x in layers})


@dataclass
class Case:
    """One question of one concept, teacher forced through a vanilla and an unlearned model."""

    concept: str  # its label, as the tables spell it
    method: str
    question_index: int  # the question's index in its concept
    question: str
    answer: str  # the vanilla model's greedy answer
    prompt_ids: list[int]
    answer_ids: list[int]
    answer_tokens: list[str]  # each answer token as text, for the charts
    layers: list[int]
    vanilla: object  # the HF models, in eval mode
    unlearned: object
    tokenizer: object

    @property
    def input_ids(self):
        """[1, prompt + answer]: the question followed by the vanilla answer (teacher forcing)."""
        import torch

        return torch.tensor([self.prompt_ids + self.answer_ids])

    @property
    def positions(self) -> list[int]:
        """The positions whose logits predict the answer tokens: position t predicts token t + 1."""
        n = len(self.prompt_ids)
        return list(range(n - 1, n + len(self.answer_ids) - 1))


# The module paths the chapter's code names (nnsight reaches modules by attribute): Llama-like models only.
LESSON_PATHS = {"layers": "model.layers", "coef_module": "mlp.down_proj"}


def check_architecture(model, name: str) -> None:
    """Refuse a model whose modules are not where the chapter's code looks for them."""
    arch = models.architecture_of(model)
    if any(getattr(arch, k) != v for k, v in LESSON_PATHS.items()):
        raise ValueError(f"model: the mechanics chapter's code reaches the MLP as model.layers[i].mlp.down_proj "
                         f"(Llama-like models); {name!r} is a {arch.family!r} model, whose MLP output projection is "
                         f"{arch.layers}[i].{arch.coef_module}")


def case(s: Study, question: int = 0) -> Case:
    """Load the chapter's case: the `question`-th question the unlearned model may be scored on (the questions of
    the engine's sweep, in order), with both models loaded."""
    from . import pipeline

    validate.check_int(question, "question", 0)
    concept, method = s.concept_set.get(s.concepts[0]), s.methods[0]
    handle = s.unlearned(concept.label, method)
    answers = s.answers(include_unrelated=False)
    rows = answers[(answers.concept == concept.label) & (answers.kind == "target")]
    rows = rows[rows.question_index.isin(pipeline.scorable(handle.config, concept))].sort_values("question_index")
    if question >= len(rows):
        raise ValueError(f"question: {question} is out of range; concept {concept.label!r} has {len(rows)} question(s) the "
                         f"unlearned model was not trained on (0..{len(rows) - 1})")
    row = rows.iloc[question]
    vanilla, tok = models.load(s.model)
    check_architecture(vanilla, s.model)
    unlearned, _ = handle.load()
    prompt_ids = [int(t) for t in row.prompt_ids]
    answer_ids = [int(t) for t in row.answer_ids]
    return Case(concept.label, method, int(row.question_index), str(row.question), str(row.answer_text), prompt_ids,
                answer_ids, [tok.decode([t]) for t in answer_ids], window(s), vanilla.eval(), unlearned.eval(), tok)


def engine_krs(sweep: pd.DataFrame, c: Case, experiment: str) -> float:
    """The engine's KRS for the case's question and window (a row of `sweep`, the study's sweep over EXPERIMENTS)."""
    rows = sweep[(sweep.experiment == experiment) & (sweep.question_index == c.question_index)
                 & (sweep.concept == c.concept) & (sweep.method == c.method)
                 & sweep.layers.map(lambda x: [int(i) for i in x] == c.layers)]
    if len(rows) != 1:
        raise ValueError(f"engine_krs: expected one row of experiment {experiment!r} for question "
                         f"{c.question_index} and layers {c.layers}, found {len(rows)}")
    return float(rows.krs.iloc[0])


def token_table(c: Case, runs: Mapping) -> pd.DataFrame:
    """Tidy: one row per (run, answer token): run, position (1..n), token, probability. `runs`: {run name: the
    probability of each answer token} (a list or a 1-D tensor)."""
    records = []
    for run, probs in runs.items():
        probs = probs.tolist() if hasattr(probs, "tolist") else list(probs)
        if len(probs) != len(c.answer_ids):
            raise ValueError(f"token_table: run {run!r} has {len(probs)} probabilities for "
                             f"{len(c.answer_ids)} answer tokens")
        for i, (tok, p) in enumerate(zip(c.answer_tokens, probs)):
            records.append({"run": run, "position": i + 1, "token": tok, "probability": float(p)})
    return pd.DataFrame.from_records(records, columns=["run", "position", "token", "probability"])
