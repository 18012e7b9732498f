"""Does the paper's claim hold on this run? Checks computed from tidy tables only.

Each check returns a `Verdict`: the claim in words, `holds` (True / False, or None when the table cannot decide),
the numbers it rests on (`evidence`), and a sentence for the page. Thresholds are arguments with the paper's
wording as defaults, so a reader can see (and change) exactly what "recovers little" means.

KRS averages follow the paper: per question, then over the questions of a (method, concept) pair, then over the
pairs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from .patching import experiments as experiments_mod, sites as sites_mod
from .tables import require_columns


@dataclass(frozen=True)
class Verdict:
    claim: str
    holds: bool | None
    evidence: dict = field(default_factory=dict)
    sentence: str = ""

    @property
    def answer(self) -> str:
        """'yes', 'no' or 'undecided' - for the page."""
        return {True: "yes", False: "no", None: "undecided"}[self.holds]

    def _repr_markdown_(self) -> str:
        return f"**{self.claim}** - {self.answer}. {self.sentence}"


SPLIT_WORDS = {"target": "the target questions", "unrelated": "the unrelated questions",
               "completion": "text completion", "forget_text": "the forget text", "heldout_text": "held-out text"}
METRIC_WORDS = {"rougeL": "ROUGE-L", "bleu": "BLEU", "accuracy": "accuracy", "perplexity": "perplexity"}


def _split(split: str) -> str:
    return SPLIT_WORDS.get(split, split)


def _metric(metric: str) -> str:
    return METRIC_WORDS.get(metric, metric)


def _what(name: str) -> str:
    """How an experiment, or a quantity of a change table (a site or a parameter set), reads in a sentence
    ("restoring the MLP coefficients recovers ..."); another name as it is."""
    if name in experiments_mod.EXPERIMENTS:
        return experiments_mod.EXPERIMENTS[name].in_words
    entry = sites_mod.SITES.get(name) or experiments_mod.PARAMETER_SETS.get(name)
    return entry.phrase if entry else name


def _layers_text(layers) -> str:
    layers = sorted(int(x) for x in layers)
    return f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"


# --------------------------------------------------------------------------------------------------------------------
# KRS tables
# --------------------------------------------------------------------------------------------------------------------
def mean_krs(sweep: pd.DataFrame, experiment: str | None = None) -> pd.DataFrame:
    """Mean KRS per (experiment, center_layer): questions -> (method, concept) pairs -> mean over pairs.

    Columns: experiment, center_layer, layers (the window, a tuple), window (the same as text), krs, pairs.
    """
    require_columns(sweep, ["experiment", "center_layer", "layers", "krs"], "mean_krs")
    df = sweep if experiment is None else sweep[sweep["experiment"] == experiment]
    if df.empty:
        have = ", ".join(map(str, sweep["experiment"].unique()))
        raise ValueError(f"mean_krs: no rows for experiment {experiment!r}; the table has: {have}")
    groups = [c for c in ("method", "concept") if c in df.columns]
    df = df.assign(layers=df["layers"].map(lambda x: tuple(int(v) for v in x)))
    per_pair = df.groupby(groups + ["experiment", "center_layer", "layers"], sort=False, dropna=False)["krs"].mean()
    per_pair = per_pair.reset_index()
    out = (per_pair.groupby(["experiment", "center_layer", "layers"], sort=False)["krs"]
           .agg(krs="mean", pairs="size").reset_index())
    out.insert(3, "window", out["layers"].map(lambda ls: _layers_text(ls)))
    return out.sort_values(["experiment", "center_layer"], ignore_index=True)


def _last_layer(sweep: pd.DataFrame, n_layers: int | None) -> int:
    if n_layers is not None:
        return int(n_layers) - 1
    return int(max(max(int(v) for v in layers) for layers in sweep["layers"]))


def best_window_contains_last_layer(sweep: pd.DataFrame, experiment: str = "coef",
                                    n_layers: int | None = None) -> Verdict:
    """The window whose restoration recovers most (highest mean KRS) includes the model's last layer.

    `n_layers`: the model's layer count; by default the highest layer in the table (right when the sweep covered
    the last layer, which a full sweep does).
    """
    table = mean_krs(sweep, experiment)
    last = _last_layer(sweep, n_layers)
    best = table.loc[table["krs"].idxmax()]
    holds = last in best["layers"]
    claim = f"The best window for restoring {_what(experiment)} contains the last layer"
    evidence = {"best_center_layer": int(best["center_layer"]), "best_krs": float(best["krs"]),
                "last_layer": last, "best_window": _layers_text(best["layers"])}
    verb = "contains" if holds else "does not contain"
    sentence = (f"{'Yes' if holds else 'No'}: restoring {_what(experiment)} recovers most at the window centred on "
                f"layer {int(best['center_layer'])} ({_layers_text(best['layers'])}, mean KRS {best['krs']:.2f}), which "
                f"{verb} the last layer ({last}).")
    return Verdict(claim, bool(holds), evidence, sentence)


def krs_below_everywhere(sweep: pd.DataFrame, experiment: str = "value", threshold: float = 0.1) -> Verdict:
    """Restoring `experiment` recovers little: mean KRS below `threshold` at every window."""
    table = mean_krs(sweep, experiment)
    worst = table.loc[table["krs"].idxmax()]
    holds = bool((table["krs"] < threshold).all())
    claim = f"Restoring {_what(experiment)} recovers little (KRS below {threshold:g} at every window)"
    evidence = {"max_krs": float(worst["krs"]), "max_center_layer": int(worst["center_layer"]),
                "mean_krs": float(table["krs"].mean()), "threshold": threshold,
                "windows_above": int((table["krs"] >= threshold).sum()), "windows": int(len(table))}
    if holds:
        sentence = (f"Yes: the highest mean KRS of any window is {worst['krs']:.3f} (centred on layer "
                    f"{int(worst['center_layer'])}), below {threshold:g} at all {len(table)} windows.")
    else:
        sentence = (f"No: {evidence['windows_above']} of {len(table)} windows reach a mean KRS of {threshold:g} or "
                    f"more; the highest is {worst['krs']:.3f} (centred on layer {int(worst['center_layer'])}).")
    return Verdict(claim, holds, evidence, sentence)


def best_krs_above(sweep: pd.DataFrame, experiment: str = "coef+attn", threshold: float = 0.9) -> Verdict:
    """Restoring `experiment` at its best window recovers at least `threshold` of the vanilla output."""
    table = mean_krs(sweep, experiment)
    best = table.loc[table["krs"].idxmax()]
    holds = bool(best["krs"] >= threshold)
    claim = f"Restoring {_what(experiment)} at the best window recovers {threshold:g} or more"
    evidence = {"best_krs": float(best["krs"]), "best_center_layer": int(best["center_layer"]),
                "best_window": _layers_text(best["layers"]), "threshold": threshold}
    sentence = (f"{'Yes' if holds else 'No'}: the best window ({_layers_text(best['layers'])}) reaches a mean KRS "
                f"of {best['krs']:.2f}, {'at or above' if holds else 'below'} {threshold:g}.")
    return Verdict(claim, holds, evidence, sentence)


def share_of_best(part: pd.DataFrame, whole: pd.DataFrame, experiment: str = "coef",
                  min_share: float = 0.5) -> Verdict:
    """Restoring `experiment` in one chosen window (`part`, e.g. the last layer alone) recovers at least `min_share`
    of what the best window of the full sweep (`whole`) recovers."""
    p = mean_krs(part, experiment)
    w = mean_krs(whole, experiment)
    best_part = p.loc[p["krs"].idxmax()]
    best_whole = w.loc[w["krs"].idxmax()]
    share = float(best_part["krs"] / best_whole["krs"]) if best_whole["krs"] > 0 else float("nan")
    holds = bool(share >= min_share)
    claim = (f"Restoring {_what(experiment)} in {_layers_text(best_part['layers'])} alone recovers {min_share:.0%} or "
             f"more of the best window's recovery")
    evidence = {"part_krs": float(best_part["krs"]), "best_krs": float(best_whole["krs"]), "share": share,
                "part_window": _layers_text(best_part["layers"]), "best_window": _layers_text(best_whole["layers"])}
    sentence = (f"{'Yes' if holds else 'No'}: {_what(experiment)} of {_layers_text(best_part['layers'])} alone "
                f"reach a mean KRS of "
                f"{best_part['krs']:.2f}, {share:.0%} of the {best_whole['krs']:.2f} of the best window "
                f"({_layers_text(best_whole['layers'])}).")
    return Verdict(claim, holds, evidence, sentence)


def stronger_than(sweep: pd.DataFrame, experiment: str = "coef", other: str = "attn") -> Verdict:
    """At its best window, restoring `experiment` recovers more than restoring `other` does at its best window."""
    a = mean_krs(sweep, experiment)
    b = mean_krs(sweep, other)
    best_a, best_b = float(a["krs"].max()), float(b["krs"].max())
    holds = best_a > best_b
    claim = f"Restoring {_what(experiment)} recovers more than restoring {_what(other)}"
    evidence = {f"best_krs_{experiment}": best_a, f"best_krs_{other}": best_b, "difference": best_a - best_b}
    sentence = (f"{'Yes' if holds else 'No'}: at its best window, restoring {_what(experiment)} reaches a mean KRS "
                f"of {best_a:.2f}, against {best_b:.2f} for {_what(other)}.")
    return Verdict(claim, holds, evidence, sentence)


def largest_change_in_last_layers(change: pd.DataFrame, quantity: str = "coef", last: int = 3,
                                  value: str = "rel_change") -> Verdict:
    """Unlearning changed `quantity` most in the model's last `last` layers (mean over methods and concepts)."""
    require_columns(change, ["layer", "quantity", value], "largest_change_in_last_layers")
    df = change[change["quantity"] == quantity]
    if df.empty:
        raise ValueError(f"largest_change_in_last_layers: no rows for quantity {quantity!r}")
    groups = [c for c in ("method", "concept") if c in df.columns]
    per_layer = df.groupby(groups + ["layer"])[value].mean().groupby("layer").mean()
    top = int(per_layer.idxmax())
    n_layers = int(per_layer.index.max()) + 1
    holds = top >= n_layers - last
    claim = f"Unlearning changes {_what(quantity)} of the last {last} layers most"
    evidence = {"top_layer": top, "top_change": float(per_layer.max()), "last_layer": n_layers - 1,
                "last_layer_change": float(per_layer.loc[n_layers - 1]), "median_change": float(per_layer.median())}
    sentence = (f"{'Yes' if holds else 'No'}: the largest mean relative change of {_what(quantity)} is at layer {top} "
                f"({per_layer.max():.3g}; the median layer changes by {per_layer.median():.3g}), "
                f"{'within' if holds else 'outside'} the last {last} layers ({n_layers - last}-{n_layers - 1}).")
    return Verdict(claim, bool(holds), evidence, sentence)


