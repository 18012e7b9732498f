"""Altair charts from tidy tables, and how they are shown in the book without a network.

Every chart function takes a tidy DataFrame (the documented columns of a pipeline stage), checks the columns it needs,
and returns an `alt.Chart`; it never touches a model. `show(chart, name)` displays a chart in a notebook as HTML that
draws with the Vega JavaScript the book serves from its own `_static/` folder (see `javascript_bundle`), and saves a
static SVG beside the page for print and for readers without JavaScript.

Colours and labels of methods and experiments come from their registries (unlearning.methods,
patching.experiments), so "DPO" is the same red in every chapter; a name outside them (a chapter's derived series,
e.g. "last layer only") keeps its name as label and gets a spare colour.

Every chart that shows a mean also shows its 95% interval (a band around a line, a bar on a point or a bar chart),
computed here with uncertainty.py, not in the browser: a bootstrap over (method, concept) pairs and their questions,
or over concepts where a table has no question level. The drop-downs that pick one method or concept pick among
precomputed means and intervals, so each choice shows the interval of what it shows.
"""
from __future__ import annotations

import hashlib
import html
import json
import os
from pathlib import Path

import altair as alt
import pandas as pd

from . import uncertainty
from .patching import experiments as experiments_mod, sites as sites_mod
from .tables import require_columns
from .unlearning import methods as methods_mod

# Vega-Lite version of the specs Altair writes; the served bundle and the SVG export use the same one.
VEGALITE_VERSION = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
BUNDLE_NAME = "dissect-vega.js"  # file name of the served bundle inside the book's _static/
FIGURES_ENV = "DISSECT_UNLEARNING_FIGURES"  # where show() saves static images (relative to cwd and to the page)

