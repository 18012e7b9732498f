"""The patching engine: restore activations or parameters of a source model in a target model, window by window.

Direction "forward" (the paper's): source = vanilla, target = unlearned; KRS says how much of the vanilla output the
restored window brings back. Direction "reverse": source = unlearned, target = vanilla; the same formula,
1 - loss(patched vanilla, unlearned) / loss(vanilla, unlearned), says how much of the *forgetting* the window carries
into the vanilla model. Both are "restore the source's window in the target and score against the source".

Every activation is read and written through nnsight traces, with `remote` passed to each trace. Parameters are
copied in torch (restore.restored_parameters) and scored through nnsight traces too.

Why it is faster than the paper's approach (one full hooked forward pass per window,
benchmarks/paper_baseline.py), with the same numbers (benchmarks/bench_patching.py prints both):
1. The source model runs once, and the unpatched target once, for all experiments and windows.
2. A window changes nothing below its first layer, so the layers below it are skipped (`.skip(saved_output)`) with
   the unpatched target's own outputs: bit-identical, and on average ~40% of the layers are never run.
3. A patched module's output no longer depends on its input: with the attention state patched, the attention
   module returns the source's state; with the coefficients patched, the MLP returns target_down_proj(source
   coefficients). One extra pass of the target with every layer patched records those outputs, and the window runs
   skip the attention / MLP modules with them instead of computing them and then overwriting the result.
4. Logits are computed for the scored positions only (the model's `logits_to_keep`), and scored against the
   reference with reused buffers (score.Reference).
5. The questions are packed (batch.py): their shared prompt prefix is computed once and no padding is computed.
   This is checked against the padded layout on the source model (see _packing_agrees).
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch

from .. import models
from . import batch as batch_mod, experiments as experiments_mod, score, windows as windows_mod
from .restore import restored_parameters

DIRECTIONS = ("forward", "reverse")
REMOTE_CHOICES = (False, True, "local")

# One row per (experiment, window, question).
ENGINE_COLUMNS = [
    "experiment", "direction", "window_size", "center_layer", "layers", "question_index", "answer_positions",
    "n_positions", "loss_patched", "loss_unpatched", "krs", "kl", "kl_unpatched", "top1_agree", "top1_agree_unpatched",
]


class RemoteUnavailableError(RuntimeError):
    """remote=True cannot work here (no NDIF API key, or NDIF cannot be reached)."""


def check_remote(remote, experiments=(), *, probe_network: bool = True) -> None:
    """Raise one clear error before any work if `remote` cannot work; do nothing for False and "local"."""
    if remote is None or remote is False or remote == "local":
        return
    if remote is not True:
        raise ValueError(f"remote must be False, True (run on NDIF) or 'local' (nnsight's offline simulation of an "
                         f"NDIF request), got {remote!r}")
    params = [e.name for e in experiments if e.restores_parameters]
    if params:
        raise ValueError(f"experiments {params} restore parameters, which edits a model's weights in this process; "
                         f"with remote=True the model runs on NDIF's servers, where they cannot be edited. "
                         f"Use remote=False or remote='local' for them")
    from nnsight import CONFIG

    if not (os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY):
        raise RemoteUnavailableError(
            "remote=True runs the traces on NDIF (ndif.us), which needs an API key: set the environment variable "
            "NDIF_API_KEY to your NDIF key, or use remote='local' to simulate the request offline, or remote=False "
            "to run here")
    if probe_network:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{CONFIG.API.HOST}/status", timeout=10):
                pass
        except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
            raise RemoteUnavailableError(f"remote=True: NDIF at {CONFIG.API.HOST} cannot be reached ({exc}); check "
                                         f"the network, or use remote='local' / remote=False") from exc


def wrap(model, tok):
    """An nnsight LanguageModel around an already loaded HF model. Wrapping leaves no hooks behind and holds the
    model only as long as the wrapper lives, so each run wraps afresh (one wrapper per model object)."""
    import warnings

    from nnsight import LanguageModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "LanguageModel is a deprecated alias of TransformersModel"
        return LanguageModel(model, tokenizer=tok)


def _attention_module(arch: models.Architecture) -> str:
    """The attention module (the parent of its output projection), relative to a decoder layer."""
    return arch.attn_module.rsplit(".", 1)[0]


@dataclass
class _Pass:
    """What the engine needs to know to run one model's traces."""

    model: torch.nn.Module  # the HF model
    lm: object  # its nnsight LanguageModel
    arch: models.Architecture
    inputs: batch_mod.ScoringInputs
    remote: object

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def trace(self, keep=None):
        """A trace over the inputs; logits only for the columns `keep` (default: the scored ones)."""
        kwargs = {k: v.to(self.device) for k, v in self.inputs.model_inputs.items()}
        if _supports_logits_to_keep(self.model):
            kwargs["logits_to_keep"] = (self.inputs.keep if keep is None else keep).to(self.device)
        return self.lm.trace(**kwargs, remote=self.remote)

    def scored(self):
        """(rows, cols) of the scored positions inside the logits a trace returns, or None if they are all of them."""
        if not _supports_logits_to_keep(self.model):
            return self.inputs.rows.to(self.device), self.inputs.cols.to(self.device)
        if self.inputs.kept_grid():
            return None
        return self.inputs.rows.to(self.device), self.inputs.kept_cols().to(self.device)

    @property
    def blocks(self):
        return models.get_module(self.lm, self.arch.layers)


