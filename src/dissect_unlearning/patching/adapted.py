"""Dissecting an adapter-unlearned model: one model object, two behaviours, every pass of a run in one session.

"vanilla" is the model as it is; "unlearned" is the same model with the adapter applied inside the trace,
out = out + (x @ A) @ (scale B) on each adapted module (unlearning/adapter.py). So the hosted weights of NDIF serve
as both models and the adapter travels with the request. A restoration of the paper becomes switching adapter terms:
restoring the vanilla value vectors of a window in the unlearned model is leaving out the adapter's term on the MLP
output projection of the window's layers (its weight is then the vanilla one); restoring the keys leaves out the
terms of the MLP input projections, and so on through the parameter sets (experiments.PARAMETER_SETS), whose
selection of a module's weight decides whether its term is toggled. In the reverse direction the vanilla model is
the target and the restored terms are the ones switched on.

All passes of one run (the source, the unpatched target, one per experiment and window) go into one
`model.session(remote=...)`: one request to NDIF, in which the scores are computed too, so only the per-question
losses (mean squared logit difference, KL, top-1 agreement) come back, never logits or activations. Unlike the local
engine this runs every window as one whole forward pass (no skipped layers or replayed modules): simpler to ship,
and the same numbers up to float rounding (tests/test_adapter.py compares it with the merged-weights engine).

The trace bodies below use only tensors, envoys, builtins and torch: every module and adapter tensor is looked up
into a flat list of operations before the session starts, so no code of this package runs inside it (NDIF runs
only whitelisted modules; tests/test_adapter.py runs these bodies with the package made unimportable).
"""
from __future__ import annotations

import torch

from .. import models
from ..unlearning import adapter as adapter_mod
from . import batch as batch_mod, experiments as experiments_mod, sites as sites_mod
from .windows import windows as make_windows  # (the package rebinds its `windows` attribute to this function)
from .common import DIRECTIONS, ENGINE_COLUMNS, REMOTE_CHOICES, as_lm, input_device

# Within a module, the order a trace touches it in: its input, then its output (nnsight follows the forward pass).
_PHASE = {"read_in": 0, "write_in": 0, "lora": 1, "lora_on": 1, "read_out": 2, "write_out": 2}


class ZeroAdapterError(ValueError):
    """The adapter changes nothing (B = 0 everywhere): "unlearned" would be the vanilla model, KRS 0/0."""


def check_adapter(model, adapter: adapter_mod.Adapter) -> None:
    """Raise unless `adapter` fits `model` and changes it: a zero adapter would compare the vanilla model with
    itself, silently (every unpatched loss 0, every KRS NaN)."""
    adapter_mod.fits(adapter, model)
    if not any(bool(b.any()) for b in adapter.b.values()):
        raise ZeroAdapterError("the adapter changes nothing (B is zero in every module: it was never trained, or "
                               "trained with no step), so the 'unlearned' model is the vanilla model and every "
                               "score would compare the vanilla model with itself")


