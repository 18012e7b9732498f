"""The scores: loss, KRS, KL, top-1 agreement, and their aggregation (which positions: see batch.py).

loss(A, B) = mean squared difference of the full-vocabulary logits of A and B over the scored positions (`mse`, the
paper's loss; any metric(reference logits, logits) -> float can take its place: engine.run(metric=...)).
KRS = 1 - loss(patched, reference) / loss(unpatched, reference): 1 = the patch brings the reference output back
completely, 0 = no effect, negative = worse. It is NaN when the unpatched model already equals the reference on a
question (0/0).
"""
from __future__ import annotations

import numpy as np
import torch


# ------------------------------------------------------------------------------------------------------------------
# Scores of one question: plain callables on [positions, vocab] logits (computed in float64)
# ------------------------------------------------------------------------------------------------------------------
def mse(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean squared difference of the full-vocabulary logits (the paper's loss)."""
    return float(((logits.double() - reference.double()) ** 2).mean())


def kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(reference || model) of the next-token distributions, averaged over positions (nats)."""
    ref = torch.log_softmax(reference.double(), -1)
    new = torch.log_softmax(logits.double(), -1)
    return float((ref.exp() * (ref - new)).sum(-1).mean())


def top1_agree(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Fraction of positions where the model's greedy token is the reference's greedy token."""
    return float((logits.argmax(-1) == reference.argmax(-1)).double().mean())


def krs(loss_patched: float, loss_unpatched: float) -> float:
    """Knowledge Recovery Score; NaN when there is nothing to recover (loss_unpatched == 0)."""
    return float("nan") if loss_unpatched == 0 else 1.0 - loss_patched / loss_unpatched


class Reference:
    """The reference logits of every scored position, prepared once to score many patched runs quickly.

    A sweep scores ~100 runs against the same reference, each over a few hundred positions x the vocabulary, so each
    run costs a few passes over d = logits - reference in two reused buffers (fresh 50 MB tensors would cost more in
    page faults than the arithmetic):
      loss = mean(d^2)
      KL(ref || new) = lse(new) - lse(ref) - ref_probs . d = log1p(ref_probs . expm1(d)) - ref_probs . d
    (the identity lse(new) - lse(ref) = log sum ref_probs * exp(d) avoids subtracting large log-normalisers, and
    expm1 keeps every term small where the two models agree, so float32 keeps the accuracy of the double-precision
    functions above to ~1e-6 relative).
    """

    def __init__(self, logits: torch.Tensor, spans: list[slice]):
        self.logits = logits.float().contiguous()
        self.probs = torch.softmax(self.logits, -1)
        self.top1 = self.logits.max(-1).indices
        self.spans = spans
        self._d = torch.empty_like(self.logits)
        self._w = torch.empty_like(self.logits)

    def per_question(self, logits: torch.Tensor, metric=mse) -> list[dict]:
        """loss (by `metric`), kl, top1_agree of each question for the logits of one run ([scored positions, vocab]).

        The default metric, mse, is computed here with the other scores; any other is called on each question's
        reference logits and logits (float32)."""
        x = logits.float()
        agree = (x.max(-1).indices == self.top1).double()
        d = torch.sub(x, self.logits, out=self._d)
        sq = torch.linalg.vector_norm(d, dim=-1).double() ** 2 / x.shape[-1]
        shift = torch.mul(d, self.probs, out=self._w).sum(-1).double()
        growth = torch.mul(d.expm1_(), self.probs, out=self._w).sum(-1).double()  # in place: d is done with
        kl_pos = torch.log1p(growth) - shift
        for i in torch.nonzero(~torch.isfinite(kl_pos)).flatten().tolist():  # a logit difference > 88: exp overflows
            kl_pos[i] = kl(self.logits[i:i + 1], x[i:i + 1])
        return [{"loss": float(sq[s].mean()) if metric is mse else float(metric(self.logits[s], x[s])),
                 "kl": float(kl_pos[s].mean()), "top1_agree": float(agree[s].mean())}
                for s in self.spans]


# ------------------------------------------------------------------------------------------------------------------
# Aggregation over questions, concepts, methods
# ------------------------------------------------------------------------------------------------------------------
def aggregate(table, by=("experiment", "center_layer"), value: str = "krs", unit=None, n_boot: int = 1000,
              ci: float = 0.95, seed: int = 0):
    """Mean, standard deviation and a seeded percentile-bootstrap interval of `value` per group of `by`.

    unit=None: every row (one question) is an observation. unit=("method", "concept") (any columns): rows are first
    averaged within each unit, as the paper averages a concept's questions before averaging over concepts and
    methods; the statistics are then over the unit means. NaN values (nothing to recover) are left out; `n` counts
    the observations used. Returns a DataFrame: by..., mean, std (ddof=1), ci_low, ci_high, n.
    """
    import pandas as pd

    by = [by] if isinstance(by, str) else list(by)
    unit = [] if unit is None else ([unit] if isinstance(unit, str) else list(unit))
    missing = [c for c in by + unit + [value] if c not in table.columns]
    if missing:
        raise KeyError(f"aggregate: the table has no column(s) {missing}; columns: {list(table.columns)}")
    data = table[by + unit + [value]].dropna(subset=[value])
    if unit:
        data = data.groupby(by + unit, sort=True, dropna=False)[value].mean().reset_index()
    rng = np.random.default_rng(seed)
    out = []
    for key, grp in data.groupby(by, sort=True, dropna=False):
        x = grp[value].to_numpy(dtype=float)
        low = high = float("nan")
        if len(x) > 1 and n_boot > 0:
            means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(1)
            low, high = np.quantile(means, [(1 - ci) / 2, 1 - (1 - ci) / 2])
        elif len(x) == 1:
            low = high = float(x[0])
        key = key if isinstance(key, tuple) else (key,)
        out.append({**dict(zip(by, key)), "mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1
                    else float("nan"), "ci_low": float(low), "ci_high": float(high), "n": len(x)})
    return pd.DataFrame(out, columns=by + ["mean", "std", "ci_low", "ci_high", "n"])
