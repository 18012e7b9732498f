"""Full fine-tuning vs adapter unlearning on one concept: how much each forgets, and where KRS finds the change.

    python benchmarks/compare_adapter.py                       # smollm2-135m, Harry Potter, grad_diff, defaults
    python benchmarks/compare_adapter.py --lora-lr 1e-3        # the adapter at its own learning rate as well

Both runs use the method's default settings (the adapter: params="lora" with its default rank, alpha and targets,
and the same learning rate unless --lora-lr adds a run at another). Forgetting is the teacher-forced answer loss
(mean NLL per token of the vanilla answers) on the concept's target questions, and on its unrelated questions for
what should be kept. The KRS curve is chapter 4's: the paper's four experiments over centred windows of 5 layers,
mean over the target questions. The adapter's curve is computed with the adapter applied inside the traces (the
path NDIF would run, here remote=False) and checked against the local engine on its merged weights.
Both unlearned models are cached like any other; a second call only re-scores.
"""
from __future__ import annotations

import argparse
import time

import torch

from dissect_unlearning import models, patching, pipeline, prompts


def answer_loss(model, tok, rows) -> float:
    """Mean NLL per answer token of the vanilla answers, teacher forced."""
    p, a = pipeline._ids(rows.prompt_ids), pipeline._ids(rows.answer_ids)
    batch = prompts.teacher_forcing_batch(p, a, prompts.pad_id(tok))
    # answer_mask[t] marks the positions whose logits predict an answer token: label column t + 1
    labels = torch.full_like(batch.input_ids, prompts.IGNORE)
    labels[:, 1:] = torch.where(batch.answer_mask[:, :-1].bool(), batch.input_ids[:, 1:], prompts.IGNORE)
    with torch.no_grad():
        logp = prompts.token_logprobs(model, batch.input_ids, batch.attention_mask, labels)
    return float(-logp.sum() / (labels[:, 1:] != prompts.IGNORE).sum())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--concept", default="Harry Potter")
    ap.add_argument("--method", default="grad_diff")
    ap.add_argument("--lora-lr", type=float, default=None, help="also train the adapter at this learning rate")
    ap.add_argument("--questions", type=int, default=None, help="score only the first N target questions")
    args = ap.parse_args(argv)

    runs = {"full": {}, "adapter": {"params": "lora"}}
    if args.lora_lr is not None:
        runs[f"adapter lr {args.lora_lr:g}"] = {"params": "lora", "lr": args.lora_lr}
    vanilla, tok = models.load(args.model)
    cset = pipeline.load_concepts("builtin")
    concept = cset.get(args.concept)
    ans = pipeline.answers(args.model, cset.select([concept.label]), progress=False)
    ans = ans[ans.concept == concept.label]
    unrelated = ans[ans.kind == "unrelated"]

    rows_out, curves = [], {}
    for label, settings in runs.items():
        t0 = time.time()
        u = pipeline.unlearned(args.model, cset, concept.label, args.method, progress=False, **settings)
        trained_s = u.train_seconds
        target = ans[(ans.kind == "target") & ans.question_index.isin(pipeline.scorable(u.config, concept))]
        target = target.sort_values("question_index")
        if args.questions:
            target = target.head(args.questions)
        model, _ = u.load()
        p, a = pipeline._ids(target.prompt_ids), pipeline._ids(target.answer_ids)
        table = patching.run(vanilla, model, tok, p, a, window=5)
        if u.is_adapter:
            through = patching.run(vanilla, u.adapter(), tok, p, a, window=5)
            merged_gap = float((through.krs - patching.run(vanilla, model, tok, p, a, window=5, layout="padded")
                                .krs).abs().max())
            table = through
        else:
            merged_gap = float("nan")
        curves[label] = table.groupby(["experiment", "center_layer"]).krs.mean()
        rows_out.append({
            "run": label, "trained": u.record["n_trainable"], "stored_MB": u.size_bytes / 1e6, "train_s": trained_s,
            "target_loss": answer_loss(model, tok, target), "unrelated_loss": answer_loss(model, tok, unrelated),
            "krs_gap_vs_merged": merged_gap, "seconds": time.time() - t0,
        })
        del model
    base = {"target_loss": answer_loss(vanilla, tok, ans[ans.kind == "target"].sort_values("question_index")
                                       .pipe(lambda d: d[d.question_index.isin(pipeline.scorable(u.config, concept))])
                                       .pipe(lambda d: d.head(args.questions) if args.questions else d)),
            "unrelated_loss": answer_loss(vanilla, tok, unrelated)}

    print(f"{args.model}, {concept.label}, {args.method}; {len(target)} target / {len(unrelated)} unrelated questions")
    print(f"vanilla: target answer loss {base['target_loss']:.4f}, unrelated {base['unrelated_loss']:.4f}")
    print(f"{'run':<22}{'trained':>12}{'stored MB':>11}{'target loss':>13}{'unrelated':>11}{'KRS gap':>10}")
    for r in rows_out:
        print(f"{r['run']:<22}{r['trained']:>12,}{r['stored_MB']:>11.2f}{r['target_loss']:>13.4f}"
              f"{r['unrelated_loss']:>11.4f}{r['krs_gap_vs_merged']:>10.1e}")
    print("\nKRS by window centre (mean over target questions), per experiment:")
    for exp in patching.PAPER_EXPERIMENTS:
        print(f"  {exp}")
        layers = sorted(next(iter(curves.values()))[exp].index)
        print("    layer " + " ".join(f"{i:>5}" for i in layers))
        for label, curve in curves.items():
            print(f"    {label[:5]:<5} " + " ".join(f"{curve[exp][i]:>5.2f}" for i in layers) + f"   ({label})")


if __name__ == "__main__":
    main()
