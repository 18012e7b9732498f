"""Build the book: execute the chapter notebooks with papermill, then render them with Jupyter Book 1.

A chapter is a parameterized notebook in `notebooks/` (one cell tagged `parameters`, each parameter on one line
with a comment that says what it means and which values it takes). A profile (`profiles/<name>.yml`) is a set of
parameter values shared by all chapters, plus optional per-chapter overrides:

    description: one line
    parameters: {model: smollm2-135m, concepts: 5, ...}
    chapters: {patching: {window: 3}}

`build()` executes each chapter of `_toc.yml` into the package cache, keyed by the notebook's cells, its parameter
values, the package's source and the library versions, so an unchanged chapter is not executed again; it then
stages a Jupyter Book source folder (`_build/book/`: the executed notebooks, the pages of `book/`, the Vega
JavaScript bundle, the charts' static images) and runs `jupyter-book build` on it with execution off and warnings
as errors; the HTML lands in `_build/html/`.

Layout of a build (`<output>/_build/`): book/ (staged source), html/ (the book), failed/ (the executed copy of a
chapter that raised), jupyter/ (the kernel spec of the current Python).
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from . import cache
from .unlearning.config import METHODS, UnlearnConfig

KERNEL_NAME = "dissect-unlearning"  # a kernel spec that runs the Python running the build (written per build)
BOOK_ENV = "DISSECT_UNLEARNING_BOOK"  # the project folder (with _toc.yml, notebooks/, profiles/), if not found
VERSIONED = ("dissect-unlearning", "torch", "transformers", "nnsight")  # shown in "last executed"


class BookError(ValueError):
    """The book cannot be built: a bad profile or parameter, a chapter that raised, or a broken page."""


# --------------------------------------------------------------------------------------------------------------------
# Parameter schema: every parameter a chapter may declare, with its allowed values
# --------------------------------------------------------------------------------------------------------------------
# Kept here (not per notebook) so that a profile shared by all chapters is checked once, and so that the same name
# means the same thing in every chapter.
RESTORATIONS = ("value", "key", "mlp", "layer")  # parameter restorations (patching.EXPERIMENTS)
PROMPT_FORMATS = ("auto", "paper", "chat")
DTYPES = ("float32", "bfloat16", "float16")
UNLEARNING_SETTINGS = tuple(f.name for f in dataclasses.fields(UnlearnConfig) if f.name != "method")


@dataclass(frozen=True)
class ParamSpec:
    allowed: str  # the allowed values, in words (shown in errors and in the book)
    check: Callable[[Any], Any]  # returns the (normalised) value or raises ValueError saying why


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(lo: int | None = None, hi: int | None = None, none_ok: bool = False):
    def check(v):
        if v is None and none_ok:
            return None
        if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValueError("not an integer in range")
        return v
    return check


def _choice(options, none_ok: bool = False):
    def check(v):
        if v is None and none_ok:
            return None
        if v not in options:
            raise ValueError("not one of the allowed values")
        return v
    return check


def _subset(options):
    def check(v):
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, (list, tuple)) or not v or any(x not in options for x in v):
            raise ValueError("not a non-empty list of allowed values")
        return list(dict.fromkeys(v))
    return check


def _nonempty_str(v):
    if not isinstance(v, str) or not v.strip():
        raise ValueError("not a non-empty string")
    return v


def _str_or_none(v):
    return None if v is None else _nonempty_str(v)


def _concept_selection(v):
    if v == "all" or (_is_int(v) and v >= 1):
        return v
    v = [v] if isinstance(v, str) else v
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, str) and x.strip() for x in v):
        return list(v)
    raise ValueError("not 'all', a positive integer or a list of concept names")


def _layers(v):
    if v is None:
        return None
    if isinstance(v, (list, tuple)) and v and all(_is_int(x) for x in v):
        return list(dict.fromkeys(v))
    raise ValueError("not null or a list of layer numbers")


def _steps(v):
    if isinstance(v, (list, tuple)) and v and all(_is_int(x) and 0 <= x <= 1000 for x in v):
        return sorted(set(v))
    raise ValueError("not a non-empty list of step counts")


def _relearn_data(v):
    v = [v] if isinstance(v, str) else v
    if isinstance(v, (list, tuple)) and all(x in ("unrelated", "partial") for x in v):
        return list(dict.fromkeys(v))
    raise ValueError("not a list of relearning data kinds")


def _positive_float(v):
    if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1:
        return float(v)
    raise ValueError("not a number in (0, 1)")


def _unlearning_settings(v):
    if v is None:
        return {}
    if isinstance(v, dict) and all(isinstance(k, str) and k in UNLEARNING_SETTINGS for k in v):
        return dict(v)
    raise ValueError("not a mapping of unlearning setting names to values")


def _bool(v):
    if not isinstance(v, bool):
        raise ValueError("not true or false")
    return v


def _remote(v):
    if isinstance(v, bool) or v == "local":
        return v
    raise ValueError("not true, false or 'local'")


def _device(v):
    if v is None or (isinstance(v, str) and re.fullmatch(r"cpu|mps|auto|cuda(:\d+)?", v)):
        return v
    raise ValueError("not a device name")


PARAMETERS: dict[str, ParamSpec] = {
    "model": ParamSpec("a registry name (smollm2-135m, gemma3-270m), a checkpoint folder, or a Hugging Face id "
                       "'owner/name'", _nonempty_str),
    "concept_set": ParamSpec("'builtin', a JSON file of ConceptVectors records, or 'hub:owner/dataset'",
                             _nonempty_str),
    "concepts": ParamSpec("'all', N (the first N concepts of the set), or a list of concept names",
                          _concept_selection),
    "n_questions": ParamSpec("null (all of a concept's questions) or an integer >= 1", _int(1, none_ok=True)),
    "n_unrelated": ParamSpec("null (all unrelated questions) or an integer >= 0", _int(0, none_ok=True)),
    "prompt_format": ParamSpec(" | ".join(PROMPT_FORMATS), _choice(PROMPT_FORMATS)),
    "max_new_tokens": ParamSpec("an integer from 1 to 512", _int(1, 512)),
    "batch_size": ParamSpec("an integer >= 1", _int(1)),
    "methods": ParamSpec("a non-empty list of " + ", ".join(METHODS), _subset(METHODS)),
    "unlearning": ParamSpec("a mapping of unlearning settings (unlearning.UnlearnConfig; unset ones take the "
                            "method's defaults), any of: " + ", ".join(UNLEARNING_SETTINGS), _unlearning_settings),
    "restorations": ParamSpec("a non-empty list of " + ", ".join(RESTORATIONS), _subset(RESTORATIONS)),
    "window": ParamSpec("an integer from 1 to 99 (layers per patched window)", _int(1, 99)),
    "layers": ParamSpec("null (slide the window over every layer) or a list of layer numbers patched together as "
                        "one window (negative numbers count from the end: [-1] = the last layer)", _layers),
    "alignment": ParamSpec("'answer' (positions predicting the answer) or 'paper' (the released code's count)",
                           _choice(("answer", "paper"))),
    "remote": ParamSpec("true (run the traces on NDIF; needs NDIF_API_KEY), false, or 'local' (nnsight's offline "
                        "simulation of an NDIF request)", _remote),
    "device": ParamSpec("null (the model's default), cpu, cuda, cuda:N, mps or auto", _device),
    "dtype": ParamSpec("null (the model's default) or one of " + ", ".join(DTYPES), _choice(DTYPES, none_ok=True)),
    "seed": ParamSpec("an integer >= 0", _int(0)),
    "second_concepts": ParamSpec("null (the same concepts as the first model), 'all', N (the first N concepts of "
                                 "the set) or a list of concept names", lambda v: None if v is None
                                 else _concept_selection(v)),
    "second_methods": ParamSpec("null (the same methods as the first model) or a non-empty list of "
                                + ", ".join(METHODS), lambda v: None if v is None else _subset(METHODS)(v)),
    "beyond_concepts": ParamSpec("null (the same concepts as `concepts`), 'all', N (the first N concepts of the "
                                 "set) or a list of concept names", lambda v: None if v is None
                                 else _concept_selection(v)),
    "relearn_steps": ParamSpec("a non-empty list of step counts from 0 to 1000 (0 = the unlearned model itself)",
                               _steps),
    "relearn_data": ParamSpec("a list (empty = skip relearning) of 'unrelated' (text of a concept neither forgotten "
                              "nor retained) and 'partial' (half of the target questions; the other half is scored)",
                              _relearn_data),
    "relearn_lr": ParamSpec("a number in (0, 1): the relearning fine-tune's learning rate", _positive_float),
    "second_model": ParamSpec("null (skip) or a model (as for `model`) of another family, dissected the same way",
                              _str_or_none),
}


def check_value(name: str, value, where: str) -> Any:
    """The normalised value of parameter `name`, or BookError naming `where` and the allowed values."""
    spec = PARAMETERS.get(name)
    if spec is None:
        raise BookError(f"{where}: unknown parameter {name!r}; valid names: {', '.join(sorted(PARAMETERS))}")
    try:
        return spec.check(value)
    except ValueError:
        raise BookError(f"{where}: bad value {value!r} for parameter {name!r}; allowed: {spec.allowed}") from None


def parse_assignment(text: str) -> tuple[str, Any]:
    """'key=value' from the command line; the value is read as YAML (3, true, null, [a, b], text)."""
    if "=" not in text:
        raise BookError(f"-p {text!r}: expected key=value, e.g. -p model=gemma3-270m or -p methods=[grad_diff,dpo]")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


# --------------------------------------------------------------------------------------------------------------------
# Project, chapters, profiles
# --------------------------------------------------------------------------------------------------------------------
def project_root(start: str | Path | None = None) -> Path:
    """The folder with `_toc.yml` and `notebooks/`: $DISSECT_UNLEARNING_BOOK, the current folder or one above it,
    or the source checkout the package is installed from."""
    if os.environ.get(BOOK_ENV):
        root = Path(os.environ[BOOK_ENV]).expanduser().resolve()
        if not (root / "_toc.yml").is_file():
            raise BookError(f"${BOOK_ENV}={root} has no _toc.yml")
        return root
    here = Path(start or Path.cwd()).resolve()
    for p in (here, *here.parents):
        if (p / "_toc.yml").is_file() and (p / "notebooks").is_dir():
            return p
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "_toc.yml").is_file() and (checkout / "notebooks").is_dir():
        return checkout
    raise BookError("no book found: run this in the project folder (the one with _toc.yml and notebooks/), "
                    f"or set ${BOOK_ENV}")


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

    @property
    def number(self) -> int | None:
        m = re.match(r"(\d+)_", self.stem)
        return int(m.group(1)) if m else None

    @property
    def slug(self) -> str:
        return re.sub(r"^\d+_", "", self.stem)

    @property
    def toc_file(self) -> str:
        return f"notebooks/{self.stem}"

    def matches(self, name: str) -> bool:
        name = str(name).strip().removesuffix(".ipynb").replace("-", "_")
        name = name.split("/")[-1]
        return name in (self.stem, self.slug) or (name.isdigit() and self.number == int(name))

    def parameters(self) -> dict[str, Parameter]:
        """The notebook's documented parameters (parsed from its `parameters` cell), in order."""
        return _notebook_parameters(self.path)


