"""Fine-tuning unlearning: one module per loss, one trainer, lossless compact storage of the result.

    cfg = UnlearnConfig.for_method("npo", steps=10)
    result = trainer.unlearn(model, tok, forget_concept, retain_concept, cfg, qa=vanilla_answers)
"""
from . import dpo, grad_ascent, grad_diff, idk_dpo, npo
from .config import METHOD_DEFAULTS, METHODS, UnlearnConfig

METHOD_MODULES = {"grad_ascent": grad_ascent, "grad_diff": grad_diff, "npo": npo, "dpo": dpo, "idk_dpo": idk_dpo}

__all__ = ["METHODS", "METHOD_DEFAULTS", "METHOD_MODULES", "UnlearnConfig"]
