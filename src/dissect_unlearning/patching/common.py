"""What the patching engine and the adapter path (adapted.py, remote.py) share: the directions, the remote choices,
the engine's columns, the error of a remote run that cannot work, and wrapping a loaded model for nnsight. A module of
its own so that neither imports the other for them."""
from __future__ import annotations

DIRECTIONS = ("forward", "reverse")
REMOTE_CHOICES = (False, True, "local")


class RemoteUnavailableError(RuntimeError):
    """remote=True cannot work here (no NDIF API key, or NDIF cannot be reached)."""


# One row per (experiment, window, question).
ENGINE_COLUMNS = [
    "experiment", "direction", "window_size", "center_layer", "layers", "question_index", "answer_positions",
    "n_positions", "loss_patched", "loss_unpatched", "krs", "kl", "kl_unpatched", "top1_agree", "top1_agree_unpatched",
]


def wrap(model, tok):
    """An nnsight LanguageModel around an already loaded HF model. Wrapping leaves no hooks behind and holds the
    model only as long as the wrapper lives, so each run wraps afresh (one wrapper per model object)."""
    import warnings

    from nnsight import LanguageModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "LanguageModel is a deprecated alias of TransformersModel"
        return LanguageModel(model, tokenizer=tok)


def as_lm(model, tok):
    """(nnsight model, torch module) for `model`: a loaded HF model (wrapped afresh) or an nnsight model already
    (models.remote_model's, whose torch module is on the meta device: its weights are NDIF's)."""
    from .. import models

    module = models.torch_module(model)
    return (model if module is not model else wrap(model, tok)), module


def input_device(module):
    """Where a request's inputs go: the weights' device, or the CPU for a model whose weights are elsewhere (meta),
    from where nnsight ships them with the request."""
    device = next(module.parameters()).device
    return device if device.type != "meta" else "cpu"
