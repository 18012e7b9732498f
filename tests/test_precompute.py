"""The precompute stage: the tasks derived from the chapters' own study cells run in plan mode."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from dissect_unlearning import book, cache, precompute, study as study_mod

ROOT = Path(__file__).resolve().parents[1]


def plan(profile="default", overrides=None, only=None):
    prof = book.load_profile(profile, ROOT)
    chs = [ch for ch in book.chapters(ROOT) if ch.in_toc and (only is None or ch.number in only)]
    return [(ch, *book.resolve_parameters(ch, prof, {k: v for k, v in (overrides or {}).items()
                                                     if k in ch.parameters()}, with_sources=True)) for ch in chs]


def stages(t, name):
    return [r.kwargs for r in t.requests if r.stage == name]


def seed_of(t) -> int:
    """The unlearning seed of a task's model (0 unless its context sets another)."""
    import json

    return json.loads(t.context).get("unlearning", {}).get("seed", 0)


def regime_of(t) -> str:
    """The forget data of a task's model (the default, unless its context sets another)."""
    import json

    from dissect_unlearning.unlearning import UnlearnConfig

    return json.loads(t.context).get("unlearning", {}).get("forget_data", UnlearnConfig.forget_data)


def params_of(t) -> str:
    """Which parameters a task's model trains: 'lora' for chapter 4's adapter comparison, else the default."""
    import json

    from dissect_unlearning.unlearning import UnlearnConfig

    return json.loads(t.context).get("unlearning", {}).get("params", UnlearnConfig.params)


def main_variant(t) -> bool:
    from dissect_unlearning.unlearning import UnlearnConfig

    return seed_of(t) == 0 and regime_of(t) == UnlearnConfig.forget_data and params_of(t) != "lora"


def test_one_task_per_unlearned_model_and_it_trains_first():
    from dissect_unlearning.unlearning import UnlearnConfig

    todo = precompute.tasks(plan())
    prof = book.load_profile("default", ROOT).parameters
    pairs = [(t.model, t.concept, t.method, seed_of(t), regime_of(t), params_of(t)) for t in todo if t.concept]
    assert len(pairs) == len(set(pairs))  # each unlearned model in exactly one task
    # the chapters' unlearned models, and the control fine-tune of each concept (chapters 6 and 7); the other seeds
    # of the beyond_concepts' pairs (the patching chapter), and their other forget data regimes (chapter 3)
    default = UnlearnConfig.forget_data
    main = {("smollm2-135m", c, m, 0, default) for c in prof["concepts"] for m in prof["methods"]}
    main |= {("smollm2-135m", c, "control", 0, "text") for c in prof["concepts"]}  # the control learns text
    beyond = [(c, m) for c in prof["beyond_concepts"] for m in prof["methods"]]
    seeds = {("smollm2-135m", c, m, s, default) for c, m in beyond for s in prof["seeds"][1:]}
    regimes = {("smollm2-135m", c, m, 0, r) for c, m in beyond for r in ("text", "qa", "text+qa") if r != default}
    second = {(prof["second_model"], c, m, 0, default) for c in prof["second_concepts"]
              for m in prof["second_methods"]}
    full = {(*k, UnlearnConfig.params) for k in main | seeds | regimes | second}
    # chapter 4's adapter set beside full fine-tuning: the first pair of beyond_concepts, first seed
    adapter = {("smollm2-135m", prof["beyond_concepts"][0], prof["methods"][0], 0, default, "lora")}
    assert len(prof["seeds"]) >= 3 and set(pairs) == full | adapter
    for t in todo:
        if t.concept:
            assert t.requests[0].stage == "unlearned" and t.requests[0].kwargs == {}
            assert len(t.requests) == len(set(t.requests))  # no request twice
    estimates = [t.estimate("smollm2-135m") for t in todo]
    assert estimates == sorted(estimates, reverse=True)  # longest first


def test_tasks_follow_the_chapters_parameters():
    todo = {(t.model, t.concept, t.method): t for t in precompute.tasks(plan()) if main_variant(t)}
    prof = book.load_profile("default", ROOT).parameters
    hp = todo[("smollm2-135m", "Harry Potter", "dpo")]
    france = todo[("smollm2-135m", "France", "dpo")]
    # reverse patching and relearning only for beyond_concepts (Harry Potter, not France)
    assert [kw["direction"] for kw in stages(hp, "sweep") if kw["direction"] != "forward"] == ["reverse"]
    assert not [kw for kw in stages(france, "sweep") if kw["direction"] != "forward"]
    # ... and 'partial' relearning brings its never-known control (the same budget on a fictional concept)
    assert [kw["data"] for kw in stages(hp, "relearn")] == [*prof["relearn_data"], "never_known"]
    assert not stages(france, "relearn") and "partial" in prof["relearn_data"]
    (control,) = [kw for kw in stages(hp, "relearn") if kw["data"] == "never_known"]
    (partial,) = [kw for kw in stages(hp, "relearn") if kw["data"] == "partial"]
    assert {**control, "data": "partial"} == partial
    # chapter 5: value vectors everywhere, the beyond-paper restorations on beyond_concepts only
    sweeps = stages(france, "sweep")
    value = {"experiments": ["value"], "window": 5, "layers": None, "alignment": "answer", "remote": False,
             "kind": "target", "direction": "forward"}
    assert value in sweeps and value in stages(hp, "sweep")
    assert {**value, "experiments": ["key", "mlp", "layer"]} in stages(hp, "sweep")
    assert not [kw for kw in sweeps if "key" in kw["experiments"]]
    # chapters 6/7: the last layer, target and unrelated
    last = [kw for kw in sweeps if kw["layers"] == [-1]]
    assert sorted(kw["kind"] for kw in last) == ["target", "unrelated"]  # chapters 6 and 7 share the target one
    gemma = todo[("gemma3-270m", "Harry Potter", "grad_diff")]
    assert gemma.stages == ["unlearned", "sweep"]
    # the second model's vanilla answers are asked for once, in a task of their own
    (answers,) = [t for t in todo.values() if t.model == "gemma3-270m" and t.concept is None]
    assert answers.stages == ["answers"] and answers.requests[0].kwargs["include_unrelated"] is False