def _notebook_parameters(path: Path) -> dict[str, Parameter]:
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
    raise BookError(f"no chapter {name!r}; chapters: " + ", ".join(f"{ch.stem} ({ch.number}, {ch.slug})" for ch in chs))


@dataclass
class Profile:
    name: str
    description: str
    parameters: dict
    chapters: dict  # chapter stem -> {name: value}
    path: Path | None = None


def profile_names(root: Path | None = None) -> list[str]:
    root = root or project_root()
    return sorted(p.stem for p in (root / "profiles").glob("*.yml"))


def load_profile(name: str | Path, root: Path | None = None) -> Profile:
    """A profile by name (profiles/<name>.yml) or path, checked against the schema and the chapters."""
    root = root or project_root()
    path = Path(name)
    if not (path.suffix in (".yml", ".yaml") and path.is_file()):
        path = root / "profiles" / f"{name}.yml"
    if not path.is_file():
        raise BookError(f"no profile {str(name)!r}; profiles: {', '.join(profile_names(root))} "
                        f"(or a path to a .yml file)")
    where = f"profile {path.name}"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise BookError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise BookError(f"{where}: expected a mapping with keys description, parameters, chapters")
    extra = set(data) - {"description", "parameters", "chapters"}
    if extra:
        raise BookError(f"{where}: unknown key(s) {', '.join(sorted(extra))}; valid keys: description, parameters, "
                        f"chapters")
    params = {k: check_value(k, v, f"{where}, parameters") for k, v in (data.get("parameters") or {}).items()}
    per_chapter = {}
    for ch_name, over in (data.get("chapters") or {}).items():
        ch = find_chapter(str(ch_name), root)
        declared = ch.parameters()
        if not isinstance(over, dict):
            raise BookError(f"{where}, chapters.{ch_name}: expected a mapping of parameter values")
        for k in over:
            if k not in declared:
                raise BookError(f"{where}, chapters.{ch_name}: chapter {ch.stem} has no parameter {k!r}; valid "
                                f"names: {', '.join(declared)}")
        per_chapter[ch.stem] = {k: check_value(k, v, f"{where}, chapters.{ch_name}") for k, v in over.items()}
    return Profile(path.stem, str(data.get("description") or ""), params, per_chapter, path)


