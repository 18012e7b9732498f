"""Behavioural metrics on strings with known scores, and model-based ones on a tiny model."""
from __future__ import annotations

import math

import pytest
import torch

from dissect_unlearning import metrics


def test_bleu_known_values():
    s = "the capital of france is paris"
    assert metrics.bleu(s, s) == pytest.approx(1.0)
    assert metrics.bleu("red green blue", "one two three four") == 0.0
    assert metrics.bleu("", s) == 0.0 and metrics.bleu(s, "") == 0.0
    # Whitespace tokens: punctuation glued to a word makes a different token.
    assert metrics.bleu("the capital of france is paris.", s) < 1.0
    # A shorter candidate with all n-grams in the reference is penalised by the brevity penalty only.
    assert metrics.bleu("the capital of france is", s) == pytest.approx(math.exp(1 - 6 / 5), rel=1e-6)


def test_rouge_l_known_values():
    assert metrics.rouge_l("the cat sat", "the cat sat") == pytest.approx(1.0)
    assert metrics.rouge_l("red green blue", "one two three") == 0.0
    assert metrics.rouge_l("", "") == 0.0
    # LCS = "the cat" (2 of 3 tokens on both sides): P = R = F = 2/3.
    assert metrics.rouge_l("the cat ran", "the cat sat") == pytest.approx(2 / 3)
    # rouge-score's tokeniser ignores case and punctuation.
    assert metrics.rouge_l("The Cat, sat!", "the cat sat") == pytest.approx(1.0)
    # Asymmetric lengths: LCS 2, P = 2/2, R = 2/4, F = 2PR/(P+R) = 2/3.
    assert metrics.rouge_l("paris france", "paris is in france") == pytest.approx(2 / 3)


def test_accuracy_and_mean():
    assert metrics.accuracy("It was written by J. K. Rowling.", ["J.K. Rowling", "Rowling"]) == 1.0
    assert metrics.accuracy("I don't know.", ["Rowling"]) == 0.0
    assert metrics.mean([1.0, 0.0, None, float("nan")]) == 0.5
    assert math.isnan(metrics.mean([]))


def test_perplexity_of_a_model_with_uniform_logits_is_the_vocabulary_size(tiny_llama):
    model, tok = tiny_llama
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied to the embeddings: every logit is 0
    ppl, n = metrics.perplexity(model, tok, ["the capital of france is paris .", "harry potter"])
    assert ppl == pytest.approx(model.config.vocab_size, rel=1e-5)
    assert n == len(tok("the capital of france is paris .")["input_ids"]) - 1 + 1


def test_perplexity_does_not_depend_on_batching_or_chunking(tiny_llama):
    model, tok = tiny_llama
    texts = ["the capital of france is paris . " * 4, "harry potter is a wizard .", "mario"]
    a = metrics.perplexity(model, tok, texts, batch_size=1)
    b = metrics.perplexity(model, tok, texts, batch_size=4)
    assert a[0] == pytest.approx(b[0], rel=1e-5) and a[1] == b[1]
    # By hand: the mean NLL of each text's next tokens, no padding anywhere.
    total, count = 0.0, 0
    for t in texts:
        ids = tok(t, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if ids.shape[1] < 2:
            continue
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
        total += -logp.gather(1, ids[0, 1:, None]).sum().item()
        count += ids.shape[1] - 1
    assert a[0] == pytest.approx(math.exp(total / count), rel=1e-5) and a[1] == count


def test_greedy_continuations_batched_equal_unbatched(tiny_llama):
    model, tok = tiny_llama
    texts = ["the capital of france is", "harry potter went to the school of", "one two"]
    batched = metrics.greedy_continuations(model, tok, texts, [5, 3, 4], batch_size=3)
    single = [metrics.greedy_continuations(model, tok, [t], n)[0] for t, n in zip(texts, [5, 3, 4])]
    assert batched == single
    assert all(len(tok(c, add_special_tokens=False)["input_ids"]) <= 5 for c in batched)


def test_completion_rouge_scores_each_item(tiny_llama):
    model, tok = tiny_llama
    items = [{"First_half": "the capital of france is", "Second_half": "paris ."},
             {"First_half": "harry potter is a", "Second_half": "wizard"}]
    scores = metrics.completion_rouge(model, tok, items)
    conts = metrics.greedy_continuations(model, tok, [i["First_half"] for i in items], [2, 1])
    assert scores == [metrics.rouge_l(c, i["Second_half"]) for c, i in zip(conts, items)]
