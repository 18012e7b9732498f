"""The cache under faults: killed writers, forced rebuilds read meanwhile, locks held by live and dead processes, and
the `dissect-unlearning cache` command that lists and prunes what is left."""
import os
import subprocess
import sys
import threading
import time

import pytest

from dissect_unlearning import cache, cli, versions

# Builds (unit, {"n": 1}) and stops half-way, holding the entry's lock, until killed. The parent's package hash
# is passed in so both compute the same key even if someone edits the package meanwhile.
HOLDER = """
import sys, time
from pathlib import Path
from dissect_unlearning import cache, versions

versions._PACKAGE_HASH = sys.argv[2]

def build(folder):
    (folder / "half.bin").write_bytes(b"x" * 4096)
    Path(sys.argv[1]).write_text("building")
    time.sleep(120)

cache.get_or_build("unit", {"n": 1}, build)
"""

READER = """
import sys
from dissect_unlearning import cache, versions

versions._PACKAGE_HASH = sys.argv[1]
path = cache.lookup("unit", {"n": 2})
print("missing" if path is None else (path / "v.txt").read_text())
"""


@pytest.fixture(autouse=True)
def _own_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(cache.LOCK_TIMEOUT_ENV, raising=False)


@pytest.fixture
def holder(tmp_path):
    """start() runs HOLDER in a subprocess and returns it once it is building."""
    procs = []

    def start():
        ready = tmp_path / f"ready-{len(procs)}"
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(ready), versions.package_hash()])
        procs.append(proc)
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, "the holder process ended before building"
            assert time.monotonic() < deadline, "the holder process did not start building"
            time.sleep(0.02)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _kill(proc):
    proc.kill()  # SIGKILL: no handler runs, nothing is cleaned up
    proc.wait()


def test_a_killed_writer_leaves_no_entry_and_prune_removes_its_leftovers(holder):
    k = cache.key("unit", {"n": 1})
    kind_dir = cache.cache_root() / "unit"
    proc = holder()
    [temp] = [p for p in kind_dir.iterdir() if p.name.startswith(".")]
    assert cache.parse_temp_name(temp.name) == (k, cache.HOST, proc.pid)
    assert cache.prune() == []  # its writer runs: a build in progress is not an orphan
    assert temp.exists()

    _kill(proc)
    assert cache.lookup("unit", {"n": 1}) is None and not (kind_dir / k).exists()
    found = cache.contents()
    assert found.entries == [] and [(t.path, t.gone) for t in found.leftovers] == [(temp, True)]
    assert found.dead_locks == [kind_dir / f"{k}.lock"]
    removed = cache.prune()
    assert [r.path for r in removed] == [temp, kind_dir / f"{k}.lock"]
    assert removed[0].bytes >= 4096 and f"pid {proc.pid} on {cache.HOST}, which is gone" in removed[0].what
    assert not temp.exists() and (kind_dir / f"{k}.lock").read_text() == ""
    assert cache.prune() == []


def test_a_dead_holders_lock_is_taken_over_with_a_note(holder, capsys):
    proc = holder()
    _kill(proc)
    path = cache.get_or_build("unit", {"n": 1}, lambda f: (f / "v.txt").write_text("done"))
    assert (path / "v.txt").read_text() == "done"
    err = capsys.readouterr().err
    assert f"took over the lock of unit/{path.name} from pid {proc.pid} on {cache.HOST}" in err
    assert "which died holding it" in err


def test_a_live_holder_makes_a_second_build_wait_say_who_and_give_up(holder, monkeypatch, capsys):
    monkeypatch.setenv(cache.LOCK_TIMEOUT_ENV, "1")
    proc = holder()
    k = cache.key("unit", {"n": 1})
    start = time.monotonic()
    with pytest.raises(cache.LockTimeout) as caught:
        cache.get_or_build("unit", {"n": 1}, lambda f: pytest.fail("built while another process held the lock"))
    assert 1 <= time.monotonic() - start < 10
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"gave up after 1 s waiting for the lock of unit/{k}")
    assert f"held by pid {proc.pid} on {cache.HOST} since " in message and cache.LOCK_TIMEOUT_ENV in message
    waits = [line for line in capsys.readouterr().err.splitlines() if "waiting for the lock" in line]
    assert len(waits) == 1 and f"unit/{k}, held by pid {proc.pid}" in waits[0]  # once, then every 30 s


def test_waiting_is_reported_again_at_intervals(holder, monkeypatch, capsys):
    monkeypatch.setenv(cache.LOCK_TIMEOUT_ENV, "1")
    monkeypatch.setattr(cache, "WAIT_NOTE_EVERY", 0.3)
    holder()
    with pytest.raises(cache.LockTimeout):
        cache.get_or_build("unit", {"n": 1}, lambda f: None)
    assert 3 <= capsys.readouterr().err.count("waiting for the lock") <= 5


def _can_exchange(tmp_path) -> bool:
    a, b = tmp_path / "xa", tmp_path / "xb"
    a.mkdir()
    b.mkdir()
    return cache._exchange(a, b)


