"""Charts and verdicts on synthetic tidy tables (the columns the pipeline stages document). No model involved.

Every verdict is three-way (holds / does not hold / inconclusive, decided on a 95% bootstrap interval): each gets a
table where it clearly holds, one where it clearly does not, and a noisy one where it cannot tell.
"""
import ast
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dissect_unlearning import claims, plots, verdicts
from dissect_unlearning.book import pages

ROOT = Path(__file__).resolve().parents[1]
HOLDS, FAILS, UNDECIDED = "holds", "does not hold", "inconclusive"


def sweep_table(n_layers=6, methods=("grad_diff", "dpo"), concepts=("A", "B"), questions=4, coef_peak="last",
                value_level=0.02, combined_best=0.95, attn_level=0.3, noise=0.002, seed=0):
    """pipeline.sweep-shaped rows: KRS per (method, concept, experiment, window, question)."""
    rng = np.random.default_rng(seed)
    last = n_layers - 1
    rows = []
    for m in methods:
        for c in concepts:
            for exp in ("coef", "attn", "coef+attn", "value"):
                for centre in range(n_layers):
                    layers = list(range(max(0, centre - 1), min(last, centre + 1) + 1))
                    peak = last if coef_peak == "last" else 1
                    level = {"coef": 0.8 - 0.15 * abs(centre - peak), "attn": attn_level,
                             "coef+attn": combined_best if centre == peak else 0.5, "value": value_level}[exp]
                    for q in range(questions):
                        rows.append({"model": "tiny", "method": m, "concept": c, "experiment": exp,
                                     "center_layer": centre, "layers": layers, "question_index": q,
                                     "krs": level + rng.normal(0, noise)})
    return pd.DataFrame(rows)


def noisy(df, sd, seed=1, experiments=None):
    """The same table with question-level noise of `sd` added (to some experiments only, when given)."""
    rng = np.random.default_rng(seed)
    hit = df["experiment"].isin(experiments) if experiments else np.ones(len(df), dtype=bool)
    return df.assign(krs=df["krs"] + np.where(hit, rng.normal(0, sd, len(df)), 0.0))


