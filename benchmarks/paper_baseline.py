"""The paper's approach, written after the authors' notebook (Restoration_experiments_llama-30tokens.ipynb).

Plain torch forward hooks; one full forward pass of the unlearned model per window and experiment; the vanilla
model's forward pass repeated at the start of every experiment (as each notebook cell does); value restoration by
writing into `state_dict()` tensors and undoing it with `load_state_dict(old_params)` of a deep-copied state dict.
Module paths come from the architecture map instead of being hard-coded for LLaMA, and the scored positions are
given (so the baseline and the engine can be compared under either alignment); everything else follows the notebook.

This is the reference the benchmark times, and an independent oracle for the tests (it shares no code with the
nnsight engine except the experiment definitions and the scored positions).
"""
from __future__ import annotations

import copy

import torch

from dissect_unlearning import models
from dissect_unlearning.patching import experiments as experiments_mod


def set_act_get_hooks(model, arch, n_layers, coef=False, attn=False):
    model.activations_ = {}

    def get_activation(name):
        def hook(module, inputs, output):
            if "m_coef" in name:
                model.activations_[name] = inputs[0][:, :].detach()
            elif "attn" in name:
                model.activations_[name] = output[:, :].detach()
        return hook

    hooks = []
    blocks = models.get_module(model, arch.layers)
    for i in range(n_layers):
        if coef:
            hooks.append(models.get_module(blocks[i], arch.coef_module).register_forward_hook(
                get_activation(f"m_coef_{i}")))
        if attn:
            hooks.append(models.get_module(blocks[i], arch.attn_module).register_forward_hook(
                get_activation(f"attn_{i}")))
    return hooks


def set_act_modify_hooks(model, arch, n_layers, coef, attn, ori_coef, ori_attn, layers):
    def modify_activation(name, update_value, patch_input):
        def pre_hook(module, inputs):
            if "m_coef" in name:
                inputs[0][:, :, :] = update_value

        def post_hook(module, inputs, output):
            if "attn" in name:
                output[:, :, :] = update_value
        return pre_hook if patch_input else post_hook

    hooks = []
    blocks = models.get_module(model, arch.layers)
    for i in range(n_layers):
        if i in layers and coef:
            hooks.append(models.get_module(blocks[i], arch.coef_module).register_forward_pre_hook(
                modify_activation(f"m_coef_{i}", ori_coef[i], True)))
        if i in layers and attn:
            hooks.append(models.get_module(blocks[i], arch.attn_module).register_forward_hook(
                modify_activation(f"attn_{i}", ori_attn[i], False)))
    return hooks


def remove_hooks(hooks):
    for hook in hooks:
        hook.remove()


def compute_loss(target_logits, logits):
    return torch.mean((target_logits - logits) ** 2)


def compute_krs(ori_loss, new_loss):
    return 1 - (new_loss / ori_loss)


@torch.no_grad()
def paper_sweep(vanilla, unlearned, inputs, experiments=experiments_mod.PAPER_EXPERIMENTS, window: int = 5,
                centres=None):
    """{experiment: {centre layer: [KRS of each question]}}, plus the unpatched losses per question.

    inputs: patching.ScoringInputs with layout "padded" (the left-padded teacher-forced batch, as in the notebook, and
    the scored positions of each question).
    Windows: [layer - below .. layer + above] for every layer (or only the given centres), clipped (layers outside
    the model match nothing).
    """
    arch = models.architecture_of(vanilla)
    n_layers = models.n_layers(vanilla)
    if inputs.layout != "padded":
        raise ValueError("the paper's approach runs the left-padded batch: build inputs with layout='padded'")
    batch = inputs.model_inputs
    questions = [(int(inputs.rows[s][0]), inputs.cols[s]) for s in inputs.spans]
    below, above = (window - 1) // 2, window // 2

    # "on vanilla model and unlearned model": collect activations and the unpatched losses.
    un_hooks = set_act_get_hooks(unlearned, arch, n_layers, coef=True, attn=True)
    output = unlearned(**batch)
    remove_hooks(un_hooks)
    hooks = set_act_get_hooks(vanilla, arch, n_layers, coef=True, attn=True)
    original_output = vanilla(**batch)
    remove_hooks(hooks)
    ori_losses = [compute_loss(original_output.logits[i, cols, :], output.logits[i, cols, :]) for i, cols in questions]
    ori_coef = [vanilla.activations_[f"m_coef_{layer}"] for layer in range(n_layers)]
    ori_attn = [vanilla.activations_[f"attn_{layer}"] for layer in range(n_layers)]
    del output, original_output

    results = {}
    for exp in experiments_mod.get(experiments):
        original_output = vanilla(**batch)
        old_params = copy.deepcopy(unlearned.state_dict()) if exp.restores_parameters else None
        per_layer = {}
        for layer in (range(n_layers) if centres is None else centres):
            layers = list(range(layer - below, layer + above + 1))
            if exp.restores_parameters:
                clipped = [i for i in layers if 0 <= i < n_layers]
                names = experiments_mod.parameter_names(unlearned, arch, exp, clipped)
                for name in names:
                    unlearned.state_dict()[name][...] = vanilla.state_dict()[name][...]
                output = unlearned(**batch)
                unlearned.load_state_dict(old_params)
            else:
                hooks = set_act_modify_hooks(unlearned, arch, n_layers, "coef" in exp.sites, "attn" in exp.sites, ori_coef, ori_attn, layers)
                output = unlearned(**batch)
                remove_hooks(hooks)
            new_losses = [compute_loss(original_output.logits[i, cols, :], output.logits[i, cols, :])
                          for i, cols in questions]
            per_layer[layer] = [float(compute_krs(o, n)) for o, n in zip(ori_losses, new_losses)]
        results[exp.name] = per_layer
        del old_params
    for m in (vanilla, unlearned):
        m.__dict__.pop("activations_", None)
    return results, [float(x) for x in ori_losses]
