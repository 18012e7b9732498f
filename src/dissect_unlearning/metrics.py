"""Behavioural scores, as plain callables: how much of the vanilla behaviour an unlearned model still shows.

As in ConceptVectors: BLEU (nltk sentence BLEU, smoothing method 3, whitespace tokens) and ROUGE-L F (rouge-score) of
an answer against the *vanilla model's* answer; plus accuracy against expected answers, ROUGE-L of a greedy text
completion against the true continuation, and perplexity of a text. Maintained implementations only (nltk,
rouge-score); this module only feeds them.
"""
from __future__ import annotations

import functools
import math

import torch

from . import prompts
from .concepts import answer_matches


def bleu(candidate: str, reference: str) -> float:
    """Sentence BLEU-4 of `candidate` against one `reference`, whitespace tokens, smoothing method 3 (0 if empty)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    hyp, ref = candidate.split(), reference.split()
    if not hyp or not ref:
        return 0.0
    return float(sentence_bleu([ref], hyp, smoothing_function=SmoothingFunction().method3))


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure of `candidate` against `reference` (rouge-score's tokeniser: lower case, alphanumerics)."""
    return float(_rouge_scorer().score(reference, candidate)["rougeL"].fmeasure)


def accuracy(answer: str, accepted: list[str]) -> float:
    """1.0 if the answer contains one of the accepted answers (concepts.answer_matches), else 0.0."""
    return float(answer_matches(answer, accepted))


def mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def greedy_continuations(model, tok, texts: list[str], max_new_tokens: list[int] | int, batch_size: int = 8
                         ) -> list[str]:
    """Greedy continuation of each raw text (no chat template), at most max_new_tokens[i] tokens each, up to the
    tokenizer's EOS. Batches keep the texts' order and stop at the tokenizer's EOS only (not the generation config's
    other stop tokens): the continuations the behaviour tables were computed with."""
    stop = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    generated = prompts.greedy_generate(model, [tok(t)["input_ids"] for t in texts], max_new_tokens, stop,
                                        prompts.pad_id(tok), batch_size)
    return [tok.decode([t for t in new if t not in stop], skip_special_tokens=True).strip() for new in generated]


def completion_rouge(model, tok, items: list[dict], max_new_tokens: int = 48, batch_size: int = 8) -> list[float]:
    """ROUGE-L of the greedy continuation of each First_half against its Second_half (budget: the true length)."""
    budgets = [min(max_new_tokens, max(1, len(tok(it["Second_half"], add_special_tokens=False)["input_ids"])))
               for it in items]
    conts = greedy_continuations(model, tok, [it["First_half"] for it in items], budgets, batch_size)
    return [rouge_l(c, it["Second_half"]) for c, it in zip(conts, items)]


@torch.no_grad()
def perplexity(model, tok, texts: list[str], max_tokens: int = 512, chunk_tokens: int = 256, batch_size: int = 4
               ) -> tuple[float, int]:
    """(perplexity, tokens scored) of the first `max_tokens` tokens of each text, scored in chunks. `model` may be a
    generation.Hosted (a model of nnsight requests, with or without an adapter)."""
    chunks = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"][:max_tokens]
        chunks += [ids[i:i + chunk_tokens] for i in range(0, len(ids), chunk_tokens) if len(ids[i:i + chunk_tokens]) > 1]
    if not chunks:
        return math.nan, 0
    batches = []
    for s in range(0, len(chunks), batch_size):
        # Right padding: positions are the plain 0..n-1, as for the unpadded chunk.
        ids, mask = prompts.pad(chunks[s:s + batch_size], prompts.pad_id(tok), "right")
        batches.append((ids, mask, ids.masked_fill(mask == 0, prompts.IGNORE)))
    count = sum(int((labels[:, 1:] != prompts.IGNORE).sum()) for _, _, labels in batches)
    if callable(getattr(model, "nll_sums", None)):  # a generation.Hosted: every batch's sum in one nnsight request
        return math.exp(sum(model.nll_sums(batches)) / count), count
    device = next(model.parameters()).device
    total = 0.0
    for ids, mask, labels in batches:
        total -= prompts.token_logprobs(model, ids.to(device), mask.to(device), labels.to(device),
                                        reduction="sum").item()
    return math.exp(total / count), count
