"""The hierarchical bootstrap: seeded, resampling the levels it says it does, and covering at about its rate."""
import numpy as np
import pandas as pd
import pytest

from dissect_unlearning import uncertainty


def table(n_pairs=4, n_questions=5, pair_sd=0.1, question_sd=0.2, mean=0.5, windows=1, seed=0):
    """KRS-like rows per (method, concept, window, question): a pair effect plus question noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_pairs):
        effect = rng.normal(0, pair_sd)
        for q in range(n_questions):
            noise = rng.normal(0, question_sd)
            for w in range(windows):
                rows.append({"method": "m" if p % 2 else "n", "concept": f"c{p // 2}", "center_layer": w,
                             "question_index": q, "krs": mean + effect + noise + 0.01 * w})
    return pd.DataFrame(rows)


def test_the_same_seed_gives_the_same_interval_and_another_seed_another():
    df = table(windows=3)
    a = uncertainty.replicate_means(df, "krs", ["center_layer"])
    b = uncertainty.replicate_means(df, "krs", ["center_layer"])
    c = uncertainty.replicate_means(df, "krs", ["center_layer"], seed=1)
    assert np.array_equal(a.draws, b.draws) and a.draws.shape == (uncertainty.N_BOOT, 3)
    assert not np.array_equal(a.draws, c.draws)
    lo, hi = a.interval()
    assert (lo < a.estimate).all() and (a.estimate < hi).all()
    assert a.level == "bootstrap over pairs and questions"


def test_the_estimate_is_questions_then_pairs_then_the_mean_over_pairs():
    df = pd.DataFrame({"method": ["m", "m", "m", "n"], "concept": ["A", "A", "B", "A"],
                       "question_index": [0, 1, 0, 0], "krs": [1.0, 0.0, 1.0, 0.9]})
    # pairs: (m, A) = 0.5, (m, B) = 1.0, (n, A) = 0.9 -> 0.8
    out = uncertainty.mean_by(df, "krs")
    assert out["mean"].iloc[0] == pytest.approx(0.8) and out["pairs"].iloc[0] == 3


def test_the_interval_covers_the_true_mean_at_about_the_nominal_rate():
    # 200 data sets from one hierarchical model (pair effects, question noise): the 95% interval should hold the
    # true mean about 95% of the time; the two-level bootstrap is, if anything, a little conservative.
    hits = 0
    for seed in range(200):
        df = table(n_pairs=10, n_questions=6, pair_sd=0.15, question_sd=0.2, seed=1000 + seed)
        lo, hi = uncertainty.replicate_means(df, "krs", n_boot=300, seed=seed).interval()
        hits += bool(lo[0] <= 0.5 <= hi[0])
    assert 0.85 <= hits / 200 <= 0.99, hits / 200


def test_one_pair_resamples_its_questions_only():
    df = table(n_pairs=1, n_questions=4)
    rep = uncertainty.replicate_means(df, "krs")
    assert rep.resampled == (False, True) and rep.level == "bootstrap over questions (one pair)"
    # Every draw is a mean of four of the pair's own questions.
    values = df["krs"].to_numpy()
    grid = np.array([values[list(idx)].mean() for idx in np.ndindex(4, 4, 4, 4)])
    assert np.all(np.min(np.abs(rep.draws[:, :1] - grid[None, :]), axis=1) < 1e-12)


def test_one_question_per_pair_or_no_question_level_resamples_pairs_only():
    one_q = uncertainty.replicate_means(table(n_pairs=6, n_questions=1), "krs")
    assert one_q.resampled == (True, False) and one_q.level == "bootstrap over pairs"
    no_q = uncertainty.replicate_means(table(n_pairs=6, n_questions=3), "krs", question=None)
    assert no_q.resampled == (True, False)
    # Without a question level a pair counts as its mean: the draws are means of resampled pair means.
    pair_means = table(n_pairs=6, n_questions=3).groupby(["method", "concept"])["krs"].mean().to_numpy()
    assert no_q.estimate[0] == pytest.approx(pair_means.mean())
    assert np.isfinite(no_q.interval()[0]).all()


def test_one_pair_and_one_question_has_no_interval():
    rep = uncertainty.replicate_means(table(n_pairs=1, n_questions=1), "krs")
    lo, hi = rep.interval()
    assert rep.resampled == (False, False) and np.isnan(lo).all() and np.isnan(hi).all()
    assert rep.level.startswith("nothing to resample")


def test_questions_are_resampled_inside_each_drawn_pair():
    # Pair A: questions 0 and 1; pair B: questions 0 and 10. If questions were pooled across pairs, a draw of A
    # could pick B's 10; within pairs, every pair mean is one of A's or B's own.
    df = pd.DataFrame({"method": ["m"] * 4, "concept": ["A", "A", "B", "B"], "question_index": [0, 1, 0, 1],
                       "krs": [0.0, 1.0, 0.0, 10.0]})
    rep = uncertainty.replicate_means(df, "krs", n_boot=500)
    possible = {(a + b) / 2 for a in (0, 0.5, 1) for b in (0, 0.5, 1)} | {(a + b) / 2 for a in (0, 0.5, 1)
                                                                          for b in (0, 5, 10)} \
        | {(a + b) / 2 for a in (0, 5, 10) for b in (0, 5, 10)}
    assert all(min(abs(d - p) for p in possible) < 1e-12 for d in rep.draws[:, 0])


def test_strata_keep_the_size_of_each_half():
    df = table(n_pairs=3, n_questions=6).assign(half=lambda d: d["question_index"] % 2)
    rep = uncertainty.replicate_means(df, "krs", ["half"], strata="half", n_boot=200)
    assert np.isfinite(rep.draws).all()  # no resample leaves a half of a pair without questions


def test_nan_values_are_left_out_as_a_plain_mean_leaves_them():
    df = table(n_pairs=3, n_questions=4)
    with_nan = pd.concat([df, df.iloc[:2].assign(krs=np.nan, question_index=99)], ignore_index=True)
    a = uncertainty.replicate_means(df, "krs")
    b = uncertainty.replicate_means(with_nan, "krs")
    assert b.estimate[0] == pytest.approx(a.estimate[0]) and np.array_equal(a.draws, b.draws)


def test_the_generic_bootstrap_agrees_with_the_fast_path_on_the_same_seed():
    df = table(n_pairs=4, n_questions=3, windows=2)

    def statistic(t):
        t = t[t["center_layer"] == 1]
        per_question = t.groupby([uncertainty.PAIR_DRAW, uncertainty.QUESTION_DRAW])["krs"].mean()
        return per_question.groupby(level=0).mean().mean()

    generic = uncertainty.bootstrap(df, statistic, n_boot=60)
    fast = uncertainty.replicate_means(df, "krs", ["center_layer"], n_boot=60)
    i = fast.column(center_layer=1)
    assert generic.estimate == pytest.approx(fast.estimate[i])
    np.testing.assert_allclose(generic.draws, fast.draws[:, i])
    assert (generic.lo, generic.hi) == pytest.approx(uncertainty.percentile_interval(fast.draws[:, i]))


def test_bad_tables_are_refused_naming_the_column():
    with pytest.raises(ValueError, match="replicate_means: the table lacks column.*question_index"):
        uncertainty.replicate_means(table().drop(columns=["question_index"]), "krs")
    with pytest.raises(ValueError, match="replicate_means: the table is empty"):
        uncertainty.replicate_means(table().iloc[:0], "krs")
    with pytest.raises(ValueError, match="mean_by: `each`"):
        uncertainty.mean_by(table(), "krs", ["center_layer"], each="experiment")
