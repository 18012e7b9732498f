"""Profiles (`profiles/<name>.yml`) and the parameter values a chapter runs with.

A profile is a set of parameter values shared by all chapters, plus optional per-chapter overrides and an optional
selection of the chapters it builds:

    description: one line
    parameters: {model: smollm2-135m, concepts: 5, ...}
    chapters: {patching: {window: 3}}
    only: [mechanics, surface, patching, restoration]

`only` (chapter names, numbers or stems) makes `dissect-unlearning build --profile P` execute those chapters and
render a book of them alone (with the introduction and the reference page); without it, every chapter of _toc.yml.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from .chapter import Chapter, chapters, find_chapter
from .params import PATH_PARAMETERS, check_together, check_value
from .project import BookError, project_root


PROFILE_KEYS = ("description", "parameters", "chapters", "only")


@dataclass
class Profile:
    name: str
    description: str
    parameters: dict
    chapters: dict  # chapter stem -> {name: value}
    path: Path | None = None
    only: list[str] | None = None  # the stems of the chapters the profile builds (toc order); None: every chapter


class _DuplicateKey(Exception):
    def __init__(self, key, line: int, first: int):
        super().__init__(key, line, first)
        self.key, self.line, self.first = key, line, first


class _ProfileLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error: PyYAML keeps the last
    value without a word, so a profile that sets a parameter twice would run with whichever came last."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, line, seen[key])
                seen[key] = line
            except TypeError:  # an unhashable key: the base loader reports it
                continue
        return super().construct_mapping(node, deep)


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
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_ProfileLoader) or {}
    except _DuplicateKey as dup:
        raise BookError(f"{where}, line {dup.line}: key {dup.key!r} is given twice (first at line {dup.first}); "
                        f"keep one") from None
    except yaml.YAMLError as exc:
        raise BookError(f"{where}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise BookError(f"{where}: expected a mapping with keys description, parameters, chapters")
    extra = set(data) - set(PROFILE_KEYS)
    if extra:
        raise BookError(f"{where}: unknown key(s) {', '.join(sorted(extra))}; valid keys: {', '.join(PROFILE_KEYS)}")
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
    only = None
    if "only" in data:
        names = data["only"]
        if not isinstance(names, list) or not names or not all(isinstance(n, (str, int)) for n in names):
            raise BookError(f"{where}, only: expected a non-empty list of chapters (names, numbers or stems), "
                            f"got {names!r}")
        chosen = {find_chapter(str(n), root).stem for n in names}
        for ch in chapters(root):
            if ch.stem in chosen and not ch.in_toc:
                raise BookError(f"{where}, only: chapter {ch.stem} is not in _toc.yml, so the book has no page for it")
        only = [ch.stem for ch in chapters(root) if ch.stem in chosen]
    return Profile(path.stem, str(data.get("description") or ""), params, per_chapter, path, only)


def resolve_parameters(chapter: Chapter, profile: Profile, overrides: dict | None = None,
                       with_sources: bool = False):
    """Every parameter of `chapter`: override, else the profile's per-chapter value, else the profile's shared value,
    else the notebook's default. A parameter the notebook does not declare is not passed to it.

    A relative path that exists (a concept file, a checkpoint folder) is made absolute: the kernel runs elsewhere.
    The values are then checked together, against the concept set and the model (params.check_together), so that a
    window too large for the model fails here, before the build computes anything.
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
    check_together(out, f"chapter {chapter.stem}")
    return (out, sources) if with_sources else out


def check_overrides(overrides: dict, chs: list[Chapter]) -> dict:
    """-p names must be parameters of at least one of the chapters being run; values must be allowed."""
    valid = list(dict.fromkeys(n for ch in chs for n in ch.parameters()))
    what = chs[0].stem if len(chs) == 1 else "the chapters being built"
    for k, v in overrides.items():
        if k not in valid:
            raise BookError(f"-p {k}: {what} has no parameter {k!r}; valid names: {', '.join(valid)}")
    return {k: check_value(k, v, f"-p {k}") for k, v in overrides.items()}