def behaviour_table(target_after=0.2, unrelated_after=0.95, perplexity_after=12.0, concepts=("A", "B"),
                    spread=0.0, seed=0):
    """pipeline.behaviour-shaped rows; vanilla rows carry no method (one vanilla model for all). `spread`: how far
    each (method, concept) scatters around the given unlearned score."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in concepts:
        for split, after in (("target", target_after), ("unrelated", unrelated_after)):
            for metric in ("rougeL", "bleu"):
                rows.append(dict(model="tiny", concept=c, method=None, stage="vanilla", split=split, metric=metric,
                                 value=1.0, n=5))
                for m in ("grad_diff", "dpo"):
                    rows.append(dict(model="tiny", concept=c, method=m, stage="unlearned", split=split,
                                     metric=metric, value=after + rng.normal(0, spread), n=5))
        rows.append(dict(model="tiny", concept=c, method=None, stage="vanilla", split="heldout_text",
                         metric="perplexity", value=10.0, n=3))
        for m in ("grad_diff", "dpo"):
            rows.append(dict(model="tiny", concept=c, method=m, stage="unlearned", split="heldout_text",
                             metric="perplexity", value=perplexity_after + rng.normal(0, 10 * spread), n=3))
    return pd.DataFrame(rows)


def change_table(peak_layer=5, n_layers=6, concepts=("A",), noise=0.0, seed=0):
    """pipeline.coef_change-shaped rows (+ method): relative change per layer and quantity."""
    rng = np.random.default_rng(seed)
    rows = []
    for m in ("grad_diff", "dpo"):
        for c in concepts:
            for q in ("coef", "value"):
                for layer in range(n_layers):
                    level = (0.5 if layer == peak_layer else 0.05) * (1 if q == "coef" else 0.01)
                    rows.append(dict(method=m, concept=c, layer=layer, quantity=q,
                                     rel_change=level + rng.normal(0, noise)))
    return pd.DataFrame(rows)


def answers_table(correct, concepts=("A", "B")):
    n = len(correct)
    return pd.DataFrame({"concept": [c for c in concepts for _ in range(n)], "kind": ["target"] * (len(concepts) * n),
                         "question_index": list(range(n)) * len(concepts), "correct": list(correct) * len(concepts)})


def relearn_table(unrelated_last=0.8, partial_last=0.3, concepts=("A", "B"), spread=0.0, seed=0):
    """ROUGE-L 0.2 at step 0 for every pair, rising linearly to the given value (plus `spread` per pair)."""
    rng = np.random.default_rng(seed)
    rows = []
    for data, last in (("unrelated", unrelated_last), ("partial", partial_last)):
        for method in ("grad_diff", "dpo"):
            for concept in concepts:
                end = last + rng.normal(0, spread)
                for step, frac in ((0, 0.0), (2, 0.5), (4, 1.0)):
                    rows.append(dict(model="m", concept=concept, method=method, data=data, step=step,
                                     split="target", metric="rougeL", value=0.2 + frac * (end - 0.2), n=3,
                                     settings="{}"))
                    rows.append(dict(model="m", concept=concept, method=method, data=data, step=step,
                                     split="target", metric="accuracy", value=0.0, n=3, settings="{}"))
    return pd.DataFrame(rows)


def never_known_tables(target_gain=0.5, control_gain=0.0, concepts=("A", "B"), questions=5, noise=0.02, seed=0):
    """pipeline.relearn-shaped rows with per-question scores: the 'partial' relearning of every (method, concept) and
    its never-known control, ROUGE-L about 0.2 at step 0 rising by the given gain by step 4 (question noise)."""
    rng = np.random.default_rng(seed)
    tables = []
    for data, gain in (("partial", target_gain), ("never_known", control_gain)):
        rows = []
        for method in ("grad_diff", "dpo"):
            for concept in concepts:
                start = 0.2 + rng.normal(0, noise, questions)
                for step, frac in ((0, 0.0), (2, 0.5), (4, 1.0)):
                    per = np.clip(start + frac * gain + rng.normal(0, noise, questions), 0, 1).tolist()
                    rows.append(dict(model="m", concept=concept, method=method, data=data, step=step,
                                     split="target" if data == "partial" else "never_known", metric="rougeL",
                                     value=float(np.mean(per)), n=questions, settings="{}",
                                     text_concept=None if data == "partial" else "Orlethia",
                                     questions=list(range(questions, 2 * questions)), per_question=per,
                                     vanilla=1.0 if data == "partial" else 0.05))
        tables.append(pd.DataFrame(rows))
    return tables


def three_way(clear_yes, clear_no, unclear):
    assert clear_yes.status == HOLDS and clear_yes.holds is True, clear_yes.sentence
    assert clear_no.status == FAILS and clear_no.holds is False, clear_no.sentence
    assert unclear.status == UNDECIDED and unclear.holds is None, unclear.sentence
    lo, hi = unclear.interval
    assert lo < hi  # inconclusive because the interval is wide, not because there was none


# ------------------------------------------------------------------------------------------------------------------
# verdicts: holds, does not hold, inconclusive
# ------------------------------------------------------------------------------------------------------------------
def test_best_window_contains_last_layer_three_ways():
    yes = verdicts.best_window_contains_last_layer(sweep_table(coef_peak="last"))
    no = verdicts.best_window_contains_last_layer(sweep_table(coef_peak="early"))
    # Flat coefficients with loud question noise: the windows cannot be told apart.
    flat = sweep_table(questions=6).assign(krs=lambda d: np.where(d["experiment"] == "coef", 0.5, d["krs"]))
    unclear = verdicts.best_window_contains_last_layer(noisy(flat, 0.3, experiments=["coef"]))
    three_way(yes, no, unclear)
    assert yes.evidence["best_center_layer"] == 5 and yes.evidence["last_layer"] == 5
    assert yes.evidence["chosen_with_last"] == 1.0 and no.evidence["best_center_layer"] == 1
    assert "layers 0-2" in no.sentence and "even-numbered questions" in no.sentence
    # best with the last layer (centre 5: 0.8) - best without it (centre 3, layers 2-4: 0.5)
    assert yes.estimate == pytest.approx(0.8 - 0.5, abs=0.01)


def test_a_noise_spike_in_the_selection_half_is_not_reported_as_the_best_window():
    # The truth: layer 1 is best (0.7), every other window 0.5. A spike at the last layer on the even questions
    # only makes it the best window on all questions (0.725 > 0.7); chosen on the even questions and scored on the
    # odd ones it scores 0.5, and the claim must not hold.
    df = sweep_table(questions=4)
    coef = df["experiment"] == "coef"
    df.loc[coef, "krs"] = np.where(df.loc[coef, "center_layer"] == 1, 0.7, 0.5)
    spike = coef & (df["center_layer"] == 5) & (df["question_index"] % 2 == 0)
    df.loc[spike, "krs"] = 0.95
    on_all = verdicts.mean_krs(df, "coef")
    assert on_all.loc[on_all["krs"].idxmax(), "center_layer"] == 5  # the naive rule would say yes
    v = verdicts.best_window_contains_last_layer(df)
    assert v.holds is False and v.estimate == pytest.approx(0.5 - 0.7, abs=0.01)
    # The same trap for "the best window reaches 0.9": 0.95 on even questions, 0.85 on odd ones -> 0.9 on all.
    both = df["experiment"] == "coef+attn"
    df.loc[both, "krs"] = 0.6
    df.loc[both & (df["center_layer"] == 3), "krs"] = np.where(df.loc[both & (df["center_layer"] == 3),
                                                                      "question_index"] % 2 == 0, 0.95, 0.85)
    assert verdicts.mean_krs(df, "coef+attn")["krs"].max() == pytest.approx(0.9)
    assert verdicts.best_krs_above(df, "coef+attn", threshold=0.9).holds is False


def test_best_window_is_inconclusive_without_a_comparison():
    # The sweep covered layers 0-5 only, but the model has 12: no window holds the last layer.
    v = verdicts.best_window_contains_last_layer(sweep_table(coef_peak="last"), n_layers=12)
    assert v.status == UNDECIDED and v.evidence["last_layer"] == 11 and "cannot say" in v.sentence
    only_last = sweep_table()[lambda d: d["center_layer"] >= 4]  # every window holds layer 5
    assert verdicts.best_window_contains_last_layer(only_last).status == UNDECIDED
    one_question = sweep_table(questions=1)
    assert "two or more questions" in verdicts.best_window_contains_last_layer(one_question).sentence


def test_value_restoration_below_threshold_three_ways():
    yes = verdicts.krs_below_everywhere(sweep_table(value_level=0.02))
    no = verdicts.krs_below_everywhere(sweep_table(value_level=0.3))
    unclear = verdicts.krs_below_everywhere(noisy(sweep_table(value_level=0.08), 0.1, experiments=["value"]))
    three_way(yes, no, unclear)
    assert no.evidence["windows_above"] == no.evidence["windows"] == 6
    assert verdicts.krs_below_everywhere(sweep_table(value_level=0.3), threshold=0.5).holds is True


def test_best_krs_above_three_ways():
    yes = verdicts.best_krs_above(sweep_table(combined_best=0.95))
    no = verdicts.best_krs_above(sweep_table(combined_best=0.7))
    unclear = verdicts.best_krs_above(noisy(sweep_table(combined_best=0.9, questions=6), 0.2,
                                            experiments=["coef+attn"]))
    three_way(yes, no, unclear)
    assert yes.evidence["best_center_layer"] == 5


def test_stronger_than_three_ways():
    yes = verdicts.stronger_than(sweep_table(), "coef", "attn")
    no = verdicts.stronger_than(sweep_table(), "attn", "coef")
    unclear = verdicts.stronger_than(noisy(sweep_table(attn_level=0.8, questions=6), 0.3), "coef", "attn")
    three_way(yes, no, unclear)
    assert yes.estimate == pytest.approx(0.5, abs=0.01)


def with_other_question(df, krs_of_window, name="coef_other"):
    """`df` plus the coefficient rows again as the other-question control, KRS krs_of_window(centre, own KRS)."""
    ctl = df[df["experiment"] == "coef"].copy()
    ctl["krs"] = [krs_of_window(c, k) for c, k in zip(ctl["center_layer"], ctl["krs"])]
    return pd.concat([df, ctl.assign(experiment=name)], ignore_index=True)


def test_beyond_other_question_three_ways_at_the_chosen_window():
    # The control peaks at the first window (0.9, above the coefficients' own best, 0.8 at the last): compared at
    # the coefficients' best window (0.2 there), the own activations still win.
    elsewhere = lambda c, k: 0.9 if c == 0 else 0.2  # noqa: E731
    yes = verdicts.beyond_other_question(with_other_question(sweep_table(), elsewhere))
    no = verdicts.beyond_other_question(with_other_question(sweep_table(), lambda c, k: k + 0.1))
    unclear = verdicts.beyond_other_question(noisy(with_other_question(sweep_table(questions=6), lambda c, k: k), 0.3))
    three_way(yes, no, unclear)
    assert yes.estimate == pytest.approx(0.6, abs=0.01) and yes.evidence["best_window"] == [4, 5]
    assert yes.claim.source == "this book"
    assert verdicts.stronger_than(with_other_question(sweep_table(), elsewhere), "coef", "coef_other").holds is False
    missing = with_other_question(sweep_table(), elsewhere)
    missing = missing[~((missing.experiment == "coef_other") & (missing.center_layer == 0))]
    assert verdicts.beyond_other_question(missing).holds is None


def test_krs_by_window_draws_values_below_its_floor_at_the_floor():
    table = with_other_question(sweep_table(), lambda c, k: -15000.0)
    spec = plots.krs_by_window(table[table.experiment.isin(["coef", "coef_other"])], floor=-1).to_dict()
    scales = [layer["encoding"]["y"].get("scale") for layer in spec["layer"] if "y" in layer.get("encoding", {})]
    assert {"domainMin": -1.0, "clamp": True} in scales
    assert any("below -1 are drawn at -1" in line for line in spec["title"]["subtitle"])
    plain = plots.krs_by_window(sweep_table()).to_dict()  # no floor: the axis follows the data, no note
    assert not any("below" in line for line in plain["title"]["subtitle"])


def test_share_of_best_three_ways():
    whole = sweep_table(coef_peak="last")  # best coef window: 0.8 at the last layer
    yes = verdicts.share_of_best(whole[whole["center_layer"] == 5], whole)
    early = whole[whole["center_layer"] == 0]  # 0.8 - 0.75 = 0.05: 6% of the best
    no = verdicts.share_of_best(early, whole)
    half = whole[whole["center_layer"] == 2].assign(krs=0.4)  # half of 0.8, with noise
    unclear = verdicts.share_of_best(noisy(half, 0.3), noisy(whole, 0.05, seed=2))
    three_way(yes, no, unclear)
    assert no.evidence["share"] == pytest.approx(0.05 / 0.8, abs=0.01)


def test_mean_krs_averages_questions_then_pairs_with_an_interval():
    df = pd.DataFrame({"method": ["m", "m", "m", "n"], "concept": ["A", "A", "B", "A"], "experiment": ["coef"] * 4,
                       "center_layer": [0] * 4, "layers": [[0, 1]] * 4, "krs": [1.0, 0.0, 1.0, 0.0]})
    assert verdicts.mean_krs(df, "coef")["pairs"].iloc[0] == 3
    df.loc[3, "krs"] = 0.9
    # pairs: (m, A) = 0.5, (m, B) = 1.0, (n, A) = 0.9 -> 0.8; the plain row mean would be 0.725
    row = verdicts.mean_krs(df, "coef").iloc[0]
    assert row["krs"] == pytest.approx(0.8) and row["lo"] <= row["krs"] <= row["hi"]
    table = verdicts.mean_krs(noisy(sweep_table(), 0.1))
    assert list(table.columns[:8]) == ["experiment", "center_layer", "layers", "window", "krs", "lo", "hi", "pairs"]
    assert (table["lo"] < table["krs"]).all() and (table["krs"] < table["hi"]).all()


def test_largest_change_in_last_layers_three_ways():
    yes = verdicts.largest_change_in_last_layers(change_table(peak_layer=5, concepts=("A", "B")))
    no = verdicts.largest_change_in_last_layers(change_table(peak_layer=1, concepts=("A", "B")))
    flat = change_table(peak_layer=99, concepts=("A", "B", "C"), noise=0.03)
    unclear = verdicts.largest_change_in_last_layers(flat)
    three_way(yes, no, unclear)
    assert yes.evidence["top_layer"] == 5 and no.evidence["top_layer"] == 1
    assert verdicts.largest_change_in_last_layers(change_table(peak_layer=1, concepts=("A", "B")),
                                                  last=5).holds is True


def test_behaviour_verdicts_three_ways():
    wide = dict(concepts=("A", "B", "C", "D"), spread=0.3)
    three_way(verdicts.forgets_target(behaviour_table(target_after=0.2)),
              verdicts.forgets_target(behaviour_table(target_after=0.8)),
              verdicts.forgets_target(behaviour_table(target_after=0.5, **wide)))
    three_way(verdicts.side_effects(behaviour_table(unrelated_after=0.6)),
              verdicts.side_effects(behaviour_table(unrelated_after=0.99)),
              verdicts.side_effects(behaviour_table(unrelated_after=0.85, **wide)))
    three_way(verdicts.perplexity_rises(behaviour_table(perplexity_after=15.0)),
              verdicts.perplexity_rises(behaviour_table(perplexity_after=10.1)),
              verdicts.perplexity_rises(behaviour_table(perplexity_after=10.5, **wide)))
    v = verdicts.forgets_target(behaviour_table(target_after=0.2))
    assert v.evidence["dpo_relative_drop"] == pytest.approx(0.8) and "pairs" in v.sentence


def test_one_concept_without_a_question_level_gives_no_verdict():
    v = verdicts.forgets_target(behaviour_table(target_after=0.2, concepts=("A",)))
    assert v.status == UNDECIDED and "nothing to resample" in v.sentence and np.isnan(v.interval[0])


def test_model_knows_concepts_is_a_precondition_met_not_met_or_inconclusive():
    met = verdicts.model_knows_concepts(answers_table([True] * 8 + [False], concepts="ABCD"), claim="organism")
    not_met = verdicts.model_knows_concepts(answers_table([False] * 8 + [True], concepts="ABCD"))
    unclear = verdicts.model_knows_concepts(answers_table([True, False] * 3, concepts="AB"))
    assert (met.status, met.holds) == ("met", True) and met.claim.kind == "precondition"
    assert (not_met.status, not_met.holds) == ("not met", False)
    assert unclear.status == UNDECIDED and unclear.holds is None
    none = verdicts.model_knows_concepts(answers_table([None, None]))
    assert none.holds is None and none.answer == none.status == UNDECIDED


def test_relearning_recovers_three_ways():
    t = relearn_table(unrelated_last=0.8, partial_last=0.3)
    yes = verdicts.relearning_recovers(t, data="unrelated")
    # (0.8 - 0.2) / (1 - 0.2) = 0.75 of the gap, for both methods
    assert yes.evidence["steps"] == 4 and yes.evidence["dpo_recovered"] == pytest.approx(0.75)
    assert yes.evidence["grad_diff_unlearned"] == pytest.approx(0.2)
    no = verdicts.relearning_recovers(t, data="partial")
    assert no.evidence["grad_diff_recovered"] == pytest.approx(0.125) and "12%" in no.sentence
    unclear = verdicts.relearning_recovers(relearn_table(unrelated_last=0.6, concepts="ABCD", spread=0.3))
    three_way(yes, no, unclear)
    # One method below the bar is enough to say no
    mixed = t.copy()
    low = (mixed["method"] == "dpo") & (mixed["data"] == "unrelated") & (mixed["step"] == 4)
    mixed.loc[low & (mixed["metric"] == "rougeL"), "value"] = 0.3
    assert verdicts.relearning_recovers(mixed, data="unrelated").holds is False
    assert verdicts.relearning_recovers(t[t["data"] == "partial"], data="unrelated").status == UNDECIDED
    # Nothing forgotten: nothing to win back
    assert verdicts.relearning_recovers(t.assign(value=1.0), data="unrelated").status == UNDECIDED
    with pytest.raises(ValueError, match="relearning_recovers: the table lacks column.*step"):
        verdicts.relearning_recovers(t.drop(columns=["step"]))


def test_relearning_recovers_resamples_questions():
    # One concept, per-question scores: the questions are resampled (paired across the two ends), so the verdict has
    # an interval; without them one concept leaves nothing to resample
    partial = never_known_tables(0.7, 0.0, concepts=("A",), questions=6, noise=0.05)[0]
    yes = verdicts.relearning_recovers(partial, data="partial")
    lo, hi = yes.interval
    assert yes.holds is True and 0.5 <= lo <= yes.estimate <= hi < 1.5, yes.sentence
    assert "bootstrap over questions (one concept)" in yes.sentence
    # (0.2 + 0.7 - 0.2) / (1 - 0.2) of the gap, about 0.875, from the per-question means
    assert yes.estimate == pytest.approx(0.7 / 0.8, abs=0.08)
    noisy = never_known_tables(0.4, 0.0, concepts=("A",), questions=6, noise=0.25)[0]
    unclear = verdicts.relearning_recovers(noisy, data="partial")
    assert unclear.status == UNDECIDED and np.isfinite(unclear.interval).all(), unclear.sentence
    small = verdicts.relearning_recovers(never_known_tables(0.1, 0.0, concepts=("A",), questions=6)[0], data="partial")
    assert small.holds is False and small.interval[1] < 0.5
    means = partial.drop(columns=["questions", "per_question"])
    assert verdicts.relearning_recovers(means, data="partial").status == UNDECIDED
    # The band of the chart resamples the questions too
    spec = plots.relearning_curves(partial).to_dict()
    values = pd.DataFrame(next(iter(spec["datasets"].values())))
    last = values[(values.step == 4) & (values.pick_concept == "A")]
    assert (last.hi > last.lo).all() and "bootstrap over concepts and questions" in json.dumps(spec)


def test_relearning_beyond_never_known_three_ways():
    yes = verdicts.relearning_beyond_never_known(*never_known_tables(0.5, 0.05), claim="beyond_relearn_never_known")
    assert yes.claim.source == "this book" and yes.evidence["never_known"] == "Orlethia"
    assert yes.evidence["grad_diff_target_gain"] == pytest.approx(0.5, abs=0.05)
    assert yes.evidence["dpo_never_known_gain"] == pytest.approx(0.05, abs=0.05)
    assert "bootstrap over pairs" in yes.sentence and "and questions" in yes.sentence
    assert "The vanilla model on Orlethia's held-out questions: ROUGE-L 0.05" in yes.sentence
    no = verdicts.relearning_beyond_never_known(*never_known_tables(0.1, 0.4))  # the control gains more
    unclear = verdicts.relearning_beyond_never_known(*never_known_tables(0.3, 0.3, noise=0.2))
    three_way(yes, no, unclear)
    # The same gain as a concept the model never knew is no evidence of knowledge coming back
    same = verdicts.relearning_beyond_never_known(*never_known_tables(0.3, 0.3))
    assert same.holds is not True and same.estimate == pytest.approx(0.0, abs=0.05)
    # Every method must beat its control: one that does not is enough to say no
    target, control = never_known_tables(0.5, 0.05)
    target.loc[(target.method == "dpo") & (target.step == 4), "per_question"] = pd.Series(
        [[0.2] * 5] * len(target), index=target.index)
    weak = verdicts.relearning_beyond_never_known(target, control)
    assert weak.evidence["weakest_method"] == "dpo" and weak.holds is False
    # One concept: its questions are resampled; without per-question scores there is then nothing to resample
    one = verdicts.relearning_beyond_never_known(*never_known_tables(0.5, 0.05, concepts=("A",)))
    assert one.holds is True and "bootstrap over questions (one concept)" in one.sentence
    means = [t.drop(columns=["questions", "per_question"]) for t in never_known_tables(0.5, 0.05, concepts=("A",))]
    assert verdicts.relearning_beyond_never_known(*means).status == UNDECIDED
    assert verdicts.relearning_beyond_never_known(target, control.iloc[0:0]).status == UNDECIDED
    with pytest.raises(ValueError, match="scored at steps \\[0, 2, 4\\], the control at \\[0, 2\\]"):
        verdicts.relearning_beyond_never_known(target, control[control.step < 4])
    with pytest.raises(ValueError, match="the control must relearn the same unlearned models"):
        verdicts.relearning_beyond_never_known(target, control[control.method == "dpo"])


def test_verdicts_are_seeded():
    df = noisy(sweep_table(questions=6), 0.2)
    a, b = verdicts.best_krs_above(df), verdicts.best_krs_above(df)
    assert a.interval == b.interval and a.sentence == b.sentence
    assert verdicts.best_krs_above(df, seed=1).interval != a.interval


def test_verdict_functions_name_missing_columns():
    with pytest.raises(ValueError, match="lacks column.*krs"):
        verdicts.mean_krs(sweep_table().drop(columns=["krs"]))
    with pytest.raises(ValueError, match="no rows for experiment 'mlp'"):
        verdicts.krs_below_everywhere(sweep_table(), experiment="mlp")
    with pytest.raises(ValueError, match="largest_change_in_last_layers: no rows for quantity 'attn'"):
        verdicts.largest_change_in_last_layers(change_table(), quantity="attn")


# ------------------------------------------------------------------------------------------------------------------
# provenance: the register of claims, and what the chapters glue
# ------------------------------------------------------------------------------------------------------------------
def _chapter_calls():
    """[(chapter, verdicts function, claim id or None)] and {chapter: glued verdict names}, read from the code
    cells of the chapters (f-strings over `for d in (...)` expanded)."""
    calls, glued = [], {}
    for path in sorted((ROOT / "notebooks").glob("0[2-8]_*.ipynb")):
        nb = json.loads(path.read_text())
        code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
        loops = {m.group(1): ast.literal_eval(m.group(2))
                 for m in re.finditer(r"for (\w+) in (\([^)]*\)):", code)}

        def expand(text):
            for var, values in loops.items():
                if "{" + var + "}" in text:
                    return [text.replace("{" + var + "}", v) for v in values]
            return [text]

        for fn, args in re.findall(r"verdicts\.(\w+)\(((?:[^()]|\([^()]*\))*)\)", code, flags=re.S):
            if fn in ("mean_krs", "with_interval", "seed_spread"):  # tables, not verdicts
                continue
            ids = re.findall(r'claim=f?"([^"]+)"', args)
            for claim_id in (expand(ids[0]) if ids else [None]):
                calls.append((path.stem, fn, claim_id))
        glued[path.stem] = [n for name in re.findall(r'glue_verdict\(\s*f?"([^"]+)"', code) for n in expand(name)]
    return calls, glued


def test_every_verdict_the_chapters_glue_has_a_claim_with_its_provenance():
    calls, glued = _chapter_calls()
    names = [n for ns in glued.values() for n in ns]
    assert len(names) >= 15 and len(set(names)) == len(names)
    for name in names:
        c = claims.get(name)
        assert c.source in ("paper", "this book") and c.where and c.threshold_source and c.question
        assert c.kind in ("claim", "precondition")
        if c.source == "paper":
            assert c.provenance.startswith("paper, ")
        else:
            assert c.provenance.startswith("this book: ") and "this book" in c.threshold_source
    # Every check a chapter calls names its claim, and the claim is tested by that check.
    for chapter, fn, claim_id in calls:
        assert claim_id is not None, f"{chapter}: verdicts.{fn}(...) names no claim"
        assert claims.get(claim_id).check == fn, f"{chapter}: claim {claim_id} is not tested by {fn}"
    # The register holds nothing the book does not glue.
    assert set(claims.CLAIMS) == set(names)
    assert claims.get("organism").kind == "precondition"
    with pytest.raises(KeyError, match="no claim 'nope'"):
        claims.get("nope")


def test_a_registered_claim_gives_the_threshold_and_the_provenance():
    v = verdicts.best_krs_above(sweep_table(combined_best=0.95), "coef+attn", claim="patching_both")
    assert v.claim.id == "patching_both" and v.evidence["threshold"] == 0.9
    assert "the paper's 0.9" in v.sentence and "Claim: paper" in v.sentence
    # A chapter that sets another threshold says so, and keeps the register's reason beside it.
    other = verdicts.best_krs_above(sweep_table(combined_best=0.95), "coef+attn", threshold=0.8,
                                    claim="patching_both")
    assert other.evidence["threshold"] == 0.8 and "set by the chapter to 0.8" in other.claim.threshold_source
    with pytest.raises(ValueError, match="claim 'patching_both' is tested by verdicts.best_krs_above"):
        verdicts.stronger_than(sweep_table(), claim="patching_both")
    # Without a registered claim: this book's, with the call's threshold; the statement still reads as before.
    plain = verdicts.best_krs_above(sweep_table(), "attn", threshold=0.2)
    assert plain.claim.source == "this book" and "the attention states" in plain.claim


def test_glue_verdict_glues_status_interval_and_source(monkeypatch):
    got = {}
    monkeypatch.setattr(pages, "glue", lambda name, value, display=False: got.__setitem__(name, value))
    v = verdicts.best_krs_above(noisy(sweep_table(), 0.05), claim="patching_both")
    pages.glue_verdict("patching_both", v)
    assert got["patching_both"] == v.sentence and got["patching_both_status"] == got["patching_both_answer"] == HOLDS
    assert re.fullmatch(r"0\.\d\d \[0\.\d\d, 0\.\d\d\]", got["patching_both_interval"])
    assert got["patching_both_source"].startswith("paper, ") and "0.9" in got["patching_both_source"]
    assert got["patching_both_best_center_layer"] == 5
    got.clear()
    pages.glue_verdict("beyond_family", "Not run in this profile.")
    assert got["beyond_family"] == "Not run in this profile." and got["beyond_family_status"] == "not run"
    assert got["beyond_family_source"] == claims.get("beyond_family").provenance


# ------------------------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------------------------
def _walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _colour_map(spec: dict) -> dict:
    """{domain value: colour} of every colour scale in a Vega-Lite spec."""
    found = {}
    for node in _walk(spec):
        scale = node.get("scale") if node.get("field") in ("method", "experiment") else None
        if isinstance(scale, dict) and "domain" in scale:
            found.update(dict(zip(scale["domain"], scale["range"])))
    return found


def _has_interval(spec: dict) -> bool:
    """A layer that draws lo to hi (a band or bars) and a subtitle that says what the interval is."""
    drawn = any(isinstance(n.get("encoding"), dict)
                and any((n["encoding"].get(a) or {}).get("field") == "lo" for a in ("x", "y"))
                and any((n["encoding"].get(a) or {}).get("field") == "hi" for a in ("x2", "y2"))
                for n in _walk(spec))
    subtitles = [n.get("subtitle") for n in _walk(spec) if "subtitle" in n]
    said = any("95% interval" in " ".join(s if isinstance(s, list) else [s]) and "bootstrap" in str(s)
               for s in subtitles)
    return drawn and said


def _rows(spec: dict) -> list[dict]:
    return [r for rows in spec.get("datasets", {}).values() for r in rows]


def loss_table():
    return pd.DataFrame({"method": ["dpo"] * 6 + ["grad_diff"] * 6, "concept": (["A"] * 3 + ["B"] * 3) * 2,
                         "step": [0, 1, 2] * 4, "forget_loss": [3.0, 4.0, 5.0, 3.2, 4.5, 5.5] * 2,
                         "retain_loss": [2.0, 2.0, 2.1] * 4})


def test_charts_build_valid_specs_with_fixed_colours_and_intervals():
    sweep = noisy(sweep_table(), 0.05)
    krs = plots.krs_by_window(sweep).to_dict()
    beh = plots.behaviour_before_after(behaviour_table(concepts="ABC", spread=0.1)).to_dict()
    loss = plots.loss_curves(loss_table()).to_dict()
    change = plots.change_by_layer(change_table(concepts=("A", "B")), quantities=("coef", "value")).to_dict()
    acc = plots.accuracy_by_concept(answers_table([True, False, True])).to_dict()
    relearn = plots.relearning_curves(relearn_table(spread=0.1)).to_dict()
    for name, spec in dict(krs=krs, beh=beh, loss=loss, change=change, acc=acc, relearn=relearn).items():
        assert _has_interval(spec), f"{name}: no 95% interval drawn or named"
    assert _colour_map(relearn)["dpo"] == plots.method_colours()["dpo"]
    assert "pick_concept" in json.dumps(relearn) and relearn["facet"]["column"]["field"] == "data_label"
    # The same method has the same colour in every chart; the experiments keep theirs.
    for spec in (beh, loss):
        cmap = _colour_map(spec)
        assert cmap["dpo"] == plots.method_colours()["dpo"] and cmap["grad_diff"] == plots.method_colours()["grad_diff"]
    assert _colour_map(krs)["value"] == plots.experiment_colours()["value"]
    # Interactive: tooltips (with the interval) and drop-downs for method and concept.
    text = json.dumps(krs)
    assert '"tooltip"' in text and "pick_method" in text and "pick_concept" in text and "95% interval" in text


def test_the_krs_chart_shows_the_mean_and_interval_of_each_choice():
    sweep = noisy(sweep_table(), 0.05)
    rows = [r for r in _rows(plots.krs_by_window(sweep).to_dict()) if "pick_method" in r]
    table = verdicts.mean_krs(sweep)
    for r in rows:
        if r["pick_method"] == r["pick_concept"] == plots.ALL:
            want = table[(table["experiment"] == r["experiment"]) & (table["center_layer"] == r["center_layer"])]
            assert r["mean"] == pytest.approx(want["krs"].iloc[0], abs=1e-4)
            assert (r["lo"], r["hi"]) == pytest.approx((want["lo"].iloc[0], want["hi"].iloc[0]), abs=1e-4)
            assert r["interval"] == "bootstrap over pairs and questions"
    one_pair = [r for r in rows if r["pick_method"] == "dpo" and r["pick_concept"] == "A"]
    assert one_pair and all(r["interval"] == "bootstrap over questions (one pair)" for r in one_pair)


def test_a_method_outside_the_palette_gets_a_spare_colour():
    domain, colours = plots._palette(["dpo", "my_method"], plots.method_colours())
    assert domain == ["dpo", "my_method"]
    assert colours[0] == plots.method_colours()["dpo"] and colours[1] not in plots.method_colours().values()


def test_charts_refuse_tables_without_their_columns():
    with pytest.raises(ValueError, match="krs_by_window: the table lacks column.*center_layer"):
        plots.krs_by_window(sweep_table().drop(columns=["center_layer"]))
    with pytest.raises(ValueError, match="no target question has expected answers"):
        plots.accuracy_by_concept(answers_table([None]))


def test_chart_html_uses_the_served_bundle_and_links_the_static_image():
    chart = plots.krs_by_window(sweep_table())
    html = plots.chart_html(chart, "krs", image_url="figures/ch/krs.svg")
    assert "window.vegaEmbed" in html and "<script src" not in html
    assert 'src="figures/ch/krs.svg"' in html and "<noscript>" in html
    # Deterministic: the same chart gives the same HTML (an unchanged chapter gives an identical page).
    assert html == plots.chart_html(plots.krs_by_window(sweep_table()), "krs", image_url="figures/ch/krs.svg")


def test_show_saves_an_svg_where_the_build_says(tmp_path, monkeypatch):
    monkeypatch.setenv(plots.FIGURES_ENV, str(tmp_path / "figs"))
    assert plots.show(plots.accuracy_by_concept(answers_table([True, False])), "acc") is None
    svg = (tmp_path / "figs" / "acc.svg").read_text()
    assert svg.startswith("<svg") and "accuracy per concept" in svg and "95% interval" in svg
    with pytest.raises(ValueError, match="chart name"):
        plots.show(plots.accuracy_by_concept(answers_table([True])), "../escape")


# ------------------------------------------------------------------------------------------------------------------
# verdicts against the control fine-tune
# ------------------------------------------------------------------------------------------------------------------
def with_control(table, control):
    """A table of the unlearning methods plus the control's rows (the grad_diff rows of `control`, renamed)."""
    ctl = control[control["method"] == "grad_diff"].assign(method="control")
    return pd.concat([table, ctl], ignore_index=True)


