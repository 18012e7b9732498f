"""What the pages show besides a chapter's own cells: glued values and verdicts (called from inside the chapters),
the parameters and provenance tables the build adds to every executed chapter, and the reference page."""
from __future__ import annotations

import json
from pathlib import Path

from ..claims import CLAIMS
from .chapter import Chapter, chapters
from .params import PARAMETERS
from .profiles import load_profile, profile_names
from .project import project_root


# --------------------------------------------------------------------------------------------------------------------
# Called from inside the chapters
# --------------------------------------------------------------------------------------------------------------------
def glue(name: str, value, display: bool = False) -> None:
    """myst-nb glue: the value can be pasted in the text with {glue:text}`name` (or {glue:text}`name:.2f`)."""
    from myst_nb import glue as _glue

    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()  # numpy scalar: its repr (np.float64(...)) would not format as a number in the page
    _glue(name, value, display=display)


def glue_verdict(name: str, verdict) -> None:
    """Glue a verdict for the page under `name` and its suffixes:

    - `name`: the sentence (estimate with its interval, threshold, provenance in a few words);
    - `name_status` and `name_answer` (the same): holds / does not hold / inconclusive, or met / not met for a
      precondition;
    - `name_interval`: the estimate and its 95% interval, e.g. "0.71 [0.64, 0.78]";
    - `name_source`: where the claim comes from, e.g. "paper, headline results ...: KRS above 0.9" or
      "this book: ...";
    - `name_claim`: the claim in words; `name_question`: the question it answers;
    - each evidence number as `name_<key>`.

    `verdict` may also be a string: the reason there is no verdict on this run (a stage the parameters skipped).
    The sentence is then that reason, the status "not run", the interval "no estimate", and the claim's words and
    provenance come from the register when `name` is there, so that every reference of the page still resolves.
    """
    if isinstance(verdict, str):
        claim = CLAIMS.get(name)
        glue(name, verdict)
        glue(f"{name}_status", "not run")
        glue(f"{name}_answer", "not run")
        glue(f"{name}_interval", "no estimate")
        glue(f"{name}_source", claim.provenance if claim else "-")
        glue(f"{name}_claim", claim.statement if claim else "-")
        glue(f"{name}_question", claim.question if claim else "-")
        return
    glue(name, verdict.sentence)
    glue(f"{name}_status", verdict.status)
    glue(f"{name}_answer", verdict.answer)
    glue(f"{name}_interval", verdict.interval_text)
    glue(f"{name}_source", verdict.claim.provenance)
    glue(f"{name}_claim", verdict.claim.statement)
    glue(f"{name}_question", verdict.claim.question or verdict.claim.statement)
    for k, v in verdict.evidence.items():
        glue(f"{name}_{k}", v)


# --------------------------------------------------------------------------------------------------------------------
# Tables added to every executed chapter by the build
# --------------------------------------------------------------------------------------------------------------------
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
    """Markdown: when and with what this chapter was last executed (`run`: its run.json, plus the profile)."""
    rows = [["date (UTC)", run["date"]], ["model", _md_cell_text(run.get("model") or "-")],
            ["profile", _md_cell_text(run["profile"])]]
    rows += [[k, _md_cell_text(v)] for k, v in run["versions"].items()]
    rows += [["platform", _md_cell_text(run["platform"])], ["wall time", f"{run['seconds']:.1f} s"]]
    return "## Last executed\n\n" + _md_table(["what", "value"], rows)


# --------------------------------------------------------------------------------------------------------------------
# The parameters in words: the command line's --list-params and the book's last page
# --------------------------------------------------------------------------------------------------------------------
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
                     _md_cell_text(prof.parameters.get("model", "-")),
                     "all" if prof.only is None else ", ".join(prof.only)])
    return _md_table(["profile", "what it is for", "model", "chapters"], rows)


def parameters_reference() -> str:
    """Markdown: the parameter schema (name and allowed values) shared by all chapters."""
    return _md_table(["parameter", "allowed values"],
                     [[f"`{k}`", v.allowed.replace("|", "\\|")] for k, v in PARAMETERS.items()])


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
