"""How much unlearning changed each layer: activations on the answer positions, and weights.

relative change = ||unlearned - vanilla|| / ||vanilla|| (Frobenius norms), per layer and quantity:
  coef   MLP coefficients (input of the MLP output projection) at the positions that predict the answer tokens
  attn   attention states (output of the attention output projection) at the same positions
  value  the MLP output projection's weight (value vectors)
  key    the parameters of the MLP input projections
  mlp    every parameter of the MLP
  layer  every parameter of the decoder layer
Activations are read through nnsight traces (one per model, `remote` passed through).
"""
from __future__ import annotations

import torch

from .. import models
from . import batch as batch_mod, experiments as experiments_mod
from .engine import _Pass, check_pair, check_remote, wrap

QUANTITIES = ("coef", "attn", "value", "key", "mlp", "layer")
CHANGE_COLUMNS = ["layer", "quantity", "norm_vanilla", "norm_diff", "rel_change"]


def _answer_activations(p: _Pass, n_layers: int):
    """coef and attn of every layer at the scored positions: two lists of [positions, dim] tensors."""
    coefs, states = [], []
    rows, cols = p.inputs.rows.to(p.device), p.inputs.cols.to(p.device)
    blocks = p.blocks
    attn_path, coef_path = p.arch.attn_module, p.arch.coef_module
    with p.trace(keep=torch.tensor([0])):
        for i in range(n_layers):
            states.append(models.get_module(blocks[i], attn_path).output[rows, cols].save())
            coefs.append(models.get_module(blocks[i], coef_path).input[rows, cols].save())
    return coefs, states


def _row(layer, quantity, vanilla_tensors, diff_tensors) -> dict:
    nv = float(torch.sqrt(sum((t.double() ** 2).sum() for t in vanilla_tensors)))
    nd = float(torch.sqrt(sum((t.double() ** 2).sum() for t in diff_tensors)))
    return {"layer": layer, "quantity": quantity, "norm_vanilla": nv, "norm_diff": nd,
            "rel_change": nd / nv if nv else float("nan")}


def change(vanilla, unlearned, tok, prompt_ids, answer_ids, remote=False):
    """One row per (layer, quantity): norms of the vanilla values and of the change; a DataFrame (CHANGE_COLUMNS)."""
    import pandas as pd

    check_remote(remote)
    arch = check_pair(vanilla, unlearned)
    n_layers = models.n_layers(vanilla)
    inputs = batch_mod.scoring_inputs(prompt_ids, answer_ids, tok, "answer", "padded")
    rows = []
    with torch.no_grad():
        v_lm = wrap(vanilla, tok)
        u_lm = v_lm if unlearned is vanilla else wrap(unlearned, tok)
        v_coef, v_attn = _answer_activations(_Pass(vanilla, v_lm, arch, inputs, remote), n_layers)
        u_coef, u_attn = _answer_activations(_Pass(unlearned, u_lm, arch, inputs, remote), n_layers)
        v_params, u_params = dict(vanilla.named_parameters()), dict(unlearned.named_parameters())
        for i in range(n_layers):
            rows.append(_row(i, "coef", [v_coef[i]], [u_coef[i] - v_coef[i]]))
            rows.append(_row(i, "attn", [v_attn[i]], [u_attn[i] - v_attn[i]]))
            for q in ("value", "key", "mlp", "layer"):
                names = experiments_mod.parameter_names(vanilla, arch, experiments_mod.EXPERIMENTS[q], [i])
                rows.append(_row(i, q, [v_params[n] for n in names], [u_params[n] - v_params[n] for n in names]))
    return pd.DataFrame.from_records(rows, columns=CHANGE_COLUMNS)
