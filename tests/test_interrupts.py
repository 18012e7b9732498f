"""Interrupted builds: Ctrl-C, SIGTERM and SIGKILL stop the precompute workers and the chapter kernels within
seconds, leave the cache consistent (no temporary folder, no half entry) and no process behind; the next run goes on
from what finished; a killed unlearning run resumes to the very weights of an uninterrupted one; a second build on
one `_build/` folder waits for the first and says who holds it.

Each scenario runs in a subprocess (a harness written next to the test) that is signalled from here, as a user's
terminal or `kill` would. The harness pins the package hash of this test process, so that files other people edit
meanwhile cannot split the cache keys between a run and its re-run.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import pytest
import torch
import yaml

from dissect_unlearning import cache, progress, versions
from dissect_unlearning.unlearning import trainer

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
STOP_WITHIN = 5.0  # seconds from the signal to the last process gone: "a few seconds"

HARNESS = textwrap.dedent('''
    import json, os, signal, sys, time
    from pathlib import Path

    from dissect_unlearning import cache, progress, versions

    versions._PACKAGE_HASH = os.environ["PINNED_PACKAGE_HASH"]  # also in the spawned workers: they import this file
    MARKS = Path(os.environ.get("MARKS", "."))


    def stub_runner(task, threads):
        """What precompute.run_task does, with a stage that builds a cache entry slowly instead of a model."""
        from dissect_unlearning import precompute  # noqa: F401 - what a real worker imports

        seconds = float(os.environ["STAGE_SECONDS"])
        t0, done = time.time(), []
        for i, r in enumerate(task.requests):
            progress.stage(f"{r.stage} {i + 1}/{len(task.requests)}", done=i / len(task.requests))

            def build(folder, i=i):
                (folder / "half.bin").write_bytes(b"x" * 4096)
                (MARKS / f"{task.concept}-{i}.{os.getpid()}").write_text("")
                end = time.time() + seconds
                while time.time() < end:
                    sum(range(20000))  # busy, as a worker computing is
                    progress.detail(f"{end - time.time():.0f} s to go")
                (folder / "done").write_text("")

            s0 = time.time()
            cache.get_or_build("stub", {"concept": task.concept, "stage": i}, build)
            done.append((r.stage, round(time.time() - s0, 1)))
        return {"label": task.label, "seconds": time.time() - t0, "stages": done, "error": None}


    def stub_tasks(n, k):
        from dissect_unlearning import precompute, study

        out = []
        for i in range(n):
            t = precompute.Task("stub", f"c{i}", "m", "{}")
            for j in range(k):
                t.add(study.Request("unlearned" if j == 0 else "behaviour", "stub", f"c{i}", "m",
                                    (("j", str(j)),), "{}"))
            out.append(t)
        return out


    def precompute_main(n, k, log):
        from dissect_unlearning import precompute

        progress.STATUS_EVERY = float(os.environ.get("STATUS_EVERY", "30"))
        try:
            results = precompute.run_tasks(stub_tasks(n, k), jobs=2, log=Path(log), runner=stub_runner)
        except KeyboardInterrupt as exc:  # what the command line does with it
            print(f"dissect-unlearning: stopped ({progress.stop_reason(exc)})", file=sys.stderr)
            return 143 if isinstance(exc, progress.Stopped) else 130
        print(json.dumps([r["label"] for r in results]))
        return 0


    def train_main(out, checkpoint, kill, at_step, lr):
        """Unlearn a tiny random Llama for 5 steps; with `kill`, this process signals itself as step `at_step`
        begins (after step at_step - 1 is complete)."""
        import torch

        sys.path.insert(0, os.environ["TESTS"])
        from conftest import make_tiny_llama
        from test_unlearning import records, tiny_data

        from dissect_unlearning import concepts
        from dissect_unlearning.unlearning import trainer

        torch.set_num_threads(1)
        real_detail = progress.detail

        def detail(text):
            if kill != "none" and text == f"step {at_step}/5":
                os.kill(os.getpid(), getattr(signal, "SIG" + kill))
                time.sleep(5)  # a signal with a handler is taken at the next bytecode; SIGKILL never returns
            real_detail(text)

        progress.detail = detail
        model, tok = make_tiny_llama()
        cfg, data = tiny_data(tok, concepts.parse(records(), "test"), "npo", steps=5, lr=float(lr))
        try:
            result = trainer.train(model, tok, data, cfg, progress=False,
                                   checkpoint=Path(checkpoint) if checkpoint != "none" else None)
        except KeyboardInterrupt as exc:
            print(f"stopped ({progress.stop_reason(exc)})", file=sys.stderr)
            return 143
        torch.save({n: p.detach() for n, p in model.named_parameters()}, out)
        Path(out + ".curve.json").write_text(json.dumps([{k: v for k, v in row.items() if k != "seconds"}
                                                         for row in result.loss_curve]))
        return 0


    def unlearn_main(model_dir, concept_file, out, kill, at_step):
        """pipeline.unlearned on a tiny checkpoint (steps=5), signalling itself as step `at_step` begins."""
        import torch

        from dissect_unlearning import pipeline

        torch.set_num_threads(1)
        real_detail = progress.detail

        def detail(text):
            if kill != "none" and text == f"step {at_step}/5":
                os.kill(os.getpid(), getattr(signal, "SIG" + kill))
                time.sleep(5)
            real_detail(text)

        progress.detail = detail
        u = pipeline.unlearned(model_dir, concept_file, "Harry Potter", "grad_diff", progress=False, steps=5,
                               batch_size=2, chunk_tokens=8, max_new_tokens=4, lr=1e-3)
        model, _ = u.load()
        torch.save({n: p.detach() for n, p in model.named_parameters()}, out)
        return 0


    if __name__ == "__main__":
        # As started from a terminal: a test runner started in the background may hand down SIGINT ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        mode, *args = sys.argv[1:]
        if mode == "precompute":
            sys.exit(precompute_main(int(args[0]), int(args[1]), args[2]))
        if mode == "train":
            sys.exit(train_main(*args))
        if mode == "unlearn":
            sys.exit(unlearn_main(*args))
        if mode == "cli":
            from dissect_unlearning import cli

            sys.argv = ["dissect-unlearning", *args]
            sys.exit(cli.main(args))
        raise SystemExit(f"unknown mode {mode}")
''')


# ------------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------------
def launch(folder: Path, *args, **env) -> subprocess.Popen:
    """Run HARNESS (written into `folder`, with marks in folder/marks and its cache in folder/cache) in a session
    of its own, as a terminal's foreground job is."""
    script = folder / "harness.py"
    if not script.is_file():
        script.write_text(HARNESS)
        (folder / "marks").mkdir(exist_ok=True)
    full = {**os.environ, cache.CACHE_ENV: str(folder / "cache"), "PINNED_PACKAGE_HASH": versions.package_hash(),
            "MARKS": str(folder / "marks"), "TESTS": str(TESTS), trainer.CHECKPOINT_SECONDS_ENV: "0",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
            **{k: str(v) for k, v in env.items()}}
    for name in (cache.LOCK_TIMEOUT_ENV, cache.BUILD_LOG_ENV):
        if name not in env:
            full.pop(name, None)
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full, start_new_session=True)


