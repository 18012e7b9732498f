"""Concept records in the ConceptVectors schema: loading and validation.

A record: Concept (str), Layer (int), Dim (int), QA (list of questions), text_completion (list of
{First_half, Second_half}), unrelated_QA (list of questions), wikipedia_content (str: the forget text); optional
id/ID (int), QA_answers (one expected short answer per question: a string or a list of accepted strings).
Extra fields are kept. ConceptVectors holds some concepts at several (Layer, Dim) locations, each a sample of its
own: a name may repeat, a (Concept, Layer, Dim) triple may not.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .cache import canonical_json

BUILTIN = "builtin"  # the concept set shipped with the package (data/concepts.json)
HUB_PREFIX = "hub:"  # hub:YihuaiHong/ConceptVectors (needs network and `datasets`)

REQUIRED = {
    "Concept": str,
    "Layer": int,
    "Dim": int,
    "QA": list,
    "text_completion": list,
    "unrelated_QA": list,
    "wikipedia_content": str,
}


class ConceptDataError(ValueError):
    """Invalid concept data. `.problems` lists every problem found, each naming file, record and field."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        shown = "\n  - ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"invalid concept data in {source}:\n  - {shown}{more}")


@dataclass
class Concept:
    name: str
    layer: int
    dim: int
    questions: list[str]
    text_completion: list[dict]
    unrelated_questions: list[str]
    forget_text: str
    answers: list[list[str]] | None = None  # accepted expected answers per question
    index: int = 0  # position in its file
    id: int | None = None
    source: str = ""
    repeated: bool = False  # the name occurs at several locations in its set
    record: dict = field(default_factory=dict, repr=False)  # the full original record, extra fields included

    @property
    def label(self) -> str:
        """Unique within a set: the name, plus the location when a name repeats."""
        return f"{self.name}#{self.id if self.id is not None else self.index}" if self.repeated else self.name

    def content_hash(self) -> str:
        return hashlib.sha256(canonical_json(self.record).encode()).hexdigest()[:16]

    def to_record(self) -> dict:
        return dict(self.record)


class ConceptSet(list):
    """A list of Concepts from one source, with lookup by name, label, id or index."""

    def __init__(self, concepts, source: str = ""):
        super().__init__(concepts)
        self.source = source

    def get(self, key) -> Concept:
        if isinstance(key, Concept):
            return key
        if isinstance(key, int):
            return self[key]
        matches = [c for c in self if key in (c.label, c.name, str(c.id))]
        if not matches:
            raise KeyError(f"no concept {key!r} in {self.source}; concepts: {', '.join(c.label for c in self)}")
        if len(matches) > 1 and not any(c.label == key for c in matches):
            raise KeyError(f"concept name {key!r} is ambiguous in {self.source} (it is stored at several locations): "
                           f"use one of {', '.join(f'{c.name}#{c.id or c.index}' for c in matches)}")
        return next(c for c in matches if c.label == key) if len(matches) > 1 else matches[0]

    def select(self, keys) -> "ConceptSet":
        if keys in (None, "all"):
            return self
        if isinstance(keys, int):
            return ConceptSet(self[:keys], self.source)
        return ConceptSet([self.get(k) for k in keys], self.source)

    def content_hash(self) -> str:
        return hashlib.sha256("".join(c.content_hash() for c in self).encode()).hexdigest()[:16]

    @property
    def names(self) -> list[str]:
        return [c.label for c in self]


def builtin_path() -> Path:
    return Path(str(resources.files("dissect_unlearning") / "data" / "concepts.json"))


def load(source: str | Path = BUILTIN) -> ConceptSet:
    """Load and validate concepts from `builtin`, a JSON file (a list of records) or `hub:owner/dataset`."""
    if isinstance(source, str) and source == BUILTIN:
        path = builtin_path()
        return parse(_read_json(path), str(path))
    if isinstance(source, str) and source.startswith(HUB_PREFIX):
        return parse(_read_hub(source[len(HUB_PREFIX):]), source)
    path = Path(source)
    if not path.is_file():
        raise ConceptDataError(str(path), [f"file not found (expected a JSON list of concept records, "
                                           f"'{BUILTIN}', or '{HUB_PREFIX}owner/dataset')"])
    return parse(_read_json(path), str(path))


