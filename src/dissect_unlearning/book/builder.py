"""The whole book: check everything, precompute what the chapters need, execute them (side by side), render.

Layout of a build (`<output>/_build/`): book/ (staged source), html/ (the book), failed/ (the executed copy of a
chapter that raised), jupyter/ (the kernel specs of the current Python), built-by-chapters.log (the artefacts the
chapters computed themselves), precompute.log and chapters.log (what each stage's workers did, and when).
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .. import cache, progress, validate
from .chapter import check_documented, chapters, find_chapter
from .execute import ChapterRun, chapter_inputs, execute_chapter, jupyter_path
from .profiles import check_overrides, load_profile, resolve_parameters
from .project import BookError, project_root
from .staging import render_html, stage


@dataclass
class BuildReport:
    profile: str
    runs: list[ChapterRun] = field(default_factory=list)
    html: Path | None = None
    seconds: float = 0.0
    precomputed: list[dict] = field(default_factory=list)  # precompute.run's results
    built_by_chapters: list[tuple[str, str]] = field(default_factory=list)  # (kind, key) the chapters built
    peak_memory: int = 0  # bytes: the largest total PSS of the build's processes (progress.MemoryWatch)

    @property
    def executed(self) -> list[str]:
        return [r.chapter.stem for r in self.runs if not r.reused]

    @property
    def reused(self) -> list[str]:
        return [r.chapter.stem for r in self.runs if r.reused]


def build(profile: str | Path = "default", only=None, overrides: dict | None = None, *, root: Path | None = None,
          output: Path | None = None, force: bool = False, html: bool = True, verbose: bool = True,
          jobs: int = 1, precompute: bool = True) -> BuildReport:
    """Execute the chapters of the toc (or only those named, else those of the profile's `only`) with `profile`
    (+ -p overrides) and render the book (of the profile's `only` chapters alone, when it has that key).

    Everything is checked before anything runs: profile, chapter names, parameter names and values.
    `output`: the folder that receives `_build/` (default: the project folder).
    `jobs`: chapters executing side by side, in toc order, each kernel with cores/jobs torch threads. Chapters share
    their artefacts through the cache, whose locks make a chapter wait for a model another one is still training, so
    a later chapter works on the first (concept, method) pairs while an earlier one trains the next.
    `precompute`: first compute what the chapters to execute will need, one task per unlearned model, `jobs` at a
    time (precompute.py); the chapters then execute from a warm cache.
    """
    t0 = time.time()
    root = Path(root).resolve() if root else project_root()
    output = Path(output).resolve() if output else root
    build_dir = output / "_build"
    prof = load_profile(profile, root)
    all_chapters = chapters(root)
    if only:
        selected = [find_chapter(n, root) for n in ([only] if isinstance(only, str) else only)]
    elif prof.only is not None:  # the profile's own selection, in toc order
        selected = [ch for ch in all_chapters if ch.stem in prof.only]
    else:
        selected = [ch for ch in all_chapters if ch.in_toc]
    if not selected:
        raise BookError("no chapter to build: _toc.yml lists no notebook of notebooks/")
    for ch in selected:
        check_documented(ch)
    overrides = check_overrides(overrides or {}, selected)
    plan = [(ch, *resolve_parameters(ch, prof, {k: v for k, v in overrides.items() if k in ch.parameters()},
                                     with_sources=True)) for ch in selected]
    if not validate.int_in_range(jobs, 1):
        raise BookError(f"jobs must be {validate.int_words(1)}, got {jobs!r}")
    requested_jobs, jobs = jobs, min(jobs, len(plan))
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    report = BuildReport(prof.name)
    if verbose:
        print(f"[book] profile {prof.name}: {len(plan)} chapter(s)"
              + (f", {jobs} at a time ({threads} torch thread(s) each)" if jobs > 1 else ""), flush=True)

    # Two builds writing one _build/ folder would interleave their pages: the second waits (or gives up, saying
    # which process holds it). SIGTERM stops a build as Ctrl-C does: workers, kernels and temporary folders go, the
    # lock is released, and what finished stays cached for the next build.
    build_dir.mkdir(parents=True, exist_ok=True)
    watch = progress.MemoryWatch()
    try:
        with progress.stop_on_signals(), cache.build_lock(build_dir), watch:
            # Imported here: the precompute stage loads the whole pipeline (torch, transformers, nnsight), which the
            # rest of the book (checking parameters, --list-params, glue inside a chapter) does not need.
            from .. import precompute as precompute_mod

            if precompute:
                todo = [item for item in plan
                        if force or cache.lookup("chapter", chapter_inputs(item[0], item[1])) is None]
                report.precomputed = precompute_mod.run(todo, jobs=requested_jobs, verbose=verbose,
                                                        log=build_dir / "precompute.log")
            log = build_dir / "built-by-chapters.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("")
            before_log = os.environ.get(cache.BUILD_LOG_ENV)
            os.environ[cache.BUILD_LOG_ENV] = str(log)  # chapter kernels inherit it
            try:
                _execute_chapters(report, plan, build_dir, force, verbose, jobs, threads)
            finally:
                if before_log is None:
                    os.environ.pop(cache.BUILD_LOG_ENV, None)
                else:
                    os.environ[cache.BUILD_LOG_ENV] = before_log
            report.built_by_chapters = cache.built(log)
            heavy = [kind for kind, _ in report.built_by_chapters if kind in precompute_mod.HEAVY_KINDS]
            if precompute and heavy and verbose:
                counts = ", ".join(f"{n} {k}" for k, n in Counter(heavy).items())
                print(f"[book] note: the chapters computed artefacts the precompute stage did not ({counts}); "
                      f"precompute.tasks() is missing a stage some chapter uses", flush=True)
            if html:
                # A profile's selection, plus any chapter named on the command line (`run` of another chapter)
                keep = None if prof.only is None else [*prof.only, *(ch.stem for ch in selected
                                                                     if ch.stem not in prof.only)]
                src = stage(root, build_dir, report.runs, prof.name, keep=keep)
                missing = [ch.stem for ch in all_chapters
                           if ch.in_toc and (keep is None or ch.stem in keep)
                           and not (src / "notebooks" / f"{ch.stem}.ipynb").is_file()]
                if missing and verbose:
                    print(f"[book] not in this HTML (never built; run `dissect-unlearning build`): "
                          f"{', '.join(missing)}")
                report.html = render_html(src, output, verbose)
                if verbose:
                    print(f"[book] open {report.html / 'index.html'}", flush=True)
    except KeyboardInterrupt as exc:
        if verbose:
            print(f"[book] build stopped by {progress.stop_reason(exc)} after {progress.clock(time.time() - t0)}; "
                  f"run the same command again to go on from what finished", file=sys.stderr, flush=True)
        raise
    report.seconds = time.time() - t0
    report.peak_memory = watch.peak
    if verbose:
        if report.precomputed:
            print(f"[book] precompute: {_cpu_by_stage(report.precomputed)}", flush=True)
        print(f"[book] {watch.summary()}; built in {progress.clock(report.seconds)}", flush=True)
    return report


@dataclass
class ChapterPlan:
    """What `dissect-unlearning run CHAPTER --plan` reports: the values a run would use and what it would ask for."""

    chapter: object  # Chapter
    params: dict
    sources: dict  # parameter -> where its value came from
    requests: list  # study.Request: the stages the chapter's study cells ask for
    cached: bool  # an identical run of the chapter is in the cache (it would be reused)


def plan_chapter(name: str, profile: str | Path = "default", overrides: dict | None = None, *,
                 root: Path | None = None) -> ChapterPlan:
    """Check a run of one chapter as `build` would (profile, chapter, -p names and values, the values together) and
    run its `study` cells in plan mode: nothing is loaded, trained or executed. Raises BookError / ValueError naming
    what is wrong."""
    from .. import precompute

    root = Path(root).resolve() if root else project_root()
    ch = find_chapter(name, root)
    check_documented(ch)
    prof = load_profile(profile, root)
    checked = check_overrides(overrides or {}, [ch])
    params, sources = resolve_parameters(ch, prof, checked, with_sources=True)
    try:
        asked = precompute.requests(ch.path, params)
    except (ValueError, KeyError) as exc:
        raise BookError(f"chapter {ch.stem}: {validate.one_line(exc)}") from None
    cached = cache.lookup("chapter", chapter_inputs(ch, params)) is not None
    return ChapterPlan(ch, params, sources, asked, cached)


def _cpu_by_stage(results: list[dict]) -> str:
    """'core-seconds by stage: unlearned 1234, sweep 2345, ... (total N)' from precompute.run's results."""
    cpu: Counter = Counter()
    for r in results:
        for stage in r["stages"]:
            if len(stage) > 2:
                cpu[stage[0]] += stage[2]
    parts = ", ".join(f"{k} {v:.0f}" for k, v in cpu.most_common())
    return f"core-seconds by stage: {parts} (total {sum(cpu.values()):.0f})"


def _execute_chapters(report: BuildReport, plan, build_dir: Path, force: bool, verbose: bool, jobs: int,
                      threads: int | None) -> None:
    """Execute the chapters in `jobs` worker processes (papermill changes the working directory of the process it
    runs in, so not threads), in toc order, showing which run on the terminal and in `<build>/chapters.log`. The
    first failure (in toc order) is raised once the running chapters end; no other chapter starts after one."""
    def report_one(index: int, outcome: progress.Outcome, say) -> None:
        if outcome.error is None:
            run = outcome.result
            how = (f"unchanged, reused (executed in {run.seconds:.1f} s)" if run.reused
                   else f"executed in {run.seconds:.1f} s")
            say(f"{run.chapter.stem}: {how}")

    with jupyter_path(build_dir):
        work = [progress.Job(item[0].stem, _execute_one, (item, build_dir, force, verbose, threads))
                for item in plan]
        outcomes = progress.run_jobs(work, jobs, name="chapters", log=build_dir / "chapters.log", verbose=verbose,
                                     on_result=report_one, stop_on_error=True)
    failed = [o for o in outcomes if o.error is not None]
    if failed and isinstance(failed[0].error, BookError):
        raise failed[0].error  # it names the chapter and the cell; the worker's traceback would add nothing
    if failed:
        progress.raise_with_details(failed[0])
    report.runs = [o.result for o in outcomes]


def _execute_one(item, build_dir: Path, force: bool, verbose: bool, threads: int | None) -> ChapterRun:
    ch, params, sources = item
    run = execute_chapter(ch, params, build_dir, force=force, verbose=verbose, threads=threads)
    run.sources = sources
    return run