def end(proc: subprocess.Popen) -> None:
    """Kill `proc` and everything it started, if still running (a failed test leaves nothing behind either)."""
    if proc.poll() is None:
        for pid in [proc.pid, *progress.descendants(proc.pid)]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    proc.communicate()


@pytest.fixture
def harness(tmp_path):
    """start(*args, **env): launch() in this test's folder."""
    procs = []

    def start(*args, **env):
        procs.append(launch(tmp_path, *args, **env))
        return procs[-1]

    start.marks = tmp_path / "marks"
    yield start
    for proc in procs:
        end(proc)


def wait_for(condition, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the harness ended (code {proc.returncode}) before {what}:\n{out}\n{err}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def marks(start):
    return sorted(p.name for p in start.marks.iterdir())


def temporary_leftovers(root: Path) -> list[Path]:
    """Every temporary cache folder or file (cache.TEMP_PREFIX) under `root`, however deep."""
    return [p for p in root.rglob(f"{cache.TEMP_PREFIX}*")] if root.exists() else []


def alive(pids) -> list[int]:
    return [p for p in pids if cache.pid_alive(p)]


def stop_and_time(proc, how: str) -> tuple[float, list[int]]:
    """Signal the harness as `how` says, wait for it; return (seconds until it and every process it had started
    are gone, the processes it had started)."""
    tree = progress.descendants(proc.pid)
    t0 = time.monotonic()
    if how == "ctrl-c":  # a terminal sends SIGINT to its whole foreground process group
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, getattr(signal, how))
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{how}: the harness was still running 30 s later")
    wait_for(lambda: not alive(tree), 30, f"the processes of the harness to end after {how}")
    return time.monotonic() - t0, tree


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


