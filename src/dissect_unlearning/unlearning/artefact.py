"""An unlearned model as a cache entry: the run's record (unlearning.json) + the weights as a delta from vanilla.

Folder layout:
    unlearning.json        settings, loss curve, timings, base-model identity, package versions
    delta.json, plane*.zst the weights, stored losslessly relative to the vanilla model (see storage.py)
or, for a run with params="lora", in place of the delta:
    adapter.json, adapter.safetensors   the low-rank adapter (see adapter.py); the weights are the vanilla ones
`Unlearned` is the handle the pipeline returns; `.load()` rebuilds the exact model, `.export()` writes a standard
Hugging Face checkpoint folder.
"""
from __future__ import annotations

import contextlib
import copy
import json
import shutil
import time
from pathlib import Path

from .. import cache, models, validate
from ..state import STATE
from . import adapter as adapter_mod, storage, trainer
from .config import UnlearnConfig

RECORD = "unlearning.json"


def versions() -> dict:
    """The library versions recorded with an unlearned model."""
    from ..versions import versions as installed

    return installed("tokenizers", "numpy", "zstandard")


def build(folder: Path, model_name: str, forget, retain, config: UnlearnConfig, qa=None, retain_qa=None,
          identity: dict | None = None, progress: bool = True, trained: list | None = None, hosted=None,
          remote=False) -> dict:
    """Train and store one unlearned model into `folder`; return its record. `trained`: a list that receives the
    trained (model, tokenizer), for a caller that goes on with it (keep()).

    remote True or "local": the params="lora" adapter is trained in nnsight requests (unlearning/remote.py) on
    `hosted`, the vanilla model's torch module (on the meta device for NDIF, whose weights it runs); nothing else is
    loaded here.

    With `identity` (the inputs of the run's cache entry) a killed run resumes where its last checkpoint left it;
    the checkpoint is kept beside the entries, named by the entry's cache key, so that no run with other settings,
    data, code or libraries can pick it up."""
    checkpoint = None
    if identity is not None:
        checkpoint = cache.cache_root() / "unlearned" / f".resume~{cache.key('unlearned', identity)}"
    if remote:
        from . import data as data_mod, remote as remote_training

        model, tok = hosted, models.load_tokenizer(model_name)
        result = remote_training.train_remote(model, tok, data_mod.build(tok, forget, retain, config, qa, retain_qa),
                                              config, remote, checkpoint=checkpoint, progress=progress)
    else:
        model, tok = models.load(model_name)
        result = trainer.unlearn(model, tok, forget, retain, config, qa=qa, retain_qa=retain_qa, progress=progress,
                                 checkpoint=checkpoint)
    t0 = time.time()
    if result.adapter is not None:
        manifest = adapter_mod.save(result.adapter, folder)
        stored = {"encoding": "adapter", "bytes": (Path(folder) / adapter_mod.WEIGHTS).stat().st_size}
        if not remote:  # the model handed on (trained=) is the unlearned one, as load() gives
            adapter_mod.merge(model, result.adapter)
    else:
        # The delta is computed on the CPU (storage works on CPU copies), so the vanilla weights it is taken against
        # are loaded there, in the runtime dtype the model was trained in: no second model on the GPU.
        vanilla, _ = models.load(model_name, device="cpu")
        manifest = storage.save_delta(model, vanilla, folder)
        del vanilla
        stored = {"encoding": manifest["encoding"], "bytes": sum(manifest["plane_bytes"])}
    record = {
        "format": "dissect-unlearning/unlearned-1",
        "model": model_name,
        "identity": identity,
        "concept": forget.label,
        "retain_concept": retain.label,
        "method": config.method,
        "settings": config.to_dict(),
        "loss_curve": result.loss_curve,
        "train_seconds": round(result.seconds, 2),
        "reference_seconds": round(result.reference_seconds, 2),
        "store_seconds": round(time.time() - t0, 2),
        "n_steps": result.n_steps,
        "n_forget": result.n_forget,
        "n_trainable": result.n_trainable,
        "storage": stored,
        "versions": versions(),
        "torch_threads": _threads(),
    }
    if remote:
        record["trained"] = "ndif" if remote is True else "nnsight-simulation"
    (Path(folder) / RECORD).write_text(json.dumps(record, indent=1))
    if checkpoint is not None:
        # Now rather than once the entry is in place, which happens after this returns: a kill in between costs
        # a fresh run, never a checkpoint left behind for good.
        trainer.discard_checkpoint(checkpoint)
    if trained is not None:
        trained.append((model, tok))
    return record


def _threads() -> int:
    import torch

    return torch.get_num_threads()