def _supports_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


# ----------------------------------------------------------------------------------------------------------------------
# The traces. Bodies touch modules in forward order (attention output projection, attention module, MLP output
# projection, MLP, layer) and only use tensors, envoys and builtins, so they also run under remote="local"/True.
# ----------------------------------------------------------------------------------------------------------------------
def _read_source(p: _Pass, layers: list[int], coef: bool, attn: bool):
    """The source: logits at the scored positions, and per layer its coefficients and attention states."""
    coefs, states = {}, {}
    scored = p.scored()
    coef_path, attn_path = p.arch.coef_module, p.arch.attn_module
    blocks = p.blocks
    with p.trace():
        for i in layers:
            if attn:
                states[i] = models.get_module(blocks[i], attn_path).output.save()
            if coef:
                coefs[i] = models.get_module(blocks[i], coef_path).input.save()
        logits = p.lm.output.logits
        logits = (logits.flatten(0, 1) if scored is None else logits[scored]).save()
    return logits, coefs, states


def _read_target(p: _Pass, below: int):
    """The unpatched target: logits at the scored positions, and the outputs of layers 0..below-1 (for skipping)."""
    outputs = {}
    scored = p.scored()
    blocks = p.blocks
    with p.trace():
        for i in range(below):
            outputs[i] = blocks[i].output.save()
        logits = p.lm.output.logits
        logits = (logits.flatten(0, 1) if scored is None else logits[scored]).save()
    return logits, outputs


def _patched_module_outputs(p: _Pass, coefs: dict, states: dict):
    """Outputs of the target's MLP / attention modules when their coefficients / states are the source's.

    They depend only on the patched values (the MLP's output projection is applied to the source's coefficients; the
    attention module returns the patched state), so one pass with every layer patched records them for all windows.
    """
    mlp_out, attn_out = {}, {}
    attn_module, attn_path = _attention_module(p.arch), p.arch.attn_module
    mlp_path, coef_path = p.arch.mlp, p.arch.coef_module
    blocks = p.blocks
    last = max(list(coefs) + list(states))
    with p.trace(keep=torch.tensor([0])) as tracer:
        for i in sorted(set(coefs) | set(states)):
            if i in states:
                models.get_module(blocks[i], attn_path).output = states[i]
                attn_out[i] = models.get_module(blocks[i], attn_module).output.save()
            if i in coefs:
                models.get_module(blocks[i], coef_path).input = coefs[i]
                mlp_out[i] = models.get_module(blocks[i], mlp_path).output.save()
            if i == last:
                tracer.stop()  # nothing above is needed
    return mlp_out, attn_out