# --------------------------------------------------------------------------------------------------------------------
# One palette for the whole book
# --------------------------------------------------------------------------------------------------------------------
# The vanilla model is drawn beside the methods (before / after unlearning).
VANILLA_LABEL = "vanilla (before unlearning)"
VANILLA_COLOUR = "#7f7f7f"
# For names without a colour (a chapter's derived series): stable colours that no built-in entry uses.
_SPARE = ["#17becf", "#bcbd22", "#e377c2", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173"]

METRIC_LABELS = {
    "rougeL": "ROUGE-L F1 vs. the vanilla answer",
    "bleu": "BLEU vs. the vanilla answer",
    "accuracy": "accuracy (expected answer found)",
    "perplexity": "perplexity",
}
SPLIT_LABELS = {
    "target": "target questions",
    "unrelated": "unrelated questions",
    "completion": "text completion",
    "forget_text": "forget text",
    "heldout_text": "held-out text",
}


def _palette(names, colours: dict) -> tuple[list, list]:
    """(domain, range) for a colour scale: known names keep their colour, others get spare ones in sorted order."""
    names = list(dict.fromkeys(names))
    known = [n for n in colours if n in names]
    unknown = sorted(n for n in names if n not in colours)
    return known + unknown, [colours[n] for n in known] + [_SPARE[i % len(_SPARE)] for i in range(len(unknown))]


def method_labels() -> dict[str, str]:
    """{name: label} of the vanilla model and every registered unlearning method."""
    return {"vanilla": VANILLA_LABEL, **{m.name: m.label for m in methods_mod.REGISTRY.values()}}


def method_colours() -> dict[str, str]:
    """{name: colour} of the vanilla model and every registered unlearning method."""
    return {"vanilla": VANILLA_COLOUR, **{m.name: m.colour for m in methods_mod.REGISTRY.values()}}


def experiment_labels() -> dict[str, str]:
    return {e.name: e.label for e in experiments_mod.EXPERIMENTS.values()}


def experiment_colours() -> dict[str, str]:
    return {e.name: e.colour for e in experiments_mod.EXPERIMENTS.values()}


def method_scale(methods) -> alt.Scale:
    domain, rng = _palette(methods, method_colours())
    return alt.Scale(domain=domain, range=rng)


def experiment_scale(experiments) -> alt.Scale:
    domain, rng = _palette(experiments, experiment_colours())
    return alt.Scale(domain=domain, range=rng)


def method_label(name: str) -> str:
    return method_labels().get(name, name)


def experiment_label(name: str) -> str:
    return experiment_labels().get(name, name)


def quantity_label(name: str) -> str:
    """A quantity of pipeline.coef_change: a patching site or a parameter set."""
    entry = sites_mod.SITES.get(name) or experiments_mod.PARAMETER_SETS.get(name)
    return entry.label if entry else name


def _dropdown(field: str, values, label: str, all_label: str):
    """A parameter bound to a drop-down: null = every value (the chart then averages over them)."""
    values = list(dict.fromkeys(values))
    return alt.param(
        name=f"pick_{field}",
        value=None,
        bind=alt.binding_select(options=[None] + values, labels=[all_label] + [str(v) for v in values], name=label),
    )


ALL = "(all)"  # the precomputed rows of "every method / every concept (mean)" in a chart's table
BAND_OPACITY = 0.18


def _picks(df: pd.DataFrame, fields) -> list[dict]:
    """Every combination a chart's drop-downs can pick: for each field with several values, ALL or one value."""
    combos = [{}]
    for field in fields:
        values = list(dict.fromkeys(df[field]))
        options = [ALL] + values if len(values) > 1 else [ALL]
        combos = [{**c, field: v} for c in combos for v in options]
    return combos


def _with_intervals(df: pd.DataFrame, value: str, by, fields, pairs, question, each: str | None = None
                    ) -> pd.DataFrame:
    """Mean of `value` per `by` with its 95% interval, for every drop-down choice of `fields`: the columns
    pick_<field> (ALL or a value) say which rows a choice shows. `each`: a column of `by` bootstrapped one value at
    a time (uncertainty.mean_by); an 'experiment' column always is."""
    parts = []
    for combo in _picks(df, fields):
        sub = df
        for field, v in combo.items():
            if v != ALL:
                sub = sub[sub[field] == v]
        if sub.empty:
            continue
        out = uncertainty.mean_by(sub, value, by, pairs, question,
                                  each=each or ("experiment" if "experiment" in by else None))
        parts.append(out.assign(**{f"pick_{f}": v for f, v in combo.items()}))
    # Four decimals are more than a chart shows, and keep the page's embedded table small.
    return pd.concat(parts, ignore_index=True).round({"mean": 4, "lo": 4, "hi": 4})


def _pickers(df: pd.DataFrame, fields: dict) -> tuple[list, list]:
    """Drop-downs for the fields of `fields` ({field: (label, all_label)}) that have several values, and the
    filters that show the rows of each choice (null: the mean over all, the rows marked ALL)."""
    params, filters = [], []
    for field, (label, all_label) in fields.items():
        values = [v for v in dict.fromkeys(df[f"pick_{field}"]) if v != ALL]
        if values:
            params.append(_dropdown(field, values, label, all_label))
            filters.append(f"datum.pick_{field} == (pick_{field} == null ? '{ALL}' : pick_{field})")
    return params, filters


def _filtered(chart, filters):
    for f in filters:
        chart = chart.transform_filter(f)
    return chart


def _interval_encoding(x, y_title: str, color: alt.Color, scale: alt.Scale | None = None, **more) -> dict:
    """Encodings of an interval layer (band or bars): lo to hi, in the line's colour. Layered after the lines, so
    that the shared legend takes its symbols from the lines, not from a faint band."""
    y = alt.Y("lo:Q", title=y_title) if scale is None else alt.Y("lo:Q", title=y_title, scale=scale)
    return {"x": x, "y": y, "y2": "hi:Q", "color": color, **more}


def _interval_title(title: str, over: str, shown: str = "Band") -> alt.TitleParams:
    """The chart's title, and a subtitle that says what its interval is: '<shown>: 95% interval, <over>.'"""
    return alt.TitleParams(text=title, subtitle=[f"{shown}: 95% interval, {over}."])


INTERVAL_TOOLTIPS = [alt.Tooltip("lo:Q", title="95% interval from", format=".3f"),
                     alt.Tooltip("hi:Q", title="95% interval to", format=".3f"),
                     alt.Tooltip("interval:N", title="95% interval")]


def _window_text(layers) -> str:
    layers = [int(x) for x in layers]
    return f"{min(layers)}-{max(layers)}" if len(layers) > 1 else str(layers[0])


# --------------------------------------------------------------------------------------------------------------------
# Chapter 2: what the vanilla model knows
# --------------------------------------------------------------------------------------------------------------------
def accuracy_by_concept(answers: pd.DataFrame) -> alt.Chart:
    """Bar per concept: share of its target questions whose greedy answer contains an expected answer, with its 95%
    interval (a bootstrap over the concept's questions).

    `answers`: pipeline.answers() table (columns concept, kind, correct). Rows without expected answers are skipped.
    """
    require_columns(answers, ["concept", "kind", "correct"], "accuracy_by_concept", allow_empty=False)
    target = answers[(answers["kind"] == "target") & answers["correct"].notna()]
    if target.empty:
        raise ValueError("accuracy_by_concept: no target question has expected answers (concept field QA_answers)")
    target = target.assign(correct=target["correct"].astype(bool).astype(float))
    if "question_index" not in target.columns:
        target = target.assign(question_index=target.groupby("concept").cumcount())
    # One concept per bar: its questions are resampled within it (strata), never mixed with another's.
    rep = uncertainty.replicate_means(target.assign(q=target["concept"].astype(str) + "/"
                                                    + target["question_index"].astype(str)),
                                      "correct", ["concept"], (), "q", strata="concept")
    lo, hi = rep.interval()
    acc = rep.keys.assign(accuracy=rep.estimate, lo=lo, hi=hi)
    counts = target.groupby("concept")["correct"].agg(correct="sum", questions="count")
    acc = acc.join(counts, on="concept")
    acc["interval"] = "bootstrap over the concept's questions"
    title = _interval_title("What the vanilla model knows: accuracy per concept",
                            "bootstrap over each concept's questions", "Bars")
    base = alt.Chart(acc, title=title)
    bars = base.mark_bar().encode(
        x=alt.X("accuracy:Q", title="share of target questions answered with an expected answer",
                scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
        y=alt.Y("concept:N", title=None, sort=alt.EncodingSortField("accuracy", order="descending")),
        color=alt.value(VANILLA_COLOUR),
        tooltip=[alt.Tooltip("concept:N"), alt.Tooltip("accuracy:Q", format=".0%"),
                 alt.Tooltip("correct:Q", title="answered"), alt.Tooltip("questions:Q"),
                 alt.Tooltip("lo:Q", title="95% interval from", format=".0%"),
                 alt.Tooltip("hi:Q", title="95% interval to", format=".0%")],
    )
    whiskers = base.mark_errorbar(ticks={"size": 8}, color="black").encode(
        x=alt.X("lo:Q", title="share of target questions answered with an expected answer"), x2="hi:Q",
        y=alt.Y("concept:N", title=None, sort=alt.EncodingSortField("accuracy", order="descending")))
    return alt.layer(bars, whiskers).properties(width=440, height=alt.Step(22))


# --------------------------------------------------------------------------------------------------------------------
# Chapters 3 and 7: behaviour before and after unlearning
# --------------------------------------------------------------------------------------------------------------------
def _per_method_stages(behaviour: pd.DataFrame) -> pd.DataFrame:
    """Vanilla rows may carry no method (one vanilla model for all methods): repeat them for each method."""
    methods = [m for m in behaviour.loc[behaviour["stage"] != "vanilla", "method"].dropna().unique()]
    van = behaviour[behaviour["stage"] == "vanilla"]
    unl = behaviour[behaviour["stage"] != "vanilla"]
    if van.empty or van["method"].isin(methods).all():
        return behaviour
    van = van.drop(columns=["method"]).drop_duplicates()
    van = pd.concat([van.assign(method=m) for m in methods], ignore_index=True)
    return pd.concat([van, unl], ignore_index=True)


def behaviour_before_after(behaviour: pd.DataFrame, splits=("target", "unrelated"), metrics=None,
                           title: str = "Before and after unlearning") -> alt.Chart:
    """Slope chart: each method's mean score before (vanilla) and after unlearning, one panel per split, with the
    95% interval of each mean (a bootstrap over concepts: the table has no per-question rows).

    `behaviour`: pipeline.behaviour() table (model, concept, method, stage, split, metric, value, n). A drop-down
    picks the metric (and one picks the concept when there are several); the tooltip gives the exact means.
    """
    require_columns(behaviour, ["concept", "method", "stage", "split", "metric", "value"], "behaviour_before_after",
                    allow_empty=False)
    df = behaviour[behaviour["split"].isin(list(splits))]
    if metrics is not None:
        df = df[df["metric"].isin(list(metrics))]
    if df.empty:
        raise ValueError(f"behaviour_before_after: no rows for splits {list(splits)} and metrics {metrics}")
    df = _per_method_stages(df)
    # Mean over questions/texts per (concept, method, stage, split, metric), then over concepts with an interval.
    df = (df.groupby(["concept", "method", "stage", "split", "metric"], sort=False)["value"].mean().reset_index())
    df = _with_intervals(df, "value", ["method", "stage", "split", "metric"], ["concept"], ("concept",), None)
    df = df.rename(columns={"pairs": "concepts"})
    df["stage_order"] = (df["stage"] != "vanilla").astype(int)
    df["split_label"] = df["split"].map(lambda s: SPLIT_LABELS.get(s, s))
    df["method_label"] = df["method"].map(method_label)
    metrics_present = list(dict.fromkeys(df["metric"]))
    first = "rougeL" if "rougeL" in metrics_present else metrics_present[0]
    params, filters = _pickers(df, {"concept": ("concept ", "all concepts (mean)")})
    if len(metrics_present) > 1:
        params.insert(0, alt.param(name="pick_metric", value=first, bind=alt.binding_select(
            options=metrics_present, labels=[METRIC_LABELS.get(m, m) for m in metrics_present], name="metric ")))
        filters.insert(0, "datum.metric == pick_metric")
    y_title = (METRIC_LABELS.get(metrics_present[0], metrics_present[0]) if len(metrics_present) == 1
               else "mean score (metric chosen below)")
    x = alt.X("stage:N", title=None, sort=["vanilla", "unlearned"], axis=alt.Axis(labelAngle=0))
    color = alt.Color("method:N", scale=method_scale(df["method"]), title="method",
                      legend=alt.Legend(labelExpr=_label_expr(method_labels()), orient="bottom", columns=3))
    # Side by side within a stage, so that the methods' interval bars do not hide each other.
    offset = alt.XOffset("method:N", scale=alt.Scale(paddingInner=0.4))
    lines = alt.Chart().mark_line(point=alt.OverlayMarkDef(size=70, filled=True)).encode(
        x=x, xOffset=offset, y=alt.Y("mean:Q", title=y_title), color=color, detail="method:N",
        tooltip=[alt.Tooltip("method_label:N", title="method"), alt.Tooltip("split_label:N", title="split"),
                 alt.Tooltip("stage:N"), alt.Tooltip("mean:Q", title="mean", format=".3f"),
                 alt.Tooltip("concepts:Q", title="concepts averaged")] + INTERVAL_TOOLTIPS,
    ).add_params(*params)
    bars = alt.Chart().mark_errorbar(ticks={"size": 8}, thickness=1.5).encode(
        **_interval_encoding(x, y_title, color, xOffset=offset, detail="method:N"))
    layered = _filtered(alt.layer(lines, bars, data=df), filters).properties(width=220, height=260)
    return layered.facet(
        column=alt.Column("split_label:N", title=None, sort=[SPLIT_LABELS.get(s, s) for s in splits]),
        title=_interval_title(title, "bootstrap over concepts (no interval for one concept)", "Bars"),
    ).resolve_scale(y="independent")


def _label_expr(labels: dict) -> str:
    """A Vega expression that maps legend values to readable labels."""
    parts = [f"datum.label == {json.dumps(k)} ? {json.dumps(v)}" for k, v in labels.items()]
    return " : ".join(parts + ["datum.label"])


def loss_curves(curves: pd.DataFrame) -> alt.Chart:
    """Training curves of the unlearning runs: forget and retain loss per step, coloured by method; with several
    concepts, the mean over concepts with its 95% interval (a bootstrap over concepts) as a band.

    `curves`: concatenated Unlearned.loss_curve tables with columns method, concept, step, forget_loss, retain_loss.
    """
    require_columns(curves, ["method", "concept", "step", "forget_loss", "retain_loss"], "loss_curves",
                    allow_empty=False)
    long = curves.melt(id_vars=["method", "concept", "step"], value_vars=["forget_loss", "retain_loss"],
                       var_name="loss", value_name="value").dropna(subset=["value"])
    long["loss"] = long["loss"].map({"forget_loss": "forget set", "retain_loss": "retain set"})
    long = long.groupby(["method", "concept", "loss", "step"], sort=False)["value"].mean().reset_index()
    df = _with_intervals(long, "value", ["method", "loss", "step"], ["concept"], ("concept",), None)
    df["method_label"] = df["method"].map(method_label)
    params, filters = _pickers(df, {"concept": ("concept ", "all concepts (mean)")})
    color = alt.Color("method:N", scale=method_scale(df["method"]), title="method",
                      legend=alt.Legend(labelExpr=_label_expr(method_labels()), orient="bottom", columns=3))
    dash = alt.StrokeDash("loss:N", title="data", legend=alt.Legend(orient="bottom"))
    x = alt.X("step:Q", title="optimiser step")
    lines = _filtered(alt.Chart(df), filters).mark_line(point=True).encode(
        x=x, y=alt.Y("mean:Q", title="loss (nats per token)"), color=color, strokeDash=dash,
        tooltip=[alt.Tooltip("method_label:N", title="method"), alt.Tooltip("loss:N", title="data"),
                 alt.Tooltip("step:Q"), alt.Tooltip("mean:Q", title="loss", format=".3f")] + INTERVAL_TOOLTIPS,
    )
    band = _filtered(alt.Chart(df), filters).mark_area(opacity=BAND_OPACITY).encode(
        **_interval_encoding(x, "loss (nats per token)", color, detail="loss:N"))
    title = _interval_title("Unlearning runs: loss on the forget and retain data",
                            "bootstrap over concepts (no interval for one concept)")
    return alt.layer(lines.add_params(*params) if params else lines, band).properties(
        width=460, height=240, title=title)


# --------------------------------------------------------------------------------------------------------------------
# Chapters 4-7: knowledge recovery by window
# --------------------------------------------------------------------------------------------------------------------
def krs_by_window(sweep: pd.DataFrame, experiments=None, title: str = "Knowledge recovered by patching",
                  y_title: str = "Knowledge Recovery Score (1 = vanilla output restored)",
                  floor: float | None = None) -> alt.Chart:
    """KRS against the centre layer of the patched window, one line per experiment, with its 95% interval as a band.

    `sweep`: pipeline.sweep() rows (experiment, center_layer, layers, question_index, krs), concatenated over
    concepts and methods with columns `concept` and `method`. KRS is averaged over the questions of each
    (method, concept), then over the methods and concepts picked in the drop-downs; the interval is a bootstrap over
    those pairs and their questions (over the questions alone when one method and one concept are picked).
    floor: the lowest KRS the axis shows; lower means and interval ends are drawn at it (their tooltips keep the
    value), so that a patch that makes things far worse (KRS -1000) does not flatten every other line.
    """
    require_columns(sweep, ["experiment", "center_layer", "layers", "krs", "method", "concept"], "krs_by_window",
                    allow_empty=False)
    df = sweep if experiments is None else sweep[sweep["experiment"].isin(list(experiments))]
    if df.empty:
        raise ValueError(f"krs_by_window: no rows for experiments {list(experiments)}; the table has "
                         f"{', '.join(map(str, sweep['experiment'].unique()))}")
    df = df.assign(window=df["layers"].map(_window_text))
    question = "question_index" if "question_index" in df.columns else None
    df = _with_intervals(df, "krs", ["experiment", "center_layer", "window"], ["method", "concept"],
                         ("method", "concept"), question)
    df["experiment_label"] = df["experiment"].map(experiment_label)
    params, filters = _pickers(df, {"method": ("method ", "all methods (mean)"),
                                    "concept": ("concept ", "all concepts (mean)")})
    order = [e for e in experiment_colours() if e in set(df["experiment"])]
    color = alt.Color("experiment:N", scale=experiment_scale(df["experiment"]), sort=order, title="restored",
                      legend=alt.Legend(labelExpr=_label_expr(experiment_labels()), orient="bottom", columns=3))
    x = alt.X("center_layer:Q", title="centre layer of the patched window", axis=alt.Axis(tickMinStep=1))
    scale = alt.Scale() if floor is None else alt.Scale(domainMin=float(floor), clamp=True)
    encoding = dict(
        x=x, y=alt.Y("mean:Q", title=y_title, scale=scale), color=color,
        tooltip=[alt.Tooltip("experiment_label:N", title="restored"), alt.Tooltip("window:N", title="layers"),
                 alt.Tooltip("mean:Q", title="mean KRS", format=".3f"),
                 alt.Tooltip("pairs:Q", title="(method, concept) pairs averaged")] + INTERVAL_TOOLTIPS,
    )
    # An experiment with a single window has no line to draw a band around: its interval is a bar.
    df["single"] = df.groupby("experiment")["center_layer"].transform("nunique") == 1
    band = alt.Chart(df).mark_area(opacity=BAND_OPACITY).encode(**_interval_encoding(x, y_title, color, scale))
    bars = alt.Chart(df).transform_filter("datum.single").mark_errorbar(
        ticks={"size": 8}).encode(**_interval_encoding(x, y_title, color, scale))
    lines = _filtered(alt.Chart(df).mark_line(point=alt.OverlayMarkDef(size=45, filled=True)).encode(**encoding),
                      filters)
    zero = alt.Chart(pd.DataFrame({"y": [0.0]})).mark_rule(color="#999", strokeDash=[3, 3]).encode(y="y:Q")
    layered = alt.layer(lines.add_params(*params) if params else lines, _filtered(band, filters),
                        _filtered(bars, filters), zero)
    title = _interval_title(title, "bootstrap over (method, concept) pairs and questions",
                            "Band (a bar for a single window)")
    if floor is not None and bool((df["lo"] < floor).any() | (df["mean"] < floor).any()):
        title.subtitle = list(title.subtitle) + [f"Values below {floor:g} are drawn at {floor:g} (hover for them)."]
    return layered.properties(width=460, height=280, title=title)


def krs_full_vs_adapter(full: pd.DataFrame, adapter: pd.DataFrame,
                        title: str = "Full fine-tuning against a low-rank adapter") -> alt.Chart:
    """KRS against the centre layer of the window for two unlearned models of the same (concept, method) pairs: one
    panel per experiment, the full fine-tune's line solid and the adapter's dashed, each with its 95% interval (a
    bootstrap over the pairs and their questions).

    `full` / `adapter`: pipeline.sweep() rows of the two studies (the same experiments and windows); the rows of
    `full` are narrowed to the adapter's (concept, method, seed)."""
    for name, t in (("full", full), ("adapter", adapter)):
        require_columns(t, ["experiment", "center_layer", "layers", "krs", "method", "concept", "question_index"],
                        f"krs_full_vs_adapter ({name})", allow_empty=False)
    kinds = ["full fine-tuning", "adapter"]
    keys = [c for c in ("concept", "method", "seed") if c in full.columns and c in adapter.columns]
    full = full.merge(adapter[keys].drop_duplicates(), on=keys)  # the adapter's pairs (and seed) only
    if full.empty:
        raise ValueError(f"krs_full_vs_adapter: the full fine-tuning table has none of the adapter's {keys}")
    df = pd.concat([full.assign(tuning=kinds[0]), adapter.assign(tuning=kinds[1])], ignore_index=True)
    df = df.assign(window=df["layers"].map(_window_text))
    by = ["experiment", "tuning", "center_layer", "window"]
    stats = pd.concat([uncertainty.mean_by(part, "krs", by, ("method", "concept"), "question_index")
                       for _, part in df.groupby(["experiment", "tuning"], sort=False)], ignore_index=True)
    stats = stats.round({"mean": 4, "lo": 4, "hi": 4})
    stats["experiment_label"] = stats["experiment"].map(experiment_label)
    order = [e for e in experiment_colours() if e in set(stats["experiment"])]
    color = alt.Color("experiment:N", scale=experiment_scale(stats["experiment"]), sort=order, legend=None)
    dash = alt.StrokeDash("tuning:N", sort=kinds, title="unlearned by",
                          scale=alt.Scale(domain=kinds, range=[[1, 0], [5, 3]]))
    x = alt.X("center_layer:Q", title="centre layer of the patched window", axis=alt.Axis(tickMinStep=1))
    y_title = "KRS"
    lines = alt.Chart().mark_line(point=alt.OverlayMarkDef(size=30, filled=True)).encode(
        x=x, y=alt.Y("mean:Q", title=y_title), color=color, strokeDash=dash,
        tooltip=[alt.Tooltip("experiment_label:N", title="restored"), alt.Tooltip("tuning:N", title="unlearned by"),
                 alt.Tooltip("window:N", title="layers"), alt.Tooltip("mean:Q", title="mean KRS", format=".3f")]
        + INTERVAL_TOOLTIPS)
    band = alt.Chart().mark_area(opacity=BAND_OPACITY).encode(
        **_interval_encoding(x, y_title, color, detail="tuning:N"))
    panels = alt.layer(lines, band, data=stats).properties(width=220, height=200).facet(
        column=alt.Column("experiment_label:N", title=None, sort=[experiment_label(e) for e in order]))
    best = stats.groupby(["experiment", "tuning"])["mean"].max()
    title = _interval_title(title, "bootstrap over (method, concept) pairs and questions")
    highest = "; ".join(f"{experiment_label(e)} {best[(e, kinds[0])]:.3f} vs {best[(e, kinds[1])]:.3f}" for e in order)
    title.subtitle = list(title.subtitle) + [f"Highest mean KRS over the windows, full fine-tuning vs adapter: "
                                             f"{highest}."]
    return panels.properties(title=title)


def change_by_layer(change: pd.DataFrame, quantities=("coef",), value: str = "rel_change",
                    title: str = "How much unlearning changed each layer") -> alt.Chart:
    """Per layer, the relative change ||unlearned - vanilla|| / ||vanilla|| of a quantity, one line per method, with
    the 95% interval of the mean over concepts as a band (a bootstrap over concepts; the table has no question
    level).

    `change`: pipeline.coef_change() rows (layer, quantity, rel_change, concept) concatenated over methods with a
    `method` column. With several `quantities`, a drop-down picks one.
    """
    require_columns(change, ["method", "concept", "layer", "quantity", value], "change_by_layer", allow_empty=False)
    df = change[change["quantity"].isin(list(quantities))]
    if df.empty:
        raise ValueError(f"change_by_layer: no rows for quantities {list(quantities)}; the table has "
                         f"{', '.join(map(str, change['quantity'].unique()))}")
    df = df.groupby(["method", "concept", "quantity", "layer"], sort=False)[value].mean().reset_index()
    df = _with_intervals(df, value, ["method", "quantity", "layer"], ["concept"], ("concept",), None)
    df["method_label"] = df["method"].map(method_label)
    df["quantity_label"] = df["quantity"].map(lambda q: quantity_label(q))
    params, filters = _pickers(df, {"concept": ("concept ", "all concepts (mean)")})
    present = list(dict.fromkeys(df["quantity"]))
    if len(present) > 1:
        params.insert(0, alt.param(name="pick_quantity", value=present[0], bind=alt.binding_select(
            options=present, labels=[quantity_label(q) for q in present], name="quantity ")))
        filters.insert(0, "datum.quantity == pick_quantity")
    y_title = "relative change ||unlearned - vanilla|| / ||vanilla||"
    if len(present) == 1:
        y_title = f"{quantity_label(present[0])}: relative change"
    color = alt.Color("method:N", scale=method_scale(df["method"]), title="method",
                      legend=alt.Legend(labelExpr=_label_expr(method_labels()), orient="bottom", columns=3))
    x = alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1))
    lines = _filtered(alt.Chart(df), filters).mark_line(point=True).encode(
        x=x, y=alt.Y("mean:Q", title=y_title), color=color,
        tooltip=[alt.Tooltip("method_label:N", title="method"), alt.Tooltip("quantity_label:N", title="quantity"),
                 alt.Tooltip("layer:Q"), alt.Tooltip("mean:Q", title="relative change", format=".4f")]
        + INTERVAL_TOOLTIPS,
    )
    band = _filtered(alt.Chart(df), filters).mark_area(opacity=BAND_OPACITY).encode(
        **_interval_encoding(x, y_title, color))
    title = _interval_title(title, "bootstrap over concepts (no interval for one concept)")
    return alt.layer(lines.add_params(*params) if params else lines, band).properties(
        width=460, height=260, title=title)


