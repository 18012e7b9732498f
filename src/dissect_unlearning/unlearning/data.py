"""Forget, retain and chosen sets of an unlearning run, as token sequences with per-token loss labels.

As in ConceptVectors: the forget set is the concept's forget text (its Wikipedia article) cut into chunks
(forget_data "text"), here optionally with (or instead of) the first half of its questions answered with the vanilla
model's own answers (loss on the answer tokens only; the other half is what the book scores); the
retain set is the text of one other concept, chosen by seed, repeated to the forget set's length, here optionally
plus that concept's questions with vanilla answers - except any question the forget concept lists among its
unrelated questions, which are the test of what unlearning should keep. Example i of the retain set (and of the
chosen set, for DPO) is paired with example i of the forget set, text with text and question with question.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .. import prompts

IGNORE = prompts.IGNORE  # label of a position that carries no loss (prompt tokens, padding)


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # labels[t] = input_ids[t] where token t is trained on, else IGNORE
    source: str  # "text:<chunk>" or "qa:<question>", for people reading a batch


@dataclass
class UnlearningData:
    forget: list[Example]
    retain: list[Example]  # aligned with forget
    chosen: list[Example] | None  # DPO's preferred side, aligned with forget (None for methods without one)
    forget_concept: str
    retain_concept: str


@dataclass
class Part:
    """A right-padded batch of examples; `index` = their positions in the data set (to look up reference values)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor

    def to(self, device) -> "Part":
        """The model's inputs on `device` (a no-op where they already are); `index` stays on the CPU for look-ups."""
        return Part(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), self.index)