def _patched_logits(p: _Pass, first: int, below: dict, attn_out: dict, mlp_out: dict):
    """Target logits at the scored positions with layers < first skipped and the given modules replaced."""
    scored = p.scored()
    attn_module, mlp_path = _attention_module(p.arch), p.arch.mlp
    blocks = p.blocks
    with p.trace():
        for i in range(first):
            blocks[i].skip(below[i])
        for i in sorted(set(attn_out) | set(mlp_out)):
            if i in attn_out:
                models.get_module(blocks[i], attn_module).skip(attn_out[i])
            if i in mlp_out:
                models.get_module(blocks[i], mlp_path).skip(mlp_out[i])
        logits = p.lm.output.logits
        logits = (logits.flatten(0, 1) if scored is None else logits[scored]).save()
    return logits


# ----------------------------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------------------------
def _packing_agrees(src: _Pass, ref, prompt_ids, answer_ids, tok, alignment, n_check: int = 2) -> bool:
    """Do the packed inputs give the source model the logits the padded ones give? (A model that ignores a custom
    attention mask or position ids would not.) Checked on the last questions, which sit behind the others in a
    packed row; float rounding differs between the layouts (~1e-5), a wrong mask changes logits by whole units."""
    import warnings

    last = slice(len(prompt_ids) - min(n_check, len(prompt_ids)), len(prompt_ids))
    padded = batch_mod.scoring_inputs(prompt_ids[last], answer_ids[last], tok, alignment, "padded")
    check, _, _ = _read_source(_Pass(src.model, src.lm, src.arch, padded, src.remote), [], False, False)
    spans = src.inputs.spans[last]
    mine = ref[spans[0].start:spans[-1].stop]
    gap = float((mine.float() - check.float()).abs().max())
    if gap <= 1e-3 * (1.0 + float(check.abs().max())):
        return True
    warnings.warn(f"{type(src.model).__name__}: the packed layout changes the logits by up to {gap:.3g} (the model "
                  f"does not honour a custom 4D attention mask), so the padded layout is used", stacklevel=3)
    return False


def check_pair(vanilla, unlearned) -> models.Architecture:
    """Both models must share one architecture (same family, same parameter names and shapes)."""
    arch = models.architecture_of(vanilla)
    other = models.architecture_of(unlearned)
    if other != arch:
        raise ValueError(f"the vanilla model is a {arch.family!r} model but the unlearned one a {other.family!r} "
                         f"model: patching needs two models of one architecture")
    a = {n: tuple(t.shape) for n, t in vanilla.named_parameters()}
    b = {n: tuple(t.shape) for n, t in unlearned.named_parameters()}
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()))[:3]
        raise ValueError(f"the vanilla and unlearned models differ in parameter names or shapes (e.g. {diff}): "
                         f"patching needs two models of one architecture and size")
    # Activations and parameters move from one model into the other as they are, so both need one dtype.
    da = {t.dtype for t in vanilla.parameters()}
    db = {t.dtype for t in unlearned.parameters()}
    if da != db:
        raise ValueError(f"the vanilla model's parameters are {_dtypes(da)} but the unlearned model's {_dtypes(db)}: "
                         f"load both in one dtype (models.set_runtime(dtype=...) before loading them)")
    return arch


def _dtypes(dtypes) -> str:
    return "/".join(sorted(str(d).removeprefix("torch.") for d in dtypes))


