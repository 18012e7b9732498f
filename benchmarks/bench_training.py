"""One unlearning run (a cache miss) by two versions of the code, one right after the other: peak memory, time,
and whether the trained weights are the same.

    python benchmarks/bench_training.py [--baseline REF] [--model smollm2-135m] [--concept "Harry Potter"]
                                        [--method grad_diff] [--threads 2]

The baseline is the package as committed at REF (default HEAD~1), taken with `git archive`; the current version is
this working tree's src/. Each trains in a fresh cache of its own (seeded with the provisioned models of
$DISSECT_UNLEARNING_CACHE, hard links) in a subprocess, and reports its peak resident memory (ru_maxrss), wall and
CPU seconds, and the sha256 of the trained weights (delta.json), so a memory saving that changed a weight shows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(int(sys.argv[5]))
from dissect_unlearning import pipeline
t, c = time.time(), time.process_time()
u = pipeline.unlearned(sys.argv[2], "builtin", sys.argv[3], sys.argv[4], progress=False)
print("RESULT " + json.dumps({"wall": time.time() - t, "cpu": time.process_time() - c,
      "sha256": json.load(open(u.folder / "delta.json"))["sha256"],
      "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def run(src: Path, args, seed: Path, work: Path, name: str) -> dict:
    cache = work / f"cache-{name}"
    cache.mkdir()
    for kind in ("models", "fingerprints"):
        if (seed / kind).is_dir():
            subprocess.run(["cp", "-al", str(seed / kind), str(cache / kind)], check=True)
    env = {**os.environ, "DISSECT_UNLEARNING_CACHE": str(cache), "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(src), args.model, args.concept, args.method,
                          str(args.threads)], env=env, capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{name}: the training subprocess failed:\n{out.stderr[-3000:]}")
    return json.loads(line[7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="HEAD~1")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--concept", default="Harry Potter")
    ap.add_argument("--method", default="grad_diff")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    seed = Path(os.environ.get("DISSECT_UNLEARNING_CACHE") or Path.home() / ".cache" / "dissect-unlearning")
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        work = Path(tmp)
        blob = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "src"], check=True,
                              capture_output=True).stdout
        (work / "base.tar").write_bytes(blob)
        with tarfile.open(work / "base.tar") as tar:
            tar.extractall(work / "base", filter="data")
        a = run(work / "base" / "src", args, seed, work, "baseline")
        b = run(ROOT / "src", args, seed, work, "current")
    print(f"{args.model} / {args.concept} / {args.method}, {args.threads} thread(s), baseline {args.baseline}")
    for name, r in (("baseline", a), ("current", b)):
        print(f"{name:>9}: peak {r['peak_gb']:.2f} GB, wall {r['wall']:.0f} s, cpu {r['cpu']:.0f} s, "
              f"weights {r['sha256'][:16]}")
    print(f"    ratio: peak {b['peak_gb'] / a['peak_gb']:.2f}, wall {b['wall'] / a['wall']:.2f}; weights "
          f"{'identical' if a['sha256'] == b['sha256'] else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
