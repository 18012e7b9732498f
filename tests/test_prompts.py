import pytest
import torch

from dissect_unlearning import pipeline, prompts

QUESTIONS = ["who wrote harry potter?", "what is the capital of france?", "where is vienna?",
             "who is the brother of mario in the red and green?"]


def test_formats(tiny_tokenizer):
    assert prompts.prompt_text("who is it?", tiny_tokenizer, "paper") == "Question: who is it?\n Answer:"
    assert prompts.resolve_format("auto", tiny_tokenizer) == "chat"
    assert prompts.prompt_text("who is it?", tiny_tokenizer, "chat").endswith("assistant ")
    with pytest.raises(ValueError, match="valid: auto, paper, chat"):
        prompts.resolve_format("llama", tiny_tokenizer)


def test_batched_answers_equal_unbatched(tiny_llama):
    model, tok = tiny_llama
    for fmt in ("paper", "chat"):
        batched = prompts.generate_answers(model, tok, QUESTIONS, fmt, max_new_tokens=6, batch_size=4)
        for q, b in zip(QUESTIONS, batched):
            single = prompts.generate_answers(model, tok, [q], fmt, max_new_tokens=6, batch_size=1)[0]
            assert b.answer_ids == single.answer_ids and b.prompt_ids == single.prompt_ids
            assert b.ids[:len(b.prompt_ids)] == prompts.encode_prompt(q, tok, fmt)


def test_answer_is_cut_after_the_first_eos(tiny_llama):
    model, tok = tiny_llama
    # Make EOS the certain next token: every answer is exactly [eos].
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 100.0
    model.lm_head = head
    (a,) = prompts.generate_answers(model, tok, ["who is it?"], "paper", max_new_tokens=5)
    assert a.answer_ids == [tok.eos_token_id] and a.answer_text == ""


def test_teacher_forcing_batch_marks_the_positions_that_predict_answer_tokens(tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    p = [[5, 6, 7], [8]]
    a = [[10, 11], [12, 13, 14]]
    b = prompts.teacher_forcing_batch(p, a, pad_id=pad)
    assert b.input_ids.tolist() == [[5, 6, 7, 10, 11], [pad, 8, 12, 13, 14]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]]
    assert b.answer_mask.tolist() == [[False, False, True, True, False],
                                      [False, True, True, True, False]]
    # the token at position t is predicted by the logits at t - 1
    for row in range(2):
        assert b.input_ids[row][1:][b.answer_mask[row][:-1]].tolist() == a[row]
    assert b.n_answer == [2, 3] and b.n_prompt == [3, 1]


def test_padded_rows_compute_what_the_unpadded_sequence_computes(tiny_llama):
    model, tok = tiny_llama
    p = [prompts.encode_prompt(q, tok, "paper") for q in QUESTIONS[:2]]
    a = [[20, 21, 22], [23]]
    b = prompts.teacher_forcing_batch(p, a, tok.pad_token_id)
    with torch.no_grad():
        batched = model(**b.model_inputs()).logits
        for row in range(2):
            alone = model(input_ids=torch.tensor([p[row] + a[row]])).logits[0]
            got = batched[row][b.attention_mask[row].bool()]
            assert torch.allclose(got, alone, atol=1e-5)


def test_answers_are_cached_and_reused(tiny_checkpoint, monkeypatch):
    from dissect_unlearning import concepts

    cs = concepts.parse([{
        "Concept": "Tiny", "Layer": 1, "Dim": 2, "QA": QUESTIONS[:2], "QA_answers": ["rowling", "paris"],
        "text_completion": [], "unrelated_QA": [QUESTIONS[2]], "wikipedia_content": "text",
    }])
    df = pipeline.answers(tiny_checkpoint, cs, max_new_tokens=4, progress=False)
    assert list(df.kind) == ["target", "target", "unrelated"]
    assert (df.n_answer_tokens == df.answer_ids.map(len)).all()
    assert df.correct.iloc[:2].notna().all() and df.correct.iloc[2:].isna().all()

    def boom(*a, **k):
        raise AssertionError("answers were regenerated instead of read from the cache")

    monkeypatch.setattr(prompts, "generate_answers", boom)
    again = pipeline.answers(tiny_checkpoint, cs, max_new_tokens=4, progress=False)
    assert again.answer_ids.map(list).tolist() == df.answer_ids.map(list).tolist()
    with pytest.raises(AssertionError, match="regenerated"):
        pipeline.answers(tiny_checkpoint, cs, max_new_tokens=5, progress=False)  # new setting -> recomputed
