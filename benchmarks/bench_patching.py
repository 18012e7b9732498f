"""Benchmark: the paper's approach (benchmarks/paper_baseline.py) against the nnsight engine, in one process.

A full sweep of the paper's four experiments (coef, attn, coef+attn, value) over every centred window, on 10
questions, on the same vanilla/unlearned pair. Prints both times, the ratio and the largest |KRS difference|.

    .venv/bin/python benchmarks/bench_patching.py                 # default model, 10 questions, 1 thread
    .venv/bin/python benchmarks/bench_patching.py --repeats 2     # best of 2 runs of each

The "unlearned" model is made here: a few steps of gradient ascent on the vanilla answers' likelihood (or, with
--unlearn noise, Gaussian noise on the last layers' weights), enough to give every question a non-zero loss.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_baseline import paper_sweep  # noqa: E402

from dissect_unlearning import models, patching, prompts  # noqa: E402

QUESTIONS = [
    "Who wrote the Harry Potter books?", "What is the name of Harry Potter's school?",
    "Who is the main villain in Harry Potter?", "Who is Harry Potter's best friend?",
    "What sport do the students play on broomsticks in Harry Potter?", "What is the name of Harry Potter's owl?",
    "Which house is Harry Potter sorted into?", "Who is the headmaster of Hogwarts?",
    "What is the name of the wizard bank in Harry Potter?", "What is the first Harry Potter book called?",
]


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def make_unlearned(vanilla, tok, prompt_ids, answer_ids, how: str, steps: int = 3, lr: float = 2e-5):
    unlearned = copy.deepcopy(vanilla)
    torch.manual_seed(0)
    if how == "noise":
        n = models.n_layers(vanilla)
        with torch.no_grad():
            for name, p in unlearned.named_parameters():
                if any(f"layers.{i}." in name for i in range(n - 6, n)):
                    p.add_(torch.randn_like(p) * p.std() * 0.05)
    else:  # gradient ascent on the vanilla answers (what an unlearning method starts from)
        batch = prompts.teacher_forcing_batch(prompt_ids, answer_ids, tok.pad_token_id)
        labels = torch.where(batch.answer_mask, batch.input_ids.roll(-1, dims=1), -100)
        unlearned.train()
        opt = torch.optim.AdamW(unlearned.parameters(), lr=lr, weight_decay=0.01)
        for _ in range(steps):
            logits = unlearned(**batch.model_inputs()).logits
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            (-nll).backward()
            opt.step()
            opt.zero_grad()
        unlearned.eval()
    return unlearned


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--alignment", default="answer", choices=patching.ALIGNMENTS)
    ap.add_argument("--experiments", default=",".join(patching.PAPER_EXPERIMENTS))
    ap.add_argument("--unlearn", default="ga", choices=["ga", "noise"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = stable timings on a shared machine)")
    ap.add_argument("--repeats", type=int, default=1, help="time each side this many times, keep the best")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    vanilla, tok = models.load(args.model)
    questions = QUESTIONS[:args.questions]
    t0 = time.perf_counter()
    fmt = prompts.resolve_format("auto", tok)
    answers = prompts.generate_answers(vanilla, tok, questions, fmt, max_new_tokens=30)
    prompt_ids, answer_ids = [a.prompt_ids for a in answers], [a.answer_ids for a in answers]
    unlearned = make_unlearned(vanilla, tok, prompt_ids, answer_ids, args.unlearn)
    print(f"setup (answers + unlearned model): {time.perf_counter() - t0:.1f} s; model {args.model}, "
          f"{models.n_layers(vanilla)} layers, {len(questions)} questions, prompt format {fmt}, "
          f"threads {torch.get_num_threads()}", flush=True)
    experiments = args.experiments.split(",")
    inputs = patching.scoring_inputs(prompt_ids, answer_ids, tok, args.alignment, layout="padded")
    packed = patching.scoring_inputs(prompt_ids, answer_ids, tok, args.alignment)
    print(f"teacher-forced batch {tuple(inputs.model_inputs['input_ids'].shape)} (the engine packs it into "
          f"{tuple(packed.model_inputs['input_ids'].shape)}), {len(inputs.cols)} scored positions", flush=True)

    before = {k: v.clone() for k, v in unlearned.state_dict().items()}
    # Wall time, and CPU time of this process: on a machine shared with other work the CPU time is the steadier
    # measure of the work each side does (with one torch thread it is the time the work holds a core).
    times = {"paper": [], "ours": []}
    for _ in range(args.repeats):
        (paper, _), wall, cpu = timed(lambda: paper_sweep(vanilla, unlearned, inputs, experiments, args.window))
        times["paper"].append((wall, cpu))
        print(f"paper-style hooks: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
        ours, wall, cpu = timed(lambda: patching.run(vanilla, unlearned, tok, prompt_ids, answer_ids, experiments,
                                                     window=args.window, alignment=args.alignment))
        times["ours"].append((wall, cpu))
        print(f"nnsight engine:    {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)

    diff = 0.0
    for exp in experiments:
        for layer, krs in paper[exp].items():
            got = ours[(ours.experiment == exp) & (ours.center_layer == layer)].sort_values("question_index")
            diff = max(diff, max(abs(a - b) for a, b in zip(got.krs, krs)))
    unchanged = all(torch.equal(before[k], v) for k, v in unlearned.state_dict().items())
    pw, ow = (min(wall for wall, _ in times[k]) for k in ("paper", "ours"))
    pc, oc = (min(cpu for _, cpu in times[k]) for k in ("paper", "ours"))
    print(f"\nfull sweep ({', '.join(experiments)}; {models.n_layers(vanilla)} windows of {args.window}; "
          f"{len(questions)} questions; alignment {args.alignment}; best of {args.repeats})")
    print(f"paper-style: {pw:.1f} s wall / {pc:.1f} s CPU   nnsight engine: {ow:.1f} s wall / {oc:.1f} s CPU")
    print(f"speed-up: {pw / ow:.2f}x wall, {pc / oc:.2f}x CPU   max |KRS difference|: {diff:.2e}   "
          f"unlearned model unchanged: {unchanged}")
    print("mean KRS per experiment:",
          {e: round(float(ours[ours.experiment == e].krs.mean()), 4) for e in experiments})
    return 0


if __name__ == "__main__":
    sys.exit(main())