def test_parameter_overrides_reach_the_tasks_and_remote_chapters_are_left_alone():
    todo = precompute.tasks(plan(overrides={"methods": ["npo"], "concepts": ["Austria"], "window": 3,
                                            "beyond_concepts": None, "second_model": None}))
    assert {(t.concept, t.method) for t in todo if t.concept} == {("Austria", "npo"), ("Austria", "control")}
    (t,) = [t for t in todo if t.concept and t.method == "npo" and main_variant(t)]
    assert {kw.get("window") for kw in stages(t, "sweep") if kw["layers"] is None} == {3}
    assert stages(t, "relearn")  # beyond_concepts None: every chosen concept
    with pytest.raises(book.BookError, match="hub id"):  # a model of this machine: refused before any planning
        plan(overrides={"remote": True}, only={4, 5, 6, 7})


def test_a_failing_stage_is_reported_not_raised(monkeypatch):
    from dissect_unlearning import pipeline

    def broken(*a, **k):
        raise RuntimeError("no such model here")

    monkeypatch.setattr(pipeline, "unlearned", broken)
    context = cache.canonical_json({"concept_set": "builtin", "n_questions": 1, "n_unrelated": 0,
                                    "prompt_format": "paper", "unlearning": {}, "device": None, "dtype": None})
    t = precompute.Task("smollm2-135m", "Harry Potter", "grad_diff", context)
    t.add(study_mod.Request("unlearned", "smollm2-135m", "Harry Potter", "grad_diff", (), context))
    r = precompute.run_task(t)
    assert r["stages"] == [] and "no such model here" in r["error"]


def test_the_build_log_records_what_was_built_not_what_was_found(tmp_path, monkeypatch):
    log = tmp_path / "built.log"
    monkeypatch.setenv(cache.BUILD_LOG_ENV, str(log))
    cache.get_or_build("thing", {"a": 1}, lambda f: (f / "x").write_text("1"))
    cache.get_or_build("thing", {"a": 1}, lambda f: pytest.fail("rebuilt"))
    with pytest.raises(RuntimeError):
        cache.get_or_build("thing", {"a": 2}, lambda f: (_ for _ in ()).throw(RuntimeError("boom")))
    assert cache.built(log) == [("thing", cache.key("thing", {"a": 1}))]
    assert cache.built(tmp_path / "absent.log") == []


def test_every_chapter_plans_what_it_computes_through_its_study_cells():
    for ch in book.chapters(ROOT):
        if ch.in_toc:
            assert precompute.study_cells(ch.path), f"{ch.stem} has no cell tagged 'study'"


def test_a_changed_notebook_call_changes_the_plan_without_touching_the_package(tmp_path):
    # the plan is the notebook's own code: a new call in a study cell is a new request, nothing else to edit
    import json

    ch = book.find_chapter("patching", ROOT)
    nb = json.loads(ch.path.read_text())
    for cell in nb["cells"]:
        if "study" in cell["metadata"].get("tags", []):
            cell["source"] = "".join(cell["source"]) + '\nextra = study.sweeps(["value"], layers=[-1])\n'
    changed = tmp_path / ch.path.name
    changed.write_text(json.dumps(nb))
    params = plan(only={4})[0][1]
    before = precompute.requests(ch.path, params)
    after = precompute.requests(changed, params)
    new = [r for r in after if r not in before]
    assert new and {r.stage for r in new} == {"sweep"}
    assert all(r.kwargs["experiments"] == ["value"] and r.kwargs["layers"] == [-1] for r in new)
    assert len(new) == len(study_mod.Study.from_params(params, progress=False).runs())  # every seed of every pair