PATH_PARAMETERS = ("model", "concept_set", "second_model")  # may name a local file or folder


def resolve_parameters(chapter: Chapter, profile: Profile, overrides: dict | None = None,
                       with_sources: bool = False):
    """Every parameter of `chapter`: override, else the profile's per-chapter value, else the profile's shared value,
    else the notebook's default. A parameter the notebook does not declare is not passed to it.

    A relative path that exists (a concept file, a checkpoint folder) is made absolute: the kernel runs elsewhere.
    With `with_sources`, also returns {name: where the value came from}.
    """
    declared = chapter.parameters()
    out, sources = {}, {}
    for name, p in declared.items():
        if overrides and name in overrides:
            value, where = overrides[name], "-p"
        elif name in profile.chapters.get(chapter.stem, {}):
            value, where = profile.chapters[chapter.stem][name], f"profile {profile.name} (chapter)"
        elif name in profile.parameters:
            value, where = profile.parameters[name], f"profile {profile.name}"
        else:
            value, where = p.default, "notebook default"
        value = check_value(name, value, f"chapter {chapter.stem}, {where}")
        if name in PATH_PARAMETERS and isinstance(value, str) and not value.startswith("hub:") \
                and not Path(value).is_absolute() and Path(value).expanduser().exists():
            value = str(Path(value).expanduser().resolve())
        out[name], sources[name] = value, where
    return (out, sources) if with_sources else out


