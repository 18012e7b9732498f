"""Adapter unlearning: the unlearned model as the vanilla model plus a low-rank adapter (params="lora").

NDIF runs the weights it hosts and cannot load a checkpoint of ours, so a model unlearned by editing weights can only
be dissected here. An adapter can travel with a request instead: on each target module (the MLP projections and the
attention output projection of every layer, by default)

    out = module(x) + scale * (x @ A) @ B,        A: [in, rank], B: [rank, out], scale = lora_alpha / lora_rank

which a trace applies as an intervention on the module's input and output. The weights never change, so one hosted
model is both the vanilla model (adapter off) and the unlearned one (adapter on), and every restoration of the paper
becomes switching some of the adapter's terms off (patching/adapted.py).

A starts seeded (uniform in +-1/sqrt(in), as PEFT's LoRA does) and B at zero, so step 0 is exactly the vanilla model
and only the seed decides the run. The same adapter merged into the weights, W + scale * (A @ B)^T, is the ordinary
unlearned model every local stage of the book uses (`merge`): one model, whichever way it is computed.

Stored as two small files next to the run's record: adapter.safetensors (A and B per module) and adapter.json.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import models

WEIGHTS = "adapter.safetensors"
MANIFEST = "adapter.json"
FORMAT = "dissect-unlearning/adapter-1"


@dataclass
class Adapter:
    """A low-rank adapter over `targets` (module paths inside a decoder layer, in forward order) of every layer."""

    layers: str  # the path of the decoder layers in the model (models.Architecture.layers)
    n_layers: int
    targets: tuple[str, ...]
    rank: int
    alpha: float
    a: dict[str, torch.Tensor]  # full module name -> A [in, rank]
    b: dict[str, torch.Tensor]  # full module name -> B [rank, out]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def name(self, layer: int, target: str) -> str:
        return f"{self.layers}.{layer}.{target}"

    def names(self) -> list[str]:
        """Every adapted module's full name, layer by layer and in forward order within a layer."""
        return [self.name(i, t) for i in range(self.n_layers) for t in self.targets]

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        return [(f"{n}.lora_{x}", getattr(self, x)[n]) for n in self.names() for x in ("a", "b")]

    def numel(self) -> int:
        return sum(t.numel() for _, t in self.named_parameters())

    def delta(self, name: str) -> torch.Tensor:
        """The change the adapter makes to module `name`'s weight, in nn.Linear's [out, in] layout."""
        return (self.scale * (self.a[name] @ self.b[name])).T


def resolve_targets(model, spec: str) -> tuple[str, ...]:
    """The module paths inside a decoder layer that `spec` (UnlearnConfig.lora_targets) names, in forward order.

    "auto": the MLP's input projections (gate and up), its output projection (down) and the attention output
    projection, from the architecture map. Every target must be a linear layer in every decoder layer. `model` may be
    an nnsight model (models.remote_model), whose modules are read behind their envoys."""
    model = models.torch_module(model)
    arch = models.architecture_of(model)
    paths = ([*arch.key_modules, arch.coef_module, arch.attn_module] if spec == "auto"
             else [t.strip() for t in spec.split(",")])
    layers = list(models.get_module(model, arch.layers))
    for path in paths:
        for i, layer in enumerate(layers):
            try:
                module = models.get_module(layer, path)
            except (AttributeError, IndexError):
                raise ValueError(f"lora_targets: layer {i} of {type(model).__name__} has no module {path!r}") from None
            if not isinstance(module, torch.nn.Linear):
                raise ValueError(f"lora_targets: {path!r} is a {type(module).__name__}, not a linear layer (an adapter "
                                 f"adds a low-rank product to a linear layer's output)")
    # Forward order: the order the layer registers its modules (attention before the MLP, gate/up before down),
    # which is the order a trace must touch them in.
    order = [n for n, _ in layers[0].named_modules()]
    return tuple(sorted(paths, key=order.index))


