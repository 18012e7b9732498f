"""How to spend the cores: one process with every thread, or one single-threaded process per core?

    python benchmarks/bench_threads.py [--model smollm2-135m] [--passes 6] [--train-steps 1]

The same fixed work (patched forward passes of the patching engine on 10 Harry Potter questions, and optionally
training steps of the default unlearning batch) is run three ways, one after the other:
  A. one process, one torch thread
  B. one process, one torch thread per core
  C. one single-threaded process per core, all at once (what `build --jobs <cores>` does)
and the script prints, for each, the seconds per unit of work (wall) and the core-seconds per unit, and the
throughput of B and C relative to A. On a machine whose cores share a memory bus and caches, C's processes slow each
other down; B's threads split each matrix product instead. The numbers decide how the build spreads its work.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORK = r"""
import json, sys, time, torch, copy
threads, passes, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
from dissect_unlearning import models, prompts
from dissect_unlearning.patching import batch as B
m, tok = models.load(sys.argv[4])
qs = ["Who wrote the Harry Potter books?", "What is the name of Harry Potter's school?",
      "Who is the main villain in Harry Potter?", "Who is Harry Potter's best friend?",
      "What sport do the students play on broomsticks in Harry Potter?", "What is the name of Harry Potter's owl?",
      "Which house is Harry Potter sorted into?", "Who is the headmaster of Hogwarts?",
      "What is the name of the wizard bank in Harry Potter?", "What is the first Harry Potter book called?"]
fmt = prompts.resolve_format("auto", tok)
P = [prompts.encode_prompt(q, tok, fmt) for q in qs]
A = [tok(" The answer to this question is a name from the books, as everyone knows.")["input_ids"]] * len(qs)
inp = B.scoring_inputs(P, A, tok, "answer", "auto")
out = {}
with torch.no_grad():
    m(**inp.model_inputs, logits_to_keep=inp.keep)  # warm-up
    w, c = time.perf_counter(), time.process_time()
    for _ in range(passes):
        m(**inp.model_inputs, logits_to_keep=inp.keep)
    out["pass"] = [(time.perf_counter() - w) / passes, (time.process_time() - c) / passes]
if steps:
    torch.manual_seed(0)
    ids = torch.randint(0, len(tok), (16, 200))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
    m.train()
    w, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        logp = prompts.token_logprobs(m, ids, torch.ones_like(ids), ids)
        (-logp.mean()).backward()
        opt.step()
        opt.zero_grad()
    out["train step"] = [(time.perf_counter() - w) / steps, (time.process_time() - c) / steps]
print("RESULT " + json.dumps(out))
"""


def launch(threads: int, args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORK, str(threads), str(args.passes), str(args.train_steps),
                             args.model], stdout=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"a benchmark process failed ({proc.returncode})")
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--passes", type=int, default=6)
    ap.add_argument("--train-steps", type=int, default=1)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    t0 = time.time()
    a = result(launch(1, args))
    b = result(launch(cores, args))
    procs = [launch(1, args) for _ in range(cores)]
    c = [result(p) for p in procs]
    print(f"{cores} cores, load average before the last run {os.getloadavg()[0]:.1f}, {time.time() - t0:.0f} s")
    for unit in a:
        one, every = a[unit], b[unit]
        each = [r[unit] for r in c]
        wall_c = max(w for w, _ in each)
        print(f"{unit}:  A 1 thread {one[0]:.2f} s ({one[1]:.2f} core-s) | B {cores} threads {every[0]:.2f} s "
              f"({every[1]:.2f} core-s) | C {cores} x 1 thread {wall_c:.2f} s each ({sum(x for _, x in each) / cores:.2f} "
              f"core-s each)")
        print(f"   throughput vs A: B {one[0] / every[0]:.2f}x, C {cores * one[0] / wall_c:.2f}x  "
              f"(ideal {cores}x)")


if __name__ == "__main__":
    main()