def check_overrides(overrides: dict, chs: list[Chapter]) -> dict:
    """-p names must be parameters of at least one of the chapters being run; values must be allowed."""
    valid = list(dict.fromkeys(n for ch in chs for n in ch.parameters()))
    what = chs[0].stem if len(chs) == 1 else "the chapters being built"
    for k, v in overrides.items():
        if k not in valid:
            raise BookError(f"-p {k}: {what} has no parameter {k!r}; valid names: {', '.join(valid)}")
    return {k: check_value(k, v, f"-p {k}") for k, v in overrides.items()}


# --------------------------------------------------------------------------------------------------------------------
# Notebooks and their helpers (called from inside the chapters)
# --------------------------------------------------------------------------------------------------------------------
def concept_set(source: str = "builtin", n_questions: int | None = None, n_unrelated: int | None = None):
    """The concept set with each concept cut to its first `n_questions` questions (with their answers, and as many
    text completions) and its first `n_unrelated` unrelated questions; None keeps all.

    The cut records hash differently, so cached artefacts of the full set are never confused with those of a cut one
    (and every chapter must cut the same way to share them: they all take n_questions and n_unrelated)."""
    from . import concepts as concepts_mod

    full = concepts_mod.load(source)
    if n_questions is None and n_unrelated is None:
        return full
    records = []
    for c in full:
        rec = dict(c.to_record())
        if n_questions is not None:
            rec["QA"] = rec["QA"][:n_questions]
            for key in ("QA_answers", "QA_with_answers", "answers_tokens_num", "text_completion"):
                if isinstance(rec.get(key), list):
                    rec[key] = rec[key][:n_questions]
        if n_unrelated is not None:
            rec["unrelated_QA"] = rec["unrelated_QA"][:n_unrelated]
        records.append(rec)
    return concepts_mod.parse(records, f"{full.source} (first {n_questions} questions, {n_unrelated} unrelated)")


def glue(name: str, value, display: bool = False) -> None:
    """myst-nb glue: the value can be pasted in the text with {glue:text}`name` (or {glue:text}`name:.2f`)."""
    from myst_nb import glue as _glue

    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()  # numpy scalar: its repr (np.float64(...)) would not format as a number in the page
    _glue(name, value, display=display)


