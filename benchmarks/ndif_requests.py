"""What the ndif profile would send to NDIF, counted offline: every chapter it builds is planned (its `study` cells
in plan mode, as the precompute stage plans a build), with NDIF's preflight skipped, and the requests are counted
by kind. Needs no key and no network; sends nothing.

    python benchmarks/ndif_requests.py [--profile ndif]

Counts (the book's introduction quotes them): unlearned models; training requests (one per CHUNK_STEPS optimiser
steps, plus one for the reference log-probabilities of a method that has them); behaviour requests (at most 8 per
model: the vanilla model's completions and two perplexities, the unlearned model's target and unrelated answers,
completions and two perplexities; the vanilla ones are shared by the models of one concept); sweeps and
coefficient changes (one request each). Vanilla-answer requests are left out: one per distinct question set.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
from pathlib import Path

from dissect_unlearning import book, patching, precompute
from dissect_unlearning.unlearning import UnlearnConfig, methods as methods_mod
from dissect_unlearning.unlearning.remote import CHUNK_STEPS

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="ndif")
    args = parser.parse_args()
    patching.remote.preflight = lambda model: None  # planning only: nothing is sent
    prof = book.load_profile(args.profile, ROOT)
    requests, models = set(), set()
    for ch in book.chapters(ROOT):
        if not ch.in_toc or (prof.only and ch.stem not in prof.only and ch.stem.split("_", 1)[1] not in prof.only):
            continue
        for r in precompute.requests(ch.path, book.resolve_parameters(ch, prof)):
            requests.add(r)
            if r.concept is not None:
                models.add((r.concept, r.method, r.context))
    by_stage = collections.Counter(r.stage for r in requests)
    training = 0
    for _, method, context in models:
        config = UnlearnConfig.for_method(method, **json.loads(context)["unlearning"])
        training += math.ceil(config.steps / CHUNK_STEPS) + (1 if methods_mod.get(method).reference else 0)
    behaviour = 8 * by_stage.get("behaviour", 0)
    print(f"profile {args.profile}: {len(models)} unlearned models, {training} training requests, "
          f"{by_stage.get('sweep', 0)} sweeps, {by_stage.get('coef_change', 0)} coefficient changes, "
          f"at most {behaviour} behaviour requests, {by_stage.get('relearn', 0)} relearning runs")


if __name__ == "__main__":
    main()
