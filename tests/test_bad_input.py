"""Bad input fails at once, in one line, naming what is wrong, and before any model is loaded, any answer generated,
any model trained or the build's precompute stage started.

Every test runs with that work replaced by a failure (the `no_work` fixture), so a check that comes too late fails
the test instead of costing minutes. The models are a tiny 4-layer checkpoint and the default model, whose 30 layers
are read from its GGUF header or config without provisioning it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dissect_unlearning import Study, book, cli, models, pipeline, precompute, prompts, validate
from dissect_unlearning.book import builder
from dissect_unlearning.unlearning import UnlearnConfig, config as unlearn_config, trainer


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    """Any expensive step fails the test: a bad value must be refused before it."""
    def forbidden(what):
        def call(*args, **kwargs):
            pytest.fail(f"{what} ran before the bad input was refused")
        return call

    monkeypatch.setattr(models, "load", forbidden("models.load"))
    monkeypatch.setattr(models, "provision", forbidden("models.provision"))
    monkeypatch.setattr(prompts, "generate_answers", forbidden("answer generation"))
    monkeypatch.setattr(trainer, "train", forbidden("training"))
    monkeypatch.setattr(trainer, "unlearn", forbidden("training"))
    monkeypatch.setattr(precompute, "run", forbidden("the precompute stage"))
    monkeypatch.setattr(builder, "execute_chapter", forbidden("chapter execution"), raising=False)


def refused(capsys, argv, *words) -> str:
    """Run the command line; it must exit with 2 and one line on stderr that contains every word."""
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("dissect-unlearning: error: ")
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.fixture
def files(tmp_path):
    """A file, a non-empty folder, an empty concept file and a zero-byte one."""
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "zero.json").write_text("")
    return tmp_path


# ------------------------------------------------------------------------------------------------------------------
# Window and layers, against the model's layer count
# ------------------------------------------------------------------------------------------------------------------
def test_n_layers_of_reads_the_config_only(tiny_checkpoint):
    assert models.n_layers_of(tiny_checkpoint) == 4
    assert models.n_layers_of(models.DEFAULT_MODEL) == 30  # no provisioning: models.provision is forbidden here
    with pytest.raises(models.ModelError, match="unknown model 'no-such-model'"):
        models.n_layers_of("no-such-model")


def test_a_window_larger_than_the_model_in_a_chapter(capsys, tiny_checkpoint, tmp_path):
    run = ["run", "patching", "--profile", "default", "--no-html", "--output", tmp_path]  # layers null: windows
    refused(capsys, [*run, "-p", f"model={tiny_checkpoint}", "-p", "window=6"],
            "chapter 04_patching", "window 6", "4 layers")
    refused(capsys, [*run, "-p", "window=40"], "window 40", "30 layers", "smollm2-135m")
    assert not (tmp_path / "_build").exists()


def test_a_window_larger_than_the_model_in_a_sweep(capsys, tiny_checkpoint, tmp_path):
    refused(capsys, ["sweep", "--vanilla", tiny_checkpoint, "--unlearned", tiny_checkpoint, "--concept", "Austria",
                     "--window", "6", "--out", tmp_path / "s.parquet"], "window 6", "4 layers")
    with pytest.raises(ValueError, match="window 40 is larger than the model, which has 30 layers"):
        Study.from_params({"window": 40})
    with pytest.raises(ValueError, match="window 6 .* 4 layers"):
        pipeline.sweep(tiny_checkpoint, tiny_checkpoint, "builtin", "Austria", window=6)
    assert Study.from_params({"window": 30}).params["window"] == 30  # the whole model is allowed


def test_layers_outside_the_model(capsys, tiny_checkpoint, tmp_path):
    refused(capsys, ["run", "patching", "--profile", "smoke", "--no-html", "--output", tmp_path, "-p", "layers=[99]"],
            "layers", "layer 99 does not exist", "30 layers")
    refused(capsys, ["sweep", "--vanilla", tiny_checkpoint, "--unlearned", tiny_checkpoint, "--concept", "Austria",
                     "--layers", "2,99", "--out", tmp_path / "s.parquet"], "layer 99 does not exist", "4 layers")
    with pytest.raises(ValueError, match="layers: layer 99 does not exist; the model has 30 layers"):
        Study.from_params({"layers": [99]})
    with pytest.raises(ValueError, match="layer -5 does not exist"):
        pipeline.sweep(tiny_checkpoint, tiny_checkpoint, "builtin", "Austria", layers=[-5])
    study = Study.from_params({"layers": [-1]})
    with pytest.raises(ValueError, match="layer 30 does not exist"):
        study.sweeps(["coef"], layers=[30])  # a chapter's own call, checked as the parameters are


# ------------------------------------------------------------------------------------------------------------------
# Concept data
# ------------------------------------------------------------------------------------------------------------------
def test_an_empty_concept_file(capsys, files, tiny_checkpoint, tmp_path):
    for name, problem in (("empty.json", "it holds no concept records"), ("zero.json", "the file is empty")):
        refused(capsys, ["answers", "--model", tiny_checkpoint, "--concepts", files / name], name, problem)
        with pytest.raises(ValueError, match=problem):
            Study.from_params({"concept_set": str(files / name)})
    refused(capsys, ["run", "model_organism", "--profile", "smoke", "--no-html", "--output", tmp_path,
                     "-p", f"concept_set={files / 'empty.json'}"], "chapter 02_model_organism", "empty.json",
            "no concept records")


def test_concept_selection_through_the_command_line_and_the_study(capsys, tiny_checkpoint, tmp_path):
    refused(capsys, ["answers", "--model", tiny_checkpoint, "--concept", "Atlantis"], "no concept 'Atlantis'")
    refused(capsys, ["unlearn", "--model", tiny_checkpoint, "--concept", "Atlantis"], "no concept 'Atlantis'")
    refused(capsys, ["answers", "--model", tiny_checkpoint, "--concept", "Austria", "--concept", "Austria"],
            "'Austria' is named twice")
    for bad in (0, -1, "Atlantis"):
        with pytest.raises((ValueError, KeyError)):
            pipeline.answers(tiny_checkpoint, "builtin", select=bad)
    with pytest.raises(ValueError, match="beyond_concepts: no concept 'Atlantis'"):
        Study.from_params({"beyond_concepts": ["Atlantis"]})
    refused(capsys, ["run", "patching", "--profile", "smoke", "--no-html", "--output", tmp_path,
                     "-p", "concepts=[Atlantis]"], "chapter 04_patching", "concepts: no concept 'Atlantis'")


def test_duplicate_ids_in_a_concept_file(capsys, tiny_checkpoint, tmp_path):
    from dissect_unlearning import concepts

    records = json.loads(concepts.builtin_path().read_text())[:2]
    records[1]["id"] = records[0]["id"]
    path = tmp_path / "dup-ids.json"
    path.write_text(json.dumps(records))
    refused(capsys, ["answers", "--model", tiny_checkpoint, "--concepts", path], "dup-ids.json", "field 'id'")


# ------------------------------------------------------------------------------------------------------------------
# Unlearning settings
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("steps", 10 ** 9), ("steps", unlearn_config.MAX_STEPS + 1), ("beta", math.inf), ("retain_weight", math.inf),
    ("lr", math.nan), ("lr", math.inf), ("lr", -1e-5), ("weight_decay", math.inf), ("max_grad_norm", math.nan),
    ("epochs", math.inf), ("retain_weight", math.nan), ("beta", -math.inf),
])
def test_unlearning_settings_must_be_finite_and_bounded(field, value):
    method = "npo" if field == "beta" else "grad_diff"
    with pytest.raises(ValueError, match=f"invalid unlearning settings: {field} must be"):
        UnlearnConfig.for_method(method, **{field: value})


def test_epochs_that_give_too_many_steps_are_refused_before_training():
    cfg = UnlearnConfig.for_method("grad_diff", epochs=unlearn_config.MAX_STEPS, batch_size=1)
    with pytest.raises(ValueError, match="epochs=100000 gives 1000000 steps"):
        cfg.n_steps(10)
    assert UnlearnConfig.for_method("grad_diff", steps=unlearn_config.MAX_STEPS).n_steps(10) == unlearn_config.MAX_STEPS


def test_unlearning_settings_are_refused_on_every_entry_point(capsys, tiny_checkpoint, tmp_path):
    common = ["--model", tiny_checkpoint, "--concept", "Austria"]
    refused(capsys, ["unlearn", *common, "--steps", "1000000000"], "steps must be an integer from 1 to 100000")
    refused(capsys, ["unlearn", *common, "--method", "npo", "--set", "beta=Infinity"], "beta must be a finite")
    refused(capsys, ["unlearn", *common, "--set", "retain_weight=Infinity"], "retain_weight must be a finite")
    refused(capsys, ["unlearn", *common, "--set", "lr=NaN"], "lr must be a finite number")
    refused(capsys, ["behaviour", *common, "--method", "npo", "--set", "beta=Infinity"], "beta must be a finite")
    with pytest.raises(ValueError, match="beta must be a finite"):
        pipeline.unlearned(tiny_checkpoint, "builtin", "Austria", "npo", beta=math.inf)
    with pytest.raises(ValueError, match=r"unlearning \(npo\): .*beta must be a finite"):
        Study.from_params({"methods": ["npo"], "unlearning": {"beta": math.inf}})
    refused(capsys, ["run", "surface", "--profile", "smoke", "--no-html", "--output", tmp_path,
                     "-p", "unlearning={steps: 1000000000}"], "chapter 03_surface", "steps must be")
    with pytest.raises(ValueError, match="lr must be a finite number"):
        pipeline.relearn(tiny_checkpoint, "builtin", "Austria", lr=math.nan)


# ------------------------------------------------------------------------------------------------------------------
# The book: --list-params, profiles
# ------------------------------------------------------------------------------------------------------------------
def test_list_params_checks_and_shows_the_overrides(capsys):
    refused(capsys, ["run", "patching", "-p", "window=100000", "--list-params"], "-p window", "bad value 100000")
    refused(capsys, ["run", "patching", "-p", "windw=3", "--list-params"], "no parameter 'windw'")
    refused(capsys, ["run", "patching", "-p", "window=40", "--list-params"], "window 40", "30 layers")
    assert cli.main(["run", "patching", "-p", "window=3", "-p", "concepts=[Austria]", "--list-params"]) == 0
    out = capsys.readouterr().out
    assert "parameters of chapter 04_patching" in out
    assert 'window = 3  (default 5)' in out and 'concepts = ["Austria"]' in out


def test_a_profile_that_gives_a_key_twice(capsys, tmp_path):
    path = tmp_path / "twice.yml"
    path.write_text("description: d\nparameters:\n  window: 3\n  seed: 1\n  window: 4\n")
    refused(capsys, ["run", "patching", "--profile", path, "--no-html", "--output", tmp_path],
            "profile twice.yml, line 5", "'window' is given twice (first at line 3)")
    path.write_text("description: d\nparameters: {seed: 1, seed: 2}\n")
    with pytest.raises(book.BookError, match="line 2: key 'seed' is given twice"):
        book.load_profile(path)
    path.write_text("description: one\ndescription: two\n")
    with pytest.raises(book.BookError, match="twice.yml, line 2: key 'description'"):
        book.load_profile(path)


# ------------------------------------------------------------------------------------------------------------------
# Output paths
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["answers", "--concept", "Austria", "--out", "{tmp}/a-file/x.parquet"], ["--out", "a-file is a file"]),
    (["answers", "--concept", "Austria", "--out", "{tmp}/full"], ["--out", "is a folder"]),
    (["behaviour", "--concept", "Austria", "--out", "{tmp}/full"], ["--out", "is a folder"]),
    (["sweep", "--unlearned", "{model}", "--concept", "Austria", "--out", "{tmp}/a-file/x.parquet"],
     ["--out", "a-file is a file"]),
    (["unlearn", "--concept", "Austria", "--out", "{tmp}/full"], ["--out", "not empty"]),
    (["unlearn", "--concept", "Austria", "--out", "{tmp}/a-file"], ["--out", "is a file, not a folder"]),
    (["unlearn", "--concept", "Austria", "--out", "{tmp}/a-file/run"], ["--out", "a-file is a file"]),
], ids=["answers-under-a-file", "answers-onto-a-folder", "behaviour-onto-a-folder", "sweep-under-a-file",
        "unlearn-onto-a-full-folder", "unlearn-onto-a-file", "unlearn-under-a-file"])
def test_output_paths_are_checked_before_the_work(capsys, files, tiny_checkpoint, argv, words):
    argv = [a.format(tmp=files, model=tiny_checkpoint) for a in argv]
    model = ["--vanilla" if argv[0] == "sweep" else "--model", tiny_checkpoint]
    refused(capsys, [*argv, *model], *words)


def test_a_build_output_must_be_a_folder(capsys, files):
    refused(capsys, ["run", "2", "--profile", "smoke", "--output", files / "a-file"], "--output", "is a file")
    refused(capsys, ["build", "--profile", "smoke", "--output", files / "a-file"], "--output", "is a file")
    if Path("/etc/passwd").is_file():
        refused(capsys, ["run", "2", "--profile", "smoke", "--output", "/etc/passwd"], "/etc/passwd: is a file")


def test_the_output_checks_accept_what_can_be_written(files):
    assert validate.check_output_file(files / "new" / "deeper" / "t.parquet") == files / "new" / "deeper" / "t.parquet"
    assert validate.check_output_file(files / "a-file") == files / "a-file"  # overwritten
    assert validate.check_output_folder(files / "new" / "run", empty=True) == files / "new" / "run"
    (files / "empty-folder").mkdir()
    assert validate.check_output_folder(files / "empty-folder", empty=True) == files / "empty-folder"
    # what Unlearned.export calls before it rebuilds the model
    with pytest.raises(ValueError, match="a-file: is a file, not a folder"):
        validate.check_output_folder(files / "a-file", "export", empty=True)


# ------------------------------------------------------------------------------------------------------------------
# Generation settings and remote execution
# ------------------------------------------------------------------------------------------------------------------
def test_max_new_tokens_is_checked_before_the_model_loads(capsys, tiny_checkpoint):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["answers", "--model", tiny_checkpoint, "--max-new-tokens", "0"])
    assert exit_.value.code == 2
    assert "argument --max-new-tokens: expected an integer >= 1, got '0'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        pipeline.answers(tiny_checkpoint, "builtin", "Austria", max_new_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        Study.from_params({"max_new_tokens": 0})


def test_remote_without_a_key_fails_when_the_study_is_built(monkeypatch):
    from nnsight import CONFIG

    from dissect_unlearning import patching

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    monkeypatch.setattr(patching.remote, "preflight", lambda model: None)  # as if NDIF ran it
    study = Study.from_params({"remote": True, "model": "org/some-model"})
    with pytest.raises(patching.RemoteLocalModelError, match="vanilla model with itself"):
        study.sweeps(["coef"])  # weights unlearned here: refused before any work
    with pytest.raises(patching.RemoteLocalModelError, match="needs adapter unlearning"):
        study.behaviour()
    monkeypatch.undo()
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    with pytest.raises(ValueError, match="model: remote=True needs the vanilla model under the hub id"):
        Study.from_params({"remote": True, "unlearning": {"params": "lora"}})  # a registry model lives here only
    with pytest.raises(patching.RemoteUnavailableError, match="no NDIF API key") as error:
        Study.from_params({"remote": True, "unlearning": {"params": "lora"}, "model": "org/some-model"})
    assert "org/some-model" in str(error.value)  # one message: the key, and whether NDIF runs it (no network here)
    assert Study.from_params({"remote": "local"}).params["remote"] == "local"
    with pytest.raises(ValueError, match="remote must be False, True"):
        Study.from_params({"remote": "ndif"})