# --------------------------------------------------------------------------------------------------------------------
# Behaviour tables (pipeline.behaviour)
# --------------------------------------------------------------------------------------------------------------------
def _stage_means(behaviour: pd.DataFrame, split: str, metric: str) -> pd.DataFrame:
    """Per method: mean vanilla and unlearned score on `split` / `metric` (concept means, then mean over concepts)."""
    require_columns(behaviour, ["concept", "method", "stage", "split", "metric", "value"], "behaviour verdict")
    df = behaviour[(behaviour["split"] == split) & (behaviour["metric"] == metric)]
    van = df[df["stage"] == "vanilla"].groupby("concept")["value"].mean()
    unl = df[df["stage"] == "unlearned"].groupby(["method", "concept"])["value"].mean().reset_index()
    if van.empty or unl.empty:
        raise ValueError(f"behaviour verdict: the table has no vanilla and unlearned rows for split {split!r}, "
                         f"metric {metric!r}")
    unl["vanilla"] = unl["concept"].map(van)
    out = unl.groupby("method", sort=False)[["vanilla", "value"]].mean().rename(columns={"value": "unlearned"})
    out["drop"] = out["vanilla"] - out["unlearned"]
    out["relative_drop"] = out["drop"] / out["vanilla"].where(out["vanilla"] != 0)
    return out


