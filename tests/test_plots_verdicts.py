"""Charts and verdicts on synthetic tidy tables (the columns the pipeline stages document). No model involved."""
import json

import numpy as np
import pandas as pd
import pytest

from dissect_unlearning import plots, verdicts


def sweep_table(n_layers=6, methods=("grad_diff", "dpo"), concepts=("A", "B"), questions=3, coef_peak="last",
                value_level=0.02, combined_best=0.95, seed=0):
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
                    level = {"coef": 0.8 - 0.15 * abs(centre - peak), "attn": 0.3,
                             "coef+attn": combined_best if centre == peak else 0.5, "value": value_level}[exp]
                    for q in range(questions):
                        rows.append({"model": "tiny", "method": m, "concept": c, "experiment": exp,
                                     "center_layer": centre, "layers": layers, "question_index": q,
                                     "krs": level + rng.normal(0, 0.002)})
    return pd.DataFrame(rows)


def behaviour_table(target_after=0.2, unrelated_after=0.95, perplexity_after=12.0):
    """pipeline.behaviour-shaped rows; vanilla rows carry no method (one vanilla model for all)."""
    rows = []
    for c in ("A", "B"):
        for split, after in (("target", target_after), ("unrelated", unrelated_after)):
            for metric in ("rougeL", "bleu"):
                rows.append(dict(model="tiny", concept=c, method=None, stage="vanilla", split=split, metric=metric,
                                 value=1.0, n=5))
                for m in ("grad_diff", "dpo"):
                    rows.append(dict(model="tiny", concept=c, method=m, stage="unlearned", split=split,
                                     metric=metric, value=after, n=5))
        rows.append(dict(model="tiny", concept=c, method=None, stage="vanilla", split="heldout_text",
                         metric="perplexity", value=10.0, n=3))
        for m in ("grad_diff", "dpo"):
            rows.append(dict(model="tiny", concept=c, method=m, stage="unlearned", split="heldout_text",
                             metric="perplexity", value=perplexity_after, n=3))
    return pd.DataFrame(rows)


def change_table(peak_layer=5, n_layers=6):
    """pipeline.coef_change-shaped rows (+ method): relative change per layer and quantity."""
    rows = []
    for m in ("grad_diff", "dpo"):
        for q in ("coef", "value"):
            for layer in range(n_layers):
                rows.append(dict(method=m, concept="A", layer=layer, quantity=q,
                                 rel_change=(0.5 if layer == peak_layer else 0.05) * (1 if q == "coef" else 0.01)))
    return pd.DataFrame(rows)


def answers_table(correct):
    return pd.DataFrame({"concept": ["A"] * len(correct) + ["B"] * len(correct),
                         "kind": ["target"] * (2 * len(correct)), "correct": list(correct) * 2})


# ------------------------------------------------------------------------------------------------------------------
# verdicts: each must be True on one table and False on another
# ------------------------------------------------------------------------------------------------------------------
def test_best_window_contains_last_layer_true_and_false():
    yes = verdicts.best_window_contains_last_layer(sweep_table(coef_peak="last"))
    no = verdicts.best_window_contains_last_layer(sweep_table(coef_peak="early"))
    assert yes.holds is True and no.holds is False
    assert yes.evidence["best_center_layer"] == 5 and yes.evidence["last_layer"] == 5
    assert no.evidence["best_center_layer"] == 1
    assert yes.sentence.startswith("Yes") and no.sentence.startswith("No")
    assert "layers 0-2" in no.sentence


def test_last_layer_comes_from_n_layers_when_given():
    # The sweep covered layers 0-5 only, but the model has 12: the best window then does not hold the last layer.
    v = verdicts.best_window_contains_last_layer(sweep_table(coef_peak="last"), n_layers=12)
    assert v.holds is False and v.evidence["last_layer"] == 11


def test_value_restoration_below_threshold_true_and_false():
    assert verdicts.krs_below_everywhere(sweep_table(value_level=0.02)).holds is True
    v = verdicts.krs_below_everywhere(sweep_table(value_level=0.3))
    assert v.holds is False and v.evidence["windows_above"] == v.evidence["windows"] == 6
    assert verdicts.krs_below_everywhere(sweep_table(value_level=0.3), threshold=0.5).holds is True


