"""Compute what the chapters will ask the cache for, before they run: one task per unlearned model.

Executed chapter by chapter, the book would load each unlearned model once per chapter that uses it and keep the
cores busy only while two chapters have work left. Here each chapter's own code says what it needs: its cells tagged
`study` run in plan mode (study.planning), which records every stage they ask for without computing it. The requests
are regrouped by unlearned model: a task trains the model (or finds it), then runs every stage any chapter needs of
it with the model loaded once (artefact.keep_loaded). Tasks run longest first, in `jobs` worker processes that
report their stage to the terminal and `_build/precompute.log`, and stop with the build on Ctrl-C or SIGTERM
(progress.py); the chapters then execute from a warm cache. Both paths go through Study.execute, so they ask for
the same cache keys by construction.

Memory decides the order. A training stage (unlearning, relearning) holds the weights, their gradients and two
optimiser moments: four copies of the model, the build's high-water mark. So the build runs in two phases: first
every task's training stages, one task at a time with every core (the same weights bit for bit as with one thread:
tests/test_precompute.py), then the rest, `jobs` at a time. Each task runs in a new worker process, whose memory
goes back to the system when it ends. A task of the second phase whose worker would not fit in the memory budget
beside another one (a larger model: Gemma 3 270M's sweeps take 5.1 GB) runs alone, with every core, before the rest.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import cache, progress, study as study_mod

# Artefacts that cost real time; the chapters should find all of them built (see book.build).
HEAVY_KINDS = ("unlearned", "behaviour", "sweep", "coef_change", "relearn")
# The stages that train a model (the memory-heavy ones): the first phase runs them one task at a time.
TRAINING_STAGES = ("unlearned", "relearn")
STUDY_TAG = "study"  # the notebook cells whose calls are the chapter's plan
# Rough seconds per stage on one core for the default model, only to start the longest tasks first.
_COST = {"unlearned": 75, "behaviour": 20, "coef_change": 5, "relearn": 40, "answers": 20, "pass": 0.7}
_LAYERS_GUESS = 30
# The memory the whole build should stay within (GB), and what one worker of the second phase holds: the vanilla and
# the unlearned model with their activations, about five times the model's float32 weights (measured in the cold
# default build: 5.1 GB for Gemma 3 270M's sweep task, about 2.5 GB for a SmolLM2-135M task).
MEMORY_BUDGET_GB = 6.0
WORKER_WEIGHT_MULTIPLE = 5.0


@dataclass
class Task:
    """Every request the chapters make of one unlearned model (or, with concept None, of one vanilla model)."""

    model: str
    concept: str | None
    method: str | None
    context: str
    requests: list = field(default_factory=list)

    def add(self, request: study_mod.Request) -> None:
        if request not in self.requests:
            self.requests.append(request)

    @property
    def stages(self) -> list[str]:
        return [r.stage for r in self.requests]

    # The unlearning settings that tell this task from the other tasks of its (model, concept, method), set by
    # tasks(): a chapter 3 regime's forget_data, the adapter's params. Without them a progress line would name two
    # different models alike.
    variant: str = ""

    @property
    def label(self) -> str:
        seed = self.settings.get("seed")
        return (f"{self.model}" + (f" / {self.concept} / {self.method}" if self.concept else " (vanilla answers)")
                + (f" / {self.variant}" if self.variant else "") + (f" / seed {seed}" if seed else ""))

    @property
    def settings(self) -> dict:
        """The unlearning settings of the task's context (the profile's, and a variant's changes to them)."""
        return json.loads(self.context).get("unlearning") or {}

    def split(self) -> tuple["Task | None", "Task | None"]:
        """(its training stages, the rest) as two tasks of the same model; None where a part is empty."""
        parts = []
        for training in (True, False):
            t = Task(self.model, self.concept, self.method, self.context,
                     [r for r in self.requests if (r.stage in TRAINING_STAGES) == training], self.variant)
            parts.append(t if t.requests else None)
        return parts[0], parts[1]

    def estimate(self, main_model: str | None) -> float:
        total = 0.0
        for r in self.requests:
            total += _request_cost(r)
        return total * (1.0 if self.model == main_model else 2.5)  # the other family is a larger model


def _request_cost(r: study_mod.Request) -> float:
    """Rough seconds of one request on one core for the default model."""
    if r.stage == "sweep":
        kw = r.kwargs
        windows = 1 if kw.get("layers") is not None else _LAYERS_GUESS
        return _COST["pass"] * (3 + len(kw["experiments"]) * windows)
    return _COST[r.stage]


