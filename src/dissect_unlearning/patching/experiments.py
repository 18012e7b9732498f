"""What each experiment restores, one registry entry each: activation sites (sites.py) and/or a parameter set.

Activation experiments overwrite activations of the patched model with the source model's, on every position:
  coef       MLP coefficients (site coef)
  attn       attention states (site attn)
  coef+attn  both
Parameter experiments copy a parameter set of the source model into the patched model (then put it back):
  value      MLP value vectors: the output projection's weight (arch.value_weight)
  key        MLP keys: every parameter of the MLP input projections (arch.key_modules: gate and up, or c_fc)
  mlp        every parameter of the MLP (arch.mlp)
  layer      every parameter of the decoder layer
An experiment may also do both: its sites are then patched while its parameters are restored.
A control:
  coef_other MLP coefficients of *another* question of the same concept (batch.other_question_index): if they
             restore the vanilla answer as well as the question's own, the patch does the work, not the knowledge
The first four are the paper's; key, mlp, layer and coef_other go beyond it.

To add one: register_experiment(Experiment(...)) here (or in your own code), and register_site /
register_parameter_set first if it restores something new.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..models import ARCHITECTURES, Architecture
from .sites import SITES, VALUES, Site


# ----------------------------------------------------------------------------------------------------------------------
# Parameter sets
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParameterSet:
    name: str
    selects: Callable[[Architecture, str], bool]  # (architecture, parameter name inside a decoder layer) -> restored?
    label: str  # short, for charts
    phrase: str  # how it reads in a sentence
    description: str = ""

    def names(self, model, arch: Architecture, layers) -> list[str]:
        """Full parameter names (as in model.named_parameters()) of this set in `layers`."""
        names = []
        for i in layers:
            base = f"{arch.layers}.{i}."
            for name, _ in model.get_submodule(f"{arch.layers}.{i}").named_parameters():
                if self.selects(arch, name):
                    names.append(base + name)
        if not names:
            raise ValueError(f"parameter set {self.name!r} ({self.description}) matched no parameter in layers "
                             f"{list(layers)} of {type(model).__name__}; the architecture map entry {arch.family!r} "
                             f"may be wrong")
        return names


PARAMETER_SETS: dict[str, ParameterSet] = {p.name: p for p in (
    ParameterSet("value", lambda arch, name: name == arch.value_weight, label="value vectors (weights)",
                 phrase="the value vectors", description="MLP value vectors (the output projection's weight)"),
    ParameterSet("key", lambda arch, name: name.startswith(tuple(f"{m}." for m in arch.key_modules)),
                 label="key weights", phrase="the MLP key weights",
                 description="MLP keys (every parameter of the MLP input projections)"),
    ParameterSet("mlp", lambda arch, name: name.startswith(f"{arch.mlp}."), label="MLP weights",
                 phrase="the whole MLP", description="every parameter of the MLP"),
    ParameterSet("layer", lambda arch, name: True, label="layer weights", phrase="the whole layer",
                 description="every parameter of the decoder layer"),
)}


def register_parameter_set(parameters: ParameterSet) -> ParameterSet:
    """Add a parameter set (its name must be new among sites and parameter sets); return it."""
    if parameters.name in PARAMETER_SETS or parameters.name in SITES:
        raise ValueError(f"parameter set {parameters.name!r}: the name is taken (sites and parameter sets share one "
                         f"namespace: both are quantities of patching.change)")
    PARAMETER_SETS[parameters.name] = parameters
    return parameters


def unregister_parameter_set(name: str) -> None:
    users = [e.name for e in EXPERIMENTS.values() if e.parameters == name]
    if users:
        raise ValueError(f"parameter set {name!r} is restored by experiment(s) {users}; unregister them first")
    del PARAMETER_SETS[name]


# ----------------------------------------------------------------------------------------------------------------------
# Experiments
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Experiment:
    name: str
    label: str  # short, for charts
    colour: str  # the same in every chart of the book
    sites: tuple[str, ...] = ()  # activation sites patched (sites.SITES)
    parameters: str | None = None  # the parameter set restored (PARAMETER_SETS)
    description: str = ""
    phrase: str = ""  # how it reads in a sentence; empty: the phrases of its parts joined by "and"
    paper: bool = False  # one of the paper's experiments
    source: str = "same"  # whose activations are patched in: the question's own ("same") or another question's

    @property
    def restores_parameters(self) -> bool:
        return self.parameters is not None

    @property
    def in_words(self) -> str:
        """'restoring <in_words> recovers ...'"""
        if self.phrase:
            return self.phrase
        parts = [SITES[s].phrase for s in self.sites]
        if self.parameters is not None:
            parts.append(PARAMETER_SETS[self.parameters].phrase)
        return " and ".join(parts)


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    Experiment("coef", "MLP coefficients", "#4c78a8", sites=("coef",), paper=True,
               description="MLP coefficients (input of the MLP output projection)"),
    Experiment("attn", "attention states", "#f58518", sites=("attn",), paper=True,
               description="attention states (output of the attention output projection)"),
    Experiment("coef+attn", "coefficients + attention", "#54a24b", sites=("coef", "attn"), paper=True,
               phrase="the MLP coefficients and attention states",
               description="MLP coefficients and attention states"),
    Experiment("value", "value vectors", "#b279a2", parameters="value", paper=True,
               description="MLP value vectors (the output projection's weight)"),
    Experiment("key", "key weights", "#e5b800", parameters="key",
               description="MLP keys (every parameter of the MLP input projections)"),
    Experiment("mlp", "whole MLP", "#72b7b2", parameters="mlp", description="every parameter of the MLP"),
    Experiment("layer", "whole layer", "#9d755d", parameters="layer",
               description="every parameter of the decoder layer"),
    Experiment("coef_other", "coefficients of another question (control)", "#bab0ac", sites=("coef",),
               source="other", phrase="the MLP coefficients of another question of the same concept",
               description="MLP coefficients recorded on another question of the same concept (a control)"),
)}
SOURCES = ("same", "other")
PAPER_EXPERIMENTS = tuple(name for name, e in EXPERIMENTS.items() if e.paper)


def register_experiment(experiment: Experiment) -> Experiment:
    """Add an experiment to the registry; return it. Its sites and parameter set must be registered already."""
    name = experiment.name
    if name in EXPERIMENTS:
        raise ValueError(f"experiment {name!r} exists already")
    if not name or "," in name:
        raise ValueError(f"experiment name {name!r}: give a non-empty name without commas (lists of experiments "
                         f"are comma-separated)")
    unknown = [s for s in experiment.sites if s not in SITES]
    if unknown:
        raise ValueError(f"experiment {name!r}: unknown site(s) {unknown}; registered: {', '.join(SITES)}")
    if len(set(experiment.sites)) != len(experiment.sites):
        raise ValueError(f"experiment {name!r}: sites {list(experiment.sites)} name a site twice")
    if experiment.parameters is not None and experiment.parameters not in PARAMETER_SETS:
        raise ValueError(f"experiment {name!r}: unknown parameter set {experiment.parameters!r}; registered: "
                         f"{', '.join(PARAMETER_SETS)}")
    if not experiment.sites and experiment.parameters is None:
        raise ValueError(f"experiment {name!r} restores nothing: give sites, parameters or both")
    if experiment.source not in SOURCES:
        raise ValueError(f"experiment {name!r}: source must be one of {SOURCES}, got {experiment.source!r}")
    if experiment.source == "other" and (experiment.parameters is not None or not experiment.sites):
        raise ValueError(f"experiment {name!r}: source 'other' moves activations between questions, so it needs "
                         f"sites and no parameter set (parameters are the same for every question)")
    if not (experiment.label and experiment.colour):
        raise ValueError(f"experiment {name!r}: give a label and a colour (for the book's charts)")
    EXPERIMENTS[name] = experiment
    return experiment


def unregister_experiment(name: str) -> None:
    del EXPERIMENTS[name]


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
    if experiment.parameters is None:
        raise ValueError(f"experiment {experiment.name!r} restores no parameters")
    return PARAMETER_SETS[experiment.parameters].names(model, arch, layers)


_SAMPLE = ARCHITECTURES["llama"]  # every family has the same attributes


def register_site(site: Site) -> Site:
    """Add an activation site to sites.SITES (its name must be new among sites and parameter sets); return it.
    Here, not in sites.py: the checks read the parameter sets and experiments too."""
    if site.name in SITES or site.name in PARAMETER_SETS:
        raise ValueError(f"site {site.name!r}: the name is taken (sites and parameter sets share one namespace: "
                         f"both are quantities of patching.change)")
    if site.value not in VALUES:
        raise ValueError(f"site {site.name!r}: value must be one of {VALUES}, got {site.value!r}")
    if not isinstance(getattr(_SAMPLE, site.module, None), str):
        raise ValueError(f"site {site.name!r}: module must name a models.Architecture attribute that holds a module "
                         f"path inside a decoder layer (e.g. coef_module, attn_module, mlp), got {site.module!r}")
    if any(s.order == site.order for s in SITES.values()):
        raise ValueError(f"site {site.name!r}: order {site.order} is taken; the forward-pass order of the sites "
                         f"must be unambiguous")
    SITES[site.name] = site
    return site


def unregister_site(name: str) -> None:
    users = [e.name for e in EXPERIMENTS.values() if name in e.sites]
    if users:
        raise ValueError(f"site {name!r} is patched by experiment(s) {users}; unregister them first")
    del SITES[name]
