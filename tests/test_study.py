"""The study object: its pairs and scopes, plan mode, and the smoke profile's chapter tables held to a fixture."""
from __future__ import annotations

import hashlib
import json
import math
import platform
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dissect_unlearning import book, patching, pipeline
from dissect_unlearning import Study
from dissect_unlearning.study import planning

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "smoke_tables.json"


def smoke_params(chapter: str) -> dict:
    return book.resolve_parameters(book.find_chapter(chapter, ROOT), book.load_profile("smoke", ROOT))


def test_pairs_scopes_and_the_second_family():
    study = Study.from_params({"concepts": ["Harry Potter", "Austria"], "methods": ["grad_diff", "npo"],
                               "beyond_concepts": ["Austria"], "second_model": "gemma3-270m",
                               "second_methods": ["dpo"], "unrelated_name": "ignored"})
    assert study.pairs() == [("Harry Potter", "grad_diff"), ("Harry Potter", "npo"), ("Austria", "grad_diff"),
                             ("Austria", "npo")]
    assert study.pairs("beyond") == [("Austria", "grad_diff"), ("Austria", "npo")]
    second = study.second_family()
    assert second.model == "gemma3-270m" and second.pairs() == [("Harry Potter", "dpo"), ("Austria", "dpo")]
    assert second.second_family() is None
    with pytest.raises(ValueError, match="unknown scope 'some'; valid: all, beyond"):
        study.pairs("some")


def test_plan_mode_records_requests_and_returns_empty_tables_with_the_real_columns():
    with planning() as recorded:
        study = Study.from_params({"concepts": ["Harry Potter"], "methods": ["grad_diff", "dpo"], "layers": [-1]})
        sweep = study.sweeps(["coef", "attn"])
        again = study.sweeps(["coef", "attn"])  # asked twice: one request
        scores = study.behaviour()
        answers = study.answers()
    assert sweep.empty and list(sweep.columns) == patching.SWEEP_COLUMNS + ["method", "seed"]
    assert again.empty and scores.empty and answers.empty
    assert list(answers.columns) == pipeline.ANSWER_COLUMNS
    assert [(r.stage, r.concept, r.method) for r in recorded] == [
        ("sweep", "Harry Potter", "grad_diff"), ("sweep", "Harry Potter", "dpo"),
        ("behaviour", "Harry Potter", "grad_diff"), ("behaviour", "Harry Potter", "dpo"),
        ("answers", None, None)]
    kw = recorded[0].kwargs
    assert kw == {"experiments": ["coef", "attn"], "window": 5, "layers": [-1], "alignment": "answer",
                  "remote": False, "kind": "target", "direction": "forward"}
    # outside the block the same study code computes (no recorder is left behind)
    assert Study.from_params({}).plan is None


# ------------------------------------------------------------------------------------------------------------------
# The smoke profile's chapter tables: the same numbers whatever the refactoring (tests/data/smoke_tables.json)
# ------------------------------------------------------------------------------------------------------------------
def smoke_tables() -> dict[str, pd.DataFrame]:
    """Every table the chapters compute on the smoke profile, by the chapters' own study calls."""
    ch = {n: Study.from_params(smoke_params(n), progress=False) for n in
          ("model_organism", "surface", "patching", "restoration", "last_layer", "side_effects", "beyond")}
    trio = ["coef", "attn", "coef+attn"]
    return {
        "ch2_answers": ch["model_organism"].answers(),
        "ch3_behaviour": ch["surface"].behaviour(),
        "ch3_loss_curve": ch["surface"].training(),
        "ch3_regime_qa": ch["surface"].with_forget_data("qa").behaviour("beyond"),
        "ch4_sweep": ch["patching"].sweeps(trio),
        "ch4_other_question": ch["patching"].sweeps(["coef_other"]),
        "ch5_value": ch["restoration"].sweeps(["value"]),
        "ch5_extra": ch["restoration"].sweeps(["key", "mlp", "layer"], "beyond"),
        "ch6_last": ch["last_layer"].sweeps(["coef"], layers=[-1]),
        "ch6_change": ch["last_layer"].coef_change(),
        "ch6_control_change": ch["last_layer"].control().coef_change(),
        "ch7_control_behaviour": ch["side_effects"].control().behaviour(),
        "ch7_unrelated": ch["side_effects"].sweeps(["coef"], layers=[-1], kind="unrelated"),
        "ch7_target": ch["side_effects"].sweeps(["coef"], layers=[-1], kind="target"),
        "ch8_reverse": ch["beyond"].sweeps(trio, "beyond", direction="reverse"),
        "ch8_relearn": ch["beyond"].relearn("beyond"),
        "ch8_never_known": ch["beyond"].relearn_control("beyond"),
    }


