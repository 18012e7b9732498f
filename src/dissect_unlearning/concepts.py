"""Concept records in the ConceptVectors schema: loading and validation.

A record: Concept (str), Layer (int), Dim (int), QA (list of questions), text_completion (list of
{First_half, Second_half}), unrelated_QA (list of questions), wikipedia_content (str: the forget text); optional
id/ID (int), QA_answers (one expected short answer per question: a string or a list of accepted strings).
Extra fields are kept. ConceptVectors holds some concepts at several (Layer, Dim) locations, each a sample of its
own: a name may repeat, a (Concept, Layer, Dim) triple may not, nor may two spellings of one name (differing only in
white space or case), an id or a label. Layer and Dim are counted from 0; ConceptSet.check_against(n_layers, mlp_dim)
checks them against a model.

A record may also be marked `never_known: true`: a fictional concept no model can have learned (data/never_known.json,
loaded by `never_known()`), the control of chapter 8's relearning. It has no concept vector (Layer and Dim are null),
needs QA_answers (its gold answers), and lives in a file of its own: a set that mixes it with other concepts is
refused, so it is never a target, a retain concept, a held-out or an unrelated text.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .cache import canonical_json

BUILTIN = "builtin"  # the concept set shipped with the package (data/concepts.json)
NEVER_KNOWN_FILE = "never_known.json"  # the shipped never-known concept (data/never_known.json)
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
# Layer and Dim stay below these: far above any model's depth and MLP width, far below what only a corrupted or
# mistyped file holds. A known model is checked exactly with ConceptSet.check_against.
LAYER_LIMIT = 1 << 10
DIM_LIMIT = 1 << 20


class ConceptDataError(ValueError):
    """Invalid concept data. `.problems` lists every problem found, each naming file, record and field."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        shown = "\n  - ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"invalid concept data in {source}:\n  - {shown}{more}")


