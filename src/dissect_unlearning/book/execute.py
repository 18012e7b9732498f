"""Executing one chapter with papermill into the package cache, keyed by everything its output depends on.

The key holds the notebook's cells, its parameter values, the files those name, the package's source and the
library versions, so an unchanged chapter is not executed again. A chapter that raises leaves its executed copy in
`<build>/failed/` and fails the build with the chapter and cell named. `<build>/jupyter/` holds the kernel specs:
they run the Python running the build.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import cache, progress
from .chapter import Chapter
from .project import BookError

KERNEL_NAME = "dissect-unlearning"  # a kernel spec that runs the Python running the build (written per build)
VERSIONED = ("dissect-unlearning", "torch", "transformers", "nnsight")  # shown in "last executed"


@dataclass
class ChapterRun:
    chapter: Chapter
    params: dict
    folder: Path  # cache entry: <stem>.ipynb, figures/<stem>/*.svg, run.json
    reused: bool
    seconds: float  # wall time of the execution (the original one when reused)
    sources: dict = field(default_factory=dict)  # parameter -> where its value came from (profile, -p, default)

    @property
    def notebook(self) -> Path:
        return self.folder / f"{self.chapter.stem}.ipynb"


def versions() -> dict:
    """The versions shown in a chapter's "last executed" table."""
    from ..versions import versions as installed

    return {dist: v or "not installed" for dist, v in installed().items()}


