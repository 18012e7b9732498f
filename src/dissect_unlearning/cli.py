"""The `dissect-unlearning` command. Each subcommand is a thin layer over the package's functions."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_models(args) -> int:
    from . import models

    if args.provision:
        for name in args.provision:
            models.provision(name)
    rows = [models.describe(n) for n in models.REGISTRY]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'name':<14} {'family':<12} {'layers':>6} {'parameters':>12}  {'provisioned':<11} cache / status"
    print(header)
    print("-" * len(header))
    for r in rows:
        params = f"{r['parameters'] / 1e6:.1f}M" if r["parameters"] else "-"
        where = r["cache"] if r["provisioned"] else r["status"]
        print(f"{r['name']:<14} {r['family']:<12} {r['layers'] or '-':>6} {params:>12}  "
              f"{'yes' if r['provisioned'] else 'no':<11} {where}")
    print("\nAlso accepted wherever a model is asked for: a local checkpoint folder, or a Hugging Face id such as "
          + ", ".join(models.PAPER_MODELS.values()) + " (needs hub access).")
    return 0


def _cmd_answers(args) -> int:
    from . import pipeline

    df = pipeline.answers(args.model, args.concepts, select=args.concept or None, prompt_format=args.prompt_format,
                          max_new_tokens=args.max_new_tokens, include_unrelated=not args.target_only)
    if args.out:
        df.to_parquet(args.out, index=False)
        print(f"wrote {len(df)} answers to {args.out}")
    target = df[df.kind == "target"]
    if target["correct"].notna().any():
        acc = target.groupby("concept", sort=False)["correct"].agg(["sum", "count"])
        for concept, r in acc.iterrows():
            print(f"{concept:<28} {int(r['sum'])}/{int(r['count'])} expected answers found")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dissect-unlearning", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list the model registry (and provision models)")
    m.add_argument("--provision", nargs="+", metavar="NAME", help="de-quantise these registry models now")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=_cmd_models)

    a = sub.add_parser("answers", help="greedy vanilla answers of a model to a concept set (cached)")
    a.add_argument("--model", default="smollm2-135m")
    a.add_argument("--concepts", default="builtin", help="'builtin', a JSON file, or hub:owner/dataset")
    a.add_argument("--concept", action="append", help="restrict to this concept (repeatable)")
    a.add_argument("--prompt-format", default="auto", choices=["auto", "paper", "chat"])
    a.add_argument("--max-new-tokens", type=int, default=30)
    a.add_argument("--target-only", action="store_true", help="skip the unrelated questions")
    a.add_argument("--out", help="also write the table to this parquet file")
    a.set_defaults(func=_cmd_answers)

    # (unlearn, sweep, build, run: added by their issues, below this line)
    return p


def main(argv=None) -> int:
    from .concepts import ConceptDataError
    from .models import ModelError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ModelError, ConceptDataError, ValueError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"dissect-unlearning: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