# --------------------------------------------------------------------------------------------------------------------
# Chapter 8: relearning
# --------------------------------------------------------------------------------------------------------------------
RELEARN_DATA_LABELS = {"unrelated": "text about another concept", "partial": "half of the target questions",
                       "never_known": "half of a never-known concept's questions (control)"}


def relearning_curves(relearn: pd.DataFrame, metric: str = "rougeL",
                      title: str = "Relearning: target answers after k fine-tuning steps",
                      control: pd.DataFrame | None = None) -> alt.Chart:
    """Target-question score against relearning steps (0 = the unlearned model), one line per method and one panel
    per kind of relearning data, with the 95% interval of the mean over concepts as a band (a bootstrap over
    concepts and, within each, the scored questions, from the per-question scores pipeline.relearn keeps; each kind
    of data on its own questions; a table without them is resampled over concepts only); a drop-down picks a concept
    (default: the mean over concepts).

    `relearn`: pipeline.relearn() rows (method, concept, data, step, split, metric, value), concatenated.
    `control`: the never-known control's rows (study.relearn_control()), a panel of their own beside 'partial':
    the same unlearned models scored on the never-known concept's held-out questions (the concept drop-down still
    names the unlearned model's concept).
    """
    require_columns(relearn, ["method", "concept", "data", "step", "metric", "value"], "relearning_curves",
                    allow_empty=False)
    has_control = control is not None and not control.empty
    if has_control:
        require_columns(control, ["method", "concept", "data", "step", "metric", "value"],
                        "relearning_curves (control)")
        relearn = pd.concat([relearn, control], ignore_index=True)
    df = relearn[relearn["metric"] == metric]
    if df.empty:
        raise ValueError(f"relearning_curves: no rows for metric {metric!r}; the table has "
                         f"{', '.join(map(str, relearn['metric'].unique()))}")
    by_question = {"questions", "per_question"} <= set(df.columns) and df["per_question"].notna().all()
    if by_question:  # one row per scored question, so that the band resamples questions too
        df = pd.DataFrame([(r.method, r.concept, r.data, r.step, int(q), float(v)) for r in df.itertuples(index=False)
                           for q, v in zip(r.questions, r.per_question)],
                          columns=["method", "concept", "data", "step", "question_index", "value"])
    else:
        df = df.groupby(["method", "concept", "data", "step"], sort=False)["value"].mean().reset_index()
    df = _with_intervals(df, "value", ["method", "data", "step"], ["concept"], ("concept",),
                         "question_index" if by_question else None, each="data")
    df = df.rename(columns={"pairs": "concepts"})
    df["method_label"] = df["method"].map(method_label)
    df["data_label"] = df["data"].map(lambda d: RELEARN_DATA_LABELS.get(d, d))
    params, filters = _pickers(df, {"concept": ("concept ", "all concepts (mean)")})
    color = alt.Color("method:N", scale=method_scale(df["method"]), title="method",
                      legend=alt.Legend(labelExpr=_label_expr(method_labels()), orient="bottom", columns=3))
    x = alt.X("step:Q", title="relearning steps (0 = unlearned model)", axis=alt.Axis(tickMinStep=1))
    y_scale = alt.Scale(domain=[0, 1] if metric in ("rougeL", "bleu", "accuracy") else alt.Undefined)
    y_title = f"{'scored' if has_control else 'target'} questions: {METRIC_LABELS.get(metric, metric)}"
    lines = alt.Chart().mark_line(point=True).encode(
        x=x, y=alt.Y("mean:Q", title=y_title, scale=y_scale),
        color=color,
        tooltip=[alt.Tooltip("method_label:N", title="method"), alt.Tooltip("data_label:N", title="relearned on"),
                 alt.Tooltip("step:Q", title="steps"), alt.Tooltip("mean:Q", title="score", format=".3f"),
                 alt.Tooltip("concepts:Q", title="concepts averaged")] + INTERVAL_TOOLTIPS,
    )
    band = alt.Chart().mark_area(opacity=BAND_OPACITY).encode(**_interval_encoding(x, y_title, color))
    layered = _filtered(alt.layer(lines.add_params(*params) if params else lines, band, data=df), filters)
    data_kinds = list(dict.fromkeys(df["data_label"]))
    return layered.properties(width=300, height=240).facet(
        column=alt.Column("data_label:N", title="relearned on", sort=data_kinds),
        title=_interval_title(title, "bootstrap over concepts and questions" if by_question
                              else "bootstrap over concepts (no interval for one concept)"))


