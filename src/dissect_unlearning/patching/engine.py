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
   coefficients) (sites.Site.replay_parent). One extra pass of the target per site, with every layer patched,
   records those outputs, and the window runs skip the attention / MLP modules with them instead of computing them
   and then overwriting the result.
4. Logits are computed for the scored positions only (the model's `logits_to_keep`), and scored against the
   reference with reused buffers (score.Reference).
5. The questions are packed (batch.py): their shared prompt prefix is computed once and no padding is computed.
   This is checked against the padded layout on the source model (see _packing_agrees).
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from dataclasses import dataclass

import torch

from .. import models
from . import batch as batch_mod, experiments as experiments_mod, score, sites as sites_mod, windows as windows_mod
from .restore import restored_parameters
# Shared with the adapter path (adapted.py), which the engine hands adapter runs to; re-exported from here
from .common import DIRECTIONS, ENGINE_COLUMNS, REMOTE_CHOICES, RemoteUnavailableError, wrap  # noqa: F401


class RemoteLocalModelError(ValueError):
    """remote=True with a model NDIF cannot have: an unlearned (or otherwise changed) copy of a hosted model."""


# Why a locally changed model cannot go to NDIF: the request names the model by its `name_or_path`, which an
# unlearned model here shares with the vanilla model it was made from, so NDIF would run its own, vanilla weights.
LOCAL_MODEL_REASON = (
    "NDIF runs the weights it hosts under a model's name, and an unlearned model here is the vanilla model plus a "
    "change stored on this machine, under the vanilla model's name: every 'unlearned' trace would run the hosted "
    "vanilla weights, and KRS would compare the vanilla model with itself, with no error. Unlearn with an adapter "
    "instead (unlearning setting params='lora'), which travels with every request, or run it here: remote=False, or "
    "remote='local' (nnsight's offline simulation of the request)")


def refuse_local_model(remote, what: str) -> None:
    """Raise RemoteLocalModelError if `remote` is True: `what` (e.g. "the unlearned model") exists only here."""
    if remote is True:
        raise RemoteLocalModelError(f"remote=True with {what}: {LOCAL_MODEL_REASON}")


def check_remote_pair(vanilla, unlearned, remote) -> None:
    """remote=True on two loaded models: refused when NDIF would see one model twice (one name, two sets of
    weights: the unlearned one made here from the vanilla one). Two models of two hosted names pass."""
    if remote is not True:
        return
    names = [getattr(getattr(m, "config", None), "_name_or_path", None) or getattr(m, "name_or_path", None)
             for m in (vanilla, unlearned)]
    if names[0] is None or names[0] == names[1] or any(n and Path(n).exists() for n in names):
        refuse_local_model(remote, f"the models {names[0]!r} and {names[1]!r}, one of them made or stored here")


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



@dataclass
class Pass:
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
# The traces. Bodies touch modules in forward order (the sites of a layer in sites.in_forward_order, each site's
# replayed module after it, then the next layer) and only use tensors, envoys, strings and builtins, so they also run
# under remote="local"/True: sites are resolved to module paths before a trace starts.
# ----------------------------------------------------------------------------------------------------------------------
def _read_source(p: Pass, layers: list[int], sites: list[sites_mod.Site]):
    """The source: logits at the scored positions, and {site name: {layer: value}} for the given layers."""
    values = {s.name: {} for s in sites}
    where = [(s.name, s.path(p.arch), s.value) for s in sites]
    scored = p.scored()
    blocks = p.blocks
    with p.trace():
        for i in layers:
            for name, path, value in where:
                values[name][i] = getattr(models.get_module(blocks[i], path), value).save()
        logits = p.lm.output.logits
        logits = (logits.flatten(0, 1) if scored is None else logits[scored]).save()
    return logits, values


def _read_target(p: Pass, below: int):
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


def _replayed_outputs(p: Pass, site: sites_mod.Site, values: dict):
    """{layer: output of the module that `site` replays} in the target when the site holds the source's `values`.

    They depend only on the patched values (the MLP's output projection is applied to the source's coefficients; the
    attention module returns the patched state), so one pass with every layer patched records them for all windows.
    """
    out = {}
    path, value, replayed = site.path(p.arch), site.value, site.replay_path(p.arch)
    blocks = p.blocks
    last = max(values)
    with p.trace(keep=torch.tensor([0])) as tracer:
        for i in sorted(values):
            setattr(models.get_module(blocks[i], path), value, values[i])
            out[i] = models.get_module(blocks[i], replayed).output.save()
            if i == last:
                tracer.stop()  # nothing above is needed
    return out


def _patched_logits(p: Pass, first: int, below: dict, replays: list):
    """Target logits at the scored positions with layers < first skipped and the given modules replaced.

    replays: [(module path inside a layer, {layer: output})], in the forward order of the modules within a layer.
    """
    scored = p.scored()
    blocks = p.blocks
    with p.trace():
        for i in range(first):
            blocks[i].skip(below[i])
        for i in sorted({i for _, outputs in replays for i in outputs}):
            for path, outputs in replays:
                if i in outputs:
                    models.get_module(blocks[i], path).skip(outputs[i])
        logits = p.lm.output.logits
        logits = (logits.flatten(0, 1) if scored is None else logits[scored]).save()
    return logits


# ----------------------------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------------------------
def _packing_agrees(src: Pass, ref, prompt_ids, answer_ids, tok, alignment, n_check: int = 2) -> bool:
    """Do the packed inputs give the source model the logits the padded ones give? (A model that ignores a custom
    attention mask or position ids would not.) Checked on the last questions, which sit behind the others in a
    packed row; float rounding differs between the layouts (~1e-5), a wrong mask changes logits by whole units."""
    import warnings

    last = slice(len(prompt_ids) - min(n_check, len(prompt_ids)), len(prompt_ids))
    padded = batch_mod.scoring_inputs(prompt_ids[last], answer_ids[last], tok, alignment, "padded")
    check, _ = _read_source(Pass(src.model, src.lm, src.arch, padded, src.remote), [], [])
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
        direction: str = "forward", remote=False, progress=False, layout: str = "auto", metric=score.mse):
    """Run the experiments over every window for one group of questions; return a DataFrame (ENGINE_COLUMNS).

    vanilla, unlearned: loaded HF causal LMs of one architecture (left unchanged afterwards); or `unlearned` an
    unlearning.adapter.Adapter: the vanilla model with the adapter applied inside the traces (patching/adapted.py),
    the form NDIF can run (remote=True), in which a parameter restoration switches adapter terms off. tok: the vanilla
    tokenizer. prompt_ids / answer_ids: the questions' prompt tokens and the vanilla answers' tokens (pipeline.answers
    rows). experiments: names in experiments.EXPERIMENTS (a list or a comma-separated string). window: size of the
    centred windows; layers: one explicit window instead (e.g. [-1] = the last layer), or a list of explicit windows
    ([[27, 28, 29], list(range(30))]).
    remote: False, True (NDIF) or "local" (nnsight's offline simulation of an NDIF request), passed to every trace.
    layout: "auto" (packed for alignment "answer" in float32, else padded), "packed" or "padded" (see batch.py); a
    packed layout is checked against the padded one on the source model first, and dropped (with a warning) if they
    disagree. question_index in the result is the position in prompt_ids.
    metric: metric(reference logits, logits) -> float, a distance over one question's scored positions ([positions,
    vocab] each; 0 = the reference output): the columns loss_patched / loss_unpatched, and
    KRS = 1 - metric(patched) / metric(unpatched). Default: the paper's loss, the mean squared logit difference.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from ..unlearning.adapter import Adapter

    if isinstance(unlearned, Adapter):
        # "unlearned" = `vanilla` with the adapter applied inside the traces: one session, shippable to NDIF
        from . import adapted

        if metric is not score.mse:
            raise ValueError("metric: a run with an adapter scores inside its session with the paper's loss (mse) "
                             "only; merge the adapter into a copy of the model (unlearning.adapter.merge) for another")
        if remote is True:
            from . import remote as remote_mod

            remote_mod.preflight(vanilla)
        return adapted.run(vanilla, unlearned, tok, prompt_ids, answer_ids, experiments, window, layers, alignment,
                           direction, remote, layout)
    exps = experiments_mod.get(experiments)
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; valid: {', '.join(DIRECTIONS)}")
    if not callable(metric):
        raise TypeError(f"metric must be a callable (reference logits, logits) -> float, got {metric!r}")
    check_remote_pair(vanilla, unlearned, remote)
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
    src = Pass(source, wrap(source, tok), arch, inputs, remote)
    tgt = Pass(target, src.lm if target is source else wrap(target, tok), arch, inputs, remote)

    sites = sites_mod.in_forward_order({s for e in exps for s in e.sites})
    patched_layers = sorted({i for w in wins for i in w.layers}) if sites else []
    # An experiment that restores parameters as well as patching sites records its replayed outputs again under
    # the restored parameters (the MLP's replayed output depends on its own weights), so it needs the source values.
    keep_values = any(e.sites and e.restores_parameters for e in exps)
    # Controls (source "other") patch in another question's activations: their sites are replayed once more, with
    # the values moved between questions (batch.other_question_index).
    moved_sites = sites_mod.in_forward_order({s for e in exps if e.source == "other" for s in e.sites})
    steps = 2 + len(sites) + len(moved_sites) + len(exps) * len(wins)
    bar = tqdm(total=steps, desc=progress if isinstance(progress, str) else "patching", disable=not progress,
               unit="pass")
    records = []
    with torch.no_grad():
        ref, values = _read_source(src, patched_layers, sites)
        if inputs.layout == "packed" and not _packing_agrees(src, ref, prompt_ids, answer_ids, tok, alignment):
            inputs = batch_mod.scoring_inputs(prompt_ids, answer_ids, tok, alignment, "padded")
            src, tgt = (Pass(x.model, x.lm, arch, inputs, remote) for x in (src, tgt))
            ref, values = _read_source(src, patched_layers, sites)
        bar.update()
        unpatched, below = _read_target(tgt, max(w.first for w in wins))
        bar.update()
        reference = score.Reference(ref, inputs.spans)
        base = reference.per_question(unpatched, metric)
        replayed = {}
        for site in sites:
            replayed[site.name] = _replayed_outputs(tgt, site, values[site.name])
            bar.update()
        replayed_other = {}
        if moved_sites:
            rows, cols = batch_mod.other_question_index(inputs)
            for site in moved_sites:
                moved = {i: v[rows.to(v.device), cols.to(v.device)] for i, v in values[site.name].items()}
                replayed_other[site.name] = _replayed_outputs(tgt, site, moved)
                bar.update()
        if not keep_values:
            values = None  # the source's activations of every patched layer: free them
        for exp in exps:
            exp_sites = [s for s in sites if s.name in exp.sites]
            for w in wins:
                if exp.restores_parameters:
                    names = experiments_mod.parameter_names(target, arch, exp, w.layers)
                    with restored_parameters(target, source, names):
                        outputs = {s.name: _replayed_outputs(tgt, s, {i: values[s.name][i] for i in w.layers})
                                   for s in exp_sites}
                        logits = _patched_logits(tgt, w.first, below, _replays(arch, exp_sites, outputs, w.layers))
                else:
                    outputs = replayed_other if exp.source == "other" else replayed
                    logits = _patched_logits(tgt, w.first, below, _replays(arch, exp_sites, outputs, w.layers))
                for q, (s, b) in enumerate(zip(reference.per_question(logits, metric), base)):
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


def _replays(arch, sites, outputs: dict, layers) -> list:
    """What _patched_logits replays for `sites` (in forward order) in `layers`: [(module path, {layer: output})]."""
    return [(s.replay_path(arch), {i: outputs[s.name][i] for i in layers}) for s in sites]