# ------------------------------------------------------------------------------------------------------------------
# The precompute stage: two workers, interrupted
# ------------------------------------------------------------------------------------------------------------------
def both_workers_building(start):
    names = marks(start)
    return len({n.rsplit(".", 1)[1] for n in names}) >= 2


@pytest.mark.parametrize("how, code, reason", [("ctrl-c", 130, "Ctrl-C (SIGINT)"), ("SIGTERM", 143, "SIGTERM")])
def test_ctrl_c_and_sigterm_stop_the_workers_within_seconds_and_leave_no_temporary_folder(harness, tmp_path, how,
                                                                                          code, reason):
    log = tmp_path / "_build" / "precompute.log"
    proc = harness("precompute", 3, 2, log, STAGE_SECONDS=120)
    wait_for(lambda: both_workers_building(harness), 120, "both workers to build", proc)
    cache_root = tmp_path / "cache"
    assert len(temporary_leftovers(cache_root)) == 2  # the two entries being written: what must not stay

    seconds, tree = stop_and_time(proc, how)
    out, err = proc.communicate()
    assert len(tree) >= 2 and seconds < STOP_WITHIN, (seconds, tree)
    assert proc.returncode == code, err
    assert temporary_leftovers(cache_root) == []
    assert not list((cache_root / "stub").glob("*/done"))  # no half entry became an entry
    no_traceback(err + out)
    assert f"precompute: stopped by {reason}" in out and "0/3 finished" in out
    assert "interrupted: stub / c0 / m; stub / c1 / m" in out
    assert "What finished is cached: run the same command again" in out
    text = log.read_text()
    assert f"precompute: stopped by {reason}" in text and "worker 1: stub / c0 / m: unlearned 1/2" in text


def test_a_killed_parent_takes_its_workers_down(harness, tmp_path):
    proc = harness("precompute", 3, 2, tmp_path / "precompute.log", STAGE_SECONDS=120)
    wait_for(lambda: both_workers_building(harness), 120, "both workers to build", proc)
    seconds, tree = stop_and_time(proc, "SIGKILL")  # no handler runs in the parent: PR_SET_PDEATHSIG does it
    proc.communicate()
    assert len(tree) >= 2 and seconds < STOP_WITHIN, (seconds, tree)
    # The workers got SIGTERM from the system and removed their own temporary folders on the way out.
    wait_for(lambda: not temporary_leftovers(tmp_path / "cache"), 5, "the workers' temporary folders to go")