def text_chunks(tok, text: str, chunk_tokens: int) -> list[list[int]]:
    """Consecutive chunks of `chunk_tokens` tokens; a short tail (under a quarter chunk) is dropped unless alone."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    chunks = [ids[i:i + chunk_tokens] for i in range(0, len(ids), chunk_tokens)]
    if len(chunks) > 1 and len(chunks[-1]) < max(2, chunk_tokens // 4):
        chunks.pop()
    return [c for c in chunks if len(c) >= 2]  # one token predicts nothing


def text_example(ids: list[int], source: str) -> Example:
    return Example(tuple(ids), tuple(ids), source)


def qa_example(prompt_ids: list[int], answer_ids: list[int], max_length: int, source: str) -> Example:
    """Prompt + answer, loss on the answer; too long = cut the answer's tail, then the prompt's head."""
    answer = list(answer_ids)[:max(1, max_length - len(prompt_ids))]
    prompt = list(prompt_ids)[max(0, len(prompt_ids) + len(answer) - max_length):]
    return Example(tuple(prompt + answer), tuple([IGNORE] * len(prompt) + answer), source)


def choose_retain(concepts, forget, seed: int, name: str | None = None):
    """The retain concept: `name` if given, else one chosen by `seed` among the concepts with another name.

    Never the forget concept itself, nor the same concept stored at another location (same name).
    """
    if name is not None:
        retain = concepts.get(name)
        if retain.name == forget.name:
            raise ValueError(f"retain_concept {name!r} is the forget concept {forget.name!r} itself; choose another")
        return retain
    others = [c for c in concepts if c.name != forget.name]
    if not others:
        raise ValueError(f"the concept set {getattr(concepts, 'source', '')!r} has no concept other than "
                         f"{forget.name!r} to retain; add one or pass retain_concept")
    # A string seed is hashed by random (sha512), so the choice does not depend on PYTHONHASHSEED.
    return random.Random(f"{seed}:{forget.label}").choice(others)


QA = list[tuple[str, list[int], list[int]]]  # (question, prompt_ids, answer_ids), answers by the vanilla model


def build(tok, forget, retain, config, qa: QA | None = None, retain_qa: QA | None = None) -> UnlearningData:
    """The data of one run. `qa` / `retain_qa` = the forget / retain concept's questions answered by the vanilla
    model (needed when config.forget_data includes "qa" / config.retain_qa). Of the forget concept's questions only
    config.trained_questions() are trained on: the others are the ones the book scores."""
    from .config import trained_questions

    if retain.name == forget.name:
        raise ValueError(f"retain concept {retain.label!r} has the forget concept's name {forget.name!r}")
    parts = config.forget_data.split("+")
    forget_set: list[Example] = []
    if "text" in parts:
        chunks = text_chunks(tok, forget.forget_text, config.chunk_tokens)
        if not chunks:
            raise ValueError(f"concept {forget.label!r}: field 'wikipedia_content' (the forget text) is too short "
                             f"to make a training chunk")
        forget_set += [text_example(c, f"text:{i}") for i, c in enumerate(chunks)]
    qa_set: list[Example] = []
    trained = trained_questions(len(qa)) if qa is not None else []
    if "qa" in parts:
        if qa is None:
            raise ValueError(f"forget_data {config.forget_data!r} trains on questions, but no vanilla answers were "
                             f"given (qa=[(question, prompt_ids, answer_ids)])")
        if not trained:
            raise ValueError(f"concept {forget.label!r}: forget_data {config.forget_data!r} trains on half of the "
                             f"questions and scores the other half, which needs at least 2 questions "
                             f"(it has {len(qa)})")
        qa_set = [qa_example(qa[i][1], qa[i][2], config.max_length, f"qa:{i}") for i in trained if qa[i][2]]
        if not qa_set:
            raise ValueError(f"concept {forget.label!r}: the vanilla model gave no answer tokens to train on")
    forget_set += qa_set  # a method with refusals as its chosen side has no text here (config checks it)

    retain_chunks = text_chunks(tok, retain.forget_text, config.chunk_tokens)
    if not retain_chunks:
        raise ValueError(f"retain concept {retain.label!r}: field 'wikipedia_content' is too short to make a chunk")
    retain_text = [text_example(c, f"text:{i}") for i, c in enumerate(retain_chunks)]
    retain_questions: list[Example] = []
    if config.retain_qa:
        if retain_qa is None:
            raise ValueError("retain_qa is true but no vanilla answers of the retain concept were given (retain_qa=)")
        held_out = set(forget.unrelated_questions)
        retain_questions = [qa_example(p, a, config.max_length, f"qa:{i}") for i, (q, p, a) in enumerate(retain_qa)
                            if a and q not in held_out]
    # Pair text with text and questions with questions (when there are retain questions), cycling each list.
    retain_set = []
    n_text = 0
    for e in forget_set:
        pool = retain_questions if (e.source.startswith("qa:") and retain_questions) else retain_text
        k = (len(retain_set) - n_text) if pool is retain_questions else n_text
        retain_set.append(pool[k % len(pool)])
        n_text += pool is retain_text

    chosen = None
    # Imported here: the method registry imports the losses, which import this module.
    from .methods import get as method

    kind = method(config.method).chosen
    if kind == "retain":
        chosen = retain_set  # ConceptVectors' DPO prefers the unrelated text to the forget text
    elif kind == "refusal":
        refusal = tok(config.refusal, add_special_tokens=False)["input_ids"] + _eos(tok)
        chosen = [qa_example(list(qa[i][1]), refusal, config.max_length, f"idk:{i}") for i in trained if qa[i][2]]
    return UnlearningData(forget_set, retain_set, chosen, forget.label, retain.label)


def _eos(tok) -> list[int]:
    return [tok.eos_token_id] if tok.eos_token_id is not None else []


def collate(examples: list[Example], index: list[int], pad_id: int) -> Part:
    """The examples as one right-padded Part: positions are the plain 0..n-1, and padding carries no loss."""
    ids, mask = prompts.pad([e.input_ids for e in examples], pad_id, "right")
    labels, _ = prompts.pad([e.labels for e in examples], IGNORE, "right")
    return Part(ids, mask, labels, torch.tensor(index, dtype=torch.long))