def test_change_beyond_control_three_ways():
    abc = ("A", "B", "C", "D")
    unlearning = change_table(peak_layer=5, concepts=abc)
    three_way(verdicts.change_beyond_control(with_control(unlearning, change_table(peak_layer=1, concepts=abc))),
              verdicts.change_beyond_control(with_control(unlearning, change_table(peak_layer=5, concepts=abc))),
              verdicts.change_beyond_control(with_control(change_table(peak_layer=5, concepts=abc, noise=0.2),
                                                          change_table(peak_layer=5, concepts=abc, noise=0.2,
                                                                       seed=3))))
    v = verdicts.change_beyond_control(with_control(unlearning, change_table(peak_layer=1, concepts=abc)))
    assert v.evidence["control_late_share"] == pytest.approx(0.15 / 0.75)  # three 0.05 layers of 0.5 + 5 x 0.05
    with pytest.raises(ValueError, match="no rows of the control"):
        verdicts.change_beyond_control(unlearning)


def test_behaviour_verdicts_against_the_control_three_ways():
    abcd = dict(concepts=("A", "B", "C", "D"))
    unl = behaviour_table(unrelated_after=0.6, perplexity_after=15.0, **abcd)
    calm = behaviour_table(unrelated_after=0.98, perplexity_after=10.1, **abcd)
    wide = dict(concepts=("A", "B", "C", "D"), spread=0.3)
    three_way(verdicts.side_effects_beyond_control(with_control(unl, calm)),
              verdicts.side_effects_beyond_control(with_control(unl, unl)),
              verdicts.side_effects_beyond_control(with_control(behaviour_table(unrelated_after=0.8, **wide),
                                                                behaviour_table(unrelated_after=0.8, seed=5, **wide))))
    three_way(verdicts.perplexity_beyond_control(with_control(unl, calm)),
              verdicts.perplexity_beyond_control(with_control(unl, unl)),
              verdicts.perplexity_beyond_control(with_control(behaviour_table(perplexity_after=12.0, **wide),
                                                              behaviour_table(perplexity_after=12.0, seed=5,
                                                                              **wide))))
    v = verdicts.side_effects_beyond_control(with_control(unl, calm))
    assert v.evidence["difference"] == pytest.approx(0.4 - 0.02) and "control" in v.sentence


