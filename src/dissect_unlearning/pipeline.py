"""The stages of a chapter, each cached by its inputs: answers -> unlearned models -> sweeps -> scores.

Notebooks call this module (plus `plots` and `verdicts`) and nothing deeper.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import cache, concepts as concepts_mod, models, prompts

ANSWER_COLUMNS = [
    "model", "concept", "concept_index", "kind", "question_index", "question", "prompt_format", "prompt_text",
    "prompt_ids", "answer_ids", "answer_text", "n_prompt_tokens", "n_answer_tokens", "expected", "correct",
]


def load_concepts(source="builtin", select=None) -> concepts_mod.ConceptSet:
    return concepts_mod.load(source).select(select)


def answers(model: str = models.DEFAULT_MODEL, concepts="builtin", select=None, prompt_format: str = "auto",
            max_new_tokens: int = 30, batch_size: int = 16, include_unrelated: bool = True, progress: bool = True,
            loaded=None) -> pd.DataFrame:
    """The vanilla model's greedy answers to every question of the selected concepts (cached).

    One row per (concept, kind, question): kind 'target' for the concept's own questions, 'unrelated' for its
    unrelated questions. `loaded` = an already loaded (model, tokenizer) of `model`, to skip a reload.
    Columns: see ANSWER_COLUMNS; `prompt_ids` / `answer_ids` are the exact token spans.
    """
    cset = concepts if isinstance(concepts, concepts_mod.ConceptSet) else load_concepts(concepts, select)
    if isinstance(concepts, concepts_mod.ConceptSet) and select is not None:
        cset = cset.select(select)
    tok = loaded[1] if loaded else models.load_tokenizer(model)
    fmt = prompts.resolve_format(prompt_format, tok)
    inputs = {
        "model": models.identity(model),
        "concepts": [c.content_hash() for c in cset],
        "prompt_format": fmt,
        "generation": {"max_new_tokens": max_new_tokens, "greedy": True, "batch_size": batch_size},
        "include_unrelated": include_unrelated,
    }

    def build(folder: Path) -> None:
        m, t = loaded if loaded else models.load(model)
        rows = []
        for c in cset:
            for i, q in enumerate(c.questions):
                exp = c.answers[i] if c.answers else None
                rows.append((c, "target", i, q, exp))
            if include_unrelated:
                for i, q in enumerate(c.unrelated_questions):
                    rows.append((c, "unrelated", i, q, None))
        unique = list(dict.fromkeys(r[3] for r in rows))  # unrelated questions repeat across concepts
        generated = prompts.generate_answers(m, t, unique, fmt, max_new_tokens, batch_size,
                                             progress="vanilla answers" if progress else False)
        by_q = dict(zip(unique, generated))
        records = []
        for c, kind, i, q, exp in rows:
            a = by_q[q]
            records.append({
                "model": model, "concept": c.label, "concept_index": c.index, "kind": kind, "question_index": i,
                "question": q, "prompt_format": fmt, "prompt_text": a.prompt_text, "prompt_ids": a.prompt_ids,
                "answer_ids": a.answer_ids, "answer_text": a.answer_text, "n_prompt_tokens": len(a.prompt_ids),
                "n_answer_tokens": len(a.answer_ids), "expected": exp,
                "correct": None if exp is None else concepts_mod.answer_matches(a.answer_text, exp),
            })
        _write_parquet(pd.DataFrame.from_records(records, columns=ANSWER_COLUMNS), folder / "answers.parquet")

    folder = cache.get_or_build("answers", inputs, build)
    return pd.read_parquet(folder / "answers.parquet")


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    cache.atomic_write_bytes(path, buf.getvalue())
