"""Time of one unlearning run (default settings) end to end, per step, and which settings dominate it.

    python benchmarks/bench_unlearning.py [--model smollm2-135m] [--concept "Harry Potter"]
                                          [--method grad_diff --method npo ...] [--ablate]

One "run" = what `pipeline.unlearned` does on a cache miss once the vanilla answers exist: load the model, build the
data, compute reference log-probs (NPO/DPO), train, load the vanilla model again and store the weights as a
compressed delta. The budget is 90 s per run on the 2-core machine. `--ablate` then times a few steps of the
default settings with one setting changed, to show what the time per step depends on (ratios from this one run).
Timings on a shared machine are noisy: compare the ratios, and the load average printed with them.
"""
import argparse
import os
import shutil
import statistics
import tempfile
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--concepts", default="builtin")
    ap.add_argument("--concept", default="Harry Potter")
    ap.add_argument("--method", action="append", help="repeatable; default grad_diff")
    ap.add_argument("--ablate", action="store_true", help="also time steps with one setting changed")
    ap.add_argument("--ablate-steps", type=int, default=3)
    args = ap.parse_args()

    import torch

    from dissect_unlearning import models, pipeline, prompts
    from dissect_unlearning.unlearning import UnlearnConfig, artefact, data, trainer

    cset = pipeline.load_concepts(args.concepts)
    concept = cset.get(args.concept)
    tok = models.load_tokenizer(args.model)
    fmt = prompts.resolve_format("auto", tok)
    print(f"torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}, load average "
          f"{os.getloadavg()[0]:.1f} (other processes share these cores: timings are noisy)")
    retain = data.choose_retain(cset, concept, UnlearnConfig().seed)
    qa = pipeline.vanilla_qa(args.model, [concept, retain], fmt)  # cached; not part of a run

    for method in args.method or ["grad_diff"]:
        cfg = UnlearnConfig.for_method(method, prompt_format=fmt)
        folder = tempfile.mkdtemp(prefix="bench-unlearn-")
        try:
            t0 = time.perf_counter()
            rec = artefact.build(folder, args.model, concept, retain, cfg, qa=qa[concept.label],
                                 retain_qa=qa[retain.label], progress=False)
            total = time.perf_counter() - t0
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        curve = rec["loss_curve"]
        step_times = [b["seconds"] - a["seconds"] for a, b in zip(curve, curve[1:])]
        first = curve[0]["seconds"] - rec["reference_seconds"]
        per_step = statistics.median(step_times) if step_times else first
        other = total - rec["train_seconds"] - rec["store_seconds"]
        print(f"\n{method} on {concept.label!r} (retain {retain.label!r}): {rec['n_steps']} steps x batch "
              f"{cfg.batch_size}, {rec['n_forget']} forget examples, chunk {cfg.chunk_tokens} tokens, params "
              f"{cfg.params} ({rec['n_trainable'] / 1e6:.1f}M trained)")
        print(f"  run total      {total:6.1f} s   (budget 90 s: {'OK' if total <= 90 else 'OVER'})")
        print(f"  load + data    {other:6.1f} s")
        print(f"  reference      {rec['reference_seconds']:6.1f} s   (NPO/DPO vanilla log-probs, once)")
        print(f"  training       {rec['train_seconds'] - rec['reference_seconds']:6.1f} s   "
              f"(per step: median {per_step:.2f} s, first {first:.2f} s)")
        print(f"  store delta    {rec['store_seconds']:6.1f} s   ({rec['storage']['bytes'] / 1e6:.1f} MB, "
              f"{rec['storage']['encoding']})")

    if args.ablate:
        method = (args.method or ["grad_diff"])[0]
        base = UnlearnConfig.for_method(method, prompt_format=fmt, steps=args.ablate_steps, warmup_steps=0)
        variants = [("default", {}),
                    ("batch_size / 2", {"batch_size": max(1, base.batch_size // 2)}),
                    ("batch_size x 2", {"batch_size": base.batch_size * 2}),
                    ("chunk_tokens / 2", {"chunk_tokens": base.chunk_tokens // 2}),
                    ("chunk_tokens x 2", {"chunk_tokens": base.chunk_tokens * 2,
                                          "max_length": max(base.max_length, base.chunk_tokens * 2)}),
                    ("params=mlp", {"params": "mlp"}),
                    ("params=last_k:4", {"params": "last_k:4"})]
        if method != "idk_dpo":
            variants.append(("forget_data=text+qa", {"forget_data": "text+qa"}))
        model, tok = models.load(args.model)
        vanilla = {k: v.clone() for k, v in model.state_dict().items()}
        print(f"\nper-step time of {method}, {args.ablate_steps} steps each (load average "
              f"{os.getloadavg()[0]:.1f}):")
        ref_time = None
        for name, change in variants:
            cfg = base.replace(**change)
            model.load_state_dict(vanilla)
            res = trainer.unlearn(model, tok, concept, retain, cfg, qa=qa[concept.label], retain_qa=qa[retain.label],
                                  progress=False)
            per_step = (res.seconds - res.reference_seconds) / res.n_steps
            ref_time = ref_time or per_step
            print(f"  {name:<18} {per_step:6.2f} s/step  x{per_step / ref_time:4.2f}   "
                  f"(reference log-probs {res.reference_seconds:.1f} s)")


if __name__ == "__main__":
    main()
