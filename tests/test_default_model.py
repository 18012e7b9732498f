"""Integration checks on the real embedded default model (SmolLM2-135M-Instruct)."""
import pytest

from dissect_unlearning import concepts, models, pipeline, prompts

pytestmark = pytest.mark.slow


def test_batched_answers_equal_unbatched_on_the_real_model(default_model):
    model, tok = default_model
    qs = concepts.load("builtin")[0].questions[:3] + ["What is the capital of France?"]
    # the paper format on this instruct model is covered by the tiny-model test; chat is the default here
    for fmt in ("chat",):
        batched = prompts.generate_answers(model, tok, qs, fmt, max_new_tokens=30, batch_size=8)
        for q, b in zip(qs, batched):
            (single,) = prompts.generate_answers(model, tok, [q], fmt, max_new_tokens=30, batch_size=1)
            assert b.answer_ids == single.answer_ids, (fmt, q, b.answer_text, single.answer_text)


def test_the_default_model_knows_every_shipped_concept(default_model):
    """For every shipped concept the vanilla answer contains the expected answer for >= 7 of 10 questions.
    A concept that fails is replaced in the data, never the threshold."""
    df = pipeline.answers(models.DEFAULT_MODEL, "builtin", loaded=default_model, progress=False)
    target = df[df.kind == "target"]
    score = target.groupby("concept", sort=False)["correct"].sum()
    failing = {c: int(s) for c, s in score.items() if s < 7}
    assert not failing, f"concepts the default model does not know (score / 10): {failing}"
    assert len(score) >= 12
    # every answer was generated with the exact token span recorded
    assert (df.n_answer_tokens > 0).all() and (df.n_answer_tokens <= 30).all()
