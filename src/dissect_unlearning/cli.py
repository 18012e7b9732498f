"""The `dissect-unlearning` command. Each subcommand is a thin layer over the package's functions.

Every subcommand checks its arguments before it does any work: the flags here (argparse types, output paths), the
rest in the function it calls (pipeline.* check their own arguments first, book.build its profile and parameters).
A bad value ends the command with a one-line error and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import validate


def _int_flag(lo: int | None = None, hi: int | None = None):
    """An argparse type: an integer within [lo, hi], checked as the book checks its parameters."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if not validate.int_in_range(value, lo, hi):
            raise argparse.ArgumentTypeError(f"expected {validate.int_words(lo, hi)}, got {text!r}")
        return value
    return parse


def _number_flag(text: str) -> float:
    """An argparse type: a finite number (float() also reads 'nan' and 'inf', which no setting can use)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if not validate.is_number(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


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
    from . import pipeline, tables

    out = validate.check_output_file(args.out, "--out") if args.out else None
    df = pipeline.answers(args.model, args.concepts, select=args.concept or None, prompt_format=args.prompt_format,
                          max_new_tokens=args.max_new_tokens, include_unrelated=not args.target_only)
    if out:
        tables.write_parquet(df, out)
        print(f"wrote {len(df)} answers to {args.out}")
    target = df[df.kind == "target"]
    if target["correct"].notna().any():
        acc = target.groupby("concept", sort=False)["correct"].agg(["sum", "count"])
        for concept, r in acc.iterrows():
            print(f"{concept:<28} {int(r['sum'])}/{int(r['count'])} expected answers found")
    return 0


def _book_overrides(pairs) -> dict:
    from . import book

    return dict(book.parse_assignment(a) for a in pairs or [])


def _cmd_build(args) -> int:
    from . import book

    if args.output:
        validate.check_output_folder(args.output, "--output")
    report = book.build(args.profile, only=args.only, overrides=_book_overrides(args.param), force=args.force,
                        html=not args.no_html, output=args.output, jobs=args.jobs,
                        precompute=not args.no_precompute)
    print(f"[book] {len(report.executed)} chapter(s) executed, {len(report.reused)} reused, "
          f"{report.seconds:.1f} s in all")
    return 0


def _cmd_run(args) -> int:
    from . import book

    chapter = book.find_chapter(args.chapter)
    if args.list_params:
        # The -p values are checked as a run would check them, and shown with what they replace.
        overrides = book.check_overrides(_book_overrides(args.param), [chapter])
        values = book.resolve_parameters(chapter, book.load_profile(args.profile), overrides)
        print(book.describe_parameters(chapter))
        if overrides:
            declared = chapter.parameters()
            print("\nwith -p (checked):")
            for name in overrides:
                print(f"  {name} = {json.dumps(values[name])}  (default {json.dumps(declared[name].default)})")
        return 0
    if args.plan:
        plan = book.plan_chapter(chapter.stem, args.profile, _book_overrides(args.param))
        print(f"[plan] {chapter.stem} with profile {args.profile}: every value checked; nothing computed")
        for name, value in plan.params.items():
            print(f"  {name} = {json.dumps(value)}  ({plan.sources[name]})")
        stages = {}
        for r in plan.requests:
            stages.setdefault(r.stage, []).append(r)
        for stage, reqs in stages.items():
            pairs = sorted({f"{r.concept} / {r.method}" for r in reqs if r.concept})
            print(f"  asks for: {stage} x {len(reqs)}" + (f" ({', '.join(pairs)})" if pairs else ""))
        print("  an identical run is cached: it would be reused" if plan.cached
              else "  not cached: a run would execute it")
        return 0
    if args.output:
        validate.check_output_folder(args.output, "--output")
    report = book.build(args.profile, only=[chapter.stem], overrides=_book_overrides(args.param), force=args.force,
                        html=not args.no_html, output=args.output, jobs=args.jobs,
                        precompute=not args.no_precompute)
    run = report.runs[0]
    print(f"[book] {chapter.stem}: {'reused' if run.reused else 'executed'} in {run.seconds:.1f} s; "
          f"executed notebook: {run.notebook}")
    return 0


def _settings(args) -> dict:
    """Unlearning settings from the explicit flags and --set NAME=VALUE (VALUE read as JSON, else a string)."""
    out = {}
    for pair in args.set or []:
        if "=" not in pair:
            raise ValueError(f"--set {pair!r}: expected NAME=VALUE")
        name, value = pair.split("=", 1)
        try:
            out[name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[name.strip()] = value
    for name in ("steps", "epochs", "lr", "batch_size", "chunk_tokens", "params", "seed", "retain_weight", "beta"):
        if getattr(args, name, None) is not None:
            out[name] = getattr(args, name)
    if out.get("epochs") is not None and "steps" not in out:
        out["steps"] = None
    return out


def _cmd_unlearn(args) -> int:
    from . import pipeline

    if args.out:  # a checkpoint folder of its own: written over another one, the two would mix their files
        validate.check_output_folder(args.out, "--out", empty=True)
    u = pipeline.unlearned(args.model, args.concepts, args.concept, args.method, progress=not args.quiet,
                           **_settings(args))
    curve = u.loss_curve
    print(f"{u.method} on {u.concept!r} (retain {u.retain_concept!r}): {len(curve)} steps in {u.train_seconds:.1f} s; "
          f"forget loss {curve.forget_loss.iloc[0]:.3f} -> {curve.forget_loss.iloc[-1]:.3f}; "
          f"cache entry {u.size_bytes / 1e6:.1f} MB at {u.folder}")
    if args.out:
        print(f"wrote a Hugging Face checkpoint to {u.export(args.out)}")
    return 0


def _cmd_behaviour(args) -> int:
    from . import pipeline, tables

    out = validate.check_output_file(args.out, "--out") if args.out else None
    df = pipeline.behaviour(args.model, args.concepts, select=args.concept or None,
                            methods=tuple(args.method or ("grad_diff", "dpo", "npo")),
                            prompt_format=args.prompt_format, settings=_settings(args) or None,
                            progress=not args.quiet)
    if out:
        tables.write_parquet(df, out)
        print(f"wrote {len(df)} rows to {args.out}")
    table = df.pivot_table(index=["method", "split", "metric"], columns="stage", values="value", aggfunc="mean",
                           sort=False)
    print(table.round(3).to_string())
    return 0


def _cmd_sweep(args) -> int:
    from . import patching, pipeline, tables

    out = validate.check_output_file(args.out, "--out")
    layers = None
    if args.layers:
        try:
            layers = [int(x) for x in args.layers.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"--layers {args.layers!r}: give layer numbers, e.g. --layers 29 or --layers 27,28,29"
                             ) from None
    remote = {"none": False, "local": "local", "ndif": True}[args.remote]
    try:
        df = pipeline.sweep(args.vanilla, args.unlearned, args.concepts, args.concept, args.experiments.split(","),
                            window=args.window, layers=layers, alignment=args.alignment,
                            prompt_format=args.prompt_format, questions=args.questions, kind=args.kind,
                            direction="reverse" if args.reverse else "forward", remote=remote)
    except patching.RemoteUnavailableError as exc:
        print(f"dissect-unlearning: error: {exc}", file=sys.stderr)
        return 2
    tables.write_parquet(df, out)  # atomic: a failed run leaves no half-written file
    print(f"wrote {len(df)} rows to {args.out}")
    summary = patching.aggregate(df, by=("experiment", "center_layer")).dropna(subset=["mean"])
    for exp, grp in summary.groupby("experiment", sort=False):
        best = grp.loc[grp["mean"].idxmax()]
        print(f"{exp:<10} mean KRS {grp['mean'].mean():+.3f}; best window centred on layer {int(best.center_layer)}: "
              f"{best['mean']:+.3f} [{best.ci_low:+.3f}, {best.ci_high:+.3f}]")
    return 0


def _cmd_cache(args) -> int:
    import time

    from . import cache, versions

    try:
        if args.prune:
            removed = cache.prune(args.kind)
            root = cache.cache_root()
            for r in removed:
                size = f", {cache.format_bytes(r.bytes)}" if r.bytes else ""
                print(f"removed {r.path.relative_to(root)}: {r.what}{size}")
            print(f"freed {cache.format_bytes(sum(r.bytes for r in removed))} ({len(removed)} item(s) removed)"
                  if removed else "nothing to prune")
            return 0
        found = cache.contents(args.kind)
    except (cache.CacheError, OSError) as exc:
        print(f"dissect-unlearning: error: {exc}", file=sys.stderr)
        return 2
    libs = ", ".join(f"{k} {v}" for k, v in versions.library_versions().items())
    print(f"cache at {found.root} (code {versions.package_hash()}; {libs})")
    if not (found.entries or found.leftovers or found.unkeyed or found.dead_locks):
        print("empty")
        return 0
    now = time.time()
    if found.entries:
        print(f"\n{'kind':<16} {'key':<12} {'size':>10} {'age':>8}  status")
        for e in sorted(found.entries, key=lambda e: (e.kind, -e.built)):
            print(f"{e.kind:<16} {e.key[:12]:<12} {cache.format_bytes(e.bytes):>10} "
                  f"{cache.format_age(max(0.0, now - e.built)):>8}  {'stale: ' + e.stale if e.stale else 'current'}")
    print(f"\n{'kind':<16} {'entries':>7} {'stale':>5} {'size':>10}")
    kinds = sorted({e.kind for e in found.entries} | set(found.unkeyed))
    for kind in kinds:
        mine = [e for e in found.entries if e.kind == kind]
        size = sum(e.bytes for e in mine) + found.unkeyed.get(kind, 0)
        note = "  (includes files not keyed by the store, e.g. provisioned models)" if found.unkeyed.get(kind) else ""
        print(f"{kind:<16} {len(mine):>7} {sum(1 for e in mine if e.stale):>5} {cache.format_bytes(size):>10}{note}")
    if found.leftovers:
        gone = [t for t in found.leftovers if t.gone]
        print(f"{'(temporary)':<16} {len(found.leftovers):>7} {'':>5} "
              f"{cache.format_bytes(sum(t.bytes for t in found.leftovers)):>10}  "
              f"({len(gone)} left by writers that are gone)")
    total = sum(e.bytes for e in found.entries) + sum(found.unkeyed.values()) + sum(t.bytes for t in found.leftovers)
    print(f"{'all':<16} {len(found.entries):>7} {sum(1 for e in found.entries if e.stale):>5} "
          f"{cache.format_bytes(total):>10}")
    if found.dead_locks:
        print(f"{len(found.dead_locks)} lock file(s) still name a holder that died holding them")
    prunable = (sum(1 for e in found.entries if e.stale) + sum(1 for t in found.leftovers if t.gone)
                + len(found.dead_locks))
    if prunable:
        scope = f" --kind {args.kind}" if args.kind else ""
        print(f"{prunable} item(s) to remove: dissect-unlearning cache --prune{scope}")
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
    a.add_argument("--max-new-tokens", type=_int_flag(1), default=30)
    a.add_argument("--target-only", action="store_true", help="skip the unrelated questions")
    a.add_argument("--out", help="also write the table to this parquet file")
    a.set_defaults(func=_cmd_answers)

    # (unlearn, sweep, build, run: added by their issues, below this line)
    # Methods and experiments as registered (unlearning.methods, patching.experiments), added ones included.
    from .patching.experiments import EXPERIMENTS, PAPER_EXPERIMENTS
    from .unlearning.methods import names as method_names

    u = sub.add_parser("unlearn", help="unlearn one concept from a model by fine-tuning (cached)")
    u.add_argument("--model", default="smollm2-135m")
    u.add_argument("--concepts", default="builtin", help="'builtin', a JSON file, or hub:owner/dataset")
    u.add_argument("--concept", required=True, help="the concept to unlearn (name, label or id)")
    u.add_argument("--method", default="grad_diff", choices=method_names())
    _add_unlearning_flags(u)
    u.add_argument("--out", help="also write a Hugging Face checkpoint folder (config, weights, tokenizer, "
                   "unlearning.json) here")
    u.set_defaults(func=_cmd_unlearn)

    bh = sub.add_parser("behaviour", help="behavioural scores (BLEU, ROUGE-L, accuracy, perplexity) before and "
                        "after unlearning (cached)")
    bh.add_argument("--model", default="smollm2-135m")
    bh.add_argument("--concepts", default="builtin", help="'builtin', a JSON file, or hub:owner/dataset")
    bh.add_argument("--concept", action="append", help="restrict to this concept (repeatable; default: all)")
    bh.add_argument("--method", action="append", choices=method_names(),
                    help="unlearning method (repeatable; default: grad_diff, dpo, npo)")
    bh.add_argument("--prompt-format", default="auto", choices=["auto", "paper", "chat"])
    _add_unlearning_flags(bh)
    bh.add_argument("--out", help="write the tidy table to this parquet file")
    bh.set_defaults(func=_cmd_behaviour)

    sw = sub.add_parser("sweep", help="activation patching / parameter restoration sweep on a vanilla-unlearned pair, "
                        "scored by KRS (cached); writes a tidy parquet table (docs/sweep-schema.md)")
    sw.add_argument("--vanilla", default="smollm2-135m", help="registry name or checkpoint folder")
    sw.add_argument("--unlearned", required=True, help="checkpoint folder or model name of the unlearned model")
    sw.add_argument("--concepts", default="builtin", help="'builtin', a JSON file, or hub:owner/dataset")
    sw.add_argument("--concept", help="the concept whose questions are used (name, label or id)")
    sw.add_argument("--experiments", default=",".join(PAPER_EXPERIMENTS),
                    help="comma-separated: " + ", ".join(EXPERIMENTS))
    sw.add_argument("--window", type=_int_flag(1), default=5, help="size of the window centred on every layer")
    sw.add_argument("--layers", help="one explicit window instead, e.g. 29 or 27,28,29 (-1 = the last layer)")
    sw.add_argument("--alignment", default="answer", choices=["answer", "paper"],
                    help="scored positions: those predicting the answer, or the released code's rule")
    sw.add_argument("--prompt-format", default="auto", choices=["auto", "paper", "chat"])
    sw.add_argument("--questions", type=_int_flag(1), help="use only the first N questions")
    sw.add_argument("--kind", default="target", choices=["target", "unrelated"])
    sw.add_argument("--reverse", action="store_true", help="patch the unlearned model's window into the vanilla model")
    sw.add_argument("--remote", default="none", choices=["none", "local", "ndif"],
                    help="run the traces on NDIF (ndif, needs NDIF_API_KEY) or simulate that offline (local)")
    sw.add_argument("--out", required=True, help="the parquet file to write")
    sw.set_defaults(func=_cmd_sweep)

    b = sub.add_parser("build", help="execute the chapters (papermill, cached) and build the HTML book in _build/html")
    b.add_argument("--profile", default="default", help="profiles/<name>.yml or a path to a .yml (default: default)")
    b.add_argument("--only", action="append", metavar="CHAPTER", help="execute only this chapter (repeatable); "
                   "other pages keep their last build")
    b.add_argument("-p", "--param", action="append", metavar="NAME=VALUE",
                   help="override a parameter for every chapter that has it (value read as YAML)")
    b.add_argument("--force", action="store_true", help="execute even chapters whose inputs did not change")
    b.add_argument("--no-html", action="store_true", help="execute only; do not run Jupyter Book")
    b.add_argument("--output", help="folder that receives _build/ (default: the project folder)")
    b.add_argument("--jobs", type=_int_flag(1), default=min(2, os.cpu_count() or 1),
                   help="chapters executed side by side, each with cores/jobs torch threads (default: 2 where "
                        "there are 2 or more cores; 1 = one after another); also the precompute tasks run side "
                        "by side")
    _add_precompute_flag(b)
    b.set_defaults(func=_cmd_build)

    r = sub.add_parser("run", help="re-execute one chapter with a profile and -p overrides, then rebuild the HTML")
    r.add_argument("chapter", help="chapter: number (4), name (patching) or file stem (04_patching)")
    r.add_argument("--profile", default="default", help="profiles/<name>.yml or a path to a .yml (default: default)")
    r.add_argument("-p", "--param", action="append", metavar="NAME=VALUE",
                   help="set a parameter of the chapter (value read as YAML: 3, true, null, [a, b])")
    r.add_argument("--list-params", action="store_true", help="print the chapter's parameters and allowed values")
    r.add_argument("--plan", action="store_true", help="check the profile, the chapter and every -p value, and list "
                   "what the chapter would compute, without computing or executing anything (a dry run)")
    r.add_argument("--force", action="store_true", help="execute even if an identical run is cached")
    r.add_argument("--no-html", action="store_true", help="execute only; do not run Jupyter Book")
    r.add_argument("--output", help="folder that receives _build/ (default: the project folder)")
    r.add_argument("--jobs", type=_int_flag(1), default=min(2, os.cpu_count() or 1),
                   help="precompute tasks run side by side, each with cores/jobs torch threads (default: 2 where "
                        "there are 2 or more cores)")
    _add_precompute_flag(r)
    r.set_defaults(func=_cmd_run)

    c = sub.add_parser("cache", help="list the artefact cache (kind, key, size, age, stale?) and totals; --prune "
                       "removes stale entries and what killed builds left behind")
    c.add_argument("--kind", help="only this kind of entry (e.g. unlearned, chapter)")
    c.add_argument("--prune", action="store_true", help="remove stale entries (built by other code or library "
                   "versions), temporary folders of writers that are gone, and lock records of dead holders")
    c.set_defaults(func=_cmd_cache)
    return p


def _add_precompute_flag(p) -> None:
    p.add_argument("--no-precompute", action="store_true",
                   help="let each chapter compute what it needs itself, instead of first computing everything the "
                        "chapters need one unlearned model at a time (slower: each chapter reloads the models)")


def _add_unlearning_flags(p) -> None:
    g = p.add_argument_group("unlearning settings (default: the method's defaults)")
    g.add_argument("--steps", type=_int_flag(1))
    g.add_argument("--epochs", type=_number_flag, help="passes over the forget set (instead of --steps)")
    g.add_argument("--lr", type=_number_flag)
    g.add_argument("--batch-size", dest="batch_size", type=_int_flag(1))
    g.add_argument("--chunk-tokens", dest="chunk_tokens", type=_int_flag(1))
    g.add_argument("--params", help="all | mlp | last_k:K | lora (an adapter: --set lora_rank=8 lora_alpha=16 "
                   "lora_targets=auto)")
    g.add_argument("--seed", type=_int_flag())
    g.add_argument("--retain-weight", dest="retain_weight", type=_number_flag)
    g.add_argument("--beta", type=_number_flag)
    g.add_argument("--set", action="append", metavar="NAME=VALUE", help="any other setting (value read as JSON)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv=None) -> int:
    from .cache import CacheError
    from .concepts import ConceptDataError
    from .models import ModelError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        from .progress import Stopped, stop_reason

        print(f"dissect-unlearning: stopped by {stop_reason(exc)}", file=sys.stderr)
        return 128 + (exc.signum if isinstance(exc, Stopped) else 2)
    except (ModelError, ConceptDataError, CacheError, ValueError, KeyError) as exc:
        print(f"dissect-unlearning: error: {validate.one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
