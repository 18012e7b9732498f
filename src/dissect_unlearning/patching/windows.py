"""Which layers one experiment patches: a window of consecutive layers centred on each layer, or chosen sets.

The paper slides a window of 5 layers (l-2 .. l+2) over every layer l and clips it at the ends, so the first and
last windows are shorter. A window of even size s centred on l covers l - (s-1)//2 .. l + s//2.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """The layers patched together (sorted, no repeats) and the layer the window is reported at."""

    center: int
    layers: tuple[int, ...]

    @property
    def first(self) -> int:
        return self.layers[0]


def centred(n_layers: int, size: int = 5) -> list[Window]:
    """One window of `size` consecutive layers centred on every layer, clipped to [0, n_layers)."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"window size must be a positive integer, got {size!r}")
    below, above = (size - 1) // 2, size // 2
    return [Window(c, tuple(range(max(0, c - below), min(n_layers, c + above + 1)))) for c in range(n_layers)]


def explicit(n_layers: int, layers) -> Window:
    """One window made of the given layers (negative numbers count from the end: -1 = the last layer).

    It is reported at its middle layer (the upper middle for an even count).
    """
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    try:
        chosen = list(layers)
    except TypeError:
        raise ValueError(f"layers must be a layer number or a list of layer numbers, got {layers!r}") from None
    if not chosen:
        raise ValueError("layers is an empty list: give at least one layer number")
    resolved = []
    for x in chosen:
        if not isinstance(x, int) or isinstance(x, bool):
            raise ValueError(f"layers: {x!r} is not a layer number (integers only)")
        if not -n_layers <= x < n_layers:
            raise ValueError(f"layers: layer {x} does not exist; the model has {n_layers} layers (0..{n_layers - 1}, "
                             f"or -1..-{n_layers} from the end)")
        resolved.append(x % n_layers)
    ordered = tuple(sorted(set(resolved)))
    return Window(ordered[len(ordered) // 2], ordered)


def windows(n_layers: int, size: int = 5, layers=None) -> list[Window]:
    """The windows of a sweep: every centred window of `size`; or, if `layers` is given, the explicit window it names
    (a layer number or a list of them), or several (a list of such lists)."""
    if layers is None:
        return centred(n_layers, size)
    if isinstance(layers, (list, tuple)) and layers and all(isinstance(x, (list, tuple)) for x in layers):
        return [explicit(n_layers, x) for x in layers]
    return [explicit(n_layers, layers)]
