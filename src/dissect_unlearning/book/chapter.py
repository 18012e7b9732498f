"""The chapters: the notebooks of `notebooks/`, their order in `_toc.yml`, and the parameters each one declares.

A chapter is a parameterized notebook: one cell tagged `parameters`, each parameter on one line with a comment that
says what it means and which values it takes.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .params import PARAMETERS, check_value
from .project import BookError, project_root


@dataclass(frozen=True)
class Parameter:
    name: str
    default: Any
    help: str


@dataclass(frozen=True)
class Chapter:
    stem: str  # file name without .ipynb, e.g. "04_patching"
    path: Path
    in_toc: bool

    # A chapter inserted after chapter N without renumbering the others is "Nb_name" (02b_mechanics): its place is
    # "2b", and the number alone (2) names chapter N itself.
    @property
    def place(self) -> str | None:
        """'4' for 04_patching, '2b' for 02b_mechanics; None for a stem without a leading number."""
        m = re.match(r"(\d+)([a-z]?)_", self.stem)
        return f"{int(m.group(1))}{m.group(2)}" if m else None

    @property
    def number(self) -> int | None:
        return int(self.place) if self.place and self.place.isdigit() else None

    @property
    def slug(self) -> str:
        return re.sub(r"^\d+[a-z]?_", "", self.stem)

    def matches(self, name: str) -> bool:
        name = str(name).strip().removesuffix(".ipynb").replace("-", "_")
        name = name.split("/")[-1]
        place = re.fullmatch(r"(\d+)([a-z]?)", name)
        return name in (self.stem, self.slug) or (place is not None and self.place is not None
                                                   and self.place == f"{int(place.group(1))}{place.group(2)}")

    def parameters(self) -> dict[str, Parameter]:
        """The notebook's documented parameters (parsed from its `parameters` cell), in order."""
        return notebook_parameters(self.path)


def notebook_parameters(path: Path) -> dict[str, Parameter]:
    import nbformat
    import papermill

    # papermill drops a line it cannot parse (with a log message only): compare with the names Python sees.
    nb = nbformat.read(str(path), as_version=4)
    cell = next((c for c in nb.cells if "parameters" in c.metadata.get("tags", [])), None)
    assigned = []
    if cell is not None:
        for node in ast.parse(cell.source).body:
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            assigned += [t.id for t in targets if isinstance(t, ast.Name)]
    found = papermill.inspect_notebook(str(path))
    lost = [n for n in assigned if n not in found]
    if lost:
        raise BookError(f"{path.name}: papermill cannot read parameter(s) {', '.join(lost)} of the parameters cell; "
                        f"write each as `name = literal  # comment` on one line, without '=' in the comment")
    params = {}
    for name, p in found.items():
        try:
            default = ast.literal_eval(p["default"])
        except (ValueError, SyntaxError):
            raise BookError(f"{path.name}: parameter {name!r} has default {p['default']} - keep each parameter on "
                            f"one line with a literal value") from None
        params[name] = Parameter(name, default, (p.get("help") or "").strip())
    return params


def check_documented(ch: Chapter) -> None:
    """Every parameter of a chapter is in the schema, documented by a comment, and has an allowed default."""
    for p in ch.parameters().values():
        if p.name not in PARAMETERS:
            raise BookError(f"{ch.path.name}: parameter {p.name!r} is not in the book's schema (book.PARAMETERS); "
                            f"known: {', '.join(sorted(PARAMETERS))}")
        if not p.help:
            raise BookError(f"{ch.path.name}: parameter {p.name!r} has no comment; write `{p.name} = ...  # meaning: "
                            f"allowed values` on its line")
        check_value(p.name, p.default, f"{ch.path.name}, default of {p.name}")


def toc_files(root: Path) -> list[str]:
    """Every `file:` (and the root) of `_toc.yml`, in reading order."""
    toc = yaml.safe_load((root / "_toc.yml").read_text(encoding="utf-8"))
    out = [toc["root"]]

    def walk(entries):
        for e in entries or []:
            if "file" in e:
                out.append(e["file"])
            for key in ("chapters", "sections", "parts"):
                walk(e.get(key))

    for key in ("chapters", "parts", "sections"):
        walk(toc.get(key))
    return [str(f).removesuffix(".ipynb").removesuffix(".md") for f in out]


def chapters(root: Path | None = None) -> list[Chapter]:
    """Every notebook in notebooks/, in the order of the toc (notebooks not in the toc last)."""
    root = root or project_root()
    in_toc = toc_files(root)
    found = {p.stem: p for p in sorted((root / "notebooks").glob("*.ipynb"))}
    ordered = [f.split("/")[-1] for f in in_toc if f.startswith("notebooks/") and f.split("/")[-1] in found]
    ordered += [s for s in found if s not in ordered]
    return [Chapter(s, found[s], f"notebooks/{s}" in in_toc) for s in ordered]


def find_chapter(name: str, root: Path | None = None) -> Chapter:
    chs = chapters(root)
    for ch in chs:
        if ch.matches(name):
            return ch
    raise BookError(f"no chapter {name!r}; chapters: " + ", ".join(f"{ch.stem} ({ch.place}, {ch.slug})" for ch in chs))
