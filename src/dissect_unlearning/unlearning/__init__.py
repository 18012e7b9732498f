"""Fine-tuning unlearning: one module per loss, a registry of methods, one trainer, lossless compact storage.

    cfg = UnlearnConfig.for_method("npo", steps=10)
    result = trainer.unlearn(model, tok, forget_concept, retain_concept, cfg, qa=vanilla_answers)
"""
from . import methods
from .config import UnlearnConfig, register_method, unregister_method
from .methods import Method


def __getattr__(name):
    # METHODS (the names of the registered methods) follows the registry, so a method registered after import is
    # listed too.
    if name == "METHODS":
        return methods.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHODS", "Method", "UnlearnConfig", "methods", "register_method", "unregister_method"]