def test_combined_restoration_and_comparison():
    assert verdicts.best_krs_above(sweep_table(combined_best=0.95)).holds is True
    assert verdicts.best_krs_above(sweep_table(combined_best=0.7)).holds is False
    assert verdicts.stronger_than(sweep_table(), "coef", "attn").holds is True
    assert verdicts.stronger_than(sweep_table(), "attn", "coef").holds is False


def test_share_of_best_true_and_false():
    whole = sweep_table(coef_peak="last")  # best coef window: 0.8 at the last layer
    part = whole[whole["center_layer"] == 5]
    assert verdicts.share_of_best(part, whole).holds is True
    early = whole[whole["center_layer"] == 0]  # 0.8 - 0.75 = 0.05: 6% of the best
    v = verdicts.share_of_best(early, whole)
    assert v.holds is False and v.evidence["share"] == pytest.approx(0.05 / 0.8, abs=0.01)


def test_mean_krs_averages_questions_then_pairs():
    df = pd.DataFrame({"method": ["m", "m", "m", "n"], "concept": ["A", "A", "B", "A"], "experiment": ["coef"] * 4,
                       "center_layer": [0] * 4, "layers": [[0, 1]] * 4, "krs": [1.0, 0.0, 1.0, 0.0]})
    assert verdicts.mean_krs(df, "coef")["pairs"].iloc[0] == 3
    df.loc[3, "krs"] = 0.9
    # pairs: (m, A) = 0.5, (m, B) = 1.0, (n, A) = 0.9 -> 0.8; the plain row mean would be 0.725
    assert verdicts.mean_krs(df, "coef")["krs"].iloc[0] == pytest.approx(0.8)


def test_largest_change_in_last_layers_true_and_false():
    yes = verdicts.largest_change_in_last_layers(change_table(peak_layer=5))
    no = verdicts.largest_change_in_last_layers(change_table(peak_layer=1))
    assert yes.holds is True and yes.evidence["top_layer"] == 5
    assert no.holds is False and no.evidence["top_layer"] == 1
    assert verdicts.largest_change_in_last_layers(change_table(peak_layer=1), last=5).holds is True


def test_behaviour_verdicts_true_and_false():
    assert verdicts.forgets_target(behaviour_table(target_after=0.2)).holds is True
    assert verdicts.forgets_target(behaviour_table(target_after=0.8)).holds is False
    assert verdicts.side_effects(behaviour_table(unrelated_after=0.6)).holds is True
    assert verdicts.side_effects(behaviour_table(unrelated_after=0.99)).holds is False
    assert verdicts.perplexity_rises(behaviour_table(perplexity_after=15.0)).holds is True
    assert verdicts.perplexity_rises(behaviour_table(perplexity_after=10.1)).holds is False
    v = verdicts.forgets_target(behaviour_table(target_after=0.2))
    assert v.evidence["dpo_relative_drop"] == pytest.approx(0.8)


def test_model_knows_concepts_true_false_and_undecided():
    assert verdicts.model_knows_concepts(answers_table([True, True, False])).holds is True
    assert verdicts.model_knows_concepts(answers_table([True, False, False])).holds is False
    undecided = verdicts.model_knows_concepts(answers_table([None, None]))
    assert undecided.holds is None and undecided.answer == "undecided"


def test_verdict_functions_name_missing_columns():
    with pytest.raises(ValueError, match="lacks column.*krs"):
        verdicts.mean_krs(sweep_table().drop(columns=["krs"]))
    with pytest.raises(ValueError, match="no rows for experiment 'mlp'"):
        verdicts.krs_below_everywhere(sweep_table(), experiment="mlp")


def relearn_table(unrelated_last=0.8, partial_last=0.3):
    """Two methods, two concepts; ROUGE-L 0.2 at step 0 for every pair, rising linearly to the given value."""
    rows = []
    for data, last in (("unrelated", unrelated_last), ("partial", partial_last)):
        for method in ("grad_diff", "dpo"):
            for concept in ("A", "B"):
                for step, frac in ((0, 0.0), (2, 0.5), (4, 1.0)):
                    rows.append(dict(model="m", concept=concept, method=method, data=data, step=step,
                                     split="target", metric="rougeL", value=0.2 + frac * (last - 0.2), n=3,
                                     settings="{}"))
                    rows.append(dict(model="m", concept=concept, method=method, data=data, step=step,
                                     split="target", metric="accuracy", value=0.0, n=3, settings="{}"))
    return pd.DataFrame(rows)