def _notebook_hash(path: Path) -> str:
    """The cells that matter (type, source, tags), not outputs or ids."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    cells = [(c.cell_type, c.source, sorted(c.get("metadata", {}).get("tags", []))) for c in nb.cells]
    return hashlib.sha256(json.dumps(cells).encode()).hexdigest()[:16]


def _file_inputs(params: dict) -> dict:
    """Files and folders named by parameter values (a concept file, a checkpoint): their content is an input."""
    out = {}
    for k, v in params.items():
        if isinstance(v, str) and v and not v.startswith("hub:") and Path(v).expanduser().exists():
            p = Path(v).expanduser()
            if p.is_file():
                out[k] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            elif (p / "config.json").is_file():
                from ..models import checkpoint_fingerprint

                out[k] = checkpoint_fingerprint(p)[:16]
    return out


def chapter_inputs(chapter: Chapter, params: dict) -> dict:
    """The cache key of an executed chapter."""
    return {"notebook": _notebook_hash(chapter.path), "stem": chapter.stem, "parameters": params,
            "files": _file_inputs(params), "versions": versions()}


def _kernel_spec(build_dir: Path, stem: str, threads: int | None = None) -> str:
    """A kernel spec for chapter `stem` that runs this very Python, in the build folder (nothing is installed
    elsewhere); returns its name. Its environment tells plots.show() where to save the chapter's static images
    (per kernel, so chapters can run side by side) and, when chapters share the cores, how many threads torch uses
    (two processes each using every core run several times slower than one at a time)."""
    name = f"{KERNEL_NAME}-{re.sub(r'[^a-z0-9_.-]', '-', stem.lower())}"
    env = {"DISSECT_UNLEARNING_FIGURES": f"figures/{stem}"}
    if threads:
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    spec = build_dir / "jupyter" / "kernels" / name / "kernel.json"
    content = json.dumps({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                          "display_name": f"Python (dissect-unlearning, {stem})", "language": "python",
                          "env": env}, indent=1)
    if not spec.is_file() or spec.read_text() != content:
        cache.atomic_write_text(spec, content)
    return name


@contextlib.contextmanager
def jupyter_path(build_dir: Path):
    """Make the build's kernel specs findable (JUPYTER_PATH) for the duration of a build. A no-op when they already
    are, so chapters executing side by side (build(jobs=2) sets it once around them) never race on the variable."""
    folder = str(build_dir / "jupyter")
    before = os.environ.get("JUPYTER_PATH")
    if before and folder in before.split(os.pathsep):
        yield
        return
    os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (folder, before) if p)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = before


def execute_chapter(chapter: Chapter, params: dict, build_dir: Path, *, force: bool = False,
                    verbose: bool = True, threads: int | None = None) -> ChapterRun:
    """Execute `chapter` with `params` into the cache (or reuse the entry of an earlier identical run).

    `threads`: torch threads of the chapter's kernel (None: torch's default, every core)."""
    inputs = chapter_inputs(chapter, params)
    reused = not force and cache.lookup("chapter", inputs) is not None
    kernel = _kernel_spec(build_dir, chapter.stem, threads)

    def run(tmp: Path) -> None:
        import papermill
        from papermill.exceptions import PapermillExecutionError

        progress.stage("executing")
        if verbose and not progress.in_worker():  # a worker's line would garble the build's status line
            print(f"[book] {chapter.stem}: executing ...", flush=True)
        out_nb = tmp / f"{chapter.stem}.ipynb"
        n_cells = len(json.loads(chapter.path.read_text())["cells"]) + 1  # + papermill's injected parameters

        def on_cell_start(cell, cell_index, **_):
            progress.detail(f"cell {cell_index + 1}/{n_cells}")

        t0 = time.time()
        try:
            with jupyter_path(build_dir), _kernels_stopped():
                papermill.execute_notebook(
                    str(chapter.path), str(out_nb), parameters=params, kernel_name=kernel, cwd=str(tmp),
                    progress_bar=False, stderr_file=sys.stderr if verbose else None,
                    request_save_on_cell_execute=False, on_cell_start=on_cell_start,
                )
        except PapermillExecutionError as exc:
            failed = build_dir / "failed" / f"{chapter.stem}.ipynb"
            if out_nb.is_file():
                failed.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(out_nb, failed)
            raise BookError(_failure_message(chapter, exc, out_nb, failed)) from None
        seconds = time.time() - t0
        run_info = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"), "seconds": seconds,
                    "model": params.get("model"), "versions": versions(),
                    "platform": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"}
        (tmp / "run.json").write_text(json.dumps(run_info, indent=1))

    folder = cache.get_or_build("chapter", inputs, run, force=force)
    info = json.loads((folder / "run.json").read_text())
    return ChapterRun(chapter, params, folder, reused, info["seconds"])


@contextlib.contextmanager
def _kernels_stopped():
    """End the kernels started inside the block when it is interrupted: papermill leaves a kernel running when
    Ctrl-C or SIGTERM (progress.Stopped) lands in its event loop, which then never reaches its shutdown."""
    before = set(progress.descendants(os.getpid()))
    try:
        yield
    except KeyboardInterrupt:
        # The stop is ours: what nbclient and asyncio report about the kernel dying below (a DeadKernelError from
        # a poll that was still pending) is noise, printed as a traceback at the end of the process
        for name in ("nbclient", "papermill", "asyncio", "traitlets", "jupyter_client"):
            logging.getLogger(name).disabled = True
        for pid in set(progress.descendants(os.getpid())) - before:
            with contextlib.suppress(OSError):  # gone meanwhile
                if b"ipykernel" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
        raise


def _failure_message(chapter: Chapter, exc, out_nb: Path, failed: Path) -> str:
    """Name the chapter and the cell (index in the source notebook, which has no injected-parameters cell)."""
    import nbformat

    index = exc.cell_index
    try:
        # The failing cell's own source names it in the source notebook (papermill's index counts the cells it
        # inserts: the injected parameters and its error banners).
        source = nbformat.read(str(chapter.path), as_version=4)
        same = [i for i, c in enumerate(source.cells) if c.cell_type == "code" and c.source == exc.source]
        if len(same) == 1:
            index = same[0]
        else:
            nb = nbformat.read(str(out_nb), as_version=4)
            injected = [i for i, c in enumerate(nb.cells) if "injected-parameters" in c.metadata.get("tags", [])]
            if injected and injected[0] < index:
                index -= 1
    except (OSError, ValueError):
        pass
    first_line = next((ln for ln in (exc.source or "").splitlines() if ln.strip()), "")
    return (f"chapter {chapter.stem} failed in cell {index} of {chapter.path.name} (execution count "
            f"{exc.exec_count}): {exc.ename}: {exc.evalue}\n  cell starts: {first_line}\n"
            f"  the executed notebook, with the traceback, is at {failed}")
