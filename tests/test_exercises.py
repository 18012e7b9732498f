"""Teaching: every chapter's exercises (appended cells, a command line each, a folded solution), every command line
checked as `dissect-unlearning run ... --plan` checks it, the lab profile's chapter selection, and the mechanics
chapter's package side (lab.py) on a tiny random model."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import nbformat
import pytest

from dissect_unlearning import book, cli

ROOT = Path(__file__).resolve().parents[1]
TAG = "exercises"
COMMAND = re.compile(r"^dissect-unlearning run .*$", re.M)


def exercise_cells(stem: str) -> list:
    nb = nbformat.read(str(ROOT / "notebooks" / f"{stem}.ipynb"), as_version=4)
    return [c for c in nb.cells if TAG in c.metadata.get("tags", [])]


def command_lines() -> list[tuple[str, str]]:
    """(chapter stem, line) for every exercise command of every chapter of the toc."""
    return [(ch.stem, line) for ch in book.chapters(ROOT) if ch.in_toc
            for cell in exercise_cells(ch.stem) for line in COMMAND.findall(cell.source)]


def check_line(line: str) -> book.ChapterPlan:
    """Parse the line with the command's own parser and check it as `run --plan` does (nothing is computed).
    Raises what the command would report: SystemExit for a flag argparse refuses, BookError / ValueError else."""
    argv = shlex.split(line)
    assert argv[:2] == ["dissect-unlearning", "run"], line
    args = cli.build_parser().parse_args(argv[1:])
    return book.plan_chapter(args.chapter, args.profile, cli._book_overrides(args.param), root=ROOT)


def test_every_chapter_ends_with_two_or_three_exercises_each_with_a_command_and_a_folded_solution():
    teaching = (ROOT / "book" / "teaching.md").read_text()
    for ch in book.chapters(ROOT):
        if not ch.in_toc:
            continue
        nb = nbformat.read(str(ch.path), as_version=4)
        tagged = [i for i, c in enumerate(nb.cells) if TAG in c.metadata.get("tags", [])]
        assert tagged, f"{ch.stem} has no exercises"
        # appended: the exercise cells are the notebook's last cells, in one block
        assert tagged == list(range(len(nb.cells) - len(tagged), len(nb.cells))), ch.stem
        head, *items = [nb.cells[i] for i in tagged]
        assert head.source.startswith("## Exercises"), ch.stem
        assert 2 <= len(items) <= 3, f"{ch.stem}: {len(items)} exercises"
        for n, cell in enumerate(items, 1):
            assert cell.cell_type == "markdown"
            assert cell.source.startswith(f"**Exercise {n}: "), (ch.stem, n)
            assert "predict" in cell.source.lower(), (ch.stem, n)
            lines = COMMAND.findall(cell.source)
            assert lines, f"{ch.stem}, exercise {n}: no `dissect-unlearning run` line"
            title = re.match(r"\*\*Exercise \d+: (.+?)\.?\*\*", cell.source).group(1)
            assert f"{n}: {title} (`" in teaching, f"book/teaching.md does not list {ch.stem}'s exercise {n}"
            for line in lines:
                assert book.find_chapter(shlex.split(line)[2], ROOT).stem == ch.stem, (ch.stem, line)
            # the solution is folded away (sphinx-design's dropdown, loaded by Jupyter Book) and closed
            assert re.search(rf"^:::{{dropdown}} Solution to exercise {n}\n.+\n:::$", cell.source, re.S | re.M), \
                (ch.stem, n)


@pytest.mark.parametrize("stem,line", command_lines(), ids=lambda x: x if "/" not in x and " " not in x else None)
def test_every_exercise_command_runs_as_written_in_plan_mode(stem, line):
    plan = check_line(line)
    assert plan.chapter.stem == stem
    for arg in re.findall(r"-p (\"[^\"]+\"|'[^']+'|\S+)", line):
        name = shlex.split(arg)[0].split("=", 1)[0]
        assert plan.sources[name] == "-p", (line, name)  # the value the exercise sets is the one the run uses
    assert plan.requests or stem == "02_model_organism"  # the plan names what the run computes


@pytest.mark.parametrize("bad,message", [
    ("dissect-unlearning run patchin --profile lab -p window=1", "no chapter 'patchin'"),
    ("dissect-unlearning run patching --profile lab -p windw=1", "has no parameter 'windw'"),
    ("dissect-unlearning run patching --profile lab -p window=0", "bad value 0 for parameter 'window'"),
    ("dissect-unlearning run surface --profile lab -p relearn_lr=0.001", "03_surface has no parameter 'relearn_lr'"),
    ("dissect-unlearning run mechanics --profile lab -p layers=[-40]", "layer -40 does not exist"),
    ("dissect-unlearning run mechanics --profile lab -p question=6", "question: 6 is out of range"),
    ("dissect-unlearning run surface --profile lab -p \"unlearning={stepz: 3}\"", "parameter 'unlearning'"),
    ("dissect-unlearning run patching --profile lba -p window=3", "no profile 'lba'"),
])
def test_a_wrong_chapter_parameter_or_value_fails_the_check(bad, message):
    with pytest.raises((book.BookError, ValueError), match=re.escape(message)):
        check_line(bad)


def test_run_plan_prints_the_values_and_the_requests_and_refuses_a_bad_line(capsys):
    assert cli.main(["run", "mechanics", "--profile", "lab", "-p", "layers=[-1]", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "layers = [-1]  (-p)" in out and "question = 0  (notebook default)" in out
    assert "asks for: sweep x 1 (Harry Potter / grad_diff)" in out
    assert cli.main(["run", "mechanics", "--profile", "lab", "-p", "question=99", "--plan"]) == 2
    assert "question: 99 is out of range" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# A profile's chapter selection (`only`), and the lab profile
# ------------------------------------------------------------------------------------------------------------------
def test_the_lab_profile_selects_the_mechanics_chapter_and_chapters_3_to_5():
    lab = book.load_profile("lab", ROOT)
    assert lab.only == ["02b_mechanics", "03_surface", "04_patching", "05_restoration"]
    assert lab.parameters["methods"] == ["grad_diff"] and len(lab.parameters["concepts"]) == 1
    assert book.load_profile("default", ROOT).only is None
    mech = book.find_chapter("2b", ROOT)
    assert mech.stem == "02b_mechanics" and mech.in_toc and mech.place == "2b" and mech.slug == "mechanics"
    assert book.find_chapter("2", ROOT).stem == "02_model_organism"


def test_a_bad_selection_is_refused_naming_the_key(tmp_path):
    for only, message in (("[patchin]", "no chapter 'patchin'"), ("[]", "only: expected a non-empty list"),
                          ("patching", "only: expected a non-empty list")):
        path = tmp_path / "p.yml"
        path.write_text(f"description: test\nparameters: {{}}\nonly: {only}\n")
        with pytest.raises(book.BookError, match=re.escape(message)):
            book.load_profile(path, ROOT)


def test_a_profile_builds_and_shows_only_its_chapters(tmp_path):
    from test_book import PARAMS, add_chapter, make_project

    root = make_project(tmp_path, [("md", "# A"), PARAMS, ("code", "x = seed")], name="01_a")
    add_chapter(root, [("md", "# B"), PARAMS, ("code", "y = seed")], name="02_b")
    add_chapter(root, [("md", "# C"), PARAMS, ("code", "z = seed")], name="03_c")
    # a whole build first: its pages of 01_a and 02_b must not survive into the selected book
    book.build("p", root=root, output=tmp_path, verbose=False, precompute=False)
    (root / "profiles" / "sel.yml").write_text("description: test\nparameters: {seed: 1}\nonly: [c, 1]\n")
    report = book.build("sel", root=root, output=tmp_path, verbose=False, precompute=False)
    assert [r.chapter.stem for r in report.runs] == ["01_a", "03_c"]  # toc order, not the profile's
    staged = tmp_path / "_build" / "book"
    assert sorted(p.stem for p in (staged / "notebooks").glob("*.ipynb")) == ["01_a", "03_c"]
    assert "02_b" not in (staged / "_toc.yml").read_text()
    html = tmp_path / "_build" / "html" / "notebooks"
    assert (html / "01_a.html").is_file() and (html / "03_c.html").is_file()
    assert "02_b.html" not in (html / "01_a.html").read_text()  # the navigation no longer leads to it
    # a chapter outside the selection, named on the command line (`run b --profile sel`), joins the book
    report = book.build("sel", only=["b"], root=root, output=tmp_path, verbose=False, precompute=False)
    assert [r.chapter.stem for r in report.runs] == ["02_b"]
    assert sorted(p.stem for p in (staged / "notebooks").glob("*.ipynb")) == ["01_a", "02_b", "03_c"]


# ------------------------------------------------------------------------------------------------------------------
# The mechanics chapter's package side
# ------------------------------------------------------------------------------------------------------------------
def test_lab_window_and_token_table():
    from dissect_unlearning import Study, lab, plots

    s = lab.study({"concepts": ["Harry Potter", "Austria"], "methods": ["npo", "dpo"], "window": 3})
    assert s.concepts == ["Harry Potter"] and s.methods == ["npo"]
    assert lab.window(s) == [27, 28, 29]  # SmolLM2-135M: 30 layers
    assert lab.window(Study.from_params({"layers": [-1, 3, -1]})) == [3, 29]
    with pytest.raises(ValueError, match="window"):
        lab.window(Study({**s.params, "window": 31}))
    case = lab.Case("Harry Potter", "npo", 4, "q?", "a", [5, 6, 7], [8, 9], ["x", "y"], [29], None, None, None)
    assert case.positions == [2, 3] and case.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    table = lab.token_table(case, {"vanilla": [0.5, 0.25], "coef": [0.1, 0.2]})
    assert table.to_dict("list") == {"run": ["vanilla", "vanilla", "coef", "coef"], "position": [1, 2, 1, 2],
                                     "token": ["x", "y", "x", "y"], "probability": [0.5, 0.25, 0.1, 0.2]}
    with pytest.raises(ValueError, match="run 'value' has 1 probabilities for 2 answer tokens"):
        lab.token_table(case, {"value": [0.3]})
    spec = plots.token_probabilities(table).to_dict()
    assert spec["encoding"]["color"]["scale"]["domain"] == ["vanilla (before unlearning)", "MLP coefficients restored"]


def test_the_hand_computation_matches_the_engine_on_a_tiny_model():
    """The chapter's own code (coefficients written in an nnsight trace, value vectors copied in) against
    patching.run on the same question and window: the chapter asserts the same on the real model."""
    import copy

    import torch
    from conftest import make_tiny_llama
    from nnsight import TransformersModel

    from dissect_unlearning import lab, patching

    vanilla, tok = make_tiny_llama()
    changed = copy.deepcopy(vanilla)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # an "unlearned" model: every MLP weight moved a little
        for name, p in changed.named_parameters():
            if ".mlp." in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    prompt, answer = tok("who wrote harry potter ?")["input_ids"], tok("the author of hogwarts")["input_ids"]
    case = lab.Case("c", "m", 0, "q", "a", prompt, answer, [str(t) for t in answer], [2, 3], vanilla, changed, tok)
    lab.check_architecture(vanilla, "tiny llama")
    v, u = TransformersModel(vanilla, tokenizer=tok), TransformersModel(changed, tokenizer=tok)
    ids, pos = case.input_ids, case.positions
    with v.trace(ids):
        logits_vanilla = v.output.logits[0, pos].save()
    with u.trace(ids):
        logits_unlearned = u.output.logits[0, pos].save()
    coefs = {}
    with v.trace(ids):
        for i in case.layers:
            coefs[i] = v.model.layers[i].mlp.down_proj.input.save()
    with u.trace(ids):
        for i in case.layers:
            u.model.layers[i].mlp.down_proj.input = coefs[i]
        logits_coef = u.output.logits[0, pos].save()
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in case.layers]
    with patching.restored_parameters(changed, vanilla, names):
        with u.trace(ids):
            logits_value = u.output.logits[0, pos].save()

    def loss(logits):
        return ((logits.double() - logits_vanilla.double()) ** 2).mean().item()

    table = patching.run(vanilla, changed, tok, [case.prompt_ids], [case.answer_ids], list(lab.EXPERIMENTS),
                         layers=case.layers).assign(concept="c", method="m")
    for exp, logits in (("coef", logits_coef), ("value", logits_value)):
        mine = 1 - loss(logits) / loss(logits_unlearned)
        assert abs(mine - lab.engine_krs(table, case, exp)) < lab.KRS_TOLERANCE, exp
    assert abs(1 - loss(logits_coef) / loss(logits_unlearned)) > 1e-3  # the patch did something
