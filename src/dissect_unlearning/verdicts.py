"""Does the paper's claim hold on this run? Three-way verdicts from tidy tables, decided on 95% intervals.

Each check computes a statistic (an estimate), its 95% interval (uncertainty.py: a seeded hierarchical bootstrap
over (method, concept) pairs and their questions, or over pairs where a table has no question level), and compares
the interval with the claim's threshold:
- holds: the whole interval is on the claim's side of the threshold;
- does not hold: the whole interval is on the other side;
- inconclusive: the interval reaches both sides, or there is nothing to resample (one pair and one question).
A precondition (a fact the setup is built to have, checked anyway) is "met" / "not met" / "inconclusive" instead.

Every verdict carries its `claim` (claims.Claim: the paper's or this book's, where it stands, where the threshold
comes from). The chapters name the claim by its id in the register (`claim="patching_both"`) and the threshold then
defaults to the register's; a check called without one gets an unregistered claim and the call's threshold.

Picking the best window and reading its score on the same questions flatters it (the maximum of noisy means is
biased upwards). So wherever a check picks a best window it splits the questions: the window is chosen on the
even-numbered questions and scored on the odd-numbered ones, and the bootstrap repeats the choice in every resample.

KRS averages follow the paper: per question, then over the questions of a (method, concept) pair, then over the
pairs.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import claims as claims_mod, uncertainty
from .claims import Claim
from .patching import experiments as experiments_mod, sites as sites_mod
from .tables import require_columns

HOLDS, FAILS, UNDECIDED = "holds", "does not hold", "inconclusive"
PRECONDITION_WORDS = {HOLDS: "met", FAILS: "not met", UNDECIDED: "inconclusive"}
PAIRS = ("method", "concept")
QUESTION = "question_index"


@dataclass(frozen=True)
class Verdict:
    claim: Claim
    status: str
    estimate: float = float("nan")
    interval: tuple = (float("nan"), float("nan"))
    evidence: dict = field(default_factory=dict)
    sentence: str = ""
    fmt: str = ".2f"  # how the estimate and its interval read ('.0%' for shares)

    @property
    def holds(self) -> bool | None:
        """True (holds / met), False (does not hold / not met) or None (inconclusive)."""
        return {HOLDS: True, "met": True, FAILS: False, "not met": False}.get(self.status)

    @property
    def answer(self) -> str:
        """The status, for the page (older chapters glued it as the answer)."""
        return self.status

    @property
    def interval_text(self) -> str:
        """'0.71 [0.64, 0.78]' ('0.71, no interval' when nothing could be resampled, 'n/a' without an estimate)."""
        return with_interval(self.estimate, self.interval, self.fmt, ", no interval")

    def _repr_markdown_(self) -> str:
        return f"**{self.claim.question or self.claim.statement}** {self.status}. {self.sentence}"


SPLIT_WORDS = {"target": "the target questions", "unrelated": "the unrelated questions",
               "completion": "text completion", "forget_text": "the forget text", "heldout_text": "held-out text"}
METRIC_WORDS = {"rougeL": "ROUGE-L", "bleu": "BLEU", "accuracy": "accuracy", "perplexity": "perplexity"}
SPLIT_HALF = "chosen on the even-numbered questions, scored on the odd-numbered ones"


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


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _layers_text(layers) -> str:
    layers = sorted(int(x) for x in layers)
    return f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"


# --------------------------------------------------------------------------------------------------------------------
# Deciding, and saying so
# --------------------------------------------------------------------------------------------------------------------
def _finite(*xs) -> bool:
    return all(x is not None and math.isfinite(float(x)) for x in xs)


def with_interval(estimate: float, interval, fmt: str = ".2f", missing: str = " (no interval)") -> str:
    """'0.71 [0.64, 0.78]': an estimate and its 95% interval, as the pages write them; `missing` follows an
    estimate without an interval."""
    lo, hi = interval
    if not _finite(estimate):
        return "n/a"
    if not _finite(lo, hi):
        return f"{estimate:{fmt}}{missing}"
    return f"{estimate:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def _decide(interval, threshold: float, side: str) -> str:
    """The three-way rule. side: 'at least' (claim: >= threshold), 'above' (> threshold), 'below' (< threshold)."""
    lo, hi = interval
    if not _finite(lo, hi):
        return UNDECIDED
    if side == "at least":
        return HOLDS if lo >= threshold else FAILS if hi < threshold else UNDECIDED
    if side == "above":
        return HOLDS if lo > threshold else FAILS if hi <= threshold else UNDECIDED
    if side == "below":
        return HOLDS if hi < threshold else FAILS if lo >= threshold else UNDECIDED
    raise ValueError(f"_decide: side must be 'at least', 'above' or 'below', not {side!r}")


def _against(status: str, interval, threshold: float, side: str, fmt: str = "g") -> str:
    """'entirely at or above 0.9', 'entirely below 0.9', 'on both sides of 0.9', 'no interval to compare with 0.9'."""
    t = f"{threshold:{fmt}}"
    if status == HOLDS:
        return {"at least": f"entirely at or above {t}", "above": f"entirely above {t}",
                "below": f"entirely below {t}"}[side]
    if status == FAILS:
        return {"at least": f"entirely below {t}", "above": f"entirely at or below {t}",
                "below": f"entirely at or above {t}"}[side]
    return f"on both sides of {t}" if _finite(*interval) else f"with no interval to compare with {t}"


def _verdict(claim: Claim, status: str, estimate: float, interval, evidence: dict, body: str,
             level: str, fmt: str = ".2f") -> Verdict:
    """Assemble a verdict: the status in the claim's words, the sentence with the interval and provenance."""
    if claim.kind == "precondition":
        status = PRECONDITION_WORDS[status]
    lo, hi = interval
    level = f"95% interval: {level}" if _finite(lo, hi) else f"no 95% interval, {level}, so no verdict"
    sentence = f"{body} (Claim: {claim.source}; threshold: {claim.threshold_source}; {level}.)"
    evidence = {**evidence, "estimate": float(estimate), "lo": float(lo), "hi": float(hi)}
    return Verdict(claim, status, float(estimate), (float(lo), float(hi)), evidence, sentence, fmt)


def _undecided(claim: Claim, reason: str, evidence: dict | None = None) -> Verdict:
    status = PRECONDITION_WORDS[UNDECIDED] if claim.kind == "precondition" else UNDECIDED
    return Verdict(claim, status, float("nan"), (float("nan"), float("nan")), evidence or {},
                   f"{reason} (Claim: {claim.source}; threshold: {claim.threshold_source}.)")


def _resolve(claim, check: str, statement: str, threshold, default: float) -> tuple[Claim, float]:
    """The claim of a call and its threshold: the register's unless the call sets another."""
    if claim is None:
        t = default if threshold is None else float(threshold)
        return claims_mod.unregistered(check, statement, t), t
    c = claims_mod.get(claim) if isinstance(claim, str) else claim
    if c.check and c.check != check:
        raise ValueError(f"verdicts.{check}: claim {c.id!r} is tested by verdicts.{c.check}, not by {check}")
    if threshold is None or float(threshold) == c.threshold:
        return c, c.threshold
    t = float(threshold)
    note = f"set by the chapter to {t:g} (the register's {c.threshold:g}: {c.threshold_source})"
    return dataclasses.replace(c, threshold=t, threshold_source=note), t