def test_a_run_after_an_interruption_computes_only_what_was_missing(harness, tmp_path, monkeypatch):
    log = tmp_path / "precompute.log"
    proc = harness("precompute", 3, 2, log, STAGE_SECONDS=1.5)
    # Stop it once a third stage has begun: some entries are complete, others half-written.
    wait_for(lambda: len(marks(harness)) >= 3, 120, "a third stage to begin", proc)
    stop_and_time(proc, "SIGTERM")
    proc.communicate()
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(versions, "_PACKAGE_HASH", versions.package_hash())
    every = [(f"c{i}", j) for i in range(3) for j in range(2)]
    before = {e for e in every if cache.lookup("stub", {"concept": e[0], "stage": e[1]})}
    assert 0 < len(before) < len(every)

    built = tmp_path / "built.log"
    proc = harness("precompute", 3, 2, log, STAGE_SECONDS=0.2, DISSECT_UNLEARNING_BUILD_LOG=built)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert json.loads(out.splitlines()[-1]) == ["stub / c0 / m", "stub / c1 / m", "stub / c2 / m"]
    keys = {cache.key("stub", {"concept": c, "stage": j}): (c, j) for c, j in every}
    rebuilt = {keys[k] for kind, k in cache.built(built)}
    assert rebuilt == set(every) - before  # what had finished was found, not computed again
    assert all(cache.lookup("stub", {"concept": c, "stage": j}) for c, j in every)
    assert temporary_leftovers(tmp_path / "cache") == []
    no_traceback(err)


def test_progress_shows_tasks_workers_stages_and_the_time_left(harness, tmp_path):
    log = tmp_path / "_build" / "precompute.log"
    proc = harness("precompute", 3, 2, log, STAGE_SECONDS=1.5, STATUS_EVERY=0.5)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    # stdout is not a terminal here: a status block every STATUS_EVERY seconds
    assert "[book] precompute: 3 task(s) (one per unlearned model), 2 at a time; progress in" in out
    assert "[book]   worker 1: stub / c0 / m: unlearned 1/2" in out
    assert "[book]   worker 2: stub / c1 / m: " in out
    assert "[book] precompute 3/3: " in out and "[book] precompute: done in" in out
    statuses = [line for line in out.splitlines() if line.startswith("[book] precompute: ") and " done, " in line]
    assert statuses and all(" elapsed" in s for s in statuses)
    assert any("left" in s for s in statuses)
    text = log.read_text()
    assert "precompute: 3 job(s), 2 at a time" in text and "worker 1: pid " in text
    assert "worker 2: stub / c1 / m: behaviour 2/2" in text  # each stage as it begins
    assert "precompute: 3/3 done" in text.splitlines()[-1]
    stamped = [line for line in text.splitlines() if line[:8].count(":") == 2]
    assert len(stamped) == len(text.splitlines())  # every line has its time
    no_traceback(err + out)


# ------------------------------------------------------------------------------------------------------------------
# The chapter stage: papermill kernels, through the command line on a throw-away book
# ------------------------------------------------------------------------------------------------------------------
WAIT_CELL = """
import os, pathlib, time
pathlib.Path(os.environ["MARKS"], f"kernel-{os.getpid()}").write_text("")
release = pathlib.Path(os.environ["MARKS"], "release")
deadline = time.time() + 300
while not release.exists() and time.time() < deadline:
    time.sleep(0.05)
"""


def make_book(tmp_path: Path, names=("01_a", "02_b")) -> Path:
    """A project with chapters that wait (a kernel each) until MARKS/release exists."""
    root = tmp_path / "project"
    (root / "notebooks").mkdir(parents=True)
    (root / "profiles").mkdir()
    (root / "book").mkdir()
    (root / "book" / "intro.md").write_text("# Intro\n")
    (root / "_toc.yml").write_text(yaml.safe_dump({"format": "jb-book", "root": "book/intro",
                                                   "chapters": [{"file": f"notebooks/{n}"} for n in names]}))
    (root / "profiles" / "p.yml").write_text("description: test\nparameters: {seed: 3}\n")
    for name in names:
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_markdown_cell(f"# {name}"),
                    nbformat.v4.new_code_cell("seed = 0  # random seed: an integer, at least 0"),
                    nbformat.v4.new_code_cell(WAIT_CELL)]
        nb.cells[1].metadata["tags"] = ["parameters"]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, root / "notebooks" / f"{name}.ipynb")
    return root


def build_args(root: Path, out: Path, jobs: int = 2) -> list[str]:
    return ["cli", "build", "--profile", "p", "--output", str(out), "--no-html", "--no-precompute",
            "--jobs", str(jobs)]


def kernels(start) -> list[int]:
    return [int(p.name.split("-")[1]) for p in start.marks.iterdir() if p.name.startswith("kernel-")]


