#!/usr/bin/env python
"""Does the vanilla model know each concept? Prints a knowledge score (x/10) per concept and every failing pair.

A concept passes when the model's greedy answer (chat template for an instruct model, 30 new tokens) contains an
accepted expected answer (`QA_answers`, matched with `concepts.answer_matches`) for at least --threshold of its
questions. This is the same generation and matching that tests/test_default_model.py uses through
`pipeline.answers`; the script calls `prompts.generate_answers` directly so it needs no cache.

    .venv/bin/python scripts/check_concept_knowledge.py                       # the shipped set, default model
    .venv/bin/python scripts/check_concept_knowledge.py path/to/concepts.json --unbatched
    .venv/bin/python scripts/check_concept_knowledge.py --concept "Harry Potter" --show-all

Exit status: 0 when every concept passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dissect_unlearning import concepts as concepts_mod  # noqa: E402
from dissect_unlearning import models, prompts  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("concepts", nargs="?", default=concepts_mod.BUILTIN,
                    help="a concepts JSON file, or 'builtin' (default: the shipped set)")
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--format", default="auto", help="prompt format: auto (default), chat or paper")
    ap.add_argument("--max-new-tokens", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threshold", type=int, default=7, help="questions a concept must get right (default 7)")
    ap.add_argument("--concept", action="append", help="only this concept (repeatable)")
    ap.add_argument("--unbatched", action="store_true",
                    help="also generate every answer one at a time and report any answer that differs")
    ap.add_argument("--unrelated", action="store_true",
                    help="also score the unrelated questions (expected answers looked up in the set)")
    ap.add_argument("--show-all", action="store_true", help="print every question and answer, not only failures")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    cset = concepts_mod.load(args.concepts)
    if args.concept:
        cset = cset.select(args.concept)
    model, tok = models.load(args.model)

    questions = []
    for c in cset:
        if not c.answers:
            print(f"{c.label}: no QA_answers, cannot score", file=sys.stderr)
            return 1
        questions += c.questions
    expected_of = {q: a for c in concepts_mod.load(args.concepts) for q, a in zip(c.questions, c.answers or [])}
    if args.unrelated:
        questions += [q for c in cset for q in c.unrelated_questions if q in expected_of]
    unique = list(dict.fromkeys(questions))

    t0 = time.time()
    generated = prompts.generate_answers(model, tok, unique, args.format, args.max_new_tokens, args.batch_size)
    answer_of = {a.question: a for a in generated}
    print(f"# {len(unique)} questions answered in {time.time() - t0:.1f} s "
          f"(model {args.model}, format {prompts.resolve_format(args.format, tok)}, "
          f"{args.max_new_tokens} new tokens, batch {args.batch_size})")

    failing = []
    for c in cset:
        hits = [concepts_mod.answer_matches(answer_of[q].answer_text, exp) for q, exp in zip(c.questions, c.answers)]
        score = sum(hits)
        status = "ok" if score >= args.threshold else "FAIL"
        print(f"{c.label:28s} {score:2d}/{len(hits)}  {status}")
        if status == "FAIL":
            failing.append(c.label)
        for q, exp, hit in zip(c.questions, c.answers, hits):
            if args.show_all or not hit:
                mark = "ok" if hit else "XX"
                print(f"    {mark} Q: {q}\n       expected: {exp}\n       answer:   {answer_of[q].answer_text!r}")
        if args.unrelated:
            uq = [q for q in c.unrelated_questions if q in expected_of]
            u_hits = sum(concepts_mod.answer_matches(answer_of[q].answer_text, expected_of[q]) for q in uq)
            print(f"    unrelated questions answered correctly: {u_hits}/{len(uq)}")

    if args.unbatched:
        t0 = time.time()
        differ = 0
        for q in unique:
            (single,) = prompts.generate_answers(model, tok, [q], args.format, args.max_new_tokens, 1)
            if single.answer_ids != answer_of[q].answer_ids:
                differ += 1
                print(f"# batched != unbatched for {q!r}:\n#   {answer_of[q].answer_text!r}\n#   {single.answer_text!r}")
        print(f"# unbatched check: {differ} of {len(unique)} answers differ ({time.time() - t0:.1f} s)")
        if differ:
            failing.append("(batched/unbatched mismatch)")

    print(f"# {len(cset) - len([f for f in failing if not f.startswith('(')])}/{len(cset)} concepts pass "
          f"(threshold {args.threshold})")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