def test_seed_spread_reports_each_seeds_best_window_and_the_largest_gap():
    one = sweep_table(coef_peak="last", methods=("grad_diff",), concepts=("A",))
    two = one.assign(seed=0)
    moved = one.assign(seed=1, krs=np.where(one["center_layer"] == 2, one["krs"] + 0.9, one["krs"]))
    table = verdicts.seed_spread(pd.concat([two, moved], ignore_index=True), "coef")
    assert list(table["seed"]) == [0, 1] and table["largest_seed_gap"].iloc[0] == pytest.approx(0.9)
    assert table["best_window"].iloc[0] != table["best_window"].iloc[1]  # seed 1's curve peaks at layer 2
    assert verdicts.seed_spread(two, "coef").empty  # one seed: nothing to compare


def test_relearning_curves_put_the_never_known_control_beside_partial():
    target, control = never_known_tables()
    both = json.dumps(plots.relearning_curves(target, control=control).to_dict())
    assert plots.RELEARN_DATA_LABELS["never_known"] in both and plots.RELEARN_DATA_LABELS["partial"] in both
    assert "scored questions: ROUGE-L" in both
    alone = json.dumps(plots.relearning_curves(target, control=control.iloc[0:0]).to_dict())
    assert plots.RELEARN_DATA_LABELS["never_known"] not in alone and "target questions: ROUGE-L" in alone


