"""How much unlearning changed each layer: activations on the answer positions, and weights.

relative change = ||unlearned - vanilla|| / ||vanilla|| (Frobenius norms), per layer and quantity. The quantities are
every registered site (sites.SITES: coef, attn), read at the positions that predict the answer tokens, and every
registered parameter set (experiments.PARAMETER_SETS: value, key, mlp, layer).
Activations are read through nnsight traces (one per model, `remote` passed through).
"""
from __future__ import annotations

import torch

from .. import models
from . import batch as batch_mod, experiments as experiments_mod, sites as sites_mod
from .engine import Pass, check_pair, check_remote, check_remote_pair, wrap

CHANGE_COLUMNS = ["layer", "quantity", "norm_vanilla", "norm_diff", "rel_change"]


def _answer_activations(p: Pass, n_layers: int, sites: list) -> dict:
    """{site name: [per layer: the value at the scored positions, [positions, dim]]}."""
    values = {s.name: [] for s in sites}
    # Resolved to strings before the trace: its body runs remotely too (see engine).
    where = [(s.name, s.path(p.arch), s.value) for s in sites_mod.in_forward_order(values)]
    rows, cols = p.inputs.rows.to(p.device), p.inputs.cols.to(p.device)
    blocks = p.blocks
    with p.trace(keep=torch.tensor([0])):
        for i in range(n_layers):
            for name, path, value in where:
                values[name].append(getattr(models.get_module(blocks[i], path), value)[rows, cols].save())
    return values


def _row(layer, quantity, vanilla_tensors, diff_tensors) -> dict:
    nv = float(torch.sqrt(sum((t.double() ** 2).sum() for t in vanilla_tensors)))
    nd = float(torch.sqrt(sum((t.double() ** 2).sum() for t in diff_tensors)))
    return {"layer": layer, "quantity": quantity, "norm_vanilla": nv, "norm_diff": nd,
            "rel_change": nd / nv if nv else float("nan")}


def change(vanilla, unlearned, tok, prompt_ids, answer_ids, remote=False):
    """One row per (layer, quantity): norms of the vanilla values and of the change; a DataFrame (CHANGE_COLUMNS)."""
    import pandas as pd

    from ..unlearning.adapter import Adapter

    if isinstance(unlearned, Adapter):  # the vanilla model with the adapter applied inside the traces
        from . import adapted

        if remote is True:
            from . import remote as remote_mod

            remote_mod.preflight(vanilla)
        return adapted.change(vanilla, unlearned, tok, prompt_ids, answer_ids, remote=remote)[CHANGE_COLUMNS]
    check_remote_pair(vanilla, unlearned, remote)
    check_remote(remote)
    arch = check_pair(vanilla, unlearned)
    n_layers = models.n_layers(vanilla)
    inputs = batch_mod.scoring_inputs(prompt_ids, answer_ids, tok, "answer", "padded")
    sites = list(sites_mod.SITES.values())
    rows = []
    with torch.no_grad():
        v_lm = wrap(vanilla, tok)
        u_lm = v_lm if unlearned is vanilla else wrap(unlearned, tok)
        v_act = _answer_activations(Pass(vanilla, v_lm, arch, inputs, remote), n_layers, sites)
        u_act = _answer_activations(Pass(unlearned, u_lm, arch, inputs, remote), n_layers, sites)
        v_params, u_params = dict(vanilla.named_parameters()), dict(unlearned.named_parameters())
        for i in range(n_layers):
            for s in sites:
                rows.append(_row(i, s.name, [v_act[s.name][i]], [u_act[s.name][i] - v_act[s.name][i]]))
            for q in experiments_mod.PARAMETER_SETS.values():
                names = q.names(vanilla, arch, [i])
                rows.append(_row(i, q.name, [v_params[n] for n in names], [u_params[n] - v_params[n] for n in names]))
    return pd.DataFrame.from_records(rows, columns=CHANGE_COLUMNS)