# --------------------------------------------------------------------------------------------------------------------
# KRS tables
# --------------------------------------------------------------------------------------------------------------------
def _with_tuples(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(layers=df["layers"].map(lambda x: tuple(int(v) for v in x)))


def _rows_of(sweep: pd.DataFrame, experiments, what: str) -> pd.DataFrame:
    require_columns(sweep, ["experiment", "center_layer", "layers", "krs"], what)
    experiments = [experiments] if isinstance(experiments, str) else list(experiments)
    df = sweep[sweep["experiment"].isin(experiments)]
    absent = [e for e in experiments if e not in set(df["experiment"])]
    if absent:
        have = ", ".join(map(str, sweep["experiment"].unique()))
        raise ValueError(f"{what}: no rows for experiment {absent[0]!r}; the table has: {have}")
    return _with_tuples(df)


def mean_krs(sweep: pd.DataFrame, experiment: str | None = None, n_boot: int = uncertainty.N_BOOT,
             seed: int = uncertainty.SEED) -> pd.DataFrame:
    """Mean KRS per (experiment, center_layer): questions -> (method, concept) pairs -> mean over pairs, with its
    95% interval (a bootstrap over pairs and questions, each experiment on its own pairs).

    Columns: experiment, center_layer, layers (the window, a tuple), window (the same as text), krs, lo, hi, pairs.
    Without a question_index column the rows of a pair are averaged and the interval is over pairs.
    """
    require_columns(sweep, ["experiment", "center_layer", "layers", "krs"], "mean_krs")
    names = list(dict.fromkeys(sweep["experiment"])) if experiment is None else [experiment]
    df = _rows_of(sweep, names, "mean_krs")
    question = QUESTION if QUESTION in df.columns else None
    out = uncertainty.mean_by(df, "krs", ["experiment", "center_layer", "layers"], PAIRS, question,
                              each="experiment", n_boot=n_boot, seed=seed).rename(columns={"mean": "krs"})
    out.insert(3, "window", out["layers"].map(_layers_text))
    out = out[["experiment", "center_layer", "layers", "window", "krs", "lo", "hi", "pairs", "interval"]]
    return out.sort_values(["experiment", "center_layer"], ignore_index=True)


def seed_spread(sweep: pd.DataFrame, experiment: str = "coef") -> pd.DataFrame:
    """How much the unlearning seed moves a (concept, method)'s KRS curve, for the pairs unlearned with several seeds.

    One row per (concept, method, seed): the best window of that seed's curve (mean over questions) and its KRS, the
    KRS of the last window (the one holding the last layer), and, repeated on every row of a pair, the largest
    difference between two seeds' KRS at any one window. Empty when no pair has more than one seed.
    """
    columns = ["concept", "method", "seed", "best_window", "best_krs", "last_window_krs", "largest_seed_gap"]
    df = _rows_of(sweep, experiment, "seed_spread")
    require_columns(df, ["concept", "method", "seed"], "seed_spread")
    curves = df.groupby(["concept", "method", "seed", "center_layer", "layers"], sort=True)["krs"].mean().reset_index()
    rows = []
    for (concept, method), pair in curves.groupby(["concept", "method"], sort=False):
        if pair["seed"].nunique() < 2:
            continue
        by_window = pair.pivot_table(index="center_layer", columns="seed", values="krs")
        gap = float((by_window.max(axis=1) - by_window.min(axis=1)).max())
        last = int(pair["center_layer"].max())
        for seed, curve in pair.groupby("seed"):
            best = curve.loc[curve["krs"].idxmax()]
            rows.append((concept, method, int(seed), _layers_text(best["layers"]), float(best["krs"]),
                         float(curve.loc[curve["center_layer"] == last, "krs"].iloc[0]), gap))
    return pd.DataFrame(rows, columns=columns)


def _last_layer(sweep: pd.DataFrame, n_layers: int | None) -> int:
    if n_layers is not None:
        return int(n_layers) - 1
    return int(max(max(int(v) for v in layers) for layers in sweep["layers"]))


def _can_split(df: pd.DataFrame) -> bool:
    """Both halves of the questions have data (at least one even and one odd question_index)."""
    if QUESTION not in df.columns:
        return False
    parity = pd.to_numeric(df[QUESTION], errors="coerce").dropna().astype(int) % 2
    return parity.nunique() == 2


class _Windows:
    """Bootstrap replicates of every window's mean KRS, in two halves of the questions when `split`: the select
    half (even question_index) to choose a window, the score half (odd) to score it. Without a split both halves are
    all the questions."""

    def __init__(self, df: pd.DataFrame, split: bool, n_boot: int, seed: int):
        self.split = split
        question = QUESTION if QUESTION in df.columns else None
        if split:
            half = np.where(pd.to_numeric(df[QUESTION]).astype(int) % 2 == 0, "select", "score")
            df = df.assign(_half=half)
            self.rep = uncertainty.replicate_means(df, "krs", ["_half", "experiment", "center_layer", "layers"],
                                                   PAIRS, question, strata="_half", n_boot=n_boot, seed=seed)
        else:
            self.rep = uncertainty.replicate_means(df, "krs", ["experiment", "center_layer", "layers"], PAIRS,
                                                   question, n_boot=n_boot, seed=seed)
        # A NaN column at the end: index -1 is a window missing from one half.
        self.estimate = np.append(self.rep.estimate, np.nan)
        self.draws = np.hstack([self.rep.draws, np.full((len(self.rep.draws), 1), np.nan)])

    @property
    def level(self) -> str:
        return self.rep.level

    def windows(self, experiment: str) -> pd.DataFrame:
        """center_layer, layers, select (column index), score (column index) of the experiment's windows."""
        keys = self.rep.keys.reset_index().rename(columns={"index": "col"})
        keys = keys[keys["experiment"] == experiment]
        if not self.split:
            w = keys[["center_layer", "layers", "col"]].assign(select=keys["col"], score=keys["col"])
            return w.sort_values("center_layer", ignore_index=True)
        sel = keys[keys["_half"] == "select"][["center_layer", "layers", "col"]].rename(columns={"col": "select"})
        sco = keys[keys["_half"] == "score"][["center_layer", "layers", "col"]].rename(columns={"col": "score"})
        w = sel.merge(sco, on=["center_layer", "layers"], how="outer").fillna({"select": -1, "score": -1})
        return w.astype({"select": int, "score": int}).sort_values("center_layer", ignore_index=True)

    def best(self, windows: pd.DataFrame):
        """(estimate, draws [B], chosen window on the table, chosen window index per resample [B]): the score-half
        KRS of the window with the highest select-half KRS, among `windows`."""
        sel, sco = windows["select"].to_numpy(), windows["score"].to_numpy()
        est, i = _pick(self.estimate[sel], self.estimate[sco])
        draws, j = _pick(self.draws[:, sel], self.draws[:, sco])
        return est, draws, int(i), j


def _pick(select: np.ndarray, score: np.ndarray):
    """Along the last axis: the `score` of the entry with the highest `select` (NaN where none is finite)."""
    s = np.where(np.isfinite(select), select, -np.inf)
    i = s.argmax(-1)
    value = np.take_along_axis(score, np.asarray(i)[..., None], -1)[..., 0]
    return np.where(np.isfinite(s).any(-1), value, np.nan), i


def _nan_max(x: np.ndarray) -> np.ndarray:
    """Max over the last axis ignoring NaN; NaN where all are NaN (without a warning)."""
    filled = np.where(np.isfinite(x), x, -np.inf)
    out = filled.max(-1)
    return np.where(np.isfinite(out), out, np.nan)


def _nan_min(x: np.ndarray) -> np.ndarray:
    return -_nan_max(-x)


def _interval_of(rep: uncertainty.Replicates, draws) -> tuple[float, float]:
    """The 95% percentile interval of a statistic's draws; (nan, nan) when the table left nothing to resample."""
    return uncertainty.percentile_interval(draws) if any(rep.resampled) else (np.nan, np.nan)


def _selection_note(split: bool) -> str:
    return f" ({SPLIT_HALF})" if split else ""


def best_window_contains_last_layer(sweep: pd.DataFrame, experiment: str = "coef", n_layers: int | None = None,
                                    claim=None, n_boot: int = uncertainty.N_BOOT,
                                    seed: int = uncertainty.SEED) -> Verdict:
    """The window whose restoration recovers most (highest mean KRS) includes the model's last layer.

    The rule (it can fail): among the windows that contain the last layer, pick the best on the even-numbered
    questions, and likewise among the windows that do not; score both picks on the odd-numbered questions. The
    statistic is the difference, held-out KRS(best with the last layer) - held-out KRS(best without it); it holds
    when its whole 95% interval is above 0, does not hold when the whole interval is at or below 0, and is
    inconclusive otherwise. Each resample repeats both picks. The evidence also gives the overall best window (chosen
    on the even questions) and how often, over the resamples, that choice contains the last layer.

    Inconclusive without a comparison: when every window of the sweep contains the last layer, when none does (the
    sweep did not reach it), or when the questions cannot be split in two halves.

    `n_layers`: the model's layer count; by default the highest layer in the table (right when the sweep covered
    the last layer, which a full sweep does).
    """
    df = _rows_of(sweep, experiment, "best_window_contains_last_layer")
    last = _last_layer(df, n_layers)
    statement = f"The best window for restoring {_what(experiment)} contains the last layer"
    c, threshold = _resolve(claim, "best_window_contains_last_layer", statement, None, 0.0)
    windows = df.drop_duplicates(["center_layer", "layers"])
    has_last = windows["layers"].map(lambda ls: last in ls)
    evidence = {"last_layer": last, "windows": int(len(windows)), "windows_with_last": int(has_last.sum())}
    if not has_last.any():
        return _undecided(c, f"No window of the sweep contains the last layer ({last}), so the sweep cannot say "
                             f"whether the best one does.", evidence)
    if has_last.all():
        return _undecided(c, f"Every window of the sweep contains the last layer ({last}): there is no window "
                             f"without it to compare with.", evidence)
    if not _can_split(df):
        return _undecided(c, "Choosing a window on half of the questions and scoring it on the other half needs "
                             "two or more questions per pair.", evidence)
    w = _Windows(df, True, n_boot, seed)
    grid = w.windows(experiment)
    inside = grid["layers"].map(lambda ls: last in ls).to_numpy()
    est_in, draws_in, i_in, _ = w.best(grid[inside])
    est_out, draws_out, i_out, _ = w.best(grid[~inside])
    est_all, _, i_all, j_all = w.best(grid)
    diff, diff_draws = est_in - est_out, draws_in - draws_out
    interval = _interval_of(w.rep, diff_draws)
    status = _decide(interval, threshold, "above")
    chosen = grid.iloc[i_all]
    share_with_last = float(np.mean(inside[j_all]))
    best_in, best_out = grid[inside].iloc[i_in], grid[~inside].iloc[i_out]
    evidence.update({"best_center_layer": int(chosen["center_layer"]), "best_window": _layers_text(chosen["layers"]),
                     "best_krs": float(est_all), "best_contains_last": bool(last in chosen["layers"]),
                     "chosen_with_last": share_with_last, "best_with_last_krs": float(est_in),
                     "best_without_last_krs": float(est_out), "best_without_last": _layers_text(best_out["layers"]),
                     "difference": float(diff)})
    body = (f"Restoring {_what(experiment)} recovers most at {_layers_text(chosen['layers'])} (held-out mean KRS "
            f"{est_all:.2f}; window {SPLIT_HALF}); that choice contains the last layer ({last}) in "
            f"{share_with_last:.0%} of the resamples. The best window with the last layer "
            f"({_layers_text(best_in['layers'])}) beats the best without it ({_layers_text(best_out['layers'])}) by "
            f"{with_interval(diff, interval, missing='')} held-out KRS, "
            f"{_against(status, interval, threshold, 'above')}.")
    return _verdict(c, status, diff, interval, evidence, body, w.level)


def krs_below_everywhere(sweep: pd.DataFrame, experiment: str = "value", threshold: float | None = None,
                         claim=None, n_boot: int = uncertainty.N_BOOT, seed: int = uncertainty.SEED) -> Verdict:
    """Restoring `experiment` recovers little: mean KRS below `threshold` (default 0.1) at every window.

    The statistic is the highest window mean, recomputed in every resample (a maximum: biased upwards, which makes
    "holds" the cautious answer). Holds when its whole 95% interval is below the threshold, does not hold when the
    whole interval is at or above it.
    """
    df = _rows_of(sweep, experiment, "krs_below_everywhere")
    t0 = 0.1 if threshold is None else threshold
    statement = f"Restoring {_what(experiment)} recovers little (KRS below {t0:g} at every window)"
    c, threshold = _resolve(claim, "krs_below_everywhere", statement, threshold, 0.1)
    w = _Windows(df, False, n_boot, seed)
    grid = w.windows(experiment)
    means = w.estimate[grid["select"].to_numpy()]
    top = int(np.nanargmax(means))
    est = float(means[top])
    draws = _nan_max(w.draws[:, grid["select"].to_numpy()])
    interval = _interval_of(w.rep, draws)
    status = _decide(interval, threshold, "below")
    worst = grid.iloc[top]
    evidence = {"max_krs": est, "max_center_layer": int(worst["center_layer"]), "mean_krs": float(np.nanmean(means)),
                "threshold": threshold, "windows_above": int((means >= threshold).sum()), "windows": int(len(grid))}
    of = f"of the {len(grid)} windows" if len(grid) > 1 else "of the one window"
    body = (f"The highest mean KRS {of} is {with_interval(est, interval, '.3f', '')} "
            f"({_layers_text(worst['layers'])}), {_against(status, interval, threshold, 'below')}.")
    return _verdict(c, status, est, interval, evidence, body, w.level, ".3f")


def best_krs_above(sweep: pd.DataFrame, experiment: str = "coef+attn", threshold: float | None = None, claim=None,
                   n_boot: int = uncertainty.N_BOOT, seed: int = uncertainty.SEED) -> Verdict:
    """Restoring `experiment` at its best window recovers `threshold` (default 0.9) or more of the vanilla output.

    With several windows, the best is chosen on the even-numbered questions and scored on the odd-numbered ones
    (again in every resample); with one window, all questions score it. Holds when the whole 95% interval of that
    score is at or above the threshold, does not hold when it is entirely below.
    """
    df = _rows_of(sweep, experiment, "best_krs_above")
    t0 = 0.9 if threshold is None else threshold
    statement = f"Restoring {_what(experiment)} at the best window recovers {t0:g} or more"
    c, threshold = _resolve(claim, "best_krs_above", statement, threshold, 0.9)
    several = df.drop_duplicates(["center_layer", "layers"]).shape[0] > 1
    if several and not _can_split(df):
        return _undecided(c, "Choosing the best window on half of the questions and scoring it on the other half "
                             "needs two or more questions per pair.")
    w = _Windows(df, several, n_boot, seed)
    grid = w.windows(experiment)
    est, draws, i, _ = w.best(grid)
    interval = _interval_of(w.rep, draws)
    status = _decide(interval, threshold, "at least")
    best = grid.iloc[i]
    evidence = {"best_krs": float(est), "best_center_layer": int(best["center_layer"]),
                "best_window": _layers_text(best["layers"]), "threshold": threshold}
    where = "The best window" if several else "The window"
    body = (f"{where}, {_layers_text(best['layers'])}{_selection_note(several)}, reaches a mean KRS of "
            f"{with_interval(est, interval, missing='')}, {_against(status, interval, threshold, 'at least')}.")
    return _verdict(c, status, est, interval, evidence, body, w.level)


def share_of_best(part: pd.DataFrame, whole: pd.DataFrame, experiment: str = "coef", min_share: float | None = None,
                  claim=None, n_boot: int = uncertainty.N_BOOT, seed: int = uncertainty.SEED) -> Verdict:
    """Restoring `experiment` in one chosen window (`part`, e.g. the last layer alone) recovers at least `min_share`
    (default 0.5) of what the best window of the full sweep (`whole`) recovers.

    The statistic is KRS(part) / KRS(best window of whole), both on the odd-numbered questions, the best window
    chosen on the even-numbered ones (and again in every resample; the two tables are resampled together, as they
    hold the same pairs and questions). Holds when the whole 95% interval of the share is at or above `min_share`.
    """
    p = _rows_of(part, experiment, "share_of_best (part)")
    w_rows = _rows_of(whole, experiment, "share_of_best (whole)")
    t0 = 0.5 if min_share is None else min_share
    p_window = _layers_text(p["layers"].iloc[0]) if p["layers"].nunique() == 1 else "one window"
    statement = (f"Restoring {_what(experiment)} in {p_window} alone recovers {t0:.0%} or more of the best "
                 f"window's recovery")
    c, threshold = _resolve(claim, "share_of_best", statement, min_share, 0.5)
    both = pd.concat([p.assign(experiment="part"), w_rows.assign(experiment="whole")], ignore_index=True)
    several = (p.drop_duplicates(["center_layer", "layers"]).shape[0] > 1
               or w_rows.drop_duplicates(["center_layer", "layers"]).shape[0] > 1)
    if several and not _can_split(both):
        return _undecided(c, "Choosing the best window on half of the questions and scoring it on the other half "
                             "needs two or more questions per pair.")
    w = _Windows(both, several, n_boot, seed)
    part_est, part_draws, i_part, _ = w.best(w.windows("part"))
    whole_grid = w.windows("whole")
    whole_est, whole_draws, i_whole, _ = w.best(whole_grid)
    evidence = {"part_krs": float(part_est), "best_krs": float(whole_est),
                "part_window": _layers_text(w.windows("part").iloc[i_part]["layers"]),
                "best_window": _layers_text(whole_grid.iloc[i_whole]["layers"])}
    if not whole_est > 0:
        return _undecided(c, f"The best window recovers nothing (held-out mean KRS {whole_est:.2f}): there is no "
                             f"recovery to take a share of.", evidence)
    share = part_est / whole_est
    with np.errstate(all="ignore"):
        share_draws = np.where(whole_draws > 0, part_draws / whole_draws, np.nan)
    interval = _interval_of(w.rep, share_draws)
    status = _decide(interval, threshold, "at least")
    evidence["share"] = float(share)
    body = (f"{_capital(_what(experiment))} of {evidence['part_window']} alone reach a mean KRS of "
            f"{part_est:.2f}, a share of {with_interval(share, interval, missing='')} of the {whole_est:.2f} of the "
            f"best window, {evidence['best_window']}{_selection_note(several)}, "
            f"{_against(status, interval, threshold, 'at least')}.")
    return _verdict(c, status, share, interval, evidence, body, w.level)


def _two_experiments(sweep, experiment: str, other: str, check: str, statement: str, claim, n_boot: int, seed: int):
    """(claim, threshold, several windows?, _Windows) of a comparison of two experiments' held-out KRS; the
    _Windows is None, and the claim an undecided Verdict, when the best window cannot be chosen on half of the
    questions."""
    df = _rows_of(sweep, [experiment, other], check)
    c, threshold = _resolve(claim, check, statement, None, 0.0)
    several = df.groupby("experiment")["center_layer"].nunique().max() > 1
    if several and not _can_split(df):
        return _undecided(c, "Choosing the best window on half of the questions and scoring it on the other half "
                             "needs two or more questions per pair."), threshold, several, None
    return c, threshold, several, _Windows(df, several, n_boot, seed)


def stronger_than(sweep: pd.DataFrame, experiment: str = "coef", other: str = "attn", claim=None,
                  n_boot: int = uncertainty.N_BOOT, seed: int = uncertainty.SEED) -> Verdict:
    """At its best window, restoring `experiment` recovers more than restoring `other` does at its best window.

    Each best window is chosen on the even-numbered questions and scored on the odd-numbered ones (with one window
    each, all questions score them); the statistic is the difference of the two held-out KRS, resampled on the same
    pairs and questions. Holds when its whole 95% interval is above 0, does not hold when it is at or below 0.
    """
    statement = f"Restoring {_what(experiment)} recovers more than restoring {_what(other)}"
    c, threshold, several, w = _two_experiments(sweep, experiment, other, "stronger_than", statement, claim, n_boot,
                                                seed)
    if w is None:
        return c
    est_a, draws_a, _, _ = w.best(w.windows(experiment))
    est_b, draws_b, _, _ = w.best(w.windows(other))
    diff = est_a - est_b
    interval = _interval_of(w.rep, draws_a - draws_b)
    status = _decide(interval, threshold, "above")
    evidence = {f"best_krs_{experiment}": float(est_a), f"best_krs_{other}": float(est_b), "difference": float(diff)}
    body = (f"At its best window{_selection_note(several)}, restoring {_what(experiment)} reaches a mean KRS of "
            f"{est_a:.2f}, against {est_b:.2f} for {_what(other)}: a difference of "
            f"{with_interval(diff, interval, missing='')}, "
            f"{_against(status, interval, threshold, 'above')}.")
    return _verdict(c, status, diff, interval, evidence, body, w.level)


def beyond_other_question(sweep: pd.DataFrame, experiment: str = "coef", control: str = "coef_other", claim=None,
                          n_boot: int = uncertainty.N_BOOT, seed: int = uncertainty.SEED) -> Verdict:
    """At its best window, `experiment` (the question's own vanilla activations) recovers more than `control` (the
    same site with another question's activations, experiments.Experiment.source "other") at that same window.

    The window is chosen on the even-numbered questions by `experiment`'s KRS and both are scored there on the
    odd-numbered ones; the statistic is the difference, resampled on the same pairs and questions (the control's
    window follows each resample's choice). Holds when its whole 95% interval is above 0.
    """
    statement = (f"At the best window, restoring {_what(experiment)} recovers more than restoring "
                 f"{_what(control)}")
    c, threshold, several, w = _two_experiments(sweep, experiment, control, "beyond_other_question", statement,
                                                claim, n_boot, seed)
    if w is None:
        return c
    own, other = w.windows(experiment), w.windows(control)
    if list(own["center_layer"]) != list(other["center_layer"]):
        return _undecided(c, f"{_capital(_what(control))} was not run at the windows of {_what(experiment)}: "
                             f"the comparison needs both at every window.")
    est_a, draws_a, i, j = w.best(own)
    score = other["score"].to_numpy()
    est_b = float(w.estimate[score[i]])
    draws_b = w.draws[np.arange(len(w.draws)), score[j]]
    diff = est_a - est_b
    interval = _interval_of(w.rep, draws_a - draws_b)
    status = _decide(interval, threshold, "above")
    layers = own["layers"].iloc[i]
    evidence = {f"best_krs_{experiment}": float(est_a), f"krs_{control}": est_b, "difference": float(diff),
                "best_window": list(layers)}
    body = (f"At the best coefficient window{_selection_note(several)} ({_layers_text(layers)}), restoring "
            f"{_what(experiment)} reaches a mean KRS of {est_a:.2f}, and {_what(control)} {est_b:.2f}: a "
            f"difference of {with_interval(diff, interval, missing='')}, "
            f"{_against(status, interval, threshold, 'above')}.")
    return _verdict(c, status, diff, interval, evidence, body, w.level)


def largest_change_in_last_layers(change: pd.DataFrame, quantity: str = "coef", last: int = 3,
                                  value: str = "rel_change", claim=None, n_boot: int = uncertainty.N_BOOT,
                                  seed: int = uncertainty.SEED) -> Verdict:
    """Unlearning changed `quantity` most in the model's last `last` layers (mean over methods and concepts).

    The statistic is the largest mean change among the last `last` layers minus the largest among the others;
    the change table has no question level, so the 95% interval is a bootstrap over (method, concept) pairs. Holds
    when the whole interval is above 0, does not hold when it is at or below 0. The evidence also gives the layer
    that changed most and how often, over the resamples, it lies in the last layers.
    """
    require_columns(change, ["layer", "quantity", value], "largest_change_in_last_layers")
    df = change[change["quantity"] == quantity]
    if df.empty:
        have = ", ".join(map(str, change["quantity"].unique()))
        raise ValueError(f"largest_change_in_last_layers: no rows for quantity {quantity!r}; the table has: {have}")
    statement = f"Unlearning changes {_what(quantity)} of the last {last} layers most"
    c, threshold = _resolve(claim, "largest_change_in_last_layers", statement, None, 0.0)
    rep = uncertainty.replicate_means(df, value, ["layer"], PAIRS, None, n_boot=n_boot, seed=seed)
    layers = rep.keys["layer"].astype(int).to_numpy()
    n_layers = int(layers.max()) + 1
    late = layers >= n_layers - last
    est = rep.estimate
    top = int(layers[np.nanargmax(est)])
    evidence = {"top_layer": top, "top_change": float(np.nanmax(est)), "last_layer": n_layers - 1,
                "last_layer_change": float(est[layers == n_layers - 1][0]) if (layers == n_layers - 1).any()
                else float("nan"), "median_change": float(np.nanmedian(est))}
    if late.all():
        return _undecided(c, f"The model has {n_layers} layers, all among the last {last}: nothing to compare "
                             f"with.", evidence)
    diff = float(_nan_max(est[late]) - _nan_max(est[~late]))
    draws = _nan_max(rep.draws[:, late]) - _nan_max(rep.draws[:, ~late])
    interval = _interval_of(rep, draws)
    status = _decide(interval, threshold, "above")
    top_late = float(np.mean(late[np.where(np.isfinite(rep.draws), rep.draws, -np.inf).argmax(1)]))
    evidence.update({"difference": diff, "top_in_last_share": top_late})
    how_often = f" in {top_late:.0%} of the resamples" if any(rep.resampled) else ""
    body = (f"{_capital(_what(quantity))} changed most at layer {top} (mean relative "
            f"change {np.nanmax(est):.3g}; the median layer {np.nanmedian(est):.3g}); the top layer is among the "
            f"last {last} ({n_layers - last}-{n_layers - 1}){how_often}. The largest change there minus "
            f"the largest elsewhere is {with_interval(diff, interval, '.3g', '')}, "
            f"{_against(status, interval, threshold, 'above')}.")
    return _verdict(c, status, diff, interval, evidence, body, rep.level, ".3g")


CONTROL = "control"  # the method name of the control fine-tune (unlearning/control.py)


def _split_control(table: pd.DataFrame, control: str, what: str) -> list[str]:
    """The unlearning methods of a table that also holds the control's rows; a clear error when either is missing."""
    methods = [m for m in dict.fromkeys(table["method"]) if m != control]
    if control not in set(table["method"]):
        raise ValueError(f"{what}: the table has no rows of the control {control!r} (concatenate the control "
                         f"study's table: study.control())")
    if not methods:
        raise ValueError(f"{what}: the table has only the control's rows; add the unlearning methods' rows")
    return methods


def change_beyond_control(change: pd.DataFrame, quantity: str = "coef", last: int = 3, value: str = "rel_change",
                          control: str = CONTROL, claim=None, n_boot: int = uncertainty.N_BOOT,
                          seed: int = uncertainty.SEED) -> Verdict:
    """Unlearning concentrates its change of `quantity` in the last `last` layers more than a control fine-tune does.

    Activation changes grow with depth in any fine-tune, so where the change is largest says little on its own. The
    statistic is the share of the summed per-layer change that falls in the last `last` layers, averaged over the
    unlearning methods, minus the same share for the control (whose rows the table holds, method `control`). The
    bootstrap resamples concepts, the same draws for every method and the control (a paired comparison). Holds when
    the whole interval is above 0, does not hold when it is at or below 0.
    """
    what = "change_beyond_control"
    require_columns(change, ["concept", "method", "layer", "quantity", value], what)
    df = change[change["quantity"] == quantity]
    if df.empty:
        have = ", ".join(map(str, change["quantity"].unique()))
        raise ValueError(f"{what}: no rows for quantity {quantity!r}; the table has: {have}")
    methods = _split_control(df, control, what)
    statement = (f"Unlearning concentrates its change of {_what(quantity)} in the last {last} layers more than a "
                 f"control fine-tune does")
    c, threshold = _resolve(claim, what, statement, None, 0.0)
    rep = uncertainty.replicate_means(df, value, ["method", "layer"], ("concept",), None, n_boot=n_boot, seed=seed)
    layer = rep.keys["layer"].astype(int).to_numpy()
    method = rep.keys["method"].to_numpy()
    n_layers = int(layer.max()) + 1
    if last >= n_layers:
        return _undecided(c, f"The model has {n_layers} layers, all among the last {last}: nothing to compare with.")
    late = layer >= n_layers - last

    def share(values, m):  # values [..., C] -> the share of method m's change in the late layers
        mine = method == m
        total = np.nansum(values[..., mine], axis=-1)
        with np.errstate(all="ignore"):
            return np.nansum(values[..., mine & late], axis=-1) / total

    shares = {m: share(rep.estimate, m) for m in [*methods, control]}
    draws = np.mean([share(rep.draws, m) for m in methods], axis=0) - share(rep.draws, control)
    diff = float(np.mean([shares[m] for m in methods]) - shares[control])
    interval = _interval_of(rep, draws)
    status = _decide(interval, threshold, "above")
    evidence = {f"{m}_late_share": float(v) for m, v in shares.items()}
    evidence["difference"] = diff
    parts = "; ".join(f"{m} {shares[m]:.0%}" for m in methods)
    body = (f"Share of the change of {_what(quantity)} in the last {last} layers ({n_layers - last}-{n_layers - 1}) "
            f"of {n_layers}: {parts}; the control fine-tune {shares[control]:.0%}. Unlearning's share minus the "
            f"control's is {with_interval(diff, interval, '.2f', '')}, "
            f"{_against(status, interval, threshold, 'above')}.")
    return _verdict(c, status, diff, interval, evidence, body, rep.level)


# --------------------------------------------------------------------------------------------------------------------
# Behaviour tables (pipeline.behaviour): one row per (concept, method, stage, split, metric), no question level
# --------------------------------------------------------------------------------------------------------------------
def _pair_scores(behaviour: pd.DataFrame, split: str, metric: str) -> pd.DataFrame:
    """One row per (method, concept, stage): the vanilla score of the concept (repeated for each method) and the
    unlearned score of the pair on `split` / `metric`."""
    require_columns(behaviour, ["concept", "method", "stage", "split", "metric", "value"], "behaviour verdict")
    df = behaviour[(behaviour["split"] == split) & (behaviour["metric"] == metric)]
    van = df[df["stage"] == "vanilla"].groupby("concept")["value"].mean()
    unl = df[df["stage"] == "unlearned"].groupby(["method", "concept"])["value"].mean().reset_index()
    if van.empty or unl.empty:
        raise ValueError(f"behaviour verdict: the table has no vanilla and unlearned rows for split {split!r}, "
                         f"metric {metric!r}")
    vanilla = unl.assign(stage="vanilla", value=unl["concept"].map(van)).dropna(subset=["value"])
    return pd.concat([vanilla, unl.assign(stage="unlearned")], ignore_index=True)


def _per_method(pairs: pd.DataFrame, columns: str, n_boot: int, seed: int, question: str | None = None):
    """{method: (estimates {column value: mean}, draws {column value: [B]})} over concepts, and what was resampled.
    Concepts are resampled together for all methods (the same draws), so method comparisons stay paired; with a
    `question` column, so are the questions within each drawn concept."""
    rep = uncertainty.replicate_means(pairs, "value", ["method", columns], ("concept",), question, n_boot=n_boot,
                                      seed=seed)
    out = {}
    for i, key in rep.keys.iterrows():
        est, draws = out.setdefault(key["method"], ({}, {}))
        est[key[columns]] = rep.estimate[i]
        draws[key[columns]] = rep.draws[:, i]
    return out, rep


def _stage_effect(behaviour, split, metric, effect, n_boot, seed):
    """Per method: the effect of unlearning (a function of vanilla and unlearned means) and its draws."""
    pairs = _pair_scores(behaviour, split, metric)
    per, rep = _per_method(pairs, "stage", n_boot, seed)
    rows = {}
    for m, (est, draws) in per.items():
        with np.errstate(all="ignore"):
            rows[m] = (est["vanilla"], est["unlearned"], effect(est["vanilla"], est["unlearned"]),
                       effect(draws["vanilla"], draws["unlearned"]))
    return rows, rep


def _ratio(vanilla, unlearned):
    vanilla = np.asarray(vanilla, dtype=float)
    return np.where(vanilla > 0, unlearned / np.where(vanilla > 0, vanilla, 1.0), np.nan)


def _relative_drop(vanilla, unlearned):
    vanilla = np.asarray(vanilla, dtype=float)
    return np.where(vanilla != 0, (vanilla - unlearned) / np.where(vanilla != 0, vanilla, 1.0), np.nan)


def _interval_words(rep) -> str:
    """The behaviour and relearning intervals resample each method's concepts, the same draws for all methods."""
    return rep.level.replace("concepts", "pairs (each method's concepts, drawn together for all methods)")


def _extreme(rows: dict, weakest: bool):
    """(method, its effect, draws of the extreme over methods): the lowest effect for a claim about every method,
    the highest for a claim about some method. Methods whose effect is undefined (NaN) are left out."""
    finite = {m: r for m, r in rows.items() if np.isfinite(r[2])} or rows
    name = (min if weakest else max)(finite, key=lambda m: finite[m][2])
    stacked = np.stack([r[3] for r in finite.values()], axis=-1)
    return name, float(rows[name][2]), (_nan_min if weakest else _nan_max)(stacked)


def _per_method_text(rows: dict, rep, fmt: str, prefix: str = "", suffix: str = "") -> str:
    """'grad_diff 1.00 -> 0.20 (80% [75%, 85%] lower); dpo ...': each method's before, after and effect."""
    before_fmt = ".1f" if prefix == "x" else ".2f"
    return "; ".join(f"{m} {r[0]:{before_fmt}} -> {r[1]:{before_fmt}} "
                     f"({prefix}{with_interval(r[2], _interval_of(rep, r[3]), fmt, '')}{suffix})"
                     for m, r in rows.items())


def forgets_target(behaviour: pd.DataFrame, metric: str = "rougeL", min_relative_drop: float | None = None,
                   claim=None, n_boot: int = uncertainty.N_BOOT, seed: int = uncertainty.SEED) -> Verdict:
    """Every method lowers the target-question score by at least `min_relative_drop` (default 0.5) of its vanilla
    value.

    The statistic is the weakest method's relative drop (vanilla - unlearned) / vanilla, concept means averaged per
    method; its 95% interval is a bootstrap over (method, concept) pairs (the behaviour table has no question
    level), the minimum over methods recomputed in every resample. Holds when the whole interval is at or above
    `min_relative_drop`, does not hold when it is entirely below.
    """
    t0 = 0.5 if min_relative_drop is None else min_relative_drop
    statement = (f"Unlearning lowers the {_metric(metric)} of the target answers by {t0:.0%} or more, for every "
                 f"method")
    c, threshold = _resolve(claim, "forgets_target", statement, min_relative_drop, 0.5)
    rows, rep = _stage_effect(behaviour, "target", metric, _relative_drop, n_boot, seed)
    weakest, est, draws = _extreme(rows, weakest=True)
    interval = _interval_of(rep, draws)
    status = _decide(interval, threshold, "at least")
    evidence = {f"{m}_relative_drop": float(r[2]) for m, r in rows.items()}
    evidence.update({f"{m}_unlearned": float(r[1]) for m, r in rows.items()})
    evidence["vanilla"] = float(np.mean([r[0] for r in rows.values()]))
    evidence["weakest_method"] = weakest
    parts = _per_method_text(rows, rep, ".0%", suffix=" lower")
    body = (f"{_metric(metric)} on {_split('target')}: {parts}. The weakest method ({weakest}) drops by "
            f"{with_interval(est, interval, '.0%', '')}, {_against(status, interval, threshold, 'at least', '.0%')}.")
    return _verdict(c, status, est, interval, evidence, body, _interval_words(rep), ".0%")


def side_effects(behaviour: pd.DataFrame, split: str = "unrelated", metric: str = "rougeL",
                 min_relative_drop: float | None = None, claim=None, n_boot: int = uncertainty.N_BOOT,
                 seed: int = uncertainty.SEED) -> Verdict:
    """Unlearning one concept also lowers the score on `split` (unrelated knowledge) by `min_relative_drop` (default
    0.1) or more, for at least one method - the paper's "global" side effect.

    The statistic is the strongest method's relative drop (the maximum over methods, recomputed in every resample);
    the 95% interval is a bootstrap over (method, concept) pairs. Holds when the whole interval is at or above the
    threshold, does not hold when it is entirely below.
    """
    t0 = 0.1 if min_relative_drop is None else min_relative_drop
    statement = (f"Unlearning also lowers the {_metric(metric)} on {_split(split)} by {t0:.0%} or more (for some "
                 f"method)")
    c, threshold = _resolve(claim, "side_effects", statement, min_relative_drop, 0.1)
    rows, rep = _stage_effect(behaviour, split, metric, _relative_drop, n_boot, seed)
    strongest, est, draws = _extreme(rows, weakest=False)
    interval = _interval_of(rep, draws)
    status = _decide(interval, threshold, "at least")
    evidence = {f"{m}_relative_drop": float(r[2]) for m, r in rows.items()}
    evidence["strongest_method"] = strongest
    parts = _per_method_text(rows, rep, ".0%", suffix=" lower")
    body = (f"{_metric(metric)} on {_split(split)}: {parts}. The strongest drop ({strongest}) is "
            f"{with_interval(est, interval, '.0%', '')}, {_against(status, interval, threshold, 'at least', '.0%')}.")
    return _verdict(c, status, est, interval, evidence, body, _interval_words(rep), ".0%")


def perplexity_rises(behaviour: pd.DataFrame, split: str = "heldout_text", min_ratio: float | None = None,
                     claim=None, n_boot: int = uncertainty.N_BOOT, seed: int = uncertainty.SEED) -> Verdict:
    """Unlearning raises perplexity on general text (`split`) by a factor of `min_ratio` (default 1.05) or more, for
    some method.

    The statistic is the largest ratio unlearned / vanilla perplexity over methods (recomputed in every resample);
    the 95% interval is a bootstrap over (method, concept) pairs. Holds when the whole interval is at or above
    `min_ratio`, does not hold when it is entirely below.
    """
    t0 = 1.05 if min_ratio is None else min_ratio
    statement = f"Unlearning raises perplexity on {_split(split)} by a factor of {t0:g} or more (for some method)"
    c, threshold = _resolve(claim, "perplexity_rises", statement, min_ratio, 1.05)

    rows, rep = _stage_effect(behaviour, split, "perplexity", _ratio, n_boot, seed)
    strongest, est, draws = _extreme(rows, weakest=False)
    interval = _interval_of(rep, draws)
    status = _decide(interval, threshold, "at least")
    evidence = {f"{m}_ratio": float(r[2]) for m, r in rows.items()}
    parts = _per_method_text(rows, rep, ".2f", prefix="x")
    body = (f"Perplexity on {_split(split)}: {parts}. The largest rise ({strongest}) is a factor of "
            f"{with_interval(est, interval, missing='')}, {_against(status, interval, threshold, 'at least')}.")
    return _verdict(c, status, est, interval, evidence, body, _interval_words(rep))


def _control_rows(behaviour, split, metric, effect, control, what, n_boot, seed):
    """(rows of the unlearning methods, the control's row, rep): the control's rows are in the same table, so its
    concepts are resampled with the same draws as the methods' (a paired comparison)."""
    _split_control(behaviour, control, what)
    rows, rep = _stage_effect(behaviour, split, metric, effect, n_boot, seed)
    return {m: r for m, r in rows.items() if m != control}, rows[control], rep


def _against_control(rows, ctl, rep, compare, threshold: float):
    """(strongest method, compare(its effect, the control's), interval, status 'above' threshold): the draws of
    both come from the same resamples of concepts, so they are compared draw by draw."""
    strongest, est, draws = _extreme(rows, weakest=False)
    with np.errstate(all="ignore"):
        value, draws = float(compare(est, float(ctl[2]))), compare(draws, ctl[3])
    interval = _interval_of(rep, draws)
    return strongest, value, interval, _decide(interval, threshold, "above")


def side_effects_beyond_control(behaviour: pd.DataFrame, split: str = "unrelated", metric: str = "rougeL",
                                control: str = CONTROL, claim=None, n_boot: int = uncertainty.N_BOOT,
                                seed: int = uncertainty.SEED) -> Verdict:
    """Unlearning lowers the score on `split` more than a control fine-tune of the same budget does, for some method.

    The statistic is the strongest method's relative drop minus the control's (the table holds the control's rows,
    method `control`); concepts are resampled with the same draws for all. Holds when the whole interval is above 0.
    """
    what = "side_effects_beyond_control"
    statement = (f"Unlearning lowers the {_metric(metric)} on {_split(split)} more than a control fine-tune does "
                 f"(for some method)")
    c, threshold = _resolve(claim, what, statement, None, 0.0)
    rows, ctl, rep = _control_rows(behaviour, split, metric, _relative_drop, control, what, n_boot, seed)
    strongest, diff, interval, status = _against_control(rows, ctl, rep, np.subtract, threshold)
    evidence = {f"{m}_relative_drop": float(r[2]) for m, r in rows.items()}
    evidence.update({"control_relative_drop": float(ctl[2]), "strongest_method": strongest, "difference": diff})
    control_drop = with_interval(ctl[2], _interval_of(rep, ctl[3]), '.0%', '')
    body = (f"{_metric(metric)} on {_split(split)}: {_per_method_text(rows, rep, '.0%', suffix=' lower')}; the "
            f"control fine-tune {ctl[0]:.2f} -> {ctl[1]:.2f} ({control_drop} lower). The strongest drop ({strongest}) minus the control's is "
            f"{with_interval(diff, interval, '.0%', '')}, {_against(status, interval, threshold, 'above', '.0%')}.")
    return _verdict(c, status, diff, interval, evidence, body, _interval_words(rep), ".0%")


def perplexity_beyond_control(behaviour: pd.DataFrame, split: str = "heldout_text", control: str = CONTROL,
                              claim=None, n_boot: int = uncertainty.N_BOOT, seed: int = uncertainty.SEED) -> Verdict:
    """Unlearning raises perplexity on `split` more than a control fine-tune does, for some method.

    The statistic is the largest (unlearned / vanilla) perplexity ratio over methods divided by the control's ratio;
    concepts are resampled with the same draws for all. Holds when the whole interval is above 1.
    """
    what = "perplexity_beyond_control"
    statement = f"Unlearning raises perplexity on {_split(split)} more than a control fine-tune does (for some method)"
    c, threshold = _resolve(claim, what, statement, None, 1.0)
    rows, ctl, rep = _control_rows(behaviour, split, "perplexity", _ratio, control, what, n_boot, seed)
    strongest, rel, interval, status = _against_control(rows, ctl, rep, np.divide, threshold)
    evidence = {f"{m}_ratio": float(r[2]) for m, r in rows.items()}
    evidence.update({"control_ratio": float(ctl[2]), "strongest_method": strongest, "relative_to_control": rel})
    body = (f"Perplexity on {_split(split)}: {_per_method_text(rows, rep, '.2f', prefix='x')}; the control "
            f"fine-tune x{with_interval(ctl[2], _interval_of(rep, ctl[3]), missing='')}. The largest rise "
            f"({strongest}) relative to the control's is a factor of {with_interval(rel, interval, missing='')}, "
            f"{_against(status, interval, threshold, 'above')}.")
    return _verdict(c, status, rel, interval, evidence, body, _interval_words(rep))


# --------------------------------------------------------------------------------------------------------------------
# Relearning table (pipeline.relearn)
# --------------------------------------------------------------------------------------------------------------------
def relearning_recovers(relearn: pd.DataFrame, data: str = "unrelated", min_recovered: float | None = None,
                        metric: str = "rougeL", vanilla: float = 1.0, claim=None, n_boot: int = uncertainty.N_BOOT,
                        seed: int = uncertainty.SEED) -> Verdict:
    """A few relearning steps on `data` win back at least `min_recovered` (default 0.5) of what unlearning removed,
    for every method: (score after the last step - unlearned score) / (vanilla - unlearned score), concept means
    averaged per method. `vanilla` is the vanilla model's score (ROUGE-L of the vanilla answer against itself: 1).

    The statistic is the weakest method's share won back (the minimum over methods, recomputed in every resample).
    Its 95% interval is a bootstrap over concepts (the same draws for every method) and, within each drawn concept,
    over the scored questions (the per-question scores pipeline.relearn keeps; the same question draws at both ends,
    so the gain is paired); a table without them is resampled over concepts only, and one concept then leaves no
    interval. Holds when the whole interval is at or above `min_recovered`, does not hold when it is entirely below;
    inconclusive when there are no rows or unlearning removed nothing.
    """
    require_columns(relearn, ["method", "concept", "data", "step", "metric", "value"], "relearning_recovers")
    t0 = 0.5 if min_recovered is None else min_recovered
    statement = (f"A few fine-tuning steps on {data} data win back {t0:.0%} or more of the forgotten "
                 f"{_metric(metric)}, for every method")
    c, threshold = _resolve(claim, "relearning_recovers", statement, min_recovered, 0.5)
    df = relearn[(relearn["data"] == data) & (relearn["metric"] == metric)]
    if df.empty:
        return _undecided(c, f"No relearning rows for data {data!r} and metric {metric!r}.")
    first, last = int(df["step"].min()), int(df["step"].max())
    ends = df[df["step"].isin([first, last])]
    if {"questions", "per_question"} <= set(ends.columns):
        ends = _per_question_rows(ends, ["method", "concept", "step"])
        per, rep = _per_method(ends, "step", n_boot, seed, QUESTION)
    else:
        per, rep = _per_method(ends, "step", n_boot, seed)

    def recovered(start, end):
        removed = vanilla - np.asarray(start, dtype=float)
        with np.errstate(all="ignore"):
            return np.where(removed > 0, (end - start) / np.where(removed > 0, removed, 1.0), np.nan)

    rows = {m: (est[first], est[last], float(recovered(est[first], est[last])), recovered(d[first], d[last]))
            for m, (est, d) in per.items()}
    if not any(np.isfinite(r[2]) for r in rows.values()):
        return _undecided(c, "Unlearning removed nothing to win back.")
    weakest, est, draws = _extreme(rows, weakest=True)
    interval = _interval_of(rep, draws)
    status = _decide(interval, threshold, "at least")
    evidence = {"steps": last, **{f"{m}_recovered": r[2] for m, r in rows.items()},
                **{f"{m}_unlearned": float(r[0]) for m, r in rows.items()},
                **{f"{m}_relearned": float(r[1]) for m, r in rows.items()}, "weakest_method": weakest}
    parts = _per_method_text(rows, rep, ".0%", suffix=" of the gap")
    body = (f"{_metric(metric)} of the target answers after {last} steps on {data} data: {parts}. The weakest "
            f"method ({weakest}) wins back {with_interval(est, interval, '.0%', '')}, "
            f"{_against(status, interval, threshold, 'at least', '.0%')}.")
    return _verdict(c, status, est, interval, evidence, body, _interval_words(rep), ".0%")


def _per_question_rows(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per scored question (columns keys..., question_index, value) from pipeline.relearn's rows, which keep
    each checkpoint's question indices and per-question scores as lists."""
    rows = [(*(getattr(r, k) for k in keys), int(q), float(v)) for r in table.itertuples(index=False)
            for q, v in zip(r.questions, r.per_question)]
    return pd.DataFrame(rows, columns=[*keys, QUESTION, "value"])


NEVER_KNOWN = "never_known"  # the relearning data of the never-known control (unlearning.relearn.CONTROL)


def relearning_beyond_never_known(relearned: pd.DataFrame, control: pd.DataFrame, metric: str = "rougeL",
                                  data: str = "partial", claim=None, n_boot: int = uncertainty.N_BOOT,
                                  seed: int = uncertainty.SEED) -> Verdict:
    """A few relearning steps on half of the target questions (`data`, default 'partial') raise the score on the other
    half more than the same steps on half of a never-known concept's questions raise it on that concept's other half
    (`control`: pipeline.relearn rows of data 'never_known', the same unlearned models and budget), for every method.

    Training on half of any concept's questions can lift the other half with no knowledge coming back (the answers'
    form is learned, a guess may be right); a concept the model never knew measures how much. Per method: the gain
    on the target's held-out half (last step minus step 0) minus the gain on the never-known concept's held-out half;
    the statistic is the weakest method's difference (the minimum over methods, recomputed in every resample). The
    bootstrap resamples concepts, the same draws for every method and its control (a paired comparison), and within
    each drawn concept the target's and the never-known concept's held-out questions, each set keeping its size
    (from the per-question scores; a table without them is resampled over concepts only). Holds when the whole 95%
    interval is above 0, does not hold when it is at or below 0; inconclusive when either table has no rows.
    """
    what = "relearning_beyond_never_known"
    for name, table in (("relearned", relearned), ("control", control)):
        require_columns(table, ["method", "concept", "data", "step", "metric", "value"], f"{what} ({name})")
    statement = (f"A few fine-tuning steps on half of the target questions win back more {_metric(metric)} on the "
                 f"other half than the same steps win on a concept the model never knew, for every method")
    c, threshold = _resolve(claim, what, statement, None, 0.0)
    target = relearned[(relearned["data"] == data) & (relearned["metric"] == metric)]
    ctl = control[(control["data"] == NEVER_KNOWN) & (control["metric"] == metric)]
    if target.empty:
        return _undecided(c, f"No relearning rows for data {data!r} and metric {metric!r}.")
    if ctl.empty:
        return _undecided(c, f"No rows of the never-known control (data {NEVER_KNOWN!r}) for metric {metric!r}.")
    steps = sorted(int(k) for k in target["step"].unique())
    if steps != sorted(int(k) for k in ctl["step"].unique()):
        raise ValueError(f"{what}: the relearning was scored at steps {steps}, the control at "
                         f"{sorted(int(k) for k in ctl['step'].unique())}: the two must share their steps")
    pairs = {name: set(map(tuple, t[["method", "concept"]].drop_duplicates().to_numpy()))
             for name, t in (("relearned", target), ("control", ctl))}
    if pairs["relearned"] != pairs["control"]:
        raise ValueError(f"{what}: the relearning has (method, concept) pairs {sorted(pairs['relearned'])}, the "
                         f"control {sorted(pairs['control'])}: the control must relearn the same unlearned models")
    first, last = steps[0], steps[-1]
    if first == last:
        return _undecided(c, f"The relearning was scored at step {first} only: there is no gain to compare.")
    by_question = all("per_question" in t.columns and "questions" in t.columns for t in (target, ctl))
    rows = []
    for source, table in (("target", target), (NEVER_KNOWN, ctl)):
        for r in table[table["step"].isin([first, last])].itertuples(index=False):
            end = "last" if int(r.step) == last else "first"
            if by_question:
                rows += [(r.method, r.concept, source, end, f"{source}:{int(q)}", float(v))
                         for q, v in zip(r.questions, r.per_question)]
            else:
                rows.append((r.method, r.concept, source, end, source, float(r.value)))
    long = pd.DataFrame(rows, columns=["method", "concept", "source", "end", QUESTION, "value"])
    rep = uncertainty.replicate_means(long, "value", ["method", "source", "end"], ("concept",),
                                      QUESTION if by_question else None, strata="source" if by_question else None,
                                      n_boot=n_boot, seed=seed)

    def gain(m, source):
        a, b = rep.column(method=m, source=source, end="first"), rep.column(method=m, source=source, end="last")
        return rep.estimate[b] - rep.estimate[a], rep.draws[:, b] - rep.draws[:, a]

    per = {}
    for m in dict.fromkeys(target["method"]):
        (g_t, d_t), (g_n, d_n) = gain(m, "target"), gain(m, NEVER_KNOWN)
        per[m] = (float(g_t), float(g_n), float(g_t - g_n), d_t - d_n)
    weakest, est, draws = _extreme(per, weakest=True)
    interval = _interval_of(rep, draws)
    status = _decide(interval, threshold, "above")
    name = (", ".join(map(str, dict.fromkeys(ctl["text_concept"].dropna())))
            if "text_concept" in ctl.columns else "") or "the never-known concept"
    evidence = {"steps": last, "weakest_method": weakest, "never_known": name,
                **{f"{m}_target_gain": r[0] for m, r in per.items()},
                **{f"{m}_never_known_gain": r[1] for m, r in per.items()},
                **{f"{m}_difference": r[2] for m, r in per.items()}}
    parts = "; ".join(f"{m} {r[0]:+.2f} on the target, {r[1]:+.2f} on {name} (difference "
                      f"{with_interval(r[2], _interval_of(rep, r[3]), '+.2f', '')})" for m, r in per.items())
    body = (f"{_metric(metric)} gained on the held-out half of the questions after {last} steps on the other half: "
            f"{parts}. The weakest method's ({weakest}) gain minus {name}'s is "
            f"{with_interval(est, interval, '+.2f', '')}, {_against(status, interval, threshold, 'above')}.")
    if "vanilla" in control.columns:  # the "never knew" check: the vanilla model on the control's held-out half
        van = control[(control["data"] == NEVER_KNOWN)].groupby("metric")["vanilla"].mean()
        evidence.update({f"never_known_vanilla_{k}": float(v) for k, v in van.items()})
        said = [f"{_metric(k)} {v:.0%}" if k == "accuracy" else f"{_metric(k)} {v:.2f}" for k, v in van.items()
                if np.isfinite(v)]
        if said:
            body += f" The vanilla model on {name}'s held-out questions: {', '.join(said)}."
    return _verdict(c, status, est, interval, evidence, body, _interval_words(rep))


# --------------------------------------------------------------------------------------------------------------------
# Answers table (pipeline.answers)
# --------------------------------------------------------------------------------------------------------------------
def model_knows_concepts(answers: pd.DataFrame, min_accuracy: float | None = None, claim=None,
                         n_boot: int = uncertainty.N_BOOT, seed: int = uncertainty.SEED) -> Verdict:
    """The vanilla model knows the concepts: its answers contain an expected answer for at least `min_accuracy`
    (default 0.5) of the target questions, on average over the concepts.

    A precondition: "met" when the whole 95% interval of the mean accuracy (a bootstrap over concepts and their
    questions) is at or above `min_accuracy`, "not met" when it is entirely below, "inconclusive" otherwise and
    when the concept set gives no expected answers. The evidence lists how many concepts reach the bar alone.
    """
    require_columns(answers, ["concept", "kind", "correct"], "model_knows_concepts")
    t0 = 0.5 if min_accuracy is None else min_accuracy
    statement = f"The vanilla model knows the concepts (mean accuracy {t0:.0%} or more)"
    c, threshold = _resolve(claim, "model_knows_concepts", statement, min_accuracy, 0.5)
    if c.kind != "precondition":
        c = dataclasses.replace(c, kind="precondition")
    target = answers[(answers["kind"] == "target") & answers["correct"].notna()]
    if target.empty:
        return _undecided(c, "The concept set gives no expected answers to check against.")
    target = target.assign(correct=target["correct"].astype(bool).astype(float))
    if QUESTION not in target.columns:
        target = target.assign(**{QUESTION: target.groupby("concept").cumcount()})
    rep = uncertainty.replicate_means(target, "correct", [], ("concept",), QUESTION, n_boot=n_boot, seed=seed)
    est = float(rep.estimate[0])
    lo, hi = rep.interval()
    interval = (float(lo[0]), float(hi[0]))
    status = _decide(interval, threshold, "at least")
    acc = target.groupby("concept", sort=False)["correct"].mean()
    known = acc[acc >= threshold]
    evidence = {"concepts": int(len(acc)), "known": int(len(known)), "mean_accuracy": est,
                "min_accuracy": float(acc.min()), "questions": int(len(target))}
    weakest = acc.idxmin()
    body = (f"Mean accuracy {with_interval(est, interval, '.0%', '')} over {len(acc)} concept(s) and {len(target)} "
            f"questions, {_against(status, interval, threshold, 'at least', '.0%')}; {len(known)} of {len(acc)} "
            f"concepts reach {threshold:.0%} on their own (lowest: {weakest}, {acc.min():.0%}).")
    return _verdict(c, status, est, interval, evidence, body, rep.level, ".0%")