def study_cells(notebook: Path) -> list[str]:
    """The source of a chapter's cells tagged `study`, in order."""
    nb = json.loads(Path(notebook).read_text())
    return ["".join(c["source"]) for c in nb.get("cells", [])
            if c.get("cell_type") == "code" and STUDY_TAG in (c.get("metadata", {}).get("tags") or [])]


def requests(notebook: Path, params: dict) -> list[study_mod.Request]:
    """What a chapter executed with `params` will ask for: its `study` cells run in plan mode."""
    with study_mod.planning() as recorded:
        namespace = dict(params)
        for i, source in enumerate(study_cells(notebook)):
            exec(compile(source, f"{notebook} (study cell {i + 1})", "exec"), namespace)  # noqa: S102
    return list(recorded)


def tasks(plan) -> list[Task]:
    """The tasks for a build plan: [(chapter, parameters, ...)] as book.build makes it. Chapters that run on NDIF
    (remote=True) are left to themselves: their traces run remotely, and there is nothing to regroup. A chapter whose
    plan cannot be made (it raises) is left to itself too: executing it reports the error with its cell."""
    found: dict = {}
    main = None
    for item in plan:
        chapter, params = item[0], item[1]
        if params.get("remote") is True:
            continue
        main = main or params.get("model")
        try:
            asked = requests(chapter.path, params)
        except Exception as exc:  # noqa: BLE001 - the chapter will raise it again, with its cell
            print(f"[book] precompute: cannot plan {chapter.stem} ({type(exc).__name__}: {exc}); "
                  f"it will compute its own artefacts", file=sys.stderr, flush=True)
            continue
        for r in asked:
            key = (r.model, r.concept, r.method, r.context)
            if key not in found:
                found[key] = Task(r.model, r.concept, r.method, r.context)
                if r.concept is not None:  # every other stage needs the unlearned model: train it first
                    found[key].add(study_mod.Request("unlearned", r.model, r.concept, r.method, (), r.context))
            found[key].add(r)
    _name_variants(list(found.values()))
    return sorted(found.values(), key=lambda t: -t.estimate(main))  # longest first


def _name_variants(tasks: list[Task]) -> None:
    """Set each task's `variant`: the settings (seed apart, which the label shows itself) whose values differ among
    the tasks of its (model, concept, method), as "name value" pairs, the ones it sets itself; empty for a task
    on the profile's own settings."""
    groups: dict = {}
    for t in tasks:
        groups.setdefault((t.model, t.concept, t.method), []).append(t)
    for group in groups.values():
        values = [{k: cache.canonical_json(v) for k, v in t.settings.items() if k != "seed"} for t in group]
        differ = sorted(k for k in {k for v in values for k in v} if len({v.get(k) for v in values}) > 1)
        for t in group:
            t.variant = ", ".join(f"{k} {t.settings[k]}" for k in differ if k in t.settings)


def run_task(t: Task, threads: int | None = None) -> dict:
    """Run one task's requests in this process; returns {'label', 'seconds', 'stages', 'error'} (never raises but
    for an interrupt: a failing stage is left for its chapter, which reports it with the chapter and cell named).
    In a worker of `run`, each request is reported as the worker's stage ("sweep 3/6")."""
    import traceback

    from .unlearning import artefact

    if threads:
        import torch

        torch.set_num_threads(threads)
    t0 = time.time()
    done: list = []
    costs = [_request_cost(r) for r in t.requests]
    try:
        study = study_mod.Study.from_params(json.loads(t.context), model=t.model, progress=False)
        with artefact.keep_loaded():
            for i, r in enumerate(t.requests):
                progress.stage(f"{r.stage} {i + 1}/{len(t.requests)}", done=sum(costs[:i]) / (sum(costs) or 1.0))
                s0, c0 = time.time(), time.process_time()
                study.execute(r)
                done.append((r.stage, round(time.time() - s0, 1), round(time.process_time() - c0, 1)))
        error = None
    except Exception:  # noqa: BLE001 - reported, then left for the chapter that needs it
        error = traceback.format_exc(limit=6)
    return {"label": t.label, "seconds": time.time() - t0, "stages": done, "error": error}