def init(model, config, device=None) -> Adapter:
    """A fresh adapter for `model` with the settings of `config` (an UnlearnConfig with params="lora"): A seeded by
    config.seed, B zero, on the device and in the dtype of the weights they adapt, or on `device` if given.

    A model whose weights are not on this machine (models.remote_model: its module tree is on the meta device, the
    weights are NDIF's) gets an adapter on the CPU (or `device`) in float32: a tensor on the meta device has a shape
    and no values, and A must keep the values its seed drew. A request moves each term to its activations' device and
    dtype (generation.greedy_generate). A is drawn the same way either way, so one seed gives one adapter."""
    model = models.torch_module(model)
    arch = models.architecture_of(model)
    targets = resolve_targets(model, config.lora_targets)
    n = models.n_layers(model)
    generator = torch.Generator().manual_seed(config.seed)
    a, b = {}, {}
    for i in range(n):
        layer = models.get_module(model, f"{arch.layers}.{i}")
        for path in targets:
            module = models.get_module(layer, path)
            bound = 1 / math.sqrt(module.in_features)
            w = module.weight
            # drawn on the CPU in float32 whatever the model's device and dtype: the same adapter everywhere
            init_a = (torch.rand(module.in_features, config.lora_rank, generator=generator) * 2 - 1) * bound
            where = device if device is not None else (torch.device("cpu") if w.is_meta else w.device)
            dtype = torch.float32 if w.is_meta else w.dtype
            a[f"{arch.layers}.{i}.{path}"] = init_a.to(device=where, dtype=dtype)
            b[f"{arch.layers}.{i}.{path}"] = torch.zeros(config.lora_rank, module.out_features, device=where,
                                                         dtype=dtype)
    return Adapter(arch.layers, n, targets, config.lora_rank, float(config.lora_alpha), a, b)


@contextlib.contextmanager
def attached(model, adapter: Adapter):
    """Inside the block, `model` computes the adapted outputs (forward hooks, gradients flow into A and B)."""
    def hook(name):
        def add(module, args, out):
            return out + adapter.scale * ((args[0] @ adapter.a[name]) @ adapter.b[name])
        return add

    handles = [models.get_module(model, name).register_forward_hook(hook(name)) for name in adapter.names()]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def merge(model, adapter: Adapter):
    """Add the adapter into `model`'s weights in place (W + scale * (A @ B)^T); return the model."""
    for name in adapter.names():
        weight = models.get_module(model, name).weight
        weight.add_(adapter.delta(name).to(weight.dtype))
    return model


def save(adapter: Adapter, folder: Path) -> dict:
    """Write the adapter into `folder` (inside the cache entry being built: the entry appears whole or not at all);
    return its manifest."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in adapter.named_parameters()}
    save_file(tensors, str(folder / WEIGHTS))
    manifest = {"format": FORMAT, "layers": adapter.layers, "n_layers": adapter.n_layers,
                "targets": list(adapter.targets), "rank": adapter.rank, "alpha": adapter.alpha,
                "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
                "sha256": hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def is_stored(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def load(folder: Path, device="cpu") -> Adapter:
    """The adapter stored in `folder` (checked against its checksum)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{folder / MANIFEST}: unknown format {manifest.get('format')!r}")
    if hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest() != manifest["sha256"]:
        raise ValueError(f"{folder / WEIGHTS}: the adapter does not match its checksum (corrupt entry)")
    tensors = load_file(str(folder / WEIGHTS), device=str(device))
    adapter = Adapter(manifest["layers"], manifest["n_layers"], tuple(manifest["targets"]), manifest["rank"],
                      manifest["alpha"], {}, {})
    for name in adapter.names():
        adapter.a[name], adapter.b[name] = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
    return adapter


def fits(adapter: Adapter, model) -> None:
    """Raise a ValueError unless `adapter` was made for a model of `model`'s shape (a loaded model, or an nnsight
    model whose weights are elsewhere: the shapes are those of its meta tensors)."""
    model = models.torch_module(model)
    if models.n_layers(model) != adapter.n_layers:
        raise ValueError(f"the adapter has {adapter.n_layers} layers, the model {models.n_layers(model)}")
    for name in adapter.names():
        try:
            w = models.get_module(model, name).weight
        except AttributeError:
            raise ValueError(f"the adapter adapts {name!r}, which the model does not have") from None
        if tuple(w.shape) != tuple(adapter.delta(name).shape):
            raise ValueError(f"the adapter's module {name!r} is {tuple(adapter.delta(name).shape)}, the model's "
                             f"{tuple(w.shape)}")