def forgets_target(behaviour: pd.DataFrame, metric: str = "rougeL", min_relative_drop: float = 0.5) -> Verdict:
    """Every method lowers the target-question score by at least `min_relative_drop` of its vanilla value."""
    t = _stage_means(behaviour, "target", metric)
    holds = bool((t["relative_drop"] >= min_relative_drop).all())
    claim = (f"Unlearning lowers the {_metric(metric)} of the target answers by {min_relative_drop:.0%} or more, "
             f"for every method")
    evidence = {f"{m}_relative_drop": float(r["relative_drop"]) for m, r in t.iterrows()}
    evidence.update({f"{m}_unlearned": float(r["unlearned"]) for m, r in t.iterrows()})
    evidence["vanilla"] = float(t["vanilla"].mean())
    parts = ", ".join(f"{m} {r['vanilla']:.2f} -> {r['unlearned']:.2f} ({r['relative_drop']:.0%} lower)"
                      for m, r in t.iterrows())
    sentence = f"{'Yes' if holds else 'No'}: {_metric(metric)} on {_split('target')}: {parts}."
    return Verdict(claim, holds, evidence, sentence)


def side_effects(behaviour: pd.DataFrame, split: str = "unrelated", metric: str = "rougeL",
                 min_relative_drop: float = 0.1) -> Verdict:
    """Unlearning one concept also lowers the score on `split` (unrelated knowledge) by `min_relative_drop` or more,
    for at least one method - the paper's "global" side effect."""
    t = _stage_means(behaviour, split, metric)
    holds = bool((t["relative_drop"] >= min_relative_drop).any())
    claim = (f"Unlearning also lowers the {_metric(metric)} on {_split(split)} by {min_relative_drop:.0%} or more "
             f"(for some method)")
    evidence = {f"{m}_relative_drop": float(r["relative_drop"]) for m, r in t.iterrows()}
    parts = ", ".join(f"{m} {r['vanilla']:.2f} -> {r['unlearned']:.2f} ({r['relative_drop']:.0%} lower)"
                      for m, r in t.iterrows())
    sentence = f"{'Yes' if holds else 'No'}: {_metric(metric)} on {_split(split)}: {parts}."
    return Verdict(claim, holds, evidence, sentence)