class _Plan:
    """Everything a session needs, resolved before it starts: envoys, adapter tensors, module order."""

    def __init__(self, lm, model, arch, adapter: adapter_mod.Adapter):
        self.lm, self.model, self.arch, self.adapter = lm, model, arch, adapter
        self.n_layers = models.n_layers(model)
        blocks = models.get_module(lm, arch.layers)
        self.order = [n for n, _ in model.get_submodule(f"{arch.layers}.0").named_modules()]
        self.envoys = {}
        paths = set(adapter.targets) | {s.path(arch) for s in sites_mod.SITES.values()}
        for i in range(self.n_layers):
            for path in paths:
                self.envoys[(i, path)] = models.get_module(blocks[i], path)
        # scale folded into B: the body computes (x @ A) @ B', one multiplication fewer, and no float to ship
        self.terms = {(i, t): (adapter.a[adapter.name(i, t)], adapter.scale * adapter.b[adapter.name(i, t)])
                      for i in range(self.n_layers) for t in adapter.targets}

    def ops(self, terms_on: set, reads=(), writes=(), moved: bool = False) -> list[tuple]:
        """The operations of one pass, in forward order: (op, envoy, A, B, key).

        terms_on: {(layer, target)} whose adapter term applies. reads / writes: [(site, layer)] to save / to set to
        the source's value (key (site name, layer)), or with moved=True another question's (key (site name, layer,
        "moved"): the control of source "other"). A site on a module's output replaces that output, adapter term
        included; a site on a module's input feeds the term as well (an adapted module computes W x + x A B')."""
        ops = []
        written = {(s.path(self.arch), i, s.value): (s.name, i, "moved") if moved else (s.name, i) for s, i in writes}
        for s, i in reads:
            ops.append((i, s.path(self.arch), "read_out" if s.value == "output" else "read_in", (s.name, i)))
        for s, i in writes:
            ops.append((i, s.path(self.arch), "write_out" if s.value == "output" else "write_in",
                        written[(s.path(self.arch), i, s.value)]))
        for i, t in sorted(terms_on):
            if (t, i, "output") in written:
                continue
            key = written.get((t, i, "input"))
            ops.append((i, t, "lora" if key is None else "lora_on", key))
        ops.sort(key=lambda o: (o[0], self.order.index(o[1]), _PHASE[o[2]]))
        return [(op, self.envoys[(i, path)], *(self.terms.get((i, path)) or (None, None)), key)
                for i, path, op, key in ops]

    def toggled(self, exp, layers) -> set:
        """{(layer, target)} whose weights `exp` restores in `layers`: the terms it switches."""
        if not exp.restores_parameters:
            return set()
        names = set(experiments_mod.parameter_names(self.model, self.arch, exp, layers))
        return {(i, t) for i in layers for t in self.adapter.targets
                if f"{self.adapter.name(i, t)}.weight" in names}


def run(model, adapter: adapter_mod.Adapter, tok, prompt_ids: list[list[int]], answer_ids: list[list[int]],
        experiments=experiments_mod.PAPER_EXPERIMENTS, window: int = 5, layers=None, alignment: str = "answer",
        direction: str = "forward", remote=False, layout: str = "auto"):
    """engine.run for "unlearned" = `model` + `adapter`: a DataFrame with ENGINE_COLUMNS, from one session.

    model: the vanilla HF model (left unchanged), or an nnsight model of one NDIF hosts (models.remote_model: no
    weights here, remote=True). remote: False, True (NDIF: the adapter travels with the request)
    or "local" (nnsight's offline simulation of the request). layout "auto" is the padded layout (the packed one
    needs a check against it on the model, which the local engine does)."""
    import pandas as pd

    exps = experiments_mod.get(experiments)
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; valid: {', '.join(DIRECTIONS)}")
    if remote not in REMOTE_CHOICES:
        raise ValueError(f"remote must be False, True (run on NDIF) or 'local' (nnsight's offline simulation of an "
                         f"NDIF request), got {remote!r}")
    lm, model = as_lm(model, tok)
    if model.training:
        raise ValueError(f"{type(model).__name__} is in training mode (dropout on): call .eval() first")
    check_adapter(model, adapter)
    arch = models.architecture_of(model)
    plan = _Plan(lm, model, arch, adapter)
    wins = make_windows(plan.n_layers, window, layers)
    inputs = batch_mod.scoring_inputs(prompt_ids, answer_ids, tok, alignment, "padded" if layout == "auto" else layout)

    everywhere = {(i, t) for i in range(plan.n_layers) for t in adapter.targets}
    source_on, target_on = (set(), everywhere) if direction == "forward" else (everywhere, set())
    sites = sites_mod.in_forward_order({s for e in exps for s in e.sites})
    patched = sorted({i for w in wins for i in w.layers}) if sites else []
    source_ops = plan.ops(source_on, reads=[(s, i) for i in patched for s in sites])
    target_ops = plan.ops(target_on)
    runs, labels = [], []
    for exp in exps:
        exp_sites = [sites_mod.SITES[s] for s in exp.sites]
        for w in wins:
            terms = target_on ^ plan.toggled(exp, w.layers)  # forward: switched off; reverse: switched on
            runs.append(plan.ops(terms, writes=[(s, i) for i in w.layers for s in exp_sites],
                                 moved=exp.source == "other"))
            labels.append((exp, w))
    # Source "other" (the coef_other control): the values of another question (batch.other_question_index), moved
    # inside the request
    moved = sorted({op[-1] for ops in runs for op in ops if op[0].startswith("write") and len(op[-1]) == 3})
    other = batch_mod.other_question_index(inputs) if moved else None
    stats = _session(plan.lm, inputs, model, remote, source_ops, target_ops, runs, moved, other)

    records = []
    for (exp, w), per_q in zip(labels, stats[1:]):
        for q, (patched_q, base_q) in enumerate(zip(per_q.tolist(), stats[0].tolist())):
            loss, kl, top1 = patched_q
            records.append({
                "experiment": exp.name, "direction": direction, "window_size": None if layers is not None else window,
                "center_layer": w.center, "layers": list(w.layers), "question_index": q,
                "answer_positions": inputs.positions[q], "n_positions": len(inputs.positions[q]),
                "loss_patched": loss, "loss_unpatched": base_q[0],
                "krs": float("nan") if base_q[0] == 0 else 1.0 - loss / base_q[0],
                "kl": kl, "kl_unpatched": base_q[1], "top1_agree": top1, "top1_agree_unpatched": base_q[2],
            })
    return pd.DataFrame.from_records(records, columns=ENGINE_COLUMNS)