def _plain(v):
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, (float, np.floating)):
        return None if math.isnan(float(v)) else float(v)
    return v


# Columns left out of the fixture: where and when a table was made, not what it measured.
UNCOMPARED = {"seconds", "train_seconds", "settings", "versions", "unlearned_identity", "package_version",
              "torch_version", "transformers_version", "nnsight_version", "vanilla_model", "unlearned_model", "remote",
              "seed"}


MACHINE = "_machine"  # the fixture's entry naming the CPU it was computed on (not a table)
# Across CPU kinds the same code rounds differently (another BLAS path: an AMD EPYC with AVX-512 and an earlier
# machine differed by up to 4.7e-4 after two training steps), so the 1e-6 check holds on the CPU kind that wrote the
# fixture; on another kind the tables are held to this looser tolerance, relative to the value's size.
OTHER_CPU_TOLERANCE = 1e-3


def machine() -> dict:
    """The CPU kind, as far as float rounding depends on it: model name and torch's vector instruction set."""
    name = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        name = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                     if line.startswith("model name")), "")
    return {"cpu": name or platform.processor() or platform.machine(),
            "capability": torch.backends.cpu.get_cpu_capability()}


def write_fixture() -> None:
    """Regenerate tests/data/smoke_tables.json, for a change meant to change the numbers."""
    out = {MACHINE: machine()}
    for name, df in smoke_tables().items():
        cols = [c for c in df.columns if c not in UNCOMPARED]
        out[name] = {"columns": cols, "rows": [[_plain(v) for v in row] for row in df[cols].itertuples(index=False)]}
    FIXTURE.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    sizes = ", ".join(f"{k} {len(v['rows'])} rows" for k, v in out.items() if k != MACHINE)
    print(f"wrote {FIXTURE}: {sizes}")


def _same(a, b, tol: float, relative: bool = False) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        scale = max(1.0, abs(b)) if relative and b is not None else 1.0
        return a is not None and b is not None and abs(a - b) <= tol * scale
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y, tol, relative) for x, y in zip(a, b))
    return a == b


@pytest.mark.book
def test_smoke_chapter_tables_equal_the_fixture_within_1e_6():
    expected = json.loads(FIXTURE.read_text())
    written_on = expected.pop(MACHINE, None)
    same_cpu = written_on == machine()
    tol = 1e-6 if same_cpu else OTHER_CPU_TOLERANCE
    tables = smoke_tables()
    assert set(tables) == set(expected)
    # chapter 4 of the smoke profile runs the remote path (nnsight's simulation of NDIF) on an adapter
    for name in ("ch4_sweep", "ch4_other_question"):
        assert set(tables[name]["remote"]) == {"local"}
        assert all('"params":"lora"' in i for i in tables[name]["unlearned_identity"]), name
    digest = hashlib.sha256()
    for name, want in expected.items():
        got = tables[name]
        missing = [c for c in want["columns"] if c not in got.columns]
        assert not missing, f"{name}: columns {missing} are gone"
        rows = [[_plain(v) for v in row] for row in got[want["columns"]].itertuples(index=False)]
        assert len(rows) == len(want["rows"]), f"{name}: {len(rows)} rows, the fixture has {len(want['rows'])}"
        for i, (g, w) in enumerate(zip(rows, want["rows"])):
            bad = [c for c, x, y in zip(want["columns"], g, w) if not _same(x, y, tol, relative=not same_cpu)]
            assert not bad, f"{name} row {i}: {bad} differ: {[g[want['columns'].index(c)] for c in bad]} " \
                            f"vs {[w[want['columns'].index(c)] for c in bad]}"
        digest.update(json.dumps(rows, default=str).encode())
    how = "within 1e-6 (the fixture's CPU kind)" if same_cpu else \
        f"within {OTHER_CPU_TOLERANCE:g} relative (fixture written on {written_on}, this is {machine()})"
    print(f"smoke chapter tables: {len(tables)} tables equal the fixture {how}; sha256 {digest.hexdigest()[:16]}")