def perplexity_rises(behaviour: pd.DataFrame, split: str = "heldout_text", min_ratio: float = 1.05) -> Verdict:
    """Unlearning raises perplexity on general text (`split`) by a factor of `min_ratio` or more, for some method."""
    t = _stage_means(behaviour, split, "perplexity")
    ratio = t["unlearned"] / t["vanilla"]
    holds = bool((ratio >= min_ratio).any())
    claim = f"Unlearning raises perplexity on {_split(split)} by a factor of {min_ratio:g} or more (for some method)"
    evidence = {f"{m}_ratio": float(r) for m, r in ratio.items()}
    parts = ", ".join(f"{m} {t.loc[m, 'vanilla']:.1f} -> {t.loc[m, 'unlearned']:.1f} (x{ratio[m]:.2f})"
                      for m in t.index)
    sentence = f"{'Yes' if holds else 'No'}: perplexity on {_split(split)}: {parts}."
    return Verdict(claim, holds, evidence, sentence)


# --------------------------------------------------------------------------------------------------------------------
# Relearning table (pipeline.relearn)
# --------------------------------------------------------------------------------------------------------------------
def relearning_recovers(relearn: pd.DataFrame, data: str = "unrelated", min_recovered: float = 0.5,
                        metric: str = "rougeL", vanilla: float = 1.0) -> Verdict:
    """A few relearning steps on `data` win back at least `min_recovered` of what unlearning removed, for every
    method: (score after the last step - unlearned score) / (vanilla - unlearned score), concept means averaged per
    method. `vanilla` is the vanilla model's score (ROUGE-L of the vanilla answer against itself: 1)."""
    require_columns(relearn, ["method", "concept", "data", "step", "metric", "value"], "relearning_recovers")
    df = relearn[(relearn["data"] == data) & (relearn["metric"] == metric)]
    claim = (f"A few fine-tuning steps on {data} data win back {min_recovered:.0%} or more of the forgotten "
             f"{_metric(metric)}, for every method")
    if df.empty:
        return Verdict(claim, None, {}, f"Undecided: no relearning rows for data {data!r} and metric {metric!r}.")
    first, last = int(df["step"].min()), int(df["step"].max())
    per = df[df["step"].isin([first, last])].pivot_table(index=["method", "concept"], columns="step",
                                                         values="value", aggfunc="mean")
    t = per.groupby("method", sort=False).mean()
    removed = vanilla - t[first]
    recovered = (t[last] - t[first]) / removed.where(removed > 0)
    if recovered.isna().all():
        return Verdict(claim, None, {}, "Undecided: unlearning removed nothing to win back.")
    holds = bool((recovered.dropna() >= min_recovered).all())
    evidence = {"steps": last, **{f"{m}_recovered": float(r) for m, r in recovered.items()},
                **{f"{m}_unlearned": float(t.loc[m, first]) for m in t.index},
                **{f"{m}_relearned": float(t.loc[m, last]) for m in t.index}}
    parts = ", ".join(f"{m} {t.loc[m, first]:.2f} -> {t.loc[m, last]:.2f} ({recovered[m]:.0%} of the gap)"
                      for m in t.index)
    sentence = (f"{'Yes' if holds else 'No'}: {_metric(metric)} of the target answers after {last} steps on "
                f"{data} data: {parts}.")
    return Verdict(claim, holds, evidence, sentence)