def test_full_vs_adapter_compares_the_same_pair_one_line_per_kind_and_experiment():
    full = sweep_table(coef_peak="last")
    adapter = sweep_table(methods=("grad_diff",), concepts=("A",), coef_peak="first")
    spec = plots.krs_full_vs_adapter(full, adapter).to_dict()
    rows = next(iter(spec["datasets"].values()))
    stats = pd.DataFrame(rows)
    # the full table narrowed to the adapter's pair (A, grad_diff): one pair behind each mean, both kinds present
    assert set(stats.tuning) == {"full fine-tuning", "adapter"} and set(stats.pairs) == {1}
    assert set(stats.experiment) == set(full.experiment)
    coef = stats[stats.experiment == "coef"].pivot_table(index="center_layer", columns="tuning", values="mean")
    assert coef["full fine-tuning"].idxmax() == coef.index.max() and coef["adapter"].idxmax() == 1  # its peaks
    assert (stats.lo <= stats["mean"]).all() and (stats["mean"] <= stats.hi).all()
    subtitle = " ".join(spec["title"]["subtitle"])
    assert "Highest mean KRS over the windows" in subtitle and subtitle.count(" vs ") == 1 + 4  # 4 experiments
    with pytest.raises(ValueError, match="none of the adapter's"):
        plots.krs_full_vs_adapter(full, adapter.assign(concept="Z"))
