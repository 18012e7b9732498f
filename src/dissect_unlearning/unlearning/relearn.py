"""Relearning: fine-tune an unlearned model for a few steps and watch the "forgotten" answers come back.

If unlearning had erased the knowledge, relearning it would take as long as learning it the first time; if it only
hid it (the paper's claim: retrieval is disturbed, the value vectors are intact), a few steps on *other* data bring
it back. Two kinds of relearning data:
  'unrelated' - the text of a concept that was neither forgotten nor retained, and that gives away none of the
                forgotten concept's answers (checked: `leaks`; The Lord of the Rings' article names J.K. Rowling, so
                it cannot stand in for "nothing about Harry Potter");
  'partial'   - half of the forgotten concept's questions with the vanilla answers; the other half is scored, so
                what comes back was not shown.
The control of 'partial' (CONTROL, 'never_known'): the same unlearned model, budget and split, on a concept no model
can know (concepts.never_known: a fictional island state) - half of its questions with its gold answers, the other
half scored against them. Whatever a few steps on half of the questions win back on the other half for a concept
that was never known (the answers' form, guessing) is not knowledge coming back; the target's gain beyond it may be.
Plain next-token NLL, AdamW, seeded order; `evaluate(model, step)` is called at each checkpoint step (0 = before).
"""
from __future__ import annotations

import contextlib

import random
import re
from typing import Callable

import torch

from .. import concepts as concepts_mod, prompts
from . import data as data_mod
from .config import trained_questions
from .logprobs import mean_nll, sequence_logprobs
from .trainer import recomputed_activations

KINDS = ("unrelated", "partial")  # the relearning data a chapter chooses
CONTROL = "never_known"  # the control of 'partial', run beside it
_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> set[str]:
    return set(_WORD.findall(concepts_mod.normalise(text)))


def leaks(concept, text: str, answers: list[str] | None = None) -> dict:
    """What `text` gives away of `concept`'s answers.

    leaked: the indices of the questions one of whose accepted answers (concept.answers) occurs in the text, as a
    phrase (case, punctuation and spacing ignored, as answers are scored). overlap: the share of the answers' words
    (three letters or more, not in the question itself) that occur anywhere in the text. Without accepted answers,
    `answers` (the vanilla model's answer texts, one per question) stand in for them, and only the overlap is
    computed (a whole sentence never occurs verbatim)."""
    norm = concepts_mod.normalise(text)
    vocabulary = _words(text)
    accepted = concept.answers or [[a] for a in (answers or [])]
    leaked = [i for i, alts in enumerate(concept.answers or []) if any(concepts_mod.normalise(a) in norm
                                                                       for a in alts)]
    words = set()
    for question, alts in zip(concept.questions, accepted):
        asked = _words(question)
        words |= {w for a in alts for w in _words(a) if len(w) >= 3 and w not in asked}
    overlap = len(words & vocabulary) / len(words) if words else 0.0
    return {"leaked": leaked, "overlap": overlap, "words": len(words)}


def unrelated_concept(concept, candidates: list, answers: list[str] | None = None):
    """(the concept whose text relearning on 'unrelated' data uses, its leaks()): the first candidate (in the set's
    order) whose text gives away none of `concept`'s answers; if every one does, the one that gives away fewest
    (ties: the smaller word overlap), so that the table reports the leak rather than the build failing."""
    if not candidates:
        raise ValueError("relearning data 'unrelated' needs a concept that is neither forgotten nor retained")
    found = [(c, leaks(concept, c.forget_text, answers)) for c in candidates]
    clean = [f for f in found if not f[1]["leaked"]]
    return clean[0] if clean else min(found, key=lambda f: (len(f[1]["leaked"]), f[1]["overlap"]))


def examples(tok, kind: str, concept, other, qa, chunk_tokens: int = 128, max_length: int = 256):
    """(training examples, indices of the concept's questions to score) for a relearning `kind`.

    qa = [(question, prompt_ids, answer_ids)] of `concept` (vanilla answers); `other` = the unrelated concept."""
    n = len(concept.questions)
    if kind == "unrelated":
        chunks = data_mod.text_chunks(tok, other.forget_text, chunk_tokens)
        return [data_mod.text_example(c, f"text:{i}") for i, c in enumerate(chunks)], list(range(n))
    if kind == "partial":
        if n < 2:
            raise ValueError(f"relearning data 'partial' needs at least 2 questions; concept {concept.label!r} has {n}")
        shown = trained_questions(n)  # the half an unlearning run on questions trains on too
        train = [data_mod.qa_example(qa[i][1], qa[i][2], max_length, f"qa:{i}") for i in shown if qa[i][2]]
        return train, [i for i in range(n) if i not in shown]
    raise ValueError(f"relearning data must be one of {KINDS}, got {kind!r}")


def never_known_examples(tok, concept, prompt_format: str, max_length: int = 256):
    """(training examples, indices of the questions to score) of the never-known control: the questions 'partial'
    would train on (config.trained_questions) with the first gold answer of each, ended by the tokenizer's EOS as a
    generated answer is; the others are scored."""
    n = len(concept.questions)
    if not concept.answers:
        raise ValueError(f"the never-known control needs gold answers: concept {concept.label!r} has no QA_answers")
    if n < 2:
        raise ValueError(f"the never-known control needs at least 2 questions; concept {concept.label!r} has {n}")
    shown = trained_questions(n)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    train = []
    for i in shown:
        prompt = prompts.encode_prompt(concept.questions[i], tok, prompt_format)
        answer = tok(concept.answers[i][0], add_special_tokens=False)["input_ids"] + eos
        train.append(data_mod.qa_example(prompt, answer, max_length, f"qa:{i}"))
    return train, [i for i in range(n) if i not in shown]


def relearn(model, tok, train: list, checkpoints, evaluate: Callable[[object, int], list[dict]], lr: float = 1e-5,
            batch_size: int = 4, seed: int = 0, progress: bool = True, recompute: bool = True) -> list[dict]:
    """Fine-tune `model` in place on `train`; return the rows `evaluate` gives at each checkpoint step.

    recompute: gradient checkpointing (trainer.recomputed_activations), the same weights bit for bit either way.
    Kept on: on the default model's relearning batches it costs 1.09x the time per step and saves 0.37 GB of peak
    memory (benchmarks/bench_relearn.py, one run, idle 2-core machine), and memory is the build's tighter budget."""
    from tqdm.auto import tqdm

    checkpoints = sorted(set(int(k) for k in checkpoints))
    if not checkpoints or checkpoints[0] < 0:
        raise ValueError(f"steps must be integers >= 0, got {checkpoints}")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    pad_id = prompts.pad_id(tok)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, foreach=True)
    rows: list[dict] = []
    order: list[int] = []
    step = 0
    bar = tqdm(total=checkpoints[-1], desc="relearn", disable=not progress, unit="step")
    try:
        for k in checkpoints:
            while step < k:
                if len(order) < batch_size:
                    epoch = list(range(len(train)))
                    rng.shuffle(epoch)
                    order += epoch
                index, order = order[:batch_size], order[batch_size:]
                part = data_mod.collate([train[i] for i in index], index, pad_id)
                model.train()
                with (recomputed_activations(model) if recompute else contextlib.nullcontext()):
                    loss = mean_nll(*sequence_logprobs(model, part))
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                optimiser.step()
                optimiser.zero_grad(set_to_none=True)  # spent: not held through the next forward pass
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.2f}")
            model.eval()
            rows += [{"step": k, **r} for r in evaluate(model, k)]
    finally:
        bar.close()
        model.zero_grad(set_to_none=True)
        model.eval()
    return rows