# --------------------------------------------------------------------------------------------------------------------
# Answers table (pipeline.answers)
# --------------------------------------------------------------------------------------------------------------------
def model_knows_concepts(answers: pd.DataFrame, min_accuracy: float = 0.5) -> Verdict:
    """The vanilla model knows each concept: at least `min_accuracy` of its target questions are answered with an
    expected answer. Undecided when the concept set gives no expected answers."""
    require_columns(answers, ["concept", "kind", "correct"], "model_knows_concepts")
    target = answers[(answers["kind"] == "target") & answers["correct"].notna()]
    claim = f"The vanilla model knows every concept (accuracy {min_accuracy:.0%} or more)"
    if target.empty:
        return Verdict(claim, None, {}, "Undecided: the concept set gives no expected answers to check against.")
    acc = target.assign(correct=target["correct"].astype(bool)).groupby("concept", sort=False)["correct"].mean()
    known = acc[acc >= min_accuracy]
    holds = len(known) == len(acc)
    evidence = {"concepts": int(len(acc)), "known": int(len(known)), "mean_accuracy": float(acc.mean()),
                "min_accuracy": float(acc.min()), "questions": int(len(target))}
    weakest = acc.idxmin()
    sentence = (f"{'Yes' if holds else 'No'}: {len(known)} of {len(acc)} concepts reach {min_accuracy:.0%}; mean "
                f"accuracy {acc.mean():.0%} over {len(target)} questions (lowest: {weakest}, {acc.min():.0%}).")
    return Verdict(claim, holds, evidence, sentence)