def test_training_stages_run_first_one_task_at_a_time_then_the_rest(monkeypatch):
    """Memory: the first phase holds one training run at a time (every core); the second runs the other stages
    of the same tasks `jobs` at a time. Together they are exactly the tasks' requests."""
    todo = precompute.tasks(plan())
    calls = []
    monkeypatch.setattr(precompute, "run_tasks", lambda ts, jobs, *a, **k: calls.append((ts, jobs, k)) or [])
    monkeypatch.setattr(precompute, "worker_memory_gb", lambda model: 1.0)  # every worker fits beside another
    precompute.run(plan(), jobs=2, verbose=False)
    (training, one, kw1), (rest, two, kw2) = calls
    assert one == 1 and kw1.get("phase") == "training" and two == 2
    assert all(set(t.stages) <= set(precompute.TRAINING_STAGES) for t in training)
    assert not any(set(t.stages) & set(precompute.TRAINING_STAGES) for t in rest)
    by_model = {}
    for t in training + rest:
        by_model.setdefault((t.model, t.concept, t.method, t.context), []).extend(t.requests)
    assert {k: sorted(map(repr, v)) for k, v in by_model.items()} == \
        {(t.model, t.concept, t.method, t.context): sorted(map(repr, t.requests)) for t in todo}
    hp = [t for t in training if (t.concept, t.method) == ("Harry Potter", "dpo") and main_variant(t)][0]
    assert hp.stages == ["unlearned", "relearn", "relearn", "relearn"]  # relearning and its control train too


def test_a_larger_models_tasks_run_alone_when_two_workers_would_not_fit(monkeypatch):
    """Memory: the second phase holds two workers; a model whose two workers would pass the budget (Gemma's sweeps)
    runs its tasks first, one at a time, and the rest still run two at a time."""
    prof = book.load_profile("default", ROOT).parameters
    main, second = prof.get("model", "smollm2-135m"), prof["second_model"]
    sizes = {main: 2.7, second: 5.4}  # GB per worker, about what the cold default build measured
    monkeypatch.setattr(precompute, "worker_memory_gb", lambda model: sizes.get(model))
    calls = []
    monkeypatch.setattr(precompute, "run_tasks", lambda ts, jobs, *a, **k: calls.append((ts, jobs, k)) or [])
    precompute.run(plan(), jobs=2, verbose=False)
    (training, j1, _), (alone, j2, kw2), (rest, j3, kw3) = calls
    assert (j1, j2, j3) == (1, 1, 2) and kw2.get("phase") == "one at a time" and kw3.get("phase") is None
    assert alone and {t.model for t in alone} == {second} and {t.model for t in rest} == {main}
    # Nothing is lost or run twice: the two parts are the second phase's tasks, in their order
    second_phase = [t.split()[1] for t in precompute.tasks(plan()) if t.split()[1] is not None]
    assert [t.label for t in alone + rest] == [t.label for t in second_phase if t.model == second] + \
        [t.label for t in second_phase if t.model == main]
    # One worker, a budget both fit in, or an unknown size: nothing is held back
    todo = second_phase
    assert precompute.split_by_memory(todo, 1)[0] == []
    assert precompute.split_by_memory(todo, 2, memory_gb=11.0)[0] == []
    sizes[second] = None
    assert precompute.split_by_memory(todo, 2)[0] == []


def test_worker_memory_reads_the_checkpoints_size(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    from dissect_unlearning import models

    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_checkpoint).parameters())
    assert models.parameter_count(tiny_checkpoint) == n
    assert precompute.worker_memory_gb(tiny_checkpoint) == pytest.approx(precompute.WORKER_WEIGHT_MULTIPLE * 4 * n / 1e9)
    assert models.parameter_count("owner/not-here") is None and precompute.worker_memory_gb("owner/not-here") is None


def test_each_task_runs_in_a_process_of_its_own():
    from dissect_unlearning import progress

    jobs = [progress.Job(f"job {i}", os.getpid, ()) for i in range(3)]
    pids = [o.result for o in progress.run_jobs(jobs, 1, name="test", verbose=False, fresh=True)]
    assert len(set(pids)) == 3 and os.getpid() not in pids
    reused = [o.result for o in progress.run_jobs(jobs, 1, name="test", verbose=False)]
    assert len(set(reused)) == 1


def test_task_labels_tell_apart_the_models_of_one_concept_and_method():
    # chapter 3's regimes and the adapter are unlearned models of the same (concept, method): a progress line names
    # the setting that makes each one different, and only that
    def context(**unlearning):
        return cache.canonical_json({"concept_set": "builtin", "unlearning": unlearning})

    main = precompute.Task("m", "Harry Potter", "grad_diff", context())
    text = precompute.Task("m", "Harry Potter", "grad_diff", context(forget_data="text"))
    seed = precompute.Task("m", "Harry Potter", "grad_diff", context(seed=1))
    alone = precompute.Task("m", "Austria", "grad_diff", context(lr=1e-5))
    precompute._name_variants([main, text, seed, alone])
    assert [t.label for t in (main, text, seed, alone)] == [
        "m / Harry Potter / grad_diff", "m / Harry Potter / grad_diff / forget_data text",
        "m / Harry Potter / grad_diff / seed 1", "m / Austria / grad_diff"]
    text.add(study_mod.Request("unlearned", "m", "Harry Potter", "grad_diff", (), text.context))
    text.add(study_mod.Request("behaviour", "m", "Harry Potter", "grad_diff", (), text.context))
    training, rest = text.split()
    assert training.label == rest.label == text.label
