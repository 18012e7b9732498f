"""What each experiment restores, in terms of the architecture map (models.Architecture).

Activation experiments overwrite activations of the patched model with the source model's, on every position:
  coef       MLP coefficients: the input of the MLP output projection (arch.coef_module)
  attn       attention state: the output of the attention output projection (arch.attn_module)
  coef+attn  both
Parameter experiments copy parameters of the source model into the patched model (then put them back):
  value      MLP value vectors: the output projection's weight (arch.value_weight)
  key        MLP keys: every parameter of the MLP input projections (arch.key_modules: gate and up, or c_fc)
  mlp        every parameter of the MLP (arch.mlp)
  layer      every parameter of the decoder layer
The first four are the paper's; key, mlp and layer go beyond it.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..models import Architecture


@dataclass(frozen=True)
class Experiment:
    name: str
    coef: bool = False  # patch the MLP coefficients
    attn: bool = False  # patch the attention state
    parameters: str | None = None  # which parameters to restore: "value", "key", "mlp" or "layer"
    description: str = ""

    @property
    def restores_parameters(self) -> bool:
        return self.parameters is not None


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    Experiment("coef", coef=True, description="MLP coefficients (input of the MLP output projection)"),
    Experiment("attn", attn=True, description="attention states (output of the attention output projection)"),
    Experiment("coef+attn", coef=True, attn=True, description="MLP coefficients and attention states"),
    Experiment("value", parameters="value", description="MLP value vectors (the output projection's weight)"),
    Experiment("key", parameters="key", description="MLP keys (every parameter of the MLP input projections)"),
    Experiment("mlp", parameters="mlp", description="every parameter of the MLP"),
    Experiment("layer", parameters="layer", description="every parameter of the decoder layer"),
)}
PAPER_EXPERIMENTS = ("coef", "attn", "coef+attn", "value")


def get(names) -> list[Experiment]:
    """Experiments by name; `names` is a list or a comma-separated string."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    if not names:
        raise ValueError(f"no experiment given; valid: {', '.join(EXPERIMENTS)}")
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"unknown experiment(s) {', '.join(map(repr, unknown))}; valid: {', '.join(EXPERIMENTS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"experiments: {names} names an experiment twice")
    return [EXPERIMENTS[n] for n in names]


def parameter_names(model, arch: Architecture, experiment: Experiment, layers) -> list[str]:
    """Full parameter names (as in model.named_parameters()) that `experiment` restores in `layers`."""
    if experiment.parameters == "value":
        prefixes = [arch.value_weight]
        exact = True
    elif experiment.parameters == "key":
        prefixes, exact = [f"{m}." for m in arch.key_modules], False
    elif experiment.parameters == "mlp":
        prefixes, exact = [f"{arch.mlp}."], False
    elif experiment.parameters == "layer":
        prefixes, exact = [""], False
    else:
        raise ValueError(f"experiment {experiment.name!r} restores no parameters")
    names = []
    for i in layers:
        base = f"{arch.layers}.{i}."
        for name, _ in model.get_submodule(f"{arch.layers}.{i}").named_parameters():
            if any(name == p if exact else name.startswith(p) for p in prefixes):
                names.append(base + name)
    if not names:
        raise ValueError(f"experiment {experiment.name!r}: no parameters matched {prefixes} in layers {list(layers)} "
                         f"of {type(model).__name__}; the architecture map entry {arch.family!r} may be wrong")
    return names