def _session(lm, inputs: batch_mod.ScoringInputs, model, remote, source_ops, target_ops, runs, moved=(),
             other=None) -> torch.Tensor:
    """[1 + len(runs), questions, 3]: (mse, KL, top-1 agreement) per question of the unpatched target, then of each
    patched run, all against the source, computed in one session (on NDIF when remote is True). moved: the keys
    (site, layer, "moved") whose values are another question's, `other` = (rows, cols) to take them with."""
    device = input_device(model)
    kwargs = {k: v.to(device) for k, v in inputs.model_inputs.items()}
    rows, cols = inputs.rows.to(device), inputs.cols.to(device)
    spans = [(s.start, s.stop) for s in inputs.spans]
    other_rows, other_cols = (other[0].to(device), other[1].to(device)) if other is not None else (None, None)
    with torch.no_grad(), lm.session(remote=remote if remote else False):
        values = {}
        with lm.trace(**kwargs):
            for op, m, a, b, key in source_ops:
                if op == "lora":
                    x = m.input  # before the output: nnsight meets them in this order
                    m.output = m.output + (x @ a.to(x)) @ b.to(x)  # to NDIF's device and dtype, there
                elif op == "read_in":
                    values[key] = m.input
                elif op == "read_out":
                    values[key] = m.output
            reference = lm.output.logits[rows, cols]
        for site, layer, tag in moved:
            values[(site, layer, tag)] = values[(site, layer)][other_rows, other_cols]
        ref = reference.double()
        ref_logp = torch.log_softmax(ref, -1)
        ref_top1 = ref.argmax(-1)
        results = []
        for ops in [target_ops] + runs:
            with lm.trace(**kwargs):
                for op, m, a, b, key in ops:
                    if op == "lora":
                        x = m.input
                        m.output = m.output + (x @ a.to(x)) @ b.to(x)
                    elif op == "lora_on":  # after its write_in: the term sees the patched input
                        x = values[key]
                        m.output = m.output + (x @ a.to(x)) @ b.to(x)
                    elif op == "write_in":
                        m.input = values[key]
                    elif op == "write_out":
                        m.output = values[key]
                logits = lm.output.logits[rows, cols]
            x = logits.double()
            mse = ((x - ref) ** 2).mean(-1)
            kl = (ref_logp.exp() * (ref_logp - torch.log_softmax(x, -1))).sum(-1)
            agree = (x.argmax(-1) == ref_top1).double()
            per_position = torch.stack([mse, kl, agree], -1)
            results.append(torch.stack([per_position[a:b].mean(0) for a, b in spans]))
        stats = torch.stack(results).save()
    return stats.cpu()


