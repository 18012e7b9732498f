"""Altair charts from tidy tables, and how they are shown in the book without a network.

Every chart function takes a tidy DataFrame (the documented columns of a pipeline stage), checks the columns it needs,
and returns an `alt.Chart`; it never touches a model. `show(chart, name)` displays a chart in a notebook as HTML that
draws with the Vega JavaScript the book serves from its own `_static/` folder (see `javascript_bundle`), and saves a
static SVG beside the page for print and for readers without JavaScript.

Colours and labels of methods and experiments come from their registries (unlearning.methods,
patching.experiments), so "DPO" is the same red in every chapter; a name outside them (a chapter's derived series,
e.g. "last layer only") keeps its name as label and gets a spare colour.
"""
from __future__ import annotations

import hashlib
import html
import json
import os
from pathlib import Path

import altair as alt
import pandas as pd

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


def _window_text(layers) -> str:
    layers = [int(x) for x in layers]
    return f"{min(layers)}-{max(layers)}" if len(layers) > 1 else str(layers[0])


# --------------------------------------------------------------------------------------------------------------------
# Chapter 2: what the vanilla model knows
# --------------------------------------------------------------------------------------------------------------------
def accuracy_by_concept(answers: pd.DataFrame) -> alt.Chart:
    """Bar per concept: share of its target questions whose greedy answer contains an expected answer.

    `answers`: pipeline.answers() table (columns concept, kind, correct). Rows without expected answers are skipped.
    """
    require_columns(answers, ["concept", "kind", "correct"], "accuracy_by_concept", allow_empty=False)
    target = answers[(answers["kind"] == "target") & answers["correct"].notna()]
    if target.empty:
        raise ValueError("accuracy_by_concept: no target question has expected answers (concept field QA_answers)")
    acc = (target.assign(correct=target["correct"].astype(bool))
           .groupby("concept", sort=False)["correct"].agg(correct="sum", questions="count").reset_index())
    acc["accuracy"] = acc["correct"] / acc["questions"]
    return alt.Chart(acc, title="What the vanilla model knows: accuracy per concept").mark_bar().encode(
        x=alt.X("accuracy:Q", title="share of target questions answered with an expected answer",
                scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
        y=alt.Y("concept:N", title=None, sort="-x"),
        color=alt.value(VANILLA_COLOUR),
        tooltip=[alt.Tooltip("concept:N"), alt.Tooltip("accuracy:Q", format=".0%"),
                 alt.Tooltip("correct:Q", title="answered"), alt.Tooltip("questions:Q")],
    ).properties(width=440, height=alt.Step(22))


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
    """Slope chart: each method's mean score before (vanilla) and after unlearning, one panel per split.

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
    # Mean over questions/texts per (concept, method, stage, split, metric); the chart averages concepts.
    df = (df.groupby(["concept", "method", "stage", "split", "metric"], sort=False)["value"].mean().reset_index())
    df["stage_order"] = (df["stage"] != "vanilla").astype(int)
    df["split_label"] = df["split"].map(lambda s: SPLIT_LABELS.get(s, s))
    df["method_label"] = df["method"].map(method_label)
    metrics_present = list(dict.fromkeys(df["metric"]))
    first = "rougeL" if "rougeL" in metrics_present else metrics_present[0]
    concepts = list(dict.fromkeys(df["concept"]))
    base = alt.Chart(df)
    params = []
    if len(metrics_present) > 1:
        params.append(alt.param(name="pick_metric", value=first, bind=alt.binding_select(
            options=metrics_present, labels=[METRIC_LABELS.get(m, m) for m in metrics_present], name="metric ")))
        base = base.transform_filter("datum.metric == pick_metric")
    if len(concepts) > 1:
        concept_pick = _dropdown("concept", concepts, "concept ", "all concepts (mean)")
        base = base.transform_filter("pick_concept == null || datum.concept == pick_concept")
        params.append(concept_pick)
    base = base.transform_aggregate(
        value="mean(value)", concepts="distinct(concept)",
        groupby=["method", "method_label", "stage", "stage_order", "split", "split_label"],
    )
    y_title = (METRIC_LABELS.get(metrics_present[0], metrics_present[0]) if len(metrics_present) == 1
               else "mean score (metric chosen below)")
    enc = dict(
        x=alt.X("stage:N", title=None, sort=["vanilla", "unlearned"], axis=alt.Axis(labelAngle=0)),
        y=alt.Y("value:Q", title=y_title),
        color=alt.Color("method:N", scale=method_scale(df["method"]), title="method",
                        legend=alt.Legend(labelExpr=_label_expr(method_labels()), orient="bottom", columns=3)),
        detail="method:N",
        tooltip=[alt.Tooltip("method_label:N", title="method"), alt.Tooltip("split_label:N", title="split"),
                 alt.Tooltip("stage:N"), alt.Tooltip("value:Q", title="mean", format=".3f"),
                 alt.Tooltip("concepts:Q", title="concepts averaged")],
    )
    lines = base.mark_line(point=alt.OverlayMarkDef(size=70, filled=True)).encode(**enc)
    lines = lines.add_params(*params) if params else lines
    return lines.properties(width=220, height=260).facet(
        column=alt.Column("split_label:N", title=None, sort=[SPLIT_LABELS.get(s, s) for s in splits]),
        title=title,
    ).resolve_scale(y="independent")


def _label_expr(labels: dict) -> str:
    """A Vega expression that maps legend values to readable labels."""
    parts = [f"datum.label == {json.dumps(k)} ? {json.dumps(v)}" for k, v in labels.items()]
    return " : ".join(parts + ["datum.label"])


def loss_curves(curves: pd.DataFrame) -> alt.Chart:
    """Training curves of the unlearning runs: forget and retain loss per step, coloured by method.

    `curves`: concatenated Unlearned.loss_curve tables with columns method, concept, step, forget_loss, retain_loss.
    """
    require_columns(curves, ["method", "concept", "step", "forget_loss", "retain_loss"], "loss_curves",
                    allow_empty=False)
    long = curves.melt(id_vars=["method", "concept", "step"], value_vars=["forget_loss", "retain_loss"],
                       var_name="loss", value_name="value").dropna(subset=["value"])
    long["loss"] = long["loss"].map({"forget_loss": "forget set", "retain_loss": "retain set"})
    long["method_label"] = long["method"].map(method_label)
    concepts = list(dict.fromkeys(long["concept"]))
    chart = alt.Chart(long)
    params = []
    if len(concepts) > 1:
        params.append(_dropdown("concept", concepts, "concept ", "all concepts (mean)"))
        chart = chart.transform_filter("pick_concept == null || datum.concept == pick_concept")
    chart = chart.transform_aggregate(value="mean(value)", groupby=["method", "method_label", "loss", "step"])
    chart = chart.mark_line(point=True).encode(
        x=alt.X("step:Q", title="optimiser step"),
        y=alt.Y("value:Q", title="loss (nats per token)"),
        color=alt.Color("method:N", scale=method_scale(long["method"]), title="method",
                        legend=alt.Legend(labelExpr=_label_expr(method_labels()), orient="bottom", columns=3)),
        strokeDash=alt.StrokeDash("loss:N", title="data", legend=alt.Legend(orient="bottom")),
        tooltip=[alt.Tooltip("method_label:N", title="method"), alt.Tooltip("loss:N", title="data"),
                 alt.Tooltip("step:Q"), alt.Tooltip("value:Q", title="loss", format=".3f")],
    ).properties(width=460, height=240, title="Unlearning runs: loss on the forget and retain data")
    return chart.add_params(*params) if params else chart


# --------------------------------------------------------------------------------------------------------------------
# Chapters 4-7: knowledge recovery by window
# --------------------------------------------------------------------------------------------------------------------
def krs_by_window(sweep: pd.DataFrame, experiments=None, title: str = "Knowledge recovered by patching",
                  y_title: str = "Knowledge Recovery Score (1 = vanilla output restored)") -> alt.Chart:
    """KRS against the centre layer of the patched window, one line per experiment.

    `sweep`: pipeline.sweep() rows (experiment, center_layer, layers, question_index, krs), concatenated over
    concepts and methods with columns `concept` and `method`. KRS is averaged over the questions of each
    (method, concept), then - in the browser - over the methods and concepts picked in the drop-downs.
    """
    require_columns(sweep, ["experiment", "center_layer", "layers", "krs", "method", "concept"], "krs_by_window",
                    allow_empty=False)
    df = sweep if experiments is None else sweep[sweep["experiment"].isin(list(experiments))]
    if df.empty:
        raise ValueError(f"krs_by_window: no rows for experiments {list(experiments)}; the table has "
                         f"{', '.join(map(str, sweep['experiment'].unique()))}")
    df = df.assign(window=df["layers"].map(_window_text))
    df = (df.groupby(["method", "concept", "experiment", "center_layer", "window"], sort=False)
          .agg(krs=("krs", "mean"), questions=("krs", "size")).reset_index())
    df["experiment_label"] = df["experiment"].map(experiment_label)
    chart = alt.Chart(df)
    params = []
    for field, label, all_label in (("method", "method ", "all methods (mean)"),
                                    ("concept", "concept ", "all concepts (mean)")):
        values = list(dict.fromkeys(df[field]))
        if len(values) > 1:
            params.append(_dropdown(field, values, label, all_label))
            chart = chart.transform_filter(f"pick_{field} == null || datum.{field} == pick_{field}")
    chart = chart.transform_aggregate(
        krs="mean(krs)", pairs="count()", groupby=["experiment", "experiment_label", "center_layer", "window"],
    )
    order = [e for e in experiment_colours() if e in set(df["experiment"])]
    chart = chart.mark_line(point=alt.OverlayMarkDef(size=45, filled=True)).encode(
        x=alt.X("center_layer:Q", title="centre layer of the patched window", axis=alt.Axis(tickMinStep=1)),
        y=alt.Y("krs:Q", title=y_title),
        color=alt.Color("experiment:N", scale=experiment_scale(df["experiment"]), sort=order, title="restored",
                        legend=alt.Legend(labelExpr=_label_expr(experiment_labels()), orient="bottom", columns=3)),
        tooltip=[alt.Tooltip("experiment_label:N", title="restored"), alt.Tooltip("window:N", title="layers"),
                 alt.Tooltip("krs:Q", title="mean KRS", format=".3f"),
                 alt.Tooltip("pairs:Q", title="(method, concept) pairs averaged")],
    ).properties(width=460, height=280, title=title)
    zero = alt.Chart(pd.DataFrame({"y": [0.0]})).mark_rule(color="#999", strokeDash=[3, 3]).encode(y="y:Q")
    layered = alt.layer(chart, zero)
    return layered.add_params(*params) if params else layered


def change_by_layer(change: pd.DataFrame, quantities=("coef",), value: str = "rel_change",
                    title: str = "How much unlearning changed each layer") -> alt.Chart:
    """Per layer, the relative change ||unlearned - vanilla|| / ||vanilla|| of a quantity, one line per method.

    `change`: pipeline.coef_change() rows (layer, quantity, rel_change, concept) concatenated over methods with a
    `method` column. With several `quantities`, a drop-down picks one.
    """
    require_columns(change, ["method", "concept", "layer", "quantity", value], "change_by_layer", allow_empty=False)
    df = change[change["quantity"].isin(list(quantities))]
    if df.empty:
        raise ValueError(f"change_by_layer: no rows for quantities {list(quantities)}; the table has "
                         f"{', '.join(map(str, change['quantity'].unique()))}")
    df = df.groupby(["method", "concept", "quantity", "layer"], sort=False)[value].mean().reset_index()
    df["method_label"] = df["method"].map(method_label)
    df["quantity_label"] = df["quantity"].map(lambda q: quantity_label(q))
    chart = alt.Chart(df)
    params = []
    present = list(dict.fromkeys(df["quantity"]))
    if len(present) > 1:
        params.append(alt.param(name="pick_quantity", value=present[0], bind=alt.binding_select(
            options=present, labels=[quantity_label(q) for q in present], name="quantity ")))
        chart = chart.transform_filter("datum.quantity == pick_quantity")
    concepts = list(dict.fromkeys(df["concept"]))
    if len(concepts) > 1:
        params.append(_dropdown("concept", concepts, "concept ", "all concepts (mean)"))
        chart = chart.transform_filter("pick_concept == null || datum.concept == pick_concept")
    chart = chart.transform_aggregate(v=f"mean({value})",
                                      groupby=["method", "method_label", "quantity_label", "layer"])
    y_title = "relative change ||unlearned - vanilla|| / ||vanilla||"
    if len(present) == 1:
        y_title = f"{quantity_label(present[0])}: relative change"
    chart = chart.mark_line(point=True).encode(
        x=alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1)),
        y=alt.Y("v:Q", title=y_title),
        color=alt.Color("method:N", scale=method_scale(df["method"]), title="method",
                        legend=alt.Legend(labelExpr=_label_expr(method_labels()), orient="bottom", columns=3)),
        tooltip=[alt.Tooltip("method_label:N", title="method"), alt.Tooltip("quantity_label:N", title="quantity"),
                 alt.Tooltip("layer:Q"), alt.Tooltip("v:Q", title="relative change", format=".4f")],
    ).properties(width=460, height=260, title=title)
    return chart.add_params(*params) if params else chart


# --------------------------------------------------------------------------------------------------------------------
# Chapter 8: relearning
# --------------------------------------------------------------------------------------------------------------------
RELEARN_DATA_LABELS = {"unrelated": "text about another concept", "partial": "half of the target questions"}


def relearning_curves(relearn: pd.DataFrame, metric: str = "rougeL",
                      title: str = "Relearning: target answers after k fine-tuning steps") -> alt.Chart:
    """Target-question score against relearning steps (0 = the unlearned model), one line per method and one panel
    per kind of relearning data; a drop-down picks a concept (default: the mean over concepts).

    `relearn`: pipeline.relearn() rows (method, concept, data, step, split, metric, value), concatenated.
    """
    require_columns(relearn, ["method", "concept", "data", "step", "metric", "value"], "relearning_curves",
                    allow_empty=False)
    df = relearn[relearn["metric"] == metric]
    if df.empty:
        raise ValueError(f"relearning_curves: no rows for metric {metric!r}; the table has "
                         f"{', '.join(map(str, relearn['metric'].unique()))}")
    df = df[["method", "concept", "data", "step", "value"]].copy()
    df["method_label"] = df["method"].map(method_label)
    df["data_label"] = df["data"].map(lambda d: RELEARN_DATA_LABELS.get(d, d))
    chart = alt.Chart(df)
    params = []
    concepts = list(dict.fromkeys(df["concept"]))
    if len(concepts) > 1:
        params.append(_dropdown("concept", concepts, "concept ", "all concepts (mean)"))
        chart = chart.transform_filter("pick_concept == null || datum.concept == pick_concept")
    chart = chart.transform_aggregate(v="mean(value)", concepts="count()",
                                      groupby=["method", "method_label", "data_label", "step"])
    chart = chart.mark_line(point=True).encode(
        x=alt.X("step:Q", title="relearning steps (0 = unlearned model)", axis=alt.Axis(tickMinStep=1)),
        y=alt.Y("v:Q", title=f"target questions: {METRIC_LABELS.get(metric, metric)}",
                scale=alt.Scale(domain=[0, 1] if metric in ("rougeL", "bleu", "accuracy") else alt.Undefined)),
        color=alt.Color("method:N", scale=method_scale(df["method"]), title="method",
                        legend=alt.Legend(labelExpr=_label_expr(method_labels()), orient="bottom", columns=3)),
        tooltip=[alt.Tooltip("method_label:N", title="method"), alt.Tooltip("data_label:N", title="relearned on"),
                 alt.Tooltip("step:Q", title="steps"), alt.Tooltip("v:Q", title="score", format=".3f"),
                 alt.Tooltip("concepts:Q", title="concepts averaged")],
    ).properties(width=300, height=240)
    data_kinds = list(dict.fromkeys(df["data_label"]))
    faceted = chart.facet(column=alt.Column("data_label:N", title="relearned on", sort=data_kinds), title=title)
    return faceted.add_params(*params) if params else faceted


# --------------------------------------------------------------------------------------------------------------------
# Showing a chart in the book: local JavaScript, static SVG beside the page
# --------------------------------------------------------------------------------------------------------------------
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
