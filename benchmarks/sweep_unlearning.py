"""A small sweep of unlearning settings: target vs unrelated ROUGE-L (against the vanilla answers), per method.

    python benchmarks/sweep_unlearning.py --method grad_diff --grid lr=1e-5,2e-5 [--grid steps=10,15]
        [--concept "Harry Potter" ...] [--profile-concepts]

Each cell is `pipeline.behaviour` (cached: unlearned models and scores are reused between runs), averaged over the
concepts. The goal the defaults are chosen for: target ROUGE-L <= 0.35 with unrelated ROUGE-L >= 0.6. On a busy
2-core machine, OMP_NUM_THREADS=1 is faster than 2 (thread contention).

Tuning is kept apart from testing: by default the sweep runs on concepts of the shipped set that the published book
(profiles/default.yml) does not report on, so that no verdict of the book is scored on the data its settings were
chosen on. --profile-concepts runs it on the book's own concepts instead (to look, not to choose).
"""
import argparse
import itertools
import json
import time

PROFILE = ["Harry Potter", "The Lord of the Rings", "Valentine's Day", "Austria", "France"]


def tuning_concepts(concept_set: str, n: int = 3) -> list[str]:
    """The first `n` concepts of the set that the default profile does not report on."""
    from pathlib import Path

    import yaml

    from dissect_unlearning import pipeline

    profile = Path(__file__).resolve().parents[1] / "profiles" / "default.yml"
    reported = set(yaml.safe_load(profile.read_text())["parameters"]["concepts"])
    return [c.name for c in pipeline.load_concepts(concept_set) if c.name not in reported][:n]


def parse_value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--concepts", default="builtin")
    ap.add_argument("--concept", action="append",
                    help="default: the first three concepts of the set that the default profile does not report on")
    ap.add_argument("--profile-concepts", action="store_true", help="the default profile's five concepts instead")
    ap.add_argument("--method", action="append", required=True)
    ap.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2", help="a setting and its values")
    args = ap.parse_args()

    from dissect_unlearning import pipeline

    grid = {}
    for g in args.grid:
        name, values = g.split("=", 1)
        grid[name] = [parse_value(v) for v in values.split(",")]
    combos = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())] or [{}]
    concepts = args.concept or (PROFILE if args.profile_concepts else tuning_concepts(args.concepts))
    print(f"concepts: {', '.join(concepts)}")
    print(f"{'method':<12} {'settings':<44} {'target':>7} {'unrel.':>7} {'tgt acc':>7}  ok  per-concept target/unrelated")
    for method in args.method:
        for combo in combos:
            t0 = time.time()
            df = pipeline.behaviour(args.model, args.concepts, select=concepts, methods=(method,), settings=combo,
                                    progress=False)
            after = df[(df.stage == "unlearned") & (df.metric.isin(["rougeL", "accuracy"]))]
            per = after.pivot_table(index="concept", columns=["split", "metric"], values="value", sort=False)
            tgt, unrel = per[("target", "rougeL")], per[("unrelated", "rougeL")]
            acc = per[("target", "accuracy")].mean() if ("target", "accuracy") in per else float("nan")
            ok = tgt.mean() <= 0.35 and unrel.mean() >= 0.6
            cells = " ".join(f"{t:.2f}/{u:.2f}" for t, u in zip(tgt, unrel))
            print(f"{method:<12} {json.dumps(combo):<44} {tgt.mean():7.3f} {unrel.mean():7.3f} {acc:7.2f}  "
                  f"{'yes' if ok else 'no ':<3} {cells}   ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
