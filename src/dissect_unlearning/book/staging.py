"""Staging the Jupyter Book source folder and rendering it to HTML.

`stage()` writes `<build>/book/`: the config, the toc (the chapters present only), the pages of `book/`, the Vega
JavaScript bundle, the executed notebooks (parameter cells hidden, provenance tables added) and the charts' static
images. `render_html()` runs `jupyter-book build` on it with execution off and warnings as errors; the HTML lands in
`<output>/_build/html/`.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from .. import cache
from .execute import ChapterRun
from .pages import parameters_table, provenance_table, reference_page
from .project import BookError


def _decorate(run: ChapterRun, profile: str) -> str:
    """The executed notebook as the page shows it: parameter cells hidden, provenance tables added."""
    import nbformat

    nb = nbformat.read(str(run.notebook), as_version=4)
    run_info = json.loads((run.folder / "run.json").read_text())
    run_info["profile"] = profile
    anchor = None
    for i, cell in enumerate(nb.cells):
        tags = cell.metadata.setdefault("tags", [])
        if "parameters" in tags or "injected-parameters" in tags:
            if "remove-cell" not in tags:
                tags.append("remove-cell")
            anchor = i
    if anchor is not None:
        table = nbformat.v4.new_markdown_cell(parameters_table(run.chapter, run.params, run.sources, profile))
        table.metadata["tags"] = ["dissect-provenance"]
        nb.cells.insert(anchor + 1, table)
        last = nbformat.v4.new_markdown_cell(provenance_table(run_info))
        last.metadata["tags"] = ["dissect-provenance"]
        nb.cells.append(last)
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"  # stable ids: an unchanged chapter gives an identical page
    return nbformat.writes(nb)


def _write_if_changed(path: Path, data: str | bytes) -> None:
    data = data.encode("utf-8") if isinstance(data, str) else data
    if path.is_file() and path.read_bytes() == data:
        return
    cache.atomic_write_bytes(path, data)


def _sync_tree(src: Path, dst: Path) -> None:
    """Make dst a copy of src, touching only files that differ (Sphinx and browsers see stable mtimes)."""
    dst.mkdir(parents=True, exist_ok=True)
    wanted = set()
    for p in src.rglob("*"):
        rel = p.relative_to(src)
        wanted.add(rel)
        if p.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
        else:
            _write_if_changed(dst / rel, p.read_bytes())
    for p in sorted(dst.rglob("*"), reverse=True):
        if p.relative_to(dst) not in wanted:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _bundle(stage: Path) -> None:
    """The Vega JavaScript, served once from _static/ (every page loads it; charts call window.vegaEmbed).

    Built once per vl-convert version and bundling code (in the package cache), then copied into the book."""
    import inspect

    from .. import plots

    import vl_convert

    inputs = {"vl_convert": vl_convert.__version__, "vega_lite": plots.VEGALITE_VERSION,
              "code": hashlib.sha256(inspect.getsource(plots.javascript_bundle).encode()).hexdigest()[:16]}
    folder = cache.get_or_build("vega-bundle", inputs,
                                lambda tmp: (tmp / plots.BUNDLE_NAME).write_text(plots.javascript_bundle()))
    _write_if_changed(stage / "_static" / plots.BUNDLE_NAME, (folder / plots.BUNDLE_NAME).read_bytes())


LAUNCH_URLS = ("binderhub_url", "colab_url", "jupyterhub_url", "thebe")


def staged_config(path: Path) -> str:
    """The book's _config.yml as the build renders it: with `repository.url` set, launch buttons (those of
    `launch_buttons`) and a repository button; without it, neither (the theme would otherwise make buttons that
    lead nowhere). The repository's notebooks/ folder holds the chapters at the same paths as the staged book, so a
    launch button opens the chapter's own notebook, parameters cell first."""
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    repository = config.get("repository") or {}
    url = str(repository.get("url") or "").strip()
    html = config.setdefault("html", {})
    launch = config.setdefault("launch_buttons", {})
    if url:
        if not re.match(r"^https?://[^\s/]+/\S+$", url):
            raise BookError(f"{path}: repository.url must be the address of the book's repository "
                            f"(https://HOST/OWNER/NAME), got {url!r}")
        config["repository"] = {**repository, "url": url.rstrip("/"), "path_to_book": ""}
        html["use_repository_button"] = True
    else:
        config.pop("repository", None)
        html["use_repository_button"] = False
        for key in LAUNCH_URLS:
            launch.pop(key, None)
    return yaml.safe_dump(config, sort_keys=False)