def _read_json(path: Path):
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConceptDataError(str(path), [f"not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})"])
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConceptDataError(str(path), [f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"])


def _read_hub(dataset_id: str):
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a core dependency
        raise ConceptDataError(dataset_id, ["the `datasets` package is needed to read the hub"]) from exc
    try:
        ds = datasets.load_dataset(dataset_id, split="train")
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, ...
        raise ConceptDataError(HUB_PREFIX + dataset_id, [f"cannot read the hub dataset (network access to the model "
                                                         f"hub is needed): {type(exc).__name__}: {exc}"]) from exc
    return [dict(r) for r in ds]


def _type_name(t) -> str:
    return {str: "a string", int: "an integer", list: "a list"}[t]


def parse(data, source: str = "<memory>") -> ConceptSet:
    """Validate a list of records; raise ConceptDataError listing every problem, or return a ConceptSet."""
    if not isinstance(data, list):
        raise ConceptDataError(source, [f"top level is a JSON {type(data).__name__}, expected a list of records"])
    problems: list[str] = []
    seen: dict[tuple, int] = {}
    concepts = []
    for i, rec in enumerate(data):
        where = f"record {i}"
        if not isinstance(rec, dict):
            problems.append(f"{where}: is a {type(rec).__name__}, expected an object")
            continue
        name = rec.get("Concept")
        if isinstance(name, str):
            where += f" (concept {name!r})"
        bad = False
        for fld, typ in REQUIRED.items():
            if fld not in rec:
                problems.append(f"{where}: missing field {fld!r}")
                bad = True
            elif not isinstance(rec[fld], typ) or (typ is int and isinstance(rec[fld], bool)):
                problems.append(f"{where}: field {fld!r} must be {_type_name(typ)}, got {type(rec[fld]).__name__}")
                bad = True
        if bad:
            continue
        if not rec["Concept"].strip():
            problems.append(f"{where}: field 'Concept' is empty")
        if not rec["QA"]:
            problems.append(f"{where}: field 'QA' is an empty question list")
        for fld in ("QA", "unrelated_QA"):
            for j, q in enumerate(rec[fld]):
                if not isinstance(q, str) or not q.strip():
                    problems.append(f"{where}: field {fld!r} item {j} must be a non-empty string")
        for j, tc in enumerate(rec["text_completion"]):
            if not (isinstance(tc, dict) and isinstance(tc.get("First_half"), str)
                    and isinstance(tc.get("Second_half"), str)):
                problems.append(f"{where}: field 'text_completion' item {j} must be an object with string fields "
                                f"'First_half' and 'Second_half'")
        answers = None
        if "QA_answers" in rec:
            answers, why = _parse_answers(rec["QA_answers"], len(rec["QA"]))
            if why:
                problems.append(f"{where}: field 'QA_answers' {why}")
        rid = rec.get("id", rec.get("ID"))
        if rid is not None and (not isinstance(rid, int) or isinstance(rid, bool)):
            problems.append(f"{where}: field 'id' must be an integer, got {type(rid).__name__}")
            rid = None
        triple = (rec["Concept"], rec["Layer"], rec["Dim"])
        if triple in seen:
            problems.append(f"{where}: duplicate of record {seen[triple]} (same Concept, Layer {rec['Layer']} and "
                            f"Dim {rec['Dim']})")
        seen.setdefault(triple, i)
        concepts.append(Concept(
            name=rec["Concept"], layer=rec["Layer"], dim=rec["Dim"], questions=list(rec["QA"]),
            text_completion=list(rec["text_completion"]), unrelated_questions=list(rec["unrelated_QA"]),
            forget_text=rec["wikipedia_content"], answers=answers, index=i, id=rid, source=source, record=rec,
        ))
    if problems:
        raise ConceptDataError(source, problems)
    # A repeated name is told apart by its id, else by its index.
    counts: dict[str, int] = {}
    for c in concepts:
        counts[c.name] = counts.get(c.name, 0) + 1
    for c in concepts:
        c.repeated = counts[c.name] > 1
    return ConceptSet(concepts, source)


def _parse_answers(value, n_questions: int):
    if not isinstance(value, list):
        return None, f"must be a list (one answer per question), got {type(value).__name__}"
    if len(value) != n_questions:
        return None, f"has {len(value)} answers for {n_questions} questions"
    out = []
    for j, a in enumerate(value):
        alts = [a] if isinstance(a, str) else a
        if not isinstance(alts, list) or not alts or not all(isinstance(x, str) and x.strip() for x in alts):
            return None, f"item {j} must be a non-empty string or a list of non-empty strings"
        out.append(list(alts))
    return out, None


def answer_matches(answer_text: str, accepted: list[str]) -> bool:
    """Does a generated answer contain one of the accepted answers? Case-, punctuation- and space-insensitive."""
    norm = _normalise(answer_text)
    return any(_normalise(a) in norm for a in accepted)


def _normalise(s: str) -> str:
    import re
    import unicodedata

    s = unicodedata.normalize("NFKD", s).encode("ascii", "ignore").decode().lower()
    s = re.sub(r"[^a-z0-9]+", " ", s)
    return f" {' '.join(s.split())} "
