"""The precompute stage of a profile, by two versions of the code, one right after the other, in one run.

    python benchmarks/bench_precompute.py [--profile default] [--baseline REF] [--only "Harry Potter/dpo"] [--jobs 2]

The baseline is the package as committed at REF (default HEAD: the working tree against its last commit), taken
with `git archive` into a temporary folder; the current version is this working tree's src/. Each runs the
precompute stage of the profile (book.build's first stage: every artefact the chapters will read) in a fresh cache
of its own, seeded with the provisioned models of $DISSECT_UNLEARNING_CACHE (hard links, so nothing is provisioned
again), in a subprocess. `--only` keeps the tasks whose label contains one of the given strings (repeatable), to
measure a part of the profile; training stages always come with their task.

Printed for each version: wall time, core-seconds (user + system CPU of the whole process tree, from the kernel's
accounting of waited-for children), core-seconds by stage where the version records them, and the peak memory of
the process tree (the sum of PSS: pages shared between processes counted once, sampled every second). Then the
ratios current / baseline and the comparison of every artefact both computed (matched by their inputs): unlearned
weights by checksum, every table's numeric columns by their largest absolute difference (the other columns must be
equal), so a speed-up that changed a number shows here.
Timings on a shared machine are noisy; the ratios come from one run on one machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("answers", "sweep", "coef_change", "behaviour", "relearn")
GB = 2**30

CHILD = r"""
import json, sys, time
src, profile, only, jobs, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
sys.path.insert(0, src)
from pathlib import Path
from dissect_unlearning import book, precompute
root = Path(sys.argv[6])
prof = book.load_profile(profile, root)
plan = [(ch, *book.resolve_parameters(ch, prof, {}, with_sources=True)) for ch in book.chapters(root) if ch.in_toc]
everything = precompute.tasks
def chosen(p):
    return [t for t in everything(p) if not only or any(s in t.label for s in only)]