def test_relearning_recovers_true_false_and_undecided():
    t = relearn_table(unrelated_last=0.8, partial_last=0.3)
    v = verdicts.relearning_recovers(t, data="unrelated")
    # (0.8 - 0.2) / (1 - 0.2) = 0.75 of the gap, for both methods
    assert v.holds is True and v.evidence["steps"] == 4
    assert v.evidence["dpo_recovered"] == pytest.approx(0.75) and v.evidence["grad_diff_unlearned"] == pytest.approx(0.2)
    p = verdicts.relearning_recovers(t, data="partial")
    assert p.holds is False and p.evidence["grad_diff_recovered"] == pytest.approx(0.125)
    assert "12%" in p.sentence or "13%" in p.sentence
    # One method below the bar is enough to say no
    mixed = t.copy()
    low = (mixed["method"] == "dpo") & (mixed["data"] == "unrelated") & (mixed["step"] == 4)
    mixed.loc[low & (mixed["metric"] == "rougeL"), "value"] = 0.3
    assert verdicts.relearning_recovers(mixed, data="unrelated").holds is False
    assert verdicts.relearning_recovers(t[t["data"] == "partial"], data="unrelated").holds is None
    # Nothing forgotten: nothing to win back
    full = t.assign(value=1.0)
    assert verdicts.relearning_recovers(full, data="unrelated").holds is None
    with pytest.raises(ValueError, match="relearning_recovers: the table lacks column.*step"):
        verdicts.relearning_recovers(t.drop(columns=["step"]))


# ------------------------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------------------------
def _colour_map(spec: dict) -> dict:
    """{domain value: colour} of every colour scale in a Vega-Lite spec."""
    found = {}

    def walk(node):
        if isinstance(node, dict):
            scale = node.get("scale") if node.get("field") in ("method", "experiment") else None
            if isinstance(scale, dict) and "domain" in scale:
                found.update(dict(zip(scale["domain"], scale["range"])))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec)
    return found


def test_charts_build_valid_specs_with_fixed_colours():
    sweep = sweep_table()
    krs = plots.krs_by_window(sweep).to_dict()
    beh = plots.behaviour_before_after(behaviour_table()).to_dict()
    curves = pd.DataFrame({"method": ["dpo"] * 3 + ["grad_diff"] * 3, "concept": ["A"] * 6, "step": [0, 1, 2] * 2,
                           "forget_loss": [3.0, 4.0, 5.0] * 2, "retain_loss": [2.0, 2.0, 2.1] * 2})
    loss = plots.loss_curves(curves).to_dict()
    plots.change_by_layer(change_table(), quantities=("coef", "value")).to_dict()
    plots.accuracy_by_concept(answers_table([True, False])).to_dict()
    relearn = plots.relearning_curves(relearn_table()).to_dict()
    assert _colour_map(relearn)["dpo"] == plots.method_colours()["dpo"]
    assert "pick_concept" in json.dumps(relearn) and relearn["facet"]["column"]["field"] == "data_label"
    # The same method has the same colour in every chart; the experiments keep theirs.
    for spec in (beh, loss):
        cmap = _colour_map(spec)
        assert cmap["dpo"] == plots.method_colours()["dpo"] and cmap["grad_diff"] == plots.method_colours()["grad_diff"]
    assert _colour_map(krs)["value"] == plots.experiment_colours()["value"]
    # Interactive: tooltips and drop-downs for method and concept (two of each in the synthetic sweep).
    text = json.dumps(krs)
    assert '"tooltip"' in text and "pick_method" in text and "pick_concept" in text


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
    assert svg.startswith("<svg") and "accuracy per concept" in svg
    with pytest.raises(ValueError, match="chart name"):
        plots.show(plots.accuracy_by_concept(answers_table([True])), "../escape")