def test_force_keeps_the_old_entry_readable_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    if not _can_exchange(tmp_path):
        pytest.skip("this file system cannot swap two folders in one step")
    inputs = {"n": 2}
    path = cache.get_or_build("unit", inputs, lambda f: (f / "v.txt").write_text("old"))
    building, release, outcome = threading.Event(), threading.Event(), []

    def rebuild(folder):
        (folder / "v.txt").write_text("new")
        building.set()
        assert release.wait(30)

    def force():
        try:
            outcome.append(cache.get_or_build("unit", inputs, rebuild, force=True))
        except BaseException as exc:
            outcome.append(exc)

    # Every step that renames anything must leave a complete entry behind it.
    seen = []
    real_rename, real_exchange = os.rename, cache._exchange

    def look():
        seen.append((path / cache.COMPLETE).exists() and (path / "v.txt").read_text())

    monkeypatch.setattr(os, "rename", lambda *a, **k: (real_rename(*a, **k), look())[0])
    monkeypatch.setattr(cache, "_exchange", lambda a, b: (real_exchange(a, b), look())[0])

    t = threading.Thread(target=force)
    t.start()
    assert building.wait(30)
    reader = subprocess.run([sys.executable, "-c", READER, versions.package_hash()], capture_output=True, text=True,
                            timeout=60)
    assert reader.stdout.strip() == "old", reader.stderr  # another process, while the new entry is being built
    release.set()
    t.join(30)
    assert outcome == [path]
    assert (path / "v.txt").read_text() == "new"
    assert seen and all(s in ("old", "new") for s in seen), seen
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


def test_cache_command_lists_an_entry_and_prunes_it_once_stale(monkeypatch, capsys):
    path = cache.get_or_build("unit", {"n": 3}, lambda f: (f / "data.bin").write_bytes(b"x" * 20_000))
    cache.get_or_build("other", {"n": 3}, lambda f: (f / "data.bin").write_bytes(b"y"))
    two_hours_ago = time.time() - 7200
    os.utime(path / cache.COMPLETE, (two_hours_ago, two_hours_ago))
    size = cache.format_bytes(cache.folder_size(path))

    assert cli.main(["cache"]) == 0
    out = capsys.readouterr().out
    [row] = [line for line in out.splitlines() if line.startswith("unit ") and path.name[:12] in line]
    assert size in row and "2.0 h" in row and row.endswith("current")
    assert any(line.split()[:3] == ["all", "2", "0"] for line in out.splitlines())

    real = versions.library_versions()
    monkeypatch.setattr(versions, "library_versions", lambda: {**real, "torch": "99.0"})
    assert cli.main(["cache", "--kind", "unit"]) == 0
    out = capsys.readouterr().out
    [row] = [line for line in out.splitlines() if path.name[:12] in line]
    assert row.endswith(f"stale: torch {real['torch']} -> 99.0") and "other" not in out
    assert "1 item(s) to remove: dissect-unlearning cache --prune --kind unit" in out

    assert cli.main(["cache", "--prune", "--kind", "unit"]) == 0
    out = capsys.readouterr().out
    assert f"removed unit/{path.name}: stale entry (torch {real['torch']} -> 99.0), {size}" in out
    assert f"freed {size} (1 item(s) removed)" in out
    assert not path.exists() and (cache.cache_root() / "other").is_dir()  # --kind: the other kind stays


def test_cache_command_shows_and_prunes_what_a_killed_build_left(holder, capsys):
    proc = holder()
    _kill(proc)
    assert cli.main(["cache"]) == 0
    out = capsys.readouterr().out
    assert "(temporary)" in out and "(1 left by writers that are gone)" in out
    assert "1 lock file(s) still name a holder that died holding them" in out
    assert cli.main(["cache", "--prune"]) == 0
    out = capsys.readouterr().out
    assert f"removed unit/{cache.TEMP_PREFIX}" in out and f"pid {proc.pid} on {cache.HOST}, which is gone" in out
    assert "freed 4.1 kB (2 item(s) removed)" in out
    assert cli.main(["cache", "--prune"]) == 0 and "nothing to prune" in capsys.readouterr().out


def test_cache_command_errors_are_one_line(capsys):
    assert cli.main(["cache"]) == 0 and "empty" in capsys.readouterr().out
    cache.get_or_build("unit", {"n": 4}, lambda f: None)
    assert cli.main(["cache", "--kind", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no kind 'nope' in the cache" in err and "present: unit" in err


def test_legacy_temporary_folders_are_pruned_only_when_their_lock_is_free():
    kind_dir = cache.cache_root() / "models"
    legacy = kind_dir / ".smollm2-135m-ab12cd_9"  # what tempfile.mkdtemp(prefix=".<name>-") made before
    legacy.mkdir(parents=True)
    (legacy / "model.safetensors").write_bytes(b"w" * 100)
    with cache.lock(kind_dir / "smollm2-135m.lock"):
        assert cache.prune() == []  # its writer may be running: it would hold the lock
    [removed] = cache.prune()
    assert removed.path == legacy and not legacy.exists()


def test_prune_removes_the_training_checkpoint_of_a_finished_run_and_keeps_a_resumable_one():
    root = cache.cache_root()
    done = cache.get_or_build("unlearned", {"run": "finished"}, lambda f: (f / "w").write_text("1"))
    finished = done.parent / f"{cache.RESUME_PREFIX}{done.name}"
    resumable = done.parent / f"{cache.RESUME_PREFIX}{'0' * 24}"
    for folder in (finished, resumable):
        folder.mkdir()
        (folder / "state.pt").write_bytes(b"x" * 100)
    removed = cache.prune("unlearned")
    assert [r.path for r in removed if "checkpoint" in r.what] == [finished]
    assert not finished.exists() and resumable.is_dir() and done.is_dir()
    assert root in finished.parents