def run(vanilla, unlearned, tok, prompt_ids: list[list[int]], answer_ids: list[list[int]],
        experiments=experiments_mod.PAPER_EXPERIMENTS, window: int = 5, layers=None, alignment: str = "answer",
        direction: str = "forward", remote=False, progress=False, layout: str = "auto"):
    """Run the experiments over every window for one group of questions; return a DataFrame (ENGINE_COLUMNS).

    vanilla, unlearned: loaded HF causal LMs of one architecture (left unchanged afterwards). tok: the vanilla
    tokenizer. prompt_ids / answer_ids: the questions' prompt tokens and the vanilla answers' tokens (pipeline.answers
    rows). window: size of the centred windows; layers: one explicit window instead (e.g. [-1] = the last layer), or
    a list of explicit windows ([[27, 28, 29], list(range(30))]).
    remote: False, True (NDIF) or "local" (nnsight's offline simulation of an NDIF request), passed to every trace.
    layout: "auto" (packed for alignment "answer" in float32, else padded), "packed" or "padded" (see batch.py); a
    packed layout is checked against the padded one on the source model first, and dropped (with a warning) if they
    disagree. question_index in the result is the position in prompt_ids.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    exps = experiments_mod.get(experiments)
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; valid: {', '.join(DIRECTIONS)}")
    check_remote(remote, exps)
    arch = check_pair(vanilla, unlearned)
    n_layers = models.n_layers(vanilla)
    wins = windows_mod.windows(n_layers, window, layers)
    if layout == "auto" and next(vanilla.parameters()).dtype != torch.float32:
        # In 16-bit precision the two layouts differ by rounding far beyond what _packing_agrees accepts (SmolLM2 in
        # bfloat16: 0.8 on logits up to 36), so the check would always fall back: use the padded layout directly.
        layout = "padded"
    inputs = batch_mod.scoring_inputs(prompt_ids, answer_ids, tok, alignment, layout)
    for m in (vanilla, unlearned):
        if m.training:
            raise ValueError(f"{type(m).__name__} is in training mode (dropout on): call .eval() first")
    source, target = (vanilla, unlearned) if direction == "forward" else (unlearned, vanilla)
    src = _Pass(source, wrap(source, tok), arch, inputs, remote)
    tgt = _Pass(target, src.lm if target is source else wrap(target, tok), arch, inputs, remote)

    want_coef = any(e.coef for e in exps)
    want_attn = any(e.attn for e in exps)
    patched_layers = sorted({i for w in wins for i in w.layers}) if (want_coef or want_attn) else []
    steps = 2 + bool(patched_layers) + len(exps) * len(wins)
    bar = tqdm(total=steps, desc=progress if isinstance(progress, str) else "patching", disable=not progress,
               unit="pass")
    records = []
    with torch.no_grad():
        ref, coefs, states = _read_source(src, patched_layers, want_coef, want_attn)
        if inputs.layout == "packed" and not _packing_agrees(src, ref, prompt_ids, answer_ids, tok, alignment):
            inputs = batch_mod.scoring_inputs(prompt_ids, answer_ids, tok, alignment, "padded")
            src, tgt = (_Pass(x.model, x.lm, arch, inputs, remote) for x in (src, tgt))
            ref, coefs, states = _read_source(src, patched_layers, want_coef, want_attn)
        bar.update()
        unpatched, below = _read_target(tgt, max(w.first for w in wins))
        bar.update()
        reference = score.Reference(ref, inputs.spans)
        base = reference.per_question(unpatched)
        mlp_out, attn_out = ({}, {})
        if patched_layers:
            mlp_out, attn_out = _patched_module_outputs(tgt, coefs, states)
            bar.update()
        del coefs, states
        for exp in exps:
            for w in wins:
                if exp.restores_parameters:
                    names = experiments_mod.parameter_names(target, arch, exp, w.layers)
                    with restored_parameters(target, source, names):
                        logits = _patched_logits(tgt, w.first, below, {}, {})
                else:
                    logits = _patched_logits(tgt, w.first, below,
                                             {i: attn_out[i] for i in w.layers} if exp.attn else {},
                                             {i: mlp_out[i] for i in w.layers} if exp.coef else {})
                for q, (s, b) in enumerate(zip(reference.per_question(logits), base)):
                    records.append({
                        "experiment": exp.name, "direction": direction, "window_size": None if layers is not None
                        else window, "center_layer": w.center, "layers": list(w.layers), "question_index": q,
                        "answer_positions": inputs.positions[q], "n_positions": len(inputs.positions[q]),
                        "loss_patched": s["loss"], "loss_unpatched": b["loss"], "krs": score.krs(s["loss"], b["loss"]),
                        "kl": s["kl"], "kl_unpatched": b["kl"], "top1_agree": s["top1_agree"],
                        "top1_agree_unpatched": b["top1_agree"],
                    })
                bar.update()
    bar.close()
    return pd.DataFrame.from_records(records, columns=ENGINE_COLUMNS)
