"""Where activations are read and overwritten: the patching sites, one registry entry each.

A site is the input or the output of one module of a decoder layer, named through the architecture map
(models.Architecture), so one entry serves every model family:
  coef  MLP coefficients: the input of the MLP output projection (arch.coef_module)
  attn  attention state: the output of the attention output projection (arch.attn_module)

`order` is the order in which the engine touches the sites of one layer inside a trace. nnsight requires the modules
of a trace to be touched in the order the forward pass runs them, so it must follow the forward pass (attention
before MLP); the registry's own order (coef first) is the order of tables and charts.

`replay_parent`: once the site holds the source's value, does the module's parent (the attention block for its
output projection, the MLP for its down projection) return something that depends on that value alone? Then the
engine computes the parent's output once and replays it in every window instead of running the whole block; else it
replays only the module itself (always valid: the module's output is the patched output, or a function of the patched
input).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..models import Architecture

VALUES = ("input", "output")


@dataclass(frozen=True)
class Site:
    name: str
    module: str  # the models.Architecture attribute that gives the module's path inside a decoder layer
    value: str  # "input" or "output" of that module
    order: int  # position in the forward pass among the sites of one layer
    label: str  # short, for charts
    phrase: str  # how it reads in a sentence ("restoring the MLP coefficients recovers ...")
    description: str = ""
    replay_parent: bool = False

    def path(self, arch: Architecture) -> str:
        """The module's path inside a decoder layer."""
        return getattr(arch, self.module)

    def replay_path(self, arch: Architecture) -> str:
        """The module whose output the engine records once with the site patched, and replays in each window."""
        path = self.path(arch)
        return path.rsplit(".", 1)[0] if self.replay_parent and "." in path else path


SITES: dict[str, Site] = {s.name: s for s in (
    Site("coef", module="coef_module", value="input", order=20, replay_parent=True, label="MLP coefficients",
         phrase="the MLP coefficients", description="MLP coefficients (input of the MLP output projection)"),
    Site("attn", module="attn_module", value="output", order=10, replay_parent=True, label="attention states",
         phrase="the attention states",
         description="attention states (output of the attention output projection)"),
)}


def get(name: str) -> Site:
    if name not in SITES:
        raise ValueError(f"unknown site {name!r}; valid: {', '.join(SITES)}")
    return SITES[name]


def in_forward_order(names) -> list[Site]:
    """The named sites, sorted as the forward pass of one layer meets them."""
    return sorted((get(n) for n in set(names)), key=lambda s: s.order)

