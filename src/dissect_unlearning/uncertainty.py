"""How sure is a mean? A seeded hierarchical bootstrap over (method, concept) pairs and their questions.

The book's means are means of means: a KRS is averaged over a concept's questions, then over the (method, concept)
pairs (the paper's order). Both levels are samples: other concepts, other questions would give other numbers. So one
resample draws the pairs with replacement and then, inside every drawn pair, its questions with replacement, and
recomputes the statistic; the 2.5th and 97.5th percentiles of 1000 such resamples (seed 0) are the 95% interval.

What is resampled follows from the table:
- several pairs, several questions per pair: pairs, then questions within each drawn pair;
- one pair: its questions only (the interval says how much the questions alone move the mean);
- one question per pair, or no question column (`question=None`: the behaviour, relearning and change tables, whose
  rows are already means over questions): pairs only - the interval is over pairs;
- one pair and one question: nothing to resample; the interval is (nan, nan) and a verdict cannot be decided on it.

Two entry points:
- `replicate_means`: the fast path for "mean per question -> per pair -> over pairs" of many columns at once (every
  window of every experiment), vectorised with numpy; every column sees the same draws, so a difference or a
  maximum of columns can be bootstrapped from its `draws`;
- `bootstrap`: any statistic `table -> float`, recomputed on resampled tables (slow, for what the fast path cannot
  express). It consumes the random numbers exactly as the fast path does, so with one seed both agree.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .tables import require_columns

N_BOOT = 1000
SEED = 0
LEVEL = 0.95

# Columns the generic bootstrap adds to the table it hands the statistic: a pair or a question drawn twice gets two
# numbers, so grouping by them counts it twice, as the resample means.
PAIR_DRAW = "pair_draw"
QUESTION_DRAW = "question_draw"


def percentile_interval(draws, level: float = LEVEL):
    """(lo, hi) percentile interval of bootstrap draws along axis 0, ignoring NaN draws; NaN where no draw is
    finite. `draws` of shape [n_boot] gives two floats, [n_boot, k] two arrays of k."""
    draws = np.asarray(draws, dtype=float)
    draws = np.where(np.isfinite(draws), draws, np.nan)
    tail = (1 - level) / 2 * 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: its interval is NaN
        lo, hi = np.nanpercentile(draws, [tail, 100 - tail], axis=0)
    if np.ndim(lo) == 0:
        return float(lo), float(hi)
    return lo, hi


def describe_level(resampled: tuple[bool, bool], pairs=("method", "concept"), questions: bool = True) -> str:
    """Words for what a bootstrap resampled: (pairs?, questions?) -> 'bootstrap over pairs and questions', ...;
    with one pair column (e.g. concept) its name replaces 'pairs'. `questions`: whether the table has a question
    level at all."""
    pairs = list(pairs)
    many, one = (f"{pairs[0]}s", pairs[0]) if len(pairs) == 1 else ("pairs", "pair")
    resample_pairs, resample_questions = resampled
    if resample_pairs and resample_questions:
        return f"bootstrap over {many} and questions"
    if resample_pairs:
        return f"bootstrap over {many}"
    if resample_questions:
        return f"bootstrap over questions (one {one})"
    return f"nothing to resample (one {one}, one question)" if questions else f"nothing to resample (one {one})"


# --------------------------------------------------------------------------------------------------------------------
# The structure of a table: which pair and which question each row belongs to
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class _Design:
    pair: np.ndarray        # [rows] pair code
    question: np.ndarray    # [rows] question code (global: the same code in two pairs are two questions)
    n_pairs: int
    n_questions: int
    avail: list             # per stratum: [n_pairs, max] padded question codes each pair can draw from
    n_avail: list           # per stratum: [n_pairs] how many


def _codes(table: pd.DataFrame, columns) -> tuple[np.ndarray, int]:
    """Integer code per row for the combination of `columns` (one code for all rows when there are none)."""
    columns = list(columns)
    if not columns:
        return np.zeros(len(table), dtype=np.int64), 1
    codes = table.groupby(columns, sort=True, dropna=False).ngroup().to_numpy()
    return codes.astype(np.int64), int(codes.max()) + 1


def _design(table: pd.DataFrame, pairs, question, strata, usable: np.ndarray) -> _Design:
    pair, n_pairs = _codes(table, pairs)
    if question is None:
        q, n_q = np.zeros(len(table), dtype=np.int64), 1
    else:
        q, n_q = _codes(table, [question])
    stratum, n_strata = _codes(table, [strata]) if strata is not None else (np.zeros(len(table), np.int64), 1)
    avail, n_avail = [], []
    for s in range(n_strata):
        present = np.zeros((n_pairs, n_q), dtype=bool)
        keep = usable & (stratum == s)
        present[pair[keep], q[keep]] = True
        counts = present.sum(1)
        padded = np.zeros((n_pairs, max(1, int(counts.max()))), dtype=np.int64)
        for p in range(n_pairs):
            padded[p, :counts[p]] = np.flatnonzero(present[p])
        avail.append(padded)
        n_avail.append(counts)
    return _Design(pair, q, n_pairs, n_q, avail, n_avail)


def _resampled(design: _Design) -> tuple[bool, bool]:
    """(pairs resampled?, questions resampled?)."""
    many_questions = any(int(n.max(initial=0)) > 1 for n in design.n_avail)
    return design.n_pairs > 1, many_questions


def _draws(design: _Design, n_boot: int, rng: np.random.Generator):
    """The resampling itself: pairs [n_boot, n_pairs] and, per stratum, questions [n_boot, n_pairs, max] with a mask
    of the slots used (a pair draws as many questions as it has, in each stratum)."""
    pair_draws = rng.integers(0, design.n_pairs, size=(n_boot, design.n_pairs))
    question_draws = []
    for avail, n_avail in zip(design.avail, design.n_avail):
        n = n_avail[pair_draws]                                           # [B, P] questions of each drawn pair
        width = avail.shape[1]
        pick = np.floor(rng.random((n_boot, design.n_pairs, width)) * np.maximum(n, 1)[..., None]).astype(np.int64)
        used = np.arange(width)[None, None, :] < n[..., None]
        question_draws.append((avail[pair_draws[..., None], pick], used))
    return pair_draws, question_draws


# --------------------------------------------------------------------------------------------------------------------
# Fast path: mean per question -> per pair -> over pairs, for many columns at once
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Replicates:
    """Bootstrap replicates of the pair-averaged mean of `value` for every column (a combination of `columns`).

    keys: DataFrame, one row per column (the values of `columns`); estimate: [C] the means on the table itself;
    draws: [n_boot, C] the means on each resample (NaN where a resample left a column without data); pairs: [C]
    how many pairs have data in each column; resampled: (pairs?, questions?).
    """
    keys: pd.DataFrame
    estimate: np.ndarray
    draws: np.ndarray
    pairs: np.ndarray
    resampled: tuple[bool, bool]
    unit: tuple = ("method", "concept")  # the pair columns
    questions: bool = True  # whether the table had a question level

    @property
    def level(self) -> str:
        return describe_level(self.resampled, self.unit, self.questions)

    def interval(self, level: float = LEVEL):
        """(lo [C], hi [C]); NaN everywhere when nothing could be resampled."""
        if not any(self.resampled):
            nan = np.full(len(self.estimate), np.nan)
            return nan, nan.copy()
        return percentile_interval(self.draws, level)

    def column(self, **key) -> int:
        """The index of the column whose keys equal `key` (e.g. column(experiment="coef", center_layer=5))."""
        mask = np.ones(len(self.keys), dtype=bool)
        for k, v in key.items():
            mask &= (self.keys[k] == v).to_numpy()
        hits = np.flatnonzero(mask)
        if len(hits) != 1:
            raise KeyError(f"Replicates.column: {len(hits)} columns match {key}")
        return int(hits[0])


def replicate_means(table: pd.DataFrame, value: str, columns=(), pairs=("method", "concept"),
                    question: str | None = "question_index", strata: str | None = None, n_boot: int = N_BOOT,
                    seed: int = SEED) -> Replicates:
    """Bootstrap the mean of `value` per question -> per pair -> over pairs, for every combination of `columns`.

    Resampled: the pairs (the combinations of the `pairs` columns present in the table) with replacement, then, in
    every drawn pair, its questions (`question`) with replacement - within each stratum when `strata` names a column
    (e.g. the halves of a split-half selection, so that each half keeps its size). `question=None`: the rows of a
    pair are averaged and only pairs are resampled. Rows with a NaN `value` are left out, as a plain mean leaves
    them out. The same draws serve every column, so the draws of two columns are paired.
    """
    pairs = [c for c in pairs if c in table.columns]
    columns = list(columns)
    require_columns(table, [value] + columns + ([question] if question else []) + ([strata] if strata else []),
                    "replicate_means", allow_empty=False)
    v = pd.to_numeric(table[value], errors="coerce").to_numpy(dtype=float)
    usable = np.isfinite(v)
    design = _design(table, pairs, question, strata, usable)
    col, n_cols = _codes(table, columns)
    keys = (table.assign(_col=col).drop_duplicates("_col").sort_values("_col")[columns].reset_index(drop=True)
            if columns else pd.DataFrame(index=[0]))

    # Cell means [pair, question, column] and where a cell has data.
    P, Q, C = design.n_pairs, design.n_questions, n_cols
    sums = np.zeros((P, Q, C))
    counts = np.zeros((P, Q, C))
    rows = (design.pair[usable], design.question[usable], col[usable])
    np.add.at(sums, rows, v[usable])
    np.add.at(counts, rows, 1.0)
    present = (counts > 0).astype(float)
    cell = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)

    # The table's own estimate: every available question once.
    pair_n = present.sum(1)                                               # [P, C]
    pair_mean = np.divide(cell.sum(1), pair_n, out=np.full((P, C), np.nan), where=pair_n > 0)
    n_pairs_col = (pair_n > 0).sum(0)
    estimate = np.divide(np.nansum(pair_mean, axis=0), n_pairs_col, out=np.full(C, np.nan), where=n_pairs_col > 0)

    resampled = _resampled(design)
    rng = np.random.default_rng(seed)
    pair_draws, question_draws = _draws(design, n_boot, rng)
    # How often each question of each drawn pair was drawn: [B, P slots, Q].
    times = np.zeros(n_boot * P * Q)
    for drawn, used in question_draws:
        slot = (np.arange(n_boot)[:, None, None] * P + np.arange(P)[None, :, None]) * Q
        times += np.bincount((slot + drawn)[used], minlength=n_boot * P * Q)
    times = times.reshape(n_boot, P, Q)

    # Mean of each drawn pair over its drawn questions, [B, P slots, C]; a pair without data in a column drops out
    # of that column's mean over pairs.
    num = np.zeros((n_boot, P, C))
    den = np.zeros((n_boot, P, C))
    for p in range(P):
        b, j = np.nonzero(pair_draws == p)
        num[b, j] = times[b, j] @ cell[p]
        den[b, j] = times[b, j] @ present[p]
    ok = den > 0
    slot_mean = np.divide(num, den, out=np.zeros_like(num), where=ok)
    n_slots = ok.sum(1)
    draws = np.divide(slot_mean.sum(1), n_slots, out=np.full((n_boot, C), np.nan), where=n_slots > 0)
    return Replicates(keys, estimate, draws, n_pairs_col, resampled, tuple(pairs) or ("pair",), question is not None)


def mean_by(table: pd.DataFrame, value: str, by=(), pairs=("method", "concept"),
            question: str | None = "question_index", each: str | None = None, n_boot: int = N_BOOT,
            seed: int = SEED, level: float = LEVEL) -> pd.DataFrame:
    """Per group of `by`: the pair-averaged mean of `value` and its bootstrap interval.

    `each`: a column of `by` whose values are bootstrapped one at a time (e.g. experiment: each experiment on its
    own pairs, where experiments ran on different concepts). Columns: by..., mean, lo, hi, pairs (pairs with data),
    interval (what was resampled, in words).
    """
    by = list(by)
    if each is not None and each not in by:
        raise ValueError(f"mean_by: `each` ({each!r}) must be one of the `by` columns {by}")
    if each is not None and table[each].nunique(dropna=False) > 1:
        parts = [mean_by(part, value, by, pairs, question, None, n_boot, seed, level)
                 for _, part in table.groupby(each, sort=False, dropna=False)]
        return pd.concat(parts, ignore_index=True)
    rep = replicate_means(table, value, by, pairs, question, n_boot=n_boot, seed=seed)
    lo, hi = rep.interval(level)
    out = rep.keys.copy() if by else pd.DataFrame(index=[0])
    out["mean"], out["lo"], out["hi"] = rep.estimate, lo, hi
    out["pairs"] = rep.pairs.astype(int)
    out["interval"] = rep.level
    return out.reset_index(drop=True)


# --------------------------------------------------------------------------------------------------------------------
# Generic path: any statistic of a table
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    estimate: float
    lo: float
    hi: float
    draws: np.ndarray
    level: str  # what was resampled, in words


def bootstrap(table: pd.DataFrame, statistic, pairs=("method", "concept"), question: str | None = "question_index",
              strata: str | None = None, n_boot: int = N_BOOT, seed: int = SEED, level: float = LEVEL) -> Interval:
    """The estimate `statistic(table)` and its bootstrap interval, from `statistic` recomputed on resampled tables.

    Resampled as in `replicate_means` (pairs, then questions within each drawn pair; see the module docstring for
    one pair or one question). The statistic gets a table with the original columns plus PAIR_DRAW and
    QUESTION_DRAW: draw numbers that tell a pair or a question drawn twice apart. Group by them (not by method /
    concept / question_index) to average within pairs and questions; on the table itself they number the pairs and
    questions once each.
    """
    pairs = [c for c in pairs if c in table.columns]
    require_columns(table, pairs + ([question] if question else []) + ([strata] if strata else []), "bootstrap",
                    allow_empty=False)
    usable = np.ones(len(table), dtype=bool)
    design = _design(table, pairs, question, strata, usable)
    key = design.pair * design.n_questions + design.question
    own = table.assign(**{PAIR_DRAW: design.pair, QUESTION_DRAW: key})
    estimate = float(statistic(own))
    resampled = _resampled(design)
    words = describe_level(resampled, pairs or ("pair",), question is not None)
    if not any(resampled):
        return Interval(estimate, float("nan"), float("nan"), np.full(n_boot, np.nan), words)

    rows_of = pd.Series(np.arange(len(table))).groupby(key).apply(lambda s: s.to_numpy()).to_dict()
    rng = np.random.default_rng(seed)
    pair_draws, question_draws = _draws(design, n_boot, rng)
    draws = np.empty(n_boot)
    for b in range(n_boot):
        index, pair_no, question_no = [], [], []
        for j, p in enumerate(pair_draws[b]):
            for drawn, used in question_draws:
                for q in drawn[b, j][used[b, j]]:
                    rows = rows_of[int(p) * design.n_questions + int(q)]
                    index.append(rows)
                    pair_no.append(np.full(len(rows), j))
                    question_no.append(np.full(len(rows), len(question_no)))
        sample = table.iloc[np.concatenate(index)].assign(
            **{PAIR_DRAW: np.concatenate(pair_no), QUESTION_DRAW: np.concatenate(question_no)})
        draws[b] = statistic(sample)
    lo, hi = percentile_interval(draws, level)
    return Interval(estimate, lo, hi, draws, words)