def stage(root: Path, build_dir: Path, runs: list[ChapterRun], profile: str, keep: list[str] | None = None) -> Path:
    """Write the Jupyter Book source folder: config, toc (chapters present only), pages, static files, notebooks.

    keep: the stems of the chapters the book may show (a profile's `only`); a page staged by an earlier build of
    another chapter is removed. None keeps every staged chapter (after `--only`, the others keep their last build)."""
    src = build_dir / "book"
    (src / "notebooks").mkdir(parents=True, exist_ok=True)
    if keep is not None:
        for old in (src / "notebooks").glob("*.ipynb"):
            if old.stem not in keep:
                old.unlink()
                shutil.rmtree(src / "_extra" / "notebooks" / "figures" / old.stem, ignore_errors=True)
    _write_if_changed(src / "_config.yml", staged_config(root / "_config.yml").encode())
    for p in (root / "book").rglob("*"):
        rel = p.relative_to(root / "book")
        if p.is_file() and rel.parts[0] not in ("_executed", "_static"):
            _write_if_changed(src / "book" / rel, p.read_bytes())
    static_src = root / "book" / "_static"
    (src / "_static").mkdir(exist_ok=True)
    if static_src.is_dir():
        for p in static_src.rglob("*"):
            if p.is_file():
                _write_if_changed(src / "_static" / p.relative_to(static_src), p.read_bytes())
    _bundle(src)
    _write_if_changed(src / "book" / "reference.md", reference_page(root))
    (src / "_extra").mkdir(exist_ok=True)
    for run in runs:
        _write_if_changed(src / "notebooks" / f"{run.chapter.stem}.ipynb", _decorate(run, profile))
        figures = run.folder / "figures" / run.chapter.stem
        target = src / "_extra" / "notebooks" / "figures" / run.chapter.stem
        if figures.is_dir():
            _sync_tree(figures, target)
        elif target.exists():
            shutil.rmtree(target)
    # The toc of the staged book lists only the pages that exist (after --only, chapters never built are left out).
    toc = yaml.safe_load((root / "_toc.yml").read_text(encoding="utf-8"))
    present = lambda f: any((src / f"{f}{ext}").is_file() for ext in ("", ".ipynb", ".md"))  # noqa: E731

    def prune(entries):
        kept = []
        for e in entries or []:
            for key in ("chapters", "sections"):
                if key in e:
                    e[key] = prune(e[key])
            if "file" in e and not present(e["file"]):
                continue
            kept.append(e)
        return kept

    if not present(toc["root"]):
        raise BookError(f"the toc's root page {toc['root']} is missing: build the whole book once "
                        f"(dissect-unlearning build)")
    for key in ("chapters", "sections"):
        if key in toc:
            toc[key] = prune(toc[key])
    for part in toc.get("parts", []) or []:
        part["chapters"] = prune(part.get("chapters"))
    _write_if_changed(src / "_toc.yml", yaml.safe_dump(toc, sort_keys=False))
    return src


def render_html(src: Path, output: Path, verbose: bool = True) -> Path:
    """jupyter-book build with warnings as errors; returns the html folder. A broken page fails the build."""
    cmd = [sys.executable, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())",
           "build", str(src), "--path-output", str(output), "--builder", "html", "--all", "-W", "--keep-going"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)
    if proc.returncode != 0:
        problems = [ln for ln in log.splitlines() if "WARNING" in ln or "ERROR" in ln or "Error" in ln]
        shown = "\n  ".join(problems[:30]) or log[-3000:]
        raise BookError(f"jupyter-book build failed (warnings are errors):\n  {shown}")
    if verbose:
        print("[book] jupyter-book: build succeeded", flush=True)
    return output / "_build" / "html"
