"""Relearning with and without gradient checkpointing, each in a fresh process: seconds per step, peak resident
memory, and whether the two runs end with the same weights (they must: checkpointing recomputes the same forward).

    python benchmarks/bench_relearn.py [--steps 8] [--data unrelated] [--threads N]

The model is the lab profile's unlearned model (smollm2-135m, Harry Potter, grad_diff, six questions; trained and
cached on first use), relearned as chapter 8 does (lr 1e-5, batch 4, seed 0) for --steps steps, without the
evaluations. Prints one line per run and the ratios, measured in this one invocation.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import hashlib, json, resource, sys, time
import torch
from dissect_unlearning import concepts, models, pipeline, prompts
from dissect_unlearning.unlearning import relearn as relearn_mod
recompute, steps, data, threads = json.loads(sys.argv[1])
if threads:
    torch.set_num_threads(threads)
cset = concepts.concept_set("builtin", 6, 4)
u = pipeline.unlearned("smollm2-135m", cset, "Harry Potter", "grad_diff", progress=False)
model, tok = u.load()
target = cset.get("Harry Potter")
retain = cset.get(u.retain_concept)
van = pipeline.answers("smollm2-135m", concepts.ConceptSet([target], cset.source), prompt_format=u.config.prompt_format,
                       include_unrelated=False, progress=False)
van = van[van.kind == "target"].sort_values("question_index")
qa = [(q, list(p), list(a)) for q, p, a in zip(van.question, van.prompt_ids, van.answer_ids)]
others = [c for c in cset if c.name not in (target.name, retain.name)]
other, _ = relearn_mod.unrelated_concept(target, others, list(van.answer_text))
train, _ = relearn_mod.examples(tok, data, target, other, qa, u.config.chunk_tokens, u.config.max_length)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
relearn_mod.relearn(model, tok, train, [steps], lambda m, k: [], lr=1e-5, batch_size=4, seed=0, progress=False,
                    recompute=recompute)
seconds = time.perf_counter() - t0
h = hashlib.sha256()
for _, p in sorted(model.named_parameters()):
    h.update(p.detach().numpy().tobytes())
print(json.dumps({"seconds": seconds, "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "before_gb": base / 2**20, "weights": h.hexdigest()[:16], "tokens_per_step": 4 * max(
                      len(e.input_ids) if hasattr(e, "input_ids") else 0 for e in train)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--data", default="unrelated", choices=["unrelated", "partial"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    runs = {}
    for recompute in (True, False):
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([recompute, args.steps, args.data, args.threads])],
                             check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        runs[recompute] = json.loads(out)
        r = runs[recompute]
        print(f"recompute={recompute!s:5}: {r['seconds'] / args.steps:.2f} s/step, peak RSS {r['peak_gb']:.2f} GB "
              f"(after loading {r['before_gb']:.2f} GB), weights {r['weights']}")
    on, off = runs[True], runs[False]
    print(f"speed-up without recomputation: {on['seconds'] / off['seconds']:.2f}x; extra peak memory "
          f"{off['peak_gb'] - on['peak_gb']:+.2f} GB; same weights: {on['weights'] == off['weights']}")


if __name__ == "__main__":
    main()