def glue_verdict(name: str, verdict) -> None:
    """Glue a verdict for the page: `name` (the sentence), `name_answer` (yes / no / undecided), `name_claim`, and
    each evidence number as `name_<key>`."""
    glue(name, verdict.sentence)
    glue(f"{name}_answer", verdict.answer)
    glue(f"{name}_claim", verdict.claim)
    for k, v in verdict.evidence.items():
        glue(f"{name}_{k}", v)


# --------------------------------------------------------------------------------------------------------------------
# Provenance tables (added to every executed chapter by the build)
# --------------------------------------------------------------------------------------------------------------------
def versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["python"] = platform.python_version()
    return out


def _md_cell_text(value) -> str:
    text = value if isinstance(value, str) else repr(value)  # as the notebook's Python reads it
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def parameters_table(chapter: Chapter, params: dict, sources: dict, profile: str) -> str:
    """Markdown: the parameters this chapter ran with (value, where it came from, meaning) in a dropdown."""
    declared = chapter.parameters()
    rows = []
    for name, value in params.items():
        rows.append([f"`{name}`", _md_cell_text(value), sources.get(name, ""),
                     declared[name].help.replace("|", "\\|")])
    model = params.get("model")
    title = f"Parameters of this run: profile `{profile}`" + (f", model `{model}`" if model else "")
    rerun = f"dissect-unlearning run {chapter.slug} --profile {profile} -p NAME=VALUE"
    return (f":::{{admonition}} {title}\n:class: dropdown\n\n"
            + _md_table(["parameter", "value", "from", "meaning and allowed values"], rows)
            + f"\n\nRe-run this chapter with other values: `{rerun}`.\n:::")


def provenance_table(run: dict) -> str:
    """Markdown: when and with what this chapter was last executed."""
    rows = [["date (UTC)", run["date"]], ["model", _md_cell_text(run.get("model") or "-")],
            ["profile", _md_cell_text(run["profile"])]]
    rows += [[k, _md_cell_text(v)] for k, v in run["versions"].items()]
    rows += [["platform", _md_cell_text(run["platform"])], ["wall time", f"{run['seconds']:.1f} s"]]
    return "## Last executed\n\n" + _md_table(["what", "value"], rows)


# --------------------------------------------------------------------------------------------------------------------
# Executing one chapter (cached by its inputs)
# --------------------------------------------------------------------------------------------------------------------
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


_PACKAGE_HASH: str | None = None


def package_hash() -> str:
    """sha256 over the package's files: an executed chapter is stale when the code that made it changed."""
    global _PACKAGE_HASH
    if _PACKAGE_HASH is None:
        pkg = Path(__file__).resolve().parent
        h = hashlib.sha256()
        for p in sorted(pkg.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".json", ".md", ".yml"):
                h.update(p.relative_to(pkg).as_posix().encode())
                h.update(p.read_bytes())
        _PACKAGE_HASH = h.hexdigest()[:16]
    return _PACKAGE_HASH


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
                from .models import checkpoint_fingerprint

                out[k] = checkpoint_fingerprint(p)[:16]
    return out


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
def _jupyter_path(build_dir: Path):
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


def _chapter_inputs(chapter: Chapter, params: dict) -> dict:
    return {"notebook": _notebook_hash(chapter.path), "stem": chapter.stem, "parameters": params,
            "files": _file_inputs(params), "package": package_hash(), "versions": versions()}