@pytest.mark.parametrize("how, reason", [("ctrl-c", "Ctrl-C (SIGINT)"), ("SIGTERM", "SIGTERM")])
def test_a_build_stops_its_chapter_workers_and_their_kernels(harness, tmp_path, how, reason):
    root = make_book(tmp_path)
    proc = harness(*build_args(root, tmp_path), DISSECT_UNLEARNING_BOOK=root)
    wait_for(lambda: len(kernels(harness)) == 2, 120, "both chapters' kernels to run", proc)
    assert len(temporary_leftovers(tmp_path / "cache")) == 2  # the chapters' entries being written

    seconds, tree = stop_and_time(proc, how)
    out, err = proc.communicate()
    assert set(kernels(harness)) <= set(tree) and seconds < STOP_WITHIN, (seconds, tree, kernels(harness))
    assert temporary_leftovers(tmp_path / "cache") == []
    assert f"chapters: stopped by {reason}" in out and "interrupted: 01_a; 02_b" in out
    assert f"[book] build stopped by {reason}" in err
    assert "worker 1: 01_a: executing" in (tmp_path / "_build" / "chapters.log").read_text()
    assert "Traceback" not in err
    no_traceback(err + out)


def test_a_second_build_on_one_folder_waits_for_the_first_and_says_who_holds_it(harness, tmp_path):
    root = make_book(tmp_path, names=("01_a",))
    first = harness(*build_args(root, tmp_path, jobs=1), DISSECT_UNLEARNING_BOOK=root)
    wait_for(lambda: len(kernels(harness)) == 1, 120, "the first build's chapter to run", first)

    # With a short timeout the second gives up, naming the holder, in one line.
    second = harness(*build_args(root, tmp_path, jobs=1), DISSECT_UNLEARNING_BOOK=root,
                     DISSECT_UNLEARNING_LOCK_TIMEOUT=1)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 2, err
    build_dir = (tmp_path / "_build").resolve()
    assert f"waiting for the lock of the book build in {build_dir}, held by pid {first.pid}" in err
    assert (f"dissect-unlearning: error: gave up after 1 s waiting for the lock of the book build in {build_dir}, "
            f"held by pid {first.pid}") in err
    assert 'running "dissect-unlearning build --profile p' in err
    no_traceback(err + out)

    # With time to wait it waits, then goes on once the first is done (and finds its chapter executed).
    third = harness(*build_args(root, tmp_path, jobs=1), DISSECT_UNLEARNING_BOOK=root,
                    DISSECT_UNLEARNING_LOCK_TIMEOUT=120)
    time.sleep(3.0)
    assert third.poll() is None  # waiting
    (harness.marks / "release").write_text("")
    out1, err1 = first.communicate(timeout=120)
    out3, err3 = third.communicate(timeout=120)
    assert first.returncode == 0 and third.returncode == 0, err1 + err3
    assert "01_a: executed in" in out1 and "01_a: unchanged, reused" in out3
    assert f"waiting for the lock of the book build in {build_dir}, held by pid {first.pid}" in err3
    no_traceback(err1 + out1 + err3 + out3)


# ------------------------------------------------------------------------------------------------------------------
# Unlearning: a killed run resumes to the weights of an uninterrupted one
# ------------------------------------------------------------------------------------------------------------------
def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [n for n in a if not torch.equal(a[n], b[n])]
    assert not different, f"{len(different)} parameter(s) differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The weights (and loss curve, beside them) of the tiny run trained without interruption."""
    folder = tmp_path_factory.mktemp("straight")
    out = folder / "straight.pt"
    proc = launch(folder, "train", out, "none", "none", 0, 1e-3)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return out


# SIGKILL (no handler runs: the checkpoint on disk is all there is) in make test; TERM and INT, which stop through
# the same handler at other steps, in make test-slow (make test stays under 15 minutes)
@pytest.mark.parametrize("kill, at_step, resumes_at", [pytest.param("TERM", 4, 3, marks=pytest.mark.slow),
                                                       ("KILL", 4, 2),
                                                       pytest.param("INT", 2, 1, marks=pytest.mark.slow)])