class Unlearned:
    """A cached unlearned model: its record, and `.load()` to get (model, tokenizer) back bit-exactly."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.record = json.loads((self.folder / RECORD).read_text())

    model = property(lambda self: self.record["model"])
    method = property(lambda self: self.record["method"])
    concept = property(lambda self: self.record["concept"])
    retain_concept = property(lambda self: self.record["retain_concept"])
    settings = property(lambda self: dict(self.record["settings"]))
    train_seconds = property(lambda self: self.record["train_seconds"])

    @property
    def label(self) -> str:
        return self.method

    @property
    def config(self) -> UnlearnConfig:
        return UnlearnConfig.from_dict(self.record["settings"])

    @property
    def loss_curve(self):
        import pandas as pd

        cols = ["step", "forget_loss", "retain_loss", "loss", "lr", "grad_norm", "seconds"]
        return pd.DataFrame.from_records(self.record["loss_curve"], columns=cols)

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())

    def identity(self) -> dict:
        """What determines this model, for downstream cache keys (the inputs of its own cache entry)."""
        return dict(self.record["identity"] or {})

    def load(self, verify: bool = True, shared: bool = False):
        """(model, tokenizer) in eval mode: the vanilla model with the stored delta applied, on the runtime device
        (models.set_runtime) and in the dtype the model was trained in (the delta fits that dtype only).

        shared: inside keep_loaded(), the kept model itself rather than a copy of it, for a caller that leaves it
        as it was (a patching sweep restores what it changes); a caller that trains it gets a copy."""
        key = (str(self.folder), models.runtime())
        kept = STATE.kept  # while keep_loaded() is active: the last model rebuilt, {(folder, runtime): (model, tok)}
        if kept is not None and key in kept:
            model, tok = kept[key]
            return (model if shared else copy.deepcopy(model)).eval(), tok
        if self.is_adapter:
            dtype = json.loads((self.folder / adapter_mod.MANIFEST).read_text())["dtype"]
            model, tok = models.load(self.model, dtype=dtype)
            adapter = adapter_mod.load(self.folder, device=next(model.parameters()).device)
            adapter_mod.fits(adapter, model)
            adapter_mod.merge(model, adapter)
        else:
            dtype = json.loads((self.folder / storage.MANIFEST).read_text())["dtype"]
            model, tok = models.load(self.model, dtype=dtype)
            storage.apply_delta(model, self.folder, verify=verify)
        if kept is not None:
            keep(self.folder, model.eval(), tok)
            # One model is kept, and no other of its base model is coming (one task per unlearned model): the
            # vanilla weights remembered to speed up the next rebuild are memory for nothing.
            STATE.vanilla.clear()
            if not shared:
                return copy.deepcopy(model).eval(), tok
        return model.eval(), tok

    @property
    def is_adapter(self) -> bool:
        """Was the model unlearned as an adapter (params="lora")? Then `.adapter()` gives it, and `.load()` the
        vanilla model with it merged into the weights."""
        return adapter_mod.is_stored(self.folder)

    def adapter(self, device="cpu") -> adapter_mod.Adapter:
        """The adapter of a params="lora" run: what a remote dissection sends with its requests (patching.adapted)."""
        if not self.is_adapter:
            raise ValueError(f"{self.folder}: this model was unlearned with params={self.settings.get('params')!r}, "
                             f"which changes the weights; only params='lora' makes an adapter")
        return adapter_mod.load(self.folder, device=device)

    def export(self, out: str | Path) -> Path:
        """Write a standard Hugging Face checkpoint folder (config, weights, tokenizer) + unlearning.json, atomically."""
        out = Path(out).expanduser().resolve()
        validate.check_output_folder(out, "export", empty=True)
        with cache.atomic_folder(out) as tmp:
            model, tok = self.load()
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            shutil.copyfile(self.folder / RECORD, tmp / RECORD)
        return out

    def __repr__(self) -> str:
        return (f"Unlearned({self.method} on {self.concept!r} of {self.model}, retain {self.retain_concept!r}, "
                f"{self.size_bytes / 1e6:.0f} MB at {self.folder})")


def keeping() -> bool:
    """Is a keep_loaded() block active?"""
    return STATE.kept is not None


def keep(folder: Path, model, tok) -> None:
    """Inside keep_loaded(), make (model, tok) the kept model of the entry at `folder` (the only one kept): a run
    that has just trained it hands it over instead of it being rebuilt from the delta it wrote (bit-identical, as
    the delta is lossless and checked)."""
    kept = STATE.kept
    if kept is not None:
        kept.clear()  # one model at a time: a kept model costs its full size in memory
        kept[(str(Path(folder)), models.runtime())] = (model, tok)


@contextlib.contextmanager
def keep_loaded():
    """Inside the block, Unlearned.load() rebuilds a model from its delta once and hands out copies of it after
    that (a copy takes ~0.3 s, a rebuild ~7 s for the default model). One model is kept at a time, so work that
    runs every stage of one unlearned model before the next (book.precompute) loads each model once. Callers that
    leave the model as they found it take it with load(shared=True), without a copy."""
    outer = STATE.kept is not None  # an inner block leaves the outer one's model kept
    if not outer:
        STATE.kept = {}
    try:
        yield
    finally:
        if not outer:
            STATE.kept = None