precompute.tasks = chosen
labels = [t.label for t in chosen(plan)]
t0 = time.time()
results = precompute.run(plan, jobs=jobs, verbose=False)
json.dump({"tasks": labels, "results": results, "wall": time.time() - t0}, open(out, "w"), default=str)
"""


def pss_of_tree(pid: int) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from dissect_unlearning import progress

    return sum(progress.memory_of(p)[1] for p in [pid, *progress.descendants(pid)])


def run_version(name: str, src: Path, book_root: Path, args, seed: Path, work: Path) -> dict:
    cache = work / f"cache-{name}"
    cache.mkdir(parents=True)
    for kind in ("models", "fingerprints"):
        if (seed / kind).is_dir():
            subprocess.run(["cp", "-al", str(seed / kind), str(cache / kind)], check=True)
    out = work / f"{name}.json"
    env = {**os.environ, "DISSECT_UNLEARNING_CACHE": str(cache), "PYTHONPATH": str(src)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(src), args.profile, json.dumps(args.only or []),
                             str(args.jobs), str(out), str(book_root)], env=env)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], pss_of_tree(proc.pid))
            time.sleep(1)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    code = proc.wait()
    wall = time.time() - t0
    watcher.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        raise SystemExit(f"{name}: the precompute subprocess exited with {code}")
    data = json.loads(out.read_text())
    cpu_by_stage, wall_by_stage = {}, {}
    for r in data["results"]:
        if r["error"]:
            print(f"{name}: {r['label']} FAILED:\n{r['error']}", file=sys.stderr)
        for stage in r["stages"]:
            wall_by_stage[stage[0]] = wall_by_stage.get(stage[0], 0.0) + stage[1]
            if len(stage) > 2:
                cpu_by_stage[stage[0]] = cpu_by_stage.get(stage[0], 0.0) + stage[2]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"name": name, "cache": cache, "wall": wall, "cpu": cpu, "peak": peak[0], "tasks": data["tasks"],
            "cpu_by_stage": cpu_by_stage, "wall_by_stage": wall_by_stage}


def entries(cache: Path, kind: str) -> dict:
    """{canonical inputs: folder} of the complete entries of one kind. An input that names another entry of the
    cache by its key (a key includes the code's fingerprint, so two versions never share one) is replaced by that
    entry's own inputs, so that the same artefact of both versions is matched."""
    inputs = {meta.parent.name: json.loads(meta.read_text()).get("inputs")
              for meta in cache.glob("*/*/inputs.json")}

    def resolved(value, depth=0):
        if isinstance(value, str) and value in inputs and depth < 8:
            return {"entry": resolved(inputs[value], depth + 1)}
        if isinstance(value, dict):
            return {k: resolved(v, depth) for k, v in value.items()}
        if isinstance(value, list):
            return [resolved(v, depth) for v in value]
        return value

    found = {}
    for meta in sorted((cache / kind).glob("*/inputs.json")):
        found[json.dumps(resolved(inputs[meta.parent.name]), sort_keys=True)] = meta.parent
    return found


def compare(a: Path, b: Path) -> list[str]:
    import numpy as np
    import pandas as pd

    lines = []
    ua, ub = entries(a, "unlearned"), entries(b, "unlearned")
    common = sorted(set(ua) & set(ub))
    same = sum(json.loads((ua[k] / "delta.json").read_text())["sha256"]
               == json.loads((ub[k] / "delta.json").read_text())["sha256"] for k in common)
    lines.append(f"unlearned models: {len(common)} in both, {same} with identical weights (sha256)")
    for kind in KINDS:
        ea, eb = entries(a, kind), entries(b, kind)
        common = sorted(set(ea) & set(eb))
        worst, unequal = 0.0, 0
        for k in common:
            (fa,), (fb,) = list(ea[k].glob("*.parquet")), list(eb[k].glob("*.parquet"))
            ta, tb = pd.read_parquet(fa), pd.read_parquet(fb)
            if list(ta.columns) != list(tb.columns) or len(ta) != len(tb):
                unequal += 1
                continue
            for col in ta.columns:
                x, y = ta[col], tb[col]
                if pd.api.types.is_float_dtype(x) and pd.api.types.is_float_dtype(y):
                    both_nan = x.isna() & y.isna()
                    diff = (x - y).abs()[~both_nan]
                    worst = max(worst, float(diff.max()) if len(diff) else 0.0)
                    if diff.isna().any():
                        unequal += 1
                elif not all(np.array_equal(np.asarray(p), np.asarray(q)) if hasattr(p, "__len__") and
                             not isinstance(p, str) else p == q for p, q in zip(x, y)):
                    unequal += 1
        lines.append(f"{kind}: {len(common)} tables in both (of {len(ea)} / {len(eb)}); largest |difference| "
                     f"{worst:.3g}; {unequal} with other columns or shapes unequal")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="default")
    ap.add_argument("--baseline", default="HEAD", help="git ref of the baseline code (default HEAD)")
    ap.add_argument("--only", action="append", help="keep the tasks whose label contains this (repeatable)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--work", help="folder for the two caches (default: a temporary folder, removed)")
    args = ap.parse_args()
    seed = Path(os.environ.get("DISSECT_UNLEARNING_CACHE") or Path.home() / ".cache" / "dissect-unlearning")
    with tempfile.TemporaryDirectory(prefix="bench-precompute-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        base = work / "baseline"
        base.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "src", "notebooks", "profiles",
                                  "_toc.yml", "_config.yml"], check=True, capture_output=True).stdout
        archive_path = work / "baseline.tar"
        archive_path.write_bytes(archive)
        with tarfile.open(archive_path) as tar:
            tar.extractall(base, filter="data")
        runs = [run_version("baseline", base / "src", base, args, seed, work),
                run_version("current", ROOT / "src", ROOT, args, seed, work)]
        print(f"\nprofile {args.profile}, {len(runs[0]['tasks'])} task(s) (baseline: {args.baseline}), "
              f"{args.jobs} job(s), {os.cpu_count()} cores")
        for r in runs:
            stages = r["cpu_by_stage"] or r["wall_by_stage"]
            what = "core-s" if r["cpu_by_stage"] else "wall-s (one thread per worker)"
            print(f"{r['name']:>9}: wall {r['wall']:7.0f} s, core-seconds {r['cpu']:7.0f}, peak memory "
                  f"{r['peak'] / GB:5.1f} GB; by stage ({what}): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in sorted(stages.items(), key=lambda kv: -kv[1])))
        a, b = runs
        print(f"    ratio: wall {b['wall'] / a['wall']:.2f}, core-seconds {b['cpu'] / a['cpu']:.2f}, "
              f"peak memory {b['peak'] / max(a['peak'], 1):.2f}  (current / baseline)")
        for line in compare(a["cache"], b["cache"]):
            print("    " + line)


if __name__ == "__main__":
    main()
