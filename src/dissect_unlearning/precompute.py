"""Compute what the chapters will ask the cache for, before they run: one task per unlearned model.

Executed chapter by chapter, the book loads each unlearned model once per chapter that uses it (~7 s each, ~100
loads for the default profile) and keeps the cores busy only as long as two chapters have work left: the longest
chapter ends alone on one core. Here the same pipeline calls, with the same arguments (so the same cache keys), are
regrouped by unlearned model: a task trains the model (or finds it), then runs every stage any chapter needs of it
(scores, sweeps, relearning) with the model loaded once (artefact.keep_loaded). Tasks run longest first, `jobs` at a
time; the chapters then execute from a warm cache.

The chapters stay the source of truth: a stage listed here that no chapter asks for only wastes time, and one a
chapter asks for but is missing here is computed by the chapter itself. book.build logs every artefact the chapters
build (cache.BUILD_LOG_ENV) and reports the heavy ones, and the smoke-profile test requires none, so the two
cannot drift apart unnoticed.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

from . import cache

# Artefacts that cost real time; the chapters should find all of them built (see book.build).
HEAVY_KINDS = ("unlearned", "behaviour", "sweep", "coef_change", "relearn")
PATCHED_ACTIVATIONS = ["coef", "attn", "coef+attn"]
# Rough seconds per stage on one core for the default model, only to start the longest tasks first.
_COST = {"unlearned": 75, "behaviour": 20, "coef_change": 5, "relearn": 40, "answers": 20, "pass": 0.7}
_LAYERS_GUESS = 30
# The book's chapters whose calls tasks() mirrors, by file stem (another project's notebooks are left alone).
CHAPTERS = {"02_model_organism": 2, "03_surface": 3, "04_patching": 4, "05_restoration": 5, "06_last_layer": 6,
            "07_side_effects": 7, "08_beyond": 8}


@dataclass
class Task:
    """Every stage the chapters need of one unlearned model (or, with concept None, of one vanilla model)."""

    model: str
    concept: str | None
    method: str | None
    context: dict  # the chapter parameters the calls depend on (concept set, prompt format, settings, runtime)
    stages: list = field(default_factory=list)  # [(stage, kwargs)], in the order they run

    def add(self, stage: str, **kwargs) -> None:
        if stage == "sweep":  # spelled out, so that calls equal for pipeline.sweep are one stage here
            kwargs = {"kind": "target", "direction": "forward", **kwargs}
        if (stage, kwargs) not in self.stages:
            self.stages.append((stage, kwargs))

    @property
    def label(self) -> str:
        return f"{self.model}" + (f" / {self.concept} / {self.method}" if self.concept else " (vanilla answers)")

    def estimate(self, main_model: str) -> float:
        total = 0.0
        for stage, kw in self.stages:
            if stage == "sweep":
                windows = 1 if kw.get("layers") is not None else _LAYERS_GUESS
                total += _COST["pass"] * (3 + len(kw["experiments"]) * windows)
            else:
                total += _COST[stage]
        return total * (1.0 if self.model == main_model else 2.5)  # the other family is a larger model


def _context(p: dict) -> dict:
    return {k: p.get(k) for k in ("concept_set", "n_questions", "n_unrelated", "prompt_format", "unlearning",
                                  "device", "dtype")}


def tasks(plan) -> list[Task]:
    """The tasks for a build plan: [(chapter, parameters, ...)] as book.build makes it. Chapters that run on NDIF
    (remote=True) are left to themselves: their traces run remotely, and there is nothing to regroup."""
    from . import book

    found: dict = {}

    def task(model, concept, method, p) -> Task:
        ctx = _context(p)
        key = (model, concept, method, cache.canonical_json(ctx))
        if key not in found:
            # an unlearned model's task trains it first: every other stage needs it
            found[key] = Task(model, concept, method, ctx, [("unlearned", {})] if concept is not None else [])
        return found[key]

    for item in plan:
        ch, p = item[0], item[1]
        n = CHAPTERS.get(ch.stem)
        if n is None or p.get("remote") is True or "model" not in p:
            continue
        cset = book.concept_set(p.get("concept_set", "builtin"), p.get("n_questions"), p.get("n_unrelated"))
        model = p["model"]
        chosen = cset.select(p["concepts"]).names if "concepts" in p else []
        pairs = [(c, m) for c in chosen for m in p.get("methods", [])]
        # chapters 5 and 8 run their beyond-the-paper experiments on these only
        beyond = cset.select(p["beyond_concepts"]).names if p.get("beyond_concepts") else chosen
        trace = {"alignment": p.get("alignment"), "remote": p.get("remote")}
        win = {"window": p.get("window"), "layers": p.get("layers"), **trace}
        activations = {"experiments": PATCHED_ACTIVATIONS, **win}
        last = {"experiments": ["coef"], "layers": [-1], **trace}
        if n == 2 and "concepts" in p:
            task(model, None, None, p).add("answers", select=p["concepts"], max_new_tokens=p.get("max_new_tokens"),
                                           include_unrelated=True)
        for c, m in pairs:
            if n == 3:
                task(model, c, m, p).add("behaviour")
            elif n == 4:
                task(model, c, m, p).add("sweep", **activations)
            elif n == 5:
                task(model, c, m, p).add("sweep", experiments=["value"], **win)
                task(model, c, m, p).add("sweep", **activations)
                extra = [r for r in dict.fromkeys(p.get("restorations", [])) if r != "value"]
                if extra and c in beyond:
                    task(model, c, m, p).add("sweep", experiments=extra, **win)
            elif n == 6:
                task(model, c, m, p).add("sweep", **last)
                task(model, c, m, p).add("sweep", **activations)
                task(model, c, m, p).add("coef_change", remote=p.get("remote"))
            elif n == 7:
                task(model, c, m, p).add("behaviour")
                task(model, c, m, p).add("sweep", **last, kind="unrelated")
                task(model, c, m, p).add("sweep", **last, kind="target")
        if n == 8:
            for c in beyond:
                for m in p.get("methods", []):
                    task(model, c, m, p).add("sweep", **activations, direction="reverse")
                    for d in p.get("relearn_data", []):
                        task(model, c, m, p).add("relearn", steps=p["relearn_steps"], data=d, lr=p["relearn_lr"])
            second = p.get("second_model")
            if second:
                names = cset.select(p["second_concepts"]).names if p.get("second_concepts") else chosen
                methods = p.get("second_methods") or p.get("methods", [])
                first = task(second, names[0], methods[0], p) if names and methods else None
                if first is not None:
                    first.add("answers", select=names, max_new_tokens=None, include_unrelated=False)
                for c in names:
                    for m in methods:
                        task(second, c, m, p).add("sweep", **activations)
    main = next((item[1].get("model") for item in plan), None)
    return sorted(found.values(), key=lambda t: -t.estimate(main))  # longest first


def run_task(t: Task, threads: int | None = None) -> dict:
    """Run one task's stages in this process; returns {'label', 'seconds', 'stages', 'error'} (never raises: a
    failing stage is left for its chapter, which reports it with the chapter and cell named)."""
    import traceback

    from . import book, models, pipeline
    from .unlearning import artefact

    if threads:
        import torch

        torch.set_num_threads(threads)
    t0 = time.time()
    done: list = []
    ctx = t.context
    try:
        models.set_runtime(ctx["device"], ctx["dtype"])
        cset = book.concept_set(ctx["concept_set"] or "builtin", ctx["n_questions"], ctx["n_unrelated"])
        fmt = ctx["prompt_format"] or "auto"
        unlearning = ctx["unlearning"] or {}
        with artefact.keep_loaded():
            u = None
            for stage, kw in t.stages:
                s0 = time.time()
                if stage == "answers":
                    extra = {} if kw["max_new_tokens"] is None else {"max_new_tokens": kw["max_new_tokens"]}
                    pipeline.answers(t.model, cset, select=kw["select"], prompt_format=fmt,
                                     include_unrelated=kw["include_unrelated"], progress=False, **extra)
                elif stage == "unlearned":
                    u = pipeline.unlearned(t.model, cset, t.concept, t.method, progress=False, prompt_format=fmt,
                                           **unlearning)
                elif stage == "behaviour":
                    pipeline.behaviour(t.model, cset, select=[t.concept], methods=[t.method], prompt_format=fmt,
                                       settings=unlearning, progress=False)
                elif stage == "sweep":
                    pipeline.sweep(t.model, u, cset, t.concept, prompt_format=fmt, progress=False, **kw)
                elif stage == "coef_change":
                    pipeline.coef_change(t.model, u, cset, t.concept, prompt_format=fmt, progress=False, **kw)
                elif stage == "relearn":
                    pipeline.relearn(t.model, cset, t.concept, t.method, prompt_format=fmt, settings=unlearning,
                                     progress=False, **kw)
                else:
                    raise ValueError(f"unknown precompute stage {stage!r}")
                done.append((stage, round(time.time() - s0, 1)))
        error = None
    except Exception:  # noqa: BLE001 - reported, then left for the chapter that needs it
        error = traceback.format_exc(limit=6)
    return {"label": t.label, "seconds": time.time() - t0, "stages": done, "error": error}


def run(plan, jobs: int = 1, verbose: bool = True) -> list[dict]:
    """Run the tasks of `plan` longest first, `jobs` processes at a time (each with cores/jobs torch threads)."""
    todo = tasks(plan)
    if not todo:
        return []
    jobs = max(1, min(jobs, len(todo)))
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    if verbose:
        print(f"[book] precompute: {len(todo)} task(s) (one per unlearned model), {jobs} at a time", flush=True)
    t0 = time.time()
    results: list[dict] = []

    def report(r: dict) -> None:
        results.append(r)
        if not verbose:
            return
        status = "FAILED (its chapter will report it)" if r["error"] else f"{r['seconds']:.0f} s"
        stages = ", ".join(f"{s} {x:.0f}s" for s, x in r["stages"])
        print(f"[book] precompute {len(results)}/{len(todo)}: {r['label']}: {status} ({stages})", flush=True)
        if r["error"]:
            print(r["error"], file=sys.stderr, flush=True)

    if jobs == 1:
        for t in todo:
            report(run_task(t))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_task, t, threads) for t in todo]
            for f in as_completed(futures):
                report(f.result())
    if verbose:
        print(f"[book] precompute: done in {time.time() - t0:.0f} s", flush=True)
    return results