@pytest.mark.slow  # two more unlearned models and their sweeps on the default model: make test-slow
def test_the_remote_path_of_a_study_gives_the_numbers_of_the_local_one():
    """Smoke chapter 4 as it runs (remote="local": answers, adapter training, sweeps all as nnsight requests) against
    the same study run here (remote=False: the adapter trained by trainer.train, merged, the local engine)."""
    params = smoke_params("patching")
    assert params["remote"] == "local" and params["unlearning"]["params"] == "lora"
    simulated = Study.from_params(params, progress=False)
    local = Study.from_params({**params, "remote": False}, progress=False)
    trio = ["coef", "attn", "coef+attn", "coef_other"]
    a, b = simulated.sweeps(trio), local.sweeps(trio)
    assert len(a) == len(b) > 0 and set(a.remote) == {"local"} and set(b.remote) == {"False"}
    assert (a[["experiment", "center_layer", "question_index"]].values ==
            b[["experiment", "center_layer", "question_index"]].values).all()
    # Two smoke steps change the model little, so each loss is small and KRS a ratio of small numbers: the adapter
    # added to W x and the adapter merged into W round differently by ~1e-4 of a loss, hence relative tolerances here
    # (tests/test_adapter.py holds the engines to 1e-4 in KRS on an adapter that changes the model a lot)
    for col in ("loss_patched", "loss_unpatched"):
        assert np.allclose(a[col], b[col], rtol=1e-3, atol=0), col
    ordinary = b.krs.abs() < 10
    assert ordinary.sum() >= 6 and float((a.krs - b.krs)[ordinary].abs().max()) < 1e-3
    assert float(a.loss_unpatched.abs().min()) > 0  # the adapter changed the model: not a comparison of zeros
    ta, tb = simulated.training(), local.training()
    assert float((ta.loss - tb.loss).abs().max()) < 1e-5


LESSON = "lesson"  # the mechanics chapter's cells whose nnsight code is what the chapter teaches: shown, and counted apart


def test_chapters_are_thin_a_study_a_few_calls_a_chart_a_verdict():
    # the logic lives in the package where it is tested: a chapter reaches nothing below the study
    for ch in book.chapters(ROOT):
        nb = json.loads(ch.path.read_text())
        lesson = [line for c in nb["cells"] if LESSON in c["metadata"].get("tags", [])
                  for line in "".join(c["source"]).splitlines() if line.strip()]
        assert not lesson or ch.stem == "02b_mechanics", f"{ch.stem}: only the mechanics chapter has lesson cells"
        assert len(lesson) <= 45, f"{ch.stem}: {len(lesson)} lines of lesson code: more than a class can type"
        code = ["".join(c["source"]) for c in nb["cells"]
                if c["cell_type"] == "code" and not {"parameters", LESSON} & set(c["metadata"].get("tags", []))]
        lines = [line for src in code for line in src.splitlines() if line.strip()]
        assert len(lines) <= 30, f"{ch.stem}: {len(lines)} lines of code besides the parameters"
        text = "\n".join(lines)
        for deeper in ("pipeline", "patching", "unlearning", "models", "concepts", "precompute"):
            assert not re.search(rf"\b{deeper}\.\w+\(", text), f"{ch.stem} calls {deeper} directly: use the study"
        assert "for c in" not in text and "for m in" not in text, f"{ch.stem} loops over concepts or methods"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_study.py --write   (recompute the smoke tables into the fixture)")
    write_fixture()