def execute_chapter(chapter: Chapter, params: dict, build_dir: Path, *, force: bool = False,
                    verbose: bool = True, threads: int | None = None) -> ChapterRun:
    """Execute `chapter` with `params` into the cache (or reuse the entry of an earlier identical run).

    `threads`: torch threads of the chapter's kernel (None: torch's default, every core)."""
    inputs = _chapter_inputs(chapter, params)
    reused = not force and cache.lookup("chapter", inputs) is not None
    kernel = _kernel_spec(build_dir, chapter.stem, threads)

    def run(tmp: Path) -> None:
        import papermill
        from papermill.exceptions import PapermillExecutionError

        if verbose:
            print(f"[book] {chapter.stem}: executing ...", flush=True)
        out_nb = tmp / f"{chapter.stem}.ipynb"
        t0 = time.time()
        try:
            with _jupyter_path(build_dir):
                papermill.execute_notebook(
                    str(chapter.path), str(out_nb), parameters=params, kernel_name=kernel, cwd=str(tmp),
                    progress_bar=False, stderr_file=sys.stderr if verbose else None,
                    request_save_on_cell_execute=False,
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


# --------------------------------------------------------------------------------------------------------------------
# Staging the Jupyter Book source and rendering it
# --------------------------------------------------------------------------------------------------------------------
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

    from . import plots

    import vl_convert

    inputs = {"vl_convert": vl_convert.__version__, "vega_lite": plots.VEGALITE_VERSION,
              "code": hashlib.sha256(inspect.getsource(plots.javascript_bundle).encode()).hexdigest()[:16]}
    folder = cache.get_or_build("vega-bundle", inputs,
                                lambda tmp: (tmp / plots.BUNDLE_NAME).write_text(plots.javascript_bundle()))
    _write_if_changed(stage / "_static" / plots.BUNDLE_NAME, (folder / plots.BUNDLE_NAME).read_bytes())


def stage(root: Path, build_dir: Path, runs: list[ChapterRun], profile: str) -> Path:
    """Write the Jupyter Book source folder: config, toc (chapters present only), pages, static files, notebooks."""
    src = build_dir / "book"
    (src / "notebooks").mkdir(parents=True, exist_ok=True)
    _write_if_changed(src / "_config.yml", (root / "_config.yml").read_bytes())
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


# --------------------------------------------------------------------------------------------------------------------
# The whole book
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class BuildReport:
    profile: str
    runs: list[ChapterRun] = field(default_factory=list)
    html: Path | None = None
    seconds: float = 0.0
    precomputed: list[dict] = field(default_factory=list)  # precompute.run's results
    built_by_chapters: list[tuple[str, str]] = field(default_factory=list)  # (kind, key) the chapters built

    @property
    def executed(self) -> list[str]:
        return [r.chapter.stem for r in self.runs if not r.reused]

    @property
    def reused(self) -> list[str]:
        return [r.chapter.stem for r in self.runs if r.reused]


def build(profile: str | Path = "default", only=None, overrides: dict | None = None, *, root: Path | None = None,
          output: Path | None = None, force: bool = False, html: bool = True, verbose: bool = True,
          jobs: int = 1, precompute: bool = True) -> BuildReport:
    """Execute the chapters of the toc (or only those named) with `profile` (+ -p overrides) and render the book.

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
    else:
        selected = [ch for ch in all_chapters if ch.in_toc]
    if not selected:
        raise BookError("no chapter to build: _toc.yml lists no notebook of notebooks/")
    for ch in selected:
        _check_documented(ch)
    overrides = check_overrides(overrides or {}, selected)
    plan = [(ch, *resolve_parameters(ch, prof, {k: v for k, v in overrides.items() if k in ch.parameters()},
                                     with_sources=True)) for ch in selected]
    if not (_is_int(jobs) and jobs >= 1):
        raise BookError(f"jobs must be an integer >= 1, got {jobs!r}")
    requested_jobs, jobs = jobs, min(jobs, len(plan))
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    report = BuildReport(prof.name)
    if verbose:
        print(f"[book] profile {prof.name}: {len(plan)} chapter(s)"
              + (f", {jobs} at a time ({threads} torch thread(s) each)" if jobs > 1 else ""), flush=True)

    from . import precompute as precompute_mod

    if precompute:
        todo = [item for item in plan if force or cache.lookup("chapter", _chapter_inputs(item[0], item[1])) is None]
        report.precomputed = precompute_mod.run(todo, requested_jobs, verbose)
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
        from collections import Counter

        counts = ", ".join(f"{n} {k}" for k, n in Counter(heavy).items())
        print(f"[book] note: the chapters computed artefacts the precompute stage did not ({counts}); "
              f"precompute.tasks() is missing a stage some chapter uses", flush=True)
    if html:
        src = stage(root, build_dir, report.runs, prof.name)
        missing = [ch.stem for ch in all_chapters
                   if ch.in_toc and not (src / "notebooks" / f"{ch.stem}.ipynb").is_file()]
        if missing and verbose:
            print(f"[book] not in this HTML (never built; run `dissect-unlearning build`): {', '.join(missing)}")
        report.html = render_html(src, output, verbose)
        if verbose:
            print(f"[book] open {report.html / 'index.html'}", flush=True)
    report.seconds = time.time() - t0
    return report


def _execute_chapters(report: BuildReport, plan, build_dir: Path, force: bool, verbose: bool, jobs: int,
                      threads: int | None) -> None:
    with _jupyter_path(build_dir):
        if jobs == 1:
            report.runs = [_execute_one(item, build_dir, force, verbose, threads) for item in plan]
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # Processes, not threads: papermill changes the process's working directory while it executes. The
            # first failure (in toc order) is raised once the running chapters end; the others are cancelled.
            with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(_execute_one, item, build_dir, force, verbose, threads) for item in plan]
                errors = []
                for f in futures:
                    try:
                        report.runs.append(f.result())
                    except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others stop
                        errors.append(exc)
                        for g in futures:
                            g.cancel()
                        break
            if errors:
                raise errors[0]


def _execute_one(item, build_dir: Path, force: bool, verbose: bool, threads: int | None) -> ChapterRun:
    ch, params, sources = item
    run = execute_chapter(ch, params, build_dir, force=force, verbose=verbose, threads=threads)
    run.sources = sources
    if verbose:
        how = (f"unchanged, reused (executed in {run.seconds:.1f} s)" if run.reused
               else f"executed in {run.seconds:.1f} s")
        print(f"[book] {ch.stem}: {how}", flush=True)
    return run


def _check_documented(ch: Chapter) -> None:
    """Every parameter of a chapter is in the schema, documented by a comment, and has an allowed default."""
    params = ch.parameters()
    for p in params.values():
        if p.name not in PARAMETERS:
            raise BookError(f"{ch.path.name}: parameter {p.name!r} is not in the book's schema (book.PARAMETERS); "
                            f"known: {', '.join(sorted(PARAMETERS))}")
        if not p.help:
            raise BookError(f"{ch.path.name}: parameter {p.name!r} has no comment; write `{p.name} = ...  # meaning: "
                            f"allowed values` on its line")
        check_value(p.name, p.default, f"{ch.path.name}, default of {p.name}")


def describe_parameters(chapter: Chapter) -> str:
    """Text listing a chapter's parameters: name, default, meaning, allowed values."""
    lines = [f"parameters of chapter {chapter.stem}:"]
    for p in chapter.parameters().values():
        spec = PARAMETERS.get(p.name)
        lines.append(f"  {p.name} = {json.dumps(p.default)}\n      {p.help}"
                     + (f"\n      allowed: {spec.allowed}" if spec else ""))
    return "\n".join(lines)


def profiles_table(root: Path | None = None) -> str:
    """Markdown: every profile with its description (for the introduction)."""
    root = root or project_root()
    rows = []
    for name in profile_names(root):
        prof = load_profile(name, root)
        rows.append([f"`{name}`", prof.description.replace("|", "\\|"),
                     _md_cell_text(prof.parameters.get("model", "-"))])
    return _md_table(["profile", "what it is for", "model"], rows)


def reference_page(root: Path) -> str:
    """The book's last page: every profile and parameter, and each chapter's parameters (written at staging)."""
    parts = ["# Parameters and profiles\n",
             "Every chapter is a notebook with a `parameters` cell. A profile sets values for all chapters at once; "
             "`-p NAME=VALUE` sets one for a run (`dissect-unlearning run CHAPTER --profile P -p NAME=VALUE`).\n",
             "## Profiles\n", profiles_table(root), "\n## Parameters\n", parameters_reference(), "\n## Chapters\n"]
    for ch in chapters(root):
        if not ch.in_toc:
            continue
        rows = [[f"`{p.name}`", _md_cell_text(p.default), p.help.replace("|", "\\|")]
                for p in ch.parameters().values()]
        parts.append(f"### `{ch.stem}`\n\nRe-run: `dissect-unlearning run {ch.slug} --profile default`\n")
        parts.append(_md_table(["parameter", "default", "meaning"], rows) if rows else "No parameters.")
        parts.append("")
    return "\n".join(parts) + "\n"


def parameters_reference() -> str:
    """Markdown: the parameter schema (name and allowed values) shared by all chapters."""
    return _md_table(["parameter", "allowed values"],
                     [[f"`{k}`", v.allowed.replace("|", "\\|")] for k, v in PARAMETERS.items()])
