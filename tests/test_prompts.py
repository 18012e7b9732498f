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


# ---------------------------------------------------------------------------------------------------- shared helpers
def test_pad_puts_the_sequences_on_the_chosen_side_and_masks_the_rest():
    seqs = [[5, 6, 7], [8], []]
    ids, mask = prompts.pad(seqs, 0, "left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    ids, mask = prompts.pad(seqs, prompts.IGNORE, "right")
    assert ids.tolist() == [[5, 6, 7], [8, -100, -100], [-100, -100, -100]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    with pytest.raises(ValueError, match="side must be 'left' or 'right'"):
        prompts.pad(seqs, 0, "middle")


def test_pad_id_falls_back_to_eos_then_zero(tiny_tokenizer):
    assert prompts.pad_id(tiny_tokenizer) == tiny_tokenizer.pad_token_id
    tiny_tokenizer.pad_token = None
    assert prompts.pad_id(tiny_tokenizer) == tiny_tokenizer.eos_token_id
    tiny_tokenizer.eos_token = None
    assert prompts.pad_id(tiny_tokenizer) == 0


def step_by_step(model, prompt: list[int], budget: int, stop: set[int]) -> list[int]:
    """Greedy decoding the long way: one unbatched forward pass and one argmax per new token."""
    ids, new = list(prompt), []
    with torch.no_grad():
        while len(new) < budget:
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            new.append(token)
            if token in stop:
                break
    return new


def test_greedy_generate_equals_a_step_by_step_argmax(tiny_llama):
    model, tok = tiny_llama
    torch.manual_seed(0)
    with torch.no_grad():  # wider weights than the default init, whose answers repeat one token
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
    seqs = [prompts.encode_prompt(q, tok, "paper") for q in QUESTIONS]
    budgets = [6, 3, 5, 4]
    free = [step_by_step(model, p, 6, set()) for p in seqs]
    stop = {free[0][2]}  # a token the first answer produces: its answer must end right after it
    expected = [step_by_step(model, p, n, stop) for p, n in zip(seqs, budgets)]
    assert expected[0] == free[0][:3]
    for by_length in (False, True):
        got = prompts.greedy_generate(model, seqs, budgets, stop, tok.pad_token_id, batch_size=3,
                                      by_length=by_length)
        assert got == expected
    assert prompts.greedy_generate(model, seqs, 4, set(), tok.pad_token_id) == [f[:4] for f in free]


def test_token_logprobs_equal_a_gather_of_log_softmax(tiny_llama):
    model, tok = tiny_llama
    ids, mask = prompts.pad([[5, 6, 7, 8, 9], [10, 11, 12]], tok.pad_token_id, "right")
    labels = ids.masked_fill(mask == 0, prompts.IGNORE)
    labels[0, 1] = prompts.IGNORE  # a prompt token: no loss there
    with torch.no_grad():
        got = prompts.token_logprobs(model, ids, mask, labels)
        total = prompts.token_logprobs(model, ids, mask, labels, reduction="sum")
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
    target = labels[:, 1:]
    manual = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0].masked_fill(target == prompts.IGNORE, 0.0)
    assert got.shape == (2, 4) and got.dtype == torch.float32
    torch.testing.assert_close(got, manual, rtol=1e-6, atol=1e-6)
    assert got[0, 0] == 0 and (got[1, 2:] == 0).all() and (got[labels[:, 1:] != prompts.IGNORE] < 0).all()
    assert total.shape == () and total.item() == pytest.approx(manual.sum().item(), rel=1e-6)