# --------------------------------------------------------------------------------------------------------------------
# Showing a chart in the book: local JavaScript, static SVG beside the page
# --------------------------------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------------------------------
# The mechanics chapter: one question's answer tokens
# --------------------------------------------------------------------------------------------------------------------
def token_probabilities(table: pd.DataFrame, title: str = "Probability of each token of the vanilla answer"
                        ) -> alt.Chart:
    """Grouped bars: for each answer token (in order), the probability each run gives it.

    `table`: lab.token_table() (columns run, position, token, probability). A run named after the vanilla model, a
    method or an experiment takes its label and colour ("coef" reads "MLP coefficients restored"); others keep their
    name. One question, no interval: the bars are the exact probabilities.
    """
    require_columns(table, ["run", "position", "token", "probability"], "token_probabilities", allow_empty=False)
    labels = {**method_labels(), **{k: f"{v} restored" for k, v in experiment_labels().items()}}
    colours = {**method_colours(), **experiment_colours()}
    runs = list(dict.fromkeys(table["run"]))
    shown = [labels.get(r, r) for r in runs]
    domain, rng = _palette(runs, colours)
    scale = alt.Scale(domain=[labels.get(r, r) for r in domain], range=rng)
    data = table.assign(run=table["run"].map(lambda r: labels.get(r, r)),
                        slot=table["position"].astype(int).astype(str) + ": " + table["token"].map(repr))
    order = list(dict.fromkeys(data.sort_values("position")["slot"]))
    return alt.Chart(data, title=title).mark_bar().encode(
        x=alt.X("slot:N", title="answer token (position: text)", sort=order, axis=alt.Axis(labelAngle=-45)),
        xOffset=alt.XOffset("run:N", sort=shown),
        y=alt.Y("probability:Q", title="probability of the vanilla token", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("run:N", title=None, scale=scale, sort=shown, legend=alt.Legend(orient="bottom")),
        tooltip=[alt.Tooltip("run:N"), alt.Tooltip("position:Q"), alt.Tooltip("token:N"),
                 alt.Tooltip("probability:Q", format=".3f")],
    ).properties(width=alt.Step(max(6, 40 // max(1, len(runs)))), height=220)


def javascript_bundle() -> str:
    """vega + vega-lite + vega-embed in one script that sets window.vegaEmbed (vl-convert builds it offline)."""
    import vl_convert

    # In a function scope: the bundle's top-level names (`_`, ...) would clash with Sphinx's own globals.
    return "(function () {\n" + vl_convert.javascript_bundle(vl_version=VEGALITE_VERSION) + "\n})();\n"


def to_svg(chart) -> str:
    """A static SVG of the chart's initial state, drawn without any network access."""
    import vl_convert

    spec = chart.to_dict() if hasattr(chart, "to_dict") else chart
    return vl_convert.vegalite_to_svg(spec, vl_version=VEGALITE_VERSION, allowed_base_urls=[])


def chart_html(chart, name: str, image_url: str | None = None) -> str:
    """HTML that draws `chart` with the page's vegaEmbed (served by the book) into an SVG.

    Deterministic (the element id derives from the spec), so re-executing an unchanged chapter gives the same page.
    When `image_url` is given, readers without JavaScript get that static image instead.
    """
    spec = chart.to_dict() if hasattr(chart, "to_dict") else chart
    spec_json = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    uid = "dissect-chart-" + hashlib.sha256((name + spec_json).encode()).hexdigest()[:12]
    # "</" cannot appear inside a <script> element.
    spec_js = spec_json.replace("</", "<\\/")
    opts = json.dumps({"renderer": "svg", "actions": {"export": True, "source": False, "compiled": False,
                                                      "editor": False}})
    img = ""
    fallback = "'<p>This chart needs the Vega bundle that the book serves; it is missing on this page.</p>'"
    if image_url:
        alt_text = html.escape(_title_of(spec) or name, quote=True)
        url = html.escape(image_url, quote=True)
        img = (f'<noscript><img src="{url}" alt="{alt_text}"></noscript>'
               f'<p class="dissect-chart-static"><a href="{url}">static image (SVG)</a></p>')
        fallback = json.dumps(f'<img src="{image_url}" alt="{_title_of(spec) or name}">')
    return (
        f'<div class="dissect-chart" data-chart="{html.escape(name, quote=True)}">'
        f'<div id="{uid}" class="dissect-chart-view"></div>{img}</div>\n'
        f"<script type=\"text/javascript\">(function () {{\n"
        f"  var el = document.getElementById({json.dumps(uid)});\n"
        f"  var spec = {spec_js};\n"
        f"  if (typeof window.vegaEmbed !== 'function') {{ el.innerHTML = {fallback}; return; }}\n"
        f"  window.vegaEmbed(el, spec, {opts}).catch(function (err) {{ console.error(err); }});\n"
        f"}})();</script>"
    )


def _title_of(spec: dict) -> str | None:
    t = spec.get("title")
    if isinstance(t, dict):
        t = t.get("text")
    if isinstance(t, list):
        t = " ".join(map(str, t))
    return t


def figure_folder() -> Path:
    """Where show() saves static images: $DISSECT_UNLEARNING_FIGURES (set by the book build), else ./figures."""
    return Path(os.environ.get(FIGURES_ENV) or "figures")


def show(chart, name: str) -> None:
    """Display `chart` in the running notebook (book-ready HTML) and save its static image `<figures>/<name>.svg`.

    Returns None, so that a notebook cell ending with show() displays nothing else.

    `name` is the file name of the static image: letters, digits, '-' and '_'.
    """
    from IPython.display import HTML, display

    if not name or not all(ch.isalnum() or ch in "-_" for ch in name):
        raise ValueError(f"plots.show: chart name {name!r} must be non-empty letters, digits, '-' or '_'")
    folder = figure_folder()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.svg"
    path.write_text(to_svg(chart), encoding="utf-8")
    display(HTML(chart_html(chart, name, image_url=f"{folder.as_posix()}/{name}.svg")))