def change(model, adapter: adapter_mod.Adapter, tok, prompt_ids, answer_ids, remote=False):
    """change.change for "unlearned" = `model` + `adapter`: one row per (layer, quantity) (change.change puts the
    columns in CHANGE_COLUMNS' order: this module does not import that one, which calls it).

    The activations come from one session (adapter off, adapter on), which returns their norms only. The weights'
    norms are the local vanilla model's, and the change of a weight is the adapter's term, scale (A B)^T, exactly:
    zero for a parameter the adapter does not adapt."""
    import pandas as pd

    if remote not in REMOTE_CHOICES:
        raise ValueError(f"remote must be False, True or 'local', got {remote!r}")
    lm, model = as_lm(model, tok)
    check_adapter(model, adapter)
    arch = models.architecture_of(model)
    plan = _Plan(lm, model, arch, adapter)
    inputs = batch_mod.scoring_inputs(prompt_ids, answer_ids, tok, "answer", "padded")
    sites = list(sites_mod.SITES.values())
    reads = [(s, i) for i in range(plan.n_layers) for s in sites_mod.in_forward_order(sites_mod.SITES)]
    everywhere = {(i, t) for i in range(plan.n_layers) for t in adapter.targets}
    arrays = {n: p for n, p in model.named_parameters()}
    # The weights' norms: the vanilla weights' own where they are here, NDIF's (read in the request) where not
    weights = [] if next(model.parameters()).device.type != "meta" else [
        (n, models.get_module(plan.lm, n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1]) for n in arrays]
    norms, squares = _change_session(plan.lm, inputs, model, remote, plan.ops(set(), reads=reads),
                                     plan.ops(everywhere, reads=reads), [(s.name, i) for s, i in reads],
                                     [(m, attr) for _, m, attr in weights])
    found = dict(zip(((s.name, i) for s, i in reads), norms.tolist()))
    if weights:
        square = dict(zip((n for n, _, _ in weights), squares.tolist()))
    else:
        square = {n: float((p.detach().double() ** 2).sum()) for n, p in arrays.items()}
    rows = []
    with torch.no_grad():
        for i in range(plan.n_layers):
            for s in sites:
                nv, nd = found[(s.name, i)]
                rows.append({"layer": i, "quantity": s.name, "norm_vanilla": nv, "norm_diff": nd,
                             "rel_change": nd / nv if nv else float("nan")})
            for q in experiments_mod.PARAMETER_SETS.values():
                names = q.names(model, arch, [i])
                nv = float(torch.sqrt(torch.tensor(sum(square[n] for n in names), dtype=torch.float64)))
                adapted_names = [n for n in names if n.endswith(".weight") and n[:-7] in adapter.a]
                nd = float(torch.sqrt(sum(((adapter.delta(n[:-7]).double() ** 2).sum() for n in adapted_names),
                                          torch.zeros((), dtype=torch.float64))))
                rows.append({"layer": i, "quantity": q.name, "norm_vanilla": nv, "norm_diff": nd,
                             "rel_change": nd / nv if nv else float("nan")})
    return pd.DataFrame.from_records(rows)


def _change_session(lm, inputs, model, remote, vanilla_ops, unlearned_ops, keys, weights
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """([len(keys), 2]: ||vanilla value|| and ||unlearned - vanilla|| of each read site at the scored positions,
    [len(weights)]: the sum of squares of each (module envoy, parameter name) of `weights`, read in the request."""
    device = input_device(model)
    kwargs = {k: v.to(device) for k, v in inputs.model_inputs.items()}
    rows, cols = inputs.rows.to(device), inputs.cols.to(device)
    with torch.no_grad(), lm.session(remote=remote if remote else False):
        seen = []
        for ops in (vanilla_ops, unlearned_ops):
            values = {}
            with lm.trace(**kwargs):
                for op, m, a, b, key in ops:
                    if op == "lora":
                        x = m.input
                        m.output = m.output + (x @ a.to(x)) @ b.to(x)
                    elif op == "read_in":
                        values[key] = m.input[rows, cols]
                    elif op == "read_out":
                        values[key] = m.output[rows, cols]
            seen.append(values)
        norms = torch.stack([torch.stack([torch.linalg.vector_norm(seen[0][k].double()),
                                          torch.linalg.vector_norm((seen[1][k] - seen[0][k]).double())])
                             for k in keys]).save()
        squares = torch.zeros(0).save()
        if weights:
            with lm.trace(**kwargs):  # a parameter is read inside a trace; this one's forward pass is not used
                squares = torch.stack([(getattr(m, name).double() ** 2).sum() for m, name in weights]).save()
    return norms.cpu(), squares.cpu()