def run(plan, jobs: int = 1, verbose: bool = True, log: Path | None = None,
        memory_gb: float = MEMORY_BUDGET_GB) -> list[dict]:
    """Run the tasks of `plan`: their training stages first, one task at a time with every core, then the rest,
    longest first, `jobs` worker processes at a time (each with cores/jobs torch threads), showing their progress on
    the terminal and in `log` (see run_tasks). Of the rest, the tasks whose `jobs` workers would not fit in
    `memory_gb` together (split_by_memory) run first, one at a time with every core."""
    if verbose:
        print(f"[book] precompute: planning {len(plan)} chapter(s) ...", flush=True)
    main = next((item[1].get("model") for item in plan if item[1].get("remote") is not True), None)
    todo = tasks(plan)
    training = [t.split()[0] for t in todo if t.split()[0] is not None]
    rest = [t.split()[1] for t in todo if t.split()[1] is not None]
    results = []
    if training:
        if verbose:
            print(f"[book] precompute: training {len(training)} model(s) first, one at a time: a training run "
                  f"holds four copies of its model", flush=True)
        results += run_tasks(training, 1, verbose, log, main, phase="training")
    alone, shared = split_by_memory(rest, jobs, memory_gb)  # after training: every model is provisioned by now
    if alone:
        if verbose:
            print(f"[book] precompute: {len(alone)} task(s) of a larger model first, one at a time: two of their "
                  f"workers would not fit in {memory_gb:g} GB", flush=True)
        results += run_tasks(alone, 1, verbose, log, main, phase="one at a time")
    return results + run_tasks(shared, jobs, verbose, log, main)


def worker_memory_gb(model: str) -> float | None:
    """About what a second-phase worker of `model` holds (GB): WORKER_WEIGHT_MULTIPLE times its float32 weights;
    None when its size cannot be read here (models.parameter_count)."""
    from . import models

    n = models.parameter_count(model)
    return None if n is None else WORKER_WEIGHT_MULTIPLE * 4 * n / 1e9


def split_by_memory(todo: list[Task], jobs: int, memory_gb: float = MEMORY_BUDGET_GB
                    ) -> tuple[list[Task], list[Task]]:
    """(tasks to run one at a time, the rest), in their order: with `jobs` workers, a task runs alone when `jobs` of
    its workers would not fit in `memory_gb` (a model whose size is unknown is not held back)."""
    if jobs <= 1:
        return [], list(todo)
    sizes = {m: worker_memory_gb(m) for m in dict.fromkeys(t.model for t in todo)}
    big = {m for m, gb in sizes.items() if gb is not None and jobs * gb > memory_gb}
    return [t for t in todo if t.model in big], [t for t in todo if t.model not in big]


def run_tasks(todo: list[Task], jobs: int = 1, verbose: bool = True, log: Path | None = None,
              main_model: str | None = None, runner=run_task, phase: str | None = None) -> list[dict]:
    """Run `todo` in that order, `jobs` worker processes at a time; return run_task's results in that order.

    The terminal and `log` show tasks done / total, each worker's task and stage, the time elapsed and an estimate
    of the time left (Task.estimate scaled by the speed measured so far). Ctrl-C or SIGTERM stop every worker within
    seconds and raise KeyboardInterrupt: the finished tasks' artefacts are in the cache, so the next run goes on
    from them. `runner(task, threads)` runs one task in a worker (a module-level function: it is pickled there).
    """
    if not todo:
        return []
    jobs = max(1, min(jobs, len(todo)))
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    name = f"precompute ({phase})" if phase else "precompute"
    if verbose:
        print(f"[book] {name}: {len(todo)} task(s) (one per unlearned model), {jobs} at a time"
              + (f"; progress in {log}" if log else ""), flush=True)
    t0 = time.time()
    results: list = [None] * len(todo)
    count = 0

    def report(index: int, outcome: progress.Outcome, say) -> None:
        nonlocal count
        count += 1
        r = outcome.result
        if r is None:  # the worker itself failed (it died, or the runner raised)
            reason = f"{type(outcome.error).__name__}: {outcome.error}"
            r = {"label": todo[index].label, "seconds": outcome.seconds, "stages": [],
                 "error": (outcome.details or "") + reason}
        results[index] = r
        status = "FAILED (its chapter will report it)" if r["error"] else f"{r['seconds']:.0f} s"
        stages = ", ".join(f"{s[0]} {s[1]:.0f}s" for s in r["stages"])
        say(f"{name} {count}/{len(todo)}: {r['label']}: {status}" + (f" ({stages})" if stages else ""))
        if r["error"]:
            say(r["error"].rstrip(), err=True)

    work = [progress.Job(t.label, runner, (t, threads), t.estimate(main_model)) for t in todo]
    progress.run_jobs(work, jobs, name=name, log=log, verbose=verbose, on_result=report, fresh=True)
    if verbose:
        print(f"[book] {name}: done in {time.time() - t0:.0f} s", flush=True)
    return [r for r in results if r is not None]