class ConceptLookupError(KeyError):
    """No concept, or more than one, answers to a key. A KeyError whose message prints without KeyError's quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass
class Concept:
    name: str
    layer: int | None  # None for a never-known concept (it has no concept vector)
    dim: int | None
    questions: list[str]
    text_completion: list[dict]
    unrelated_questions: list[str]
    forget_text: str
    answers: list[list[str]] | None = None  # accepted expected answers per question
    index: int = 0  # position in its file
    id: int | None = None
    source: str = ""
    repeated: bool = False  # the name occurs at several locations in its set
    never_known: bool = False  # a fictional concept, the relearning control: never studied itself
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
        """The concept with this label, name or id (a string), or at this index (an integer from 0)."""
        if isinstance(key, Concept):
            return key
        if isinstance(key, int) and not isinstance(key, bool):
            if not 0 <= key < len(self):
                raise ConceptLookupError(f"no concept at index {key} in {self.source}: it holds {len(self)} "
                                         f"concepts (indices 0 to {len(self) - 1})")
            return self[key]
        if not isinstance(key, str):
            raise ConceptLookupError(f"no concept {key!r} in {self.source}: a concept is named by its label, name "
                                     f"or id (a string) or by its index (an integer), not a {type(key).__name__}")
        matches = [c for c in self if key in (c.label, c.name, str(c.id))]
        if not matches:
            raise ConceptLookupError(f"no concept {key!r} in {self.source}; concepts: "
                                     f"{', '.join(c.label for c in self)}")
        if len(matches) > 1 and not any(c.label == key for c in matches):
            raise ConceptLookupError(f"concept name {key!r} is ambiguous in {self.source} (it is stored at several "
                                     f"locations): use one of {', '.join(c.label for c in matches)}")
        return next(c for c in matches if c.label == key) if len(matches) > 1 else matches[0]

    def select(self, keys) -> "ConceptSet":
        """'all' (or None): the whole set; N >= 1: its first N concepts; a label, name or id, or a list of them."""
        if keys is None or (isinstance(keys, str) and keys == "all"):
            return self
        usage = "select takes 'all', a number N >= 1 (the first N concepts) or concept names"
        if isinstance(keys, bool):
            raise ValueError(f"cannot select {keys!r} from {self.source}: {usage}")
        if isinstance(keys, int):
            if keys < 1:
                raise ValueError(f"cannot select {keys} concepts from {self.source}: {usage}")
            if keys > len(self):
                raise ValueError(f"cannot select the first {keys} concepts from {self.source}: it holds "
                                 f"{len(self)}")
            return ConceptSet(self[:keys], self.source)
        if isinstance(keys, (str, Concept)):
            keys = [keys]  # one name, not a sequence of one-letter names
        if not isinstance(keys, (list, tuple)) or not keys:
            raise ValueError(f"cannot select {keys!r} from {self.source}: {usage}")
        chosen = [self.get(k) for k in keys]
        for i, c in enumerate(chosen):
            if any(d is c for d in chosen[:i]):
                raise ValueError(f"cannot select {keys!r} from {self.source}: concept {c.label!r} is named twice")
        return ConceptSet(chosen, self.source)

    def content_hash(self) -> str:
        return hashlib.sha256("".join(c.content_hash() for c in self).encode()).hexdigest()[:16]

    @property
    def names(self) -> list[str]:
        return [c.label for c in self]

    def check_against(self, n_layers: int, mlp_dim: int) -> "ConceptSet":
        """Raise ConceptDataError unless every concept's Layer is a layer of a model with `n_layers` layers and its
        Dim a neuron of an MLP `mlp_dim` wide (both counted from 0); return the set.
        models.n_layers(model) and models.mlp_dim(model) give both for a loaded model."""
        problems = []
        for c in self:
            where = f"record {c.index} (concept {c.name!r})"
            if c.never_known:  # no concept vector to locate
                continue
            if not 0 <= c.layer < n_layers:
                problems.append(f"{where}: field 'Layer' is {c.layer}, but the model has {n_layers} layers "
                                f"(0 to {n_layers - 1})")
            if not 0 <= c.dim < mlp_dim:
                problems.append(f"{where}: field 'Dim' is {c.dim}, but the model's MLP has {mlp_dim} neurons "
                                f"(0 to {mlp_dim - 1})")
        if problems:
            raise ConceptDataError(self.source, problems)
        return self


def builtin_path() -> Path:
    return Path(str(resources.files("dissect_unlearning") / "data" / "concepts.json"))


def never_known_path() -> Path:
    return Path(str(resources.files("dissect_unlearning") / "data" / NEVER_KNOWN_FILE))


def never_known(n_questions: int | None = None, source: str | Path | None = None) -> Concept:
    """The never-known concept (default: the shipped one, data/never_known.json), cut to its first `n_questions`
    questions (None keeps all; more than it has keeps all). `source`: another JSON file holding one such record."""
    path = never_known_path() if source is None else Path(source)
    cset = load(path)
    if len(cset) != 1 or not cset[0].never_known:
        marked = sum(c.never_known for c in cset)
        raise ConceptDataError(str(path), [f"expected exactly one record marked 'never_known': true, found "
                                           f"{len(cset)} record(s), {marked} of them marked"])
    if n_questions is None or n_questions >= len(cset[0].questions):
        return cset[0]
    return parse(_cut([cset[0].to_record()], n_questions, None), f"{path} (first {n_questions} questions)")[0]


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


def concept_set(source: str | Path = BUILTIN, n_questions: int | None = None,
                n_unrelated: int | None = None) -> ConceptSet:
    """The concept set with each concept cut to its first `n_questions` questions (with their answers, and as many
    text completions) and its first `n_unrelated` unrelated questions; None keeps all.

    The cut records hash differently, so cached artefacts of the full set are never confused with those of a cut one
    (and every chapter must cut the same way to share them: they all take n_questions and n_unrelated)."""
    full = load(source)
    if n_questions is None and n_unrelated is None:
        return full
    return parse(_cut([c.to_record() for c in full], n_questions, n_unrelated),
                 f"{full.source} (first {n_questions} questions, {n_unrelated} unrelated)")


def _cut(records: list[dict], n_questions: int | None, n_unrelated: int | None) -> list[dict]:
    """Copies of the records with their first `n_questions` questions (and what goes with each question) and first
    `n_unrelated` unrelated questions; None keeps all."""
    out = []
    for rec in records:
        rec = dict(rec)
        if n_questions is not None:
            rec["QA"] = rec["QA"][:n_questions]
            for key in ("QA_answers", "QA_with_answers", "answers_tokens_num", "text_completion"):
                if isinstance(rec.get(key), list):
                    rec[key] = rec[key][:n_questions]
        if n_unrelated is not None:
            rec["unrelated_QA"] = rec["unrelated_QA"][:n_unrelated]
        out.append(rec)
    return out


def _read_json(path: Path):
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConceptDataError(str(path), [f"not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})"])
    if not text.strip():
        raise ConceptDataError(str(path), ["the file is empty (expected a JSON list of concept records)"])
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
    if not data:
        raise ConceptDataError(source, ["it holds no concept records (an empty list)"])
    problems: list[str] = []
    seen: dict[tuple, int] = {}
    seen_ids: dict[int, Concept] = {}
    # Names that differ only in white space or case are one concept spelled two ways, which would split its samples.
    spelled: dict[str, tuple[int, str]] = {}
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
        fictional = rec.get("never_known", False)
        if not isinstance(fictional, bool):
            problems.append(f"{where}: field 'never_known' must be true or false, got {_describe(fictional)}")
            fictional = False
        for fld, typ in REQUIRED.items():
            if fld not in rec:
                problems.append(f"{where}: missing field {fld!r}")
                bad = True
            elif fictional and fld in ("Layer", "Dim"):
                if rec[fld] is not None:  # a concept no model knows has no concept vector to point at
                    problems.append(f"{where}: field {fld!r} must be null for a 'never_known' concept (it has no "
                                    f"concept vector), got {_describe(rec[fld])}")
                    bad = True
            elif not isinstance(rec[fld], typ) or (typ is int and isinstance(rec[fld], bool)):
                problems.append(f"{where}: field {fld!r} must be {_type_name(typ)}, got {_describe(rec[fld])}")
                bad = True
        if bad:
            continue
        if not rec["Concept"].strip():
            problems.append(f"{where}: field 'Concept' is empty")
        for fld, limit in (("Layer", LAYER_LIMIT), ("Dim", DIM_LIMIT)):
            if not fictional and not 0 <= rec[fld] < limit:
                problems.append(f"{where}: field {fld!r} must be an integer from 0 to {limit - 1}, got {rec[fld]}")
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
        if fictional and "QA_answers" not in rec:
            problems.append(f"{where}: a 'never_known' concept needs field 'QA_answers' (the gold answers its "
                            f"relearning control trains on and is scored against)")
        id_field = "id" if "id" in rec else "ID"
        rid = rec.get(id_field)
        if rid is not None and (not isinstance(rid, int) or isinstance(rid, bool)):
            problems.append(f"{where}: field {id_field!r} must be an integer, got {_describe(rid)}")
            rid = None
        spelling = " ".join(rec["Concept"].split()).casefold()
        first = spelled.setdefault(spelling, (i, rec["Concept"]))
        if first[1] != rec["Concept"]:
            problems.append(f"{where}: field 'Concept' differs from {first[1]!r} of record {first[0]} only in white "
                            f"space or case (spell one concept one way)")
        triple = (rec["Concept"], rec["Layer"], rec["Dim"])
        if triple in seen:
            problems.append(f"{where}: duplicate of record {seen[triple]} (same Concept, Layer {rec['Layer']} and "
                            f"Dim {rec['Dim']})")
        seen.setdefault(triple, i)
        concept = Concept(
            name=rec["Concept"], layer=rec["Layer"], dim=rec["Dim"], questions=list(rec["QA"]),
            text_completion=list(rec["text_completion"]), unrelated_questions=list(rec["unrelated_QA"]),
            forget_text=rec["wikipedia_content"], answers=answers, index=i, id=rid, source=source, record=rec,
            never_known=fictional,
        )
        if rid is not None and rid in seen_ids:
            other = seen_ids[rid]
            problems.append(f"{where}: field {id_field!r} is {rid}, the id of record {other.index} (concept "
                            f"{other.name!r}) too")
        elif rid is not None:
            seen_ids[rid] = concept
        concepts.append(concept)
    fictional = [c for c in concepts if c.never_known]
    if fictional and len(fictional) < len(concepts):
        problems += [f"record {c.index} (concept {c.name!r}): field 'never_known' is true in a set of concepts the "
                     f"model is meant to know; a never-known concept is a control and lives in a file of its own "
                     f"(so that it is never a target, retain concept or relearning text)" for c in fictional]
    if problems:
        raise ConceptDataError(source, problems)
    # A repeated name is told apart by its id, else by its index.
    counts: dict[str, int] = {}
    for c in concepts:
        counts[c.name] = counts.get(c.name, 0) + 1
    for c in concepts:
        c.repeated = counts[c.name] > 1
    # Labels select concepts and name them in every table: two alike would be one (e.g. a concept named 'A#3' beside
    # 'A' repeated with id 3, or one repeat with id 5 beside another without an id at index 5).
    labelled: dict[str, Concept] = {}
    for c in concepts:
        other = labelled.setdefault(c.label, c)
        if other is not c:
            problems.append(f"record {c.index} (concept {c.name!r}): fields 'Concept' and 'id' give the label "
                            f"{c.label!r} of record {other.index} (concept {other.name!r}) too; give one of them "
                            f"another name or id")
    if problems:
        raise ConceptDataError(source, problems)
    return ConceptSet(concepts, source)


def _describe(value) -> str:
    """A wrong value for a message: its type, and the value itself when it is a short scalar."""
    kind = type(value).__name__
    if isinstance(value, (bool, int, float, str)) and len(repr(value)) <= 40:
        return f"{kind} {value!r}"
    return kind


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
    norm = normalise(answer_text)
    return any(normalise(a) in norm for a in accepted)


def normalise(s: str) -> str:
    """Lower case ASCII words separated by single spaces, with a space at each end (so that ' x ' finds whole
    words): the form answers are compared in."""
    import re
    import unicodedata

    s = unicodedata.normalize("NFKD", s).encode("ascii", "ignore").decode().lower()
    s = re.sub(r"[^a-z0-9]+", " ", s)
    return f" {' '.join(s.split())} "