def test_a_killed_training_run_resumes_to_bit_identical_weights(harness, tmp_path, straight, kill, at_step,
                                                                 resumes_at):
    checkpoint = tmp_path / "cache" / ".resume~run"
    resumed = tmp_path / "resumed.pt"
    proc = harness("train", resumed, checkpoint, kill, at_step, 1e-3)
    proc.wait(120)
    _, err = proc.communicate()
    assert proc.returncode == (-signal.SIGKILL if kill == "KILL" else 143), err
    assert (checkpoint / "state.pt").is_file() and not resumed.exists()
    no_traceback(err)

    proc = harness("train", resumed, checkpoint, "none", 0, 1e-3)
    assert proc.wait(120) == 0
    _, err = proc.communicate()
    assert f"resuming at step {resumes_at}/5 from {checkpoint}" in err
    assert_bit_identical(weights(straight), weights(resumed))
    assert (json.loads(Path(f"{resumed}.curve.json").read_text())
            == json.loads(Path(f"{straight}.curve.json").read_text()))
    assert temporary_leftovers(tmp_path / "cache") == []


def test_a_checkpoint_of_other_settings_is_not_resumed(harness, tmp_path):
    checkpoint = tmp_path / "cache" / ".resume~run"
    proc = harness("train", tmp_path / "a.pt", checkpoint, "TERM", 4, 1e-3)
    proc.wait(120)
    assert (checkpoint / "state.pt").is_file()
    other, straight = tmp_path / "other.pt", tmp_path / "straight.pt"
    proc = harness("train", other, checkpoint, "none", 0, 2e-3)  # another learning rate, same folder
    assert proc.wait(120) == 0
    _, err = proc.communicate()
    assert "ignoring the checkpoint" in err and "it is of another run" in err and "resuming" not in err
    proc = harness("train", straight, "none", "none", 0, 2e-3)
    assert proc.wait(120) == 0
    assert_bit_identical(weights(straight), weights(other))


def test_a_killed_unlearned_stage_resumes_from_its_cache_keyed_checkpoint_and_removes_it(harness, tmp_path,
                                                                                          monkeypatch):
    from conftest import make_tiny_llama
    from test_unlearning import records

    model, tok = make_tiny_llama()
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    concept_file = tmp_path / "concepts.json"
    concept_file.write_text(json.dumps(records()))

    proc = harness("unlearn", model_dir, concept_file, tmp_path / "killed.pt", "KILL", 4)
    proc.wait(120)
    assert proc.returncode == -signal.SIGKILL, proc.communicate()[1]
    killed = proc.pid
    unlearned = tmp_path / "cache" / "unlearned"
    (checkpoint,) = unlearned.glob(".resume~*")
    assert (checkpoint / "state.pt").is_file()
    assert not [p for p in unlearned.iterdir() if (p / cache.COMPLETE).exists()]  # no entry yet

    resumed = tmp_path / "resumed.pt"
    proc = harness("unlearn", model_dir, concept_file, resumed, "none", 0)
    assert proc.wait(120) == 0
    _, err = proc.communicate()
    assert "resuming at step 2/5" in err
    (entry,) = [p for p in unlearned.iterdir() if (p / cache.COMPLETE).exists()]
    assert checkpoint.name == f".resume~{entry.name}"  # keyed by the entry's cache key
    assert not checkpoint.exists()
    # SIGKILL let no code of the killed process run: the entry folder it was writing stays until a prune (a
    # build's workers have theirs removed by the build)
    left = temporary_leftovers(tmp_path / "cache")
    assert [cache.parse_temp_name(p.name)[2] for p in left] == [killed]
    with monkeypatch.context() as m:
        m.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
        assert [r.path for r in cache.prune()] == left

    (tmp_path / "cache").rename(tmp_path / "first-cache")  # an uninterrupted run from an empty cache
    straight = tmp_path / "straight.pt"
    proc = harness("unlearn", model_dir, concept_file, straight, "none", 0)
    assert proc.wait(120) == 0
    assert_bit_identical(weights(straight), weights(resumed))