def test_no_profile_scores_a_model_on_a_question_it_was_trained_on():
    """For every profile (and a variant of the default that trains on questions): each request that scores target
    questions of an unlearned model leaves out every question its training data (unlearning.data.build) holds."""
    from transformers import PreTrainedTokenizerFast  # noqa: F401 - only to fail loudly if transformers is missing

    from dissect_unlearning import precompute
    from dissect_unlearning.unlearning import UnlearnConfig, data as udata

    class Tok:  # the training data's token ids do not matter here, only which questions it holds
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [1 + (hash(w) % 97) for w in text.split()]}

    checked = with_questions = 0
    cases = [(name, {}) for name in book.profile_names(ROOT)] + [("default", {"unlearning": {"forget_data": "qa"}})]
    for name, extra in cases:
        prof = book.load_profile(name, ROOT)
        if str(prof.parameters.get("concept_set", "builtin")).startswith("hub:") or \
                prof.parameters.get("remote") is True:
            continue  # a hub concept set cannot be read offline; a remote profile is refused before any work
        for ch in [c for c in book.chapters(ROOT) if c.in_toc]:
            params = book.resolve_parameters(ch, prof, {k: v for k, v in extra.items() if k in ch.parameters()})
            study = Study.from_params(params, progress=False)
            for r in precompute.requests(ch.path, params):
                kw = r.kwargs
                if r.concept is None or r.stage not in ("sweep", "coef_change", "behaviour", "relearn") or \
                        kw.get("kind", "target") != "target":
                    continue
                config = UnlearnConfig.for_method(r.method, **r.params.get("unlearning", {}))
                concept = study.concept_set.get(r.concept)
                n = len(concept.questions)
                qa = [(q, [1, 2], [3, 4]) for q in concept.questions]
                retain = next(c for c in study.concept_set if c.name != concept.name)
                trained = {int(e.source.split(":")[1]) for e in
                           udata.build(Tok(), concept, retain, config, qa=qa, retain_qa=qa).forget
                           if e.source.startswith("qa:")}
                scored = pipeline.scorable(config, concept)
                assert not trained & set(scored), (name, ch.stem, r)
                assert len(trained) + len(scored) == n  # nothing dropped silently either
                checked += 1
                with_questions += bool(trained)
    assert checked > 50 and with_questions > 10  # the variant that trains on questions was checked too


def test_seeds_make_one_unlearned_model_each_for_the_concepts_studied_in_depth():
    from dissect_unlearning import precompute

    params = {"concepts": ["Harry Potter", "Austria"], "methods": ["grad_diff"], "beyond_concepts": ["Harry Potter"]}
    with planning() as a:  # a study built inside the block plans (outside it, it computes)
        Study.from_params(params).sweeps(["coef"])
    with planning() as b:
        three = Study.from_params({**params, "seeds": [0, 1, 2]})
        three.sweeps(["coef"])
    assert three.runs() == [("Harry Potter", "grad_diff", 0), ("Harry Potter", "grad_diff", 1),
                            ("Harry Potter", "grad_diff", 2), ("Austria", "grad_diff", 0)]
    assert set(a) < set(b) and len(b) == 4  # seed 0 asks for exactly what a study without seeds asks for
    contexts = {json.loads(r.context)["unlearning"].get("seed") for r in b}
    assert contexts == {None, 1, 2}
    tasks = {}
    for r in b:
        tasks.setdefault((r.concept, r.context), []).append(r)
    assert len(tasks) == 4  # one task (one unlearned model) per seed
    labels = sorted(precompute.Task(r.model, r.concept, r.method, r.context).label for r in b)
    assert labels[-1].endswith("seed 2")
    with pytest.raises(ValueError, match="seeds must be a non-empty list of distinct"):
        Study.from_params({**params, "seeds": [1, 1]})
