import json
import multiprocessing as mp
import os
import shutil
import stat
import threading

import pytest

from dissect_unlearning import cache, versions


@pytest.fixture(autouse=True)
def _own_cache_root(tmp_path, monkeypatch):
    """Each test its own cache root: listings and prunes must see only what the test made."""
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(cache.LOCK_TIMEOUT_ENV, raising=False)


def test_key_depends_on_every_input_and_not_on_order():
    a = cache.key("x", {"model": "m", "lr": 1e-5, "layers": [1, 2]})
    assert a == cache.key("x", {"layers": [1, 2], "lr": 1e-5, "model": "m"})
    assert a != cache.key("x", {"model": "m", "lr": 2e-5, "layers": [1, 2]})
    assert a != cache.key("y", {"model": "m", "lr": 1e-5, "layers": [1, 2]})


def test_key_changes_with_the_package_source(monkeypatch):
    path = cache.get_or_build("unit", {"a": 1}, lambda f: (f / "v.txt").write_text("v"))
    before = cache.key("unit", {"a": 1})
    with monkeypatch.context() as m:
        m.setattr(versions, "package_hash", lambda: "0123456789abcdef")
        assert cache.key("unit", {"a": 1}) != before
        assert cache.lookup("unit", {"a": 1}) is None  # the entry built by the other code is not returned
    assert cache.lookup("unit", {"a": 1}) == path


@pytest.mark.parametrize("library", versions.KEYED_LIBRARIES)
def test_key_changes_with_each_library_version(monkeypatch, library):
    cache.get_or_build("unit", {"a": 1}, lambda f: (f / "v.txt").write_text("v"))
    before = cache.key("unit", {"a": 1})
    real = versions.library_versions()
    monkeypatch.setattr(versions, "library_versions", lambda: {**real, library: "999.0"})
    assert cache.key("unit", {"a": 1}) != before
    assert cache.lookup("unit", {"a": 1}) is None


def test_package_hash_covers_code_and_data_but_not_docs_or_bytecode(tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(versions.PACKAGE_ROOT, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    base = versions.tree_hash(pkg)
    assert len(base) == 16 and len(versions.package_hash()) == 16
    (pkg / "__pycache__").mkdir(exist_ok=True)
    (pkg / "__pycache__" / "cache.cpython-311.pyc").write_bytes(b"\0")
    (pkg / "NOTES.md").write_text("docs")
    (pkg / ".cache.py.swp").write_bytes(b"editor")
    assert versions.tree_hash(pkg) == base
    (pkg / "cache.py").write_text((pkg / "cache.py").read_text() + "\n# one more line\n")
    changed = versions.tree_hash(pkg)
    assert changed != base
    (pkg / "data" / "concepts.json").write_text("[]")
    assert versions.tree_hash(pkg) not in (base, changed)
    (pkg / "cache.py").rename(pkg / "cache2.py")  # same bytes, another module
    assert versions.tree_hash(pkg) not in (base, changed)


def test_versions_names_the_package_the_libraries_and_python():
    v = versions.versions()
    assert set(v) == {"dissect-unlearning", "torch", "transformers", "nnsight", "python"}
    assert v["torch"] and v["python"].count(".") == 2
    extra = versions.versions("numpy", "no-such-distribution-here")
    assert extra["numpy"] and extra["no-such-distribution-here"] is None
    assert versions.library_versions() == {k: v[k] for k in versions.KEYED_LIBRARIES}


def test_get_or_build_builds_once_and_reuses():
    calls = []

    def build(folder):
        calls.append(1)
        (folder / "out.txt").write_text("hello")

    first = cache.get_or_build("unit", {"a": 1}, build)
    second = cache.get_or_build("unit", {"a": 1}, build)
    assert first == second and calls == [1]
    assert (first / "out.txt").read_text() == "hello"
    assert json.loads((first / "inputs.json").read_text())["inputs"] == {"a": 1}


def test_entry_metadata_records_what_its_key_was_made_of():
    path = cache.get_or_build("unit", {"a": [1, 2], "b": "x"}, lambda f: (f / "v.txt").write_text("v"))
    meta = json.loads((path / cache.METADATA).read_text())
    assert meta["kind"] == "unit" and meta["key"] == path.name
    assert meta["inputs"] == {"a": [1, 2], "b": "x"}
    assert meta["code"] == versions.package_hash()
    assert meta["libraries"] == versions.library_versions()
    assert meta["versions"] == versions.versions()
    assert meta["built"]["pid"] == os.getpid() and meta["built"]["host"] == cache.HOST
    assert cache.staleness("unit", path.name, meta) is None


def test_failed_build_leaves_no_entry_and_no_temporary_folder():
    def build(folder):
        (folder / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.get_or_build("unit", {"fails": True}, build)
    assert cache.lookup("unit", {"fails": True}) is None
    leftovers = [p for p in (cache.cache_root() / "unit").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_unserialisable_key_part_is_a_clear_error():
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        cache.key("x", {"bad": object()})


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "f.txt"
    cache.atomic_write_text(p, "one")
    cache.atomic_write_text(p, "two")
    assert p.read_text() == "two" and sorted(os.listdir(tmp_path)) == ["f.txt"]


def test_atomic_write_flushes_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or real_fsync(fd))
    cache.atomic_write_bytes(tmp_path / "f.bin", b"data")
    assert synced == [False, True]  # the file's bytes, then the folder's rename


def test_atomic_write_gives_new_files_the_usual_mode_and_keeps_an_existing_mode(tmp_path):
    p = tmp_path / "f.txt"
    cache.atomic_write_text(p, "one")
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~cache._umask()  # not mkstemp's 0600
    p.chmod(0o640)
    cache.atomic_write_text(p, "two")
    assert stat.S_IMODE(p.stat().st_mode) == 0o640


def test_atomic_folder_appears_whole_replaces_and_cleans_up(tmp_path):
    dest = tmp_path / "out"
    with cache.atomic_folder(dest) as tmp:
        assert tmp.parent == tmp_path and tmp != dest and not dest.exists()
        (tmp / "a.txt").write_text("first")
    assert (dest / "a.txt").read_text() == "first"
    with cache.atomic_folder(dest) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(os.listdir(dest)) == ["b.txt"]  # replaced, not merged
    with pytest.raises(KeyboardInterrupt):
        with cache.atomic_folder(dest) as tmp:
            (tmp / "c.txt").write_text("half")
            raise KeyboardInterrupt
    assert sorted(os.listdir(dest)) == ["b.txt"] and sorted(os.listdir(tmp_path)) == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(cache.CacheError, match="exists and is not a folder"):
        with cache.atomic_folder(tmp_path / "file"):
            pass


def test_atomic_folder_replaces_without_the_exchange_call_too(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "_exchange", lambda a, b: False)  # as on a system without renameat2
    dest = tmp_path / "out"
    for text in ("old", "new"):
        with cache.atomic_folder(dest) as tmp:
            (tmp / "v.txt").write_text(text)
    assert (dest / "v.txt").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["out"]


def test_temporary_names_record_their_writer(tmp_path):
    with cache.atomic_folder(tmp_path / "some~odd~name") as tmp:
        assert cache.parse_temp_name(tmp.name) == ("some~odd~name", cache.HOST, os.getpid())
    assert cache.parse_temp_name("abc") is None and cache.parse_temp_name(".tmp~x~host~notapid~r") is None


def test_build_lock_keeps_a_second_build_out(tmp_path, capsys):
    build_dir = tmp_path / "_build"
    errors = []

    def second():
        try:
            with cache.build_lock(build_dir, timeout=0.3):
                errors.append("acquired")
        except cache.LockTimeout as exc:
            errors.append(str(exc))

    with cache.build_lock(build_dir):
        t = threading.Thread(target=second)
        t.start()
        t.join(10)
    assert len(errors) == 1 and f"the book build in {build_dir}" in errors[0]
    assert f"pid {os.getpid()} on {cache.HOST}" in errors[0] and "(this process)" in errors[0]
    assert "waiting for the lock of the book build" in capsys.readouterr().err
    with cache.build_lock(build_dir, timeout=0):  # released: free at once
        pass


def test_lock_timeout_setting_is_checked(monkeypatch):
    assert cache.lock_timeout() == cache.DEFAULT_LOCK_TIMEOUT
    monkeypatch.setenv(cache.LOCK_TIMEOUT_ENV, "90")
    assert cache.lock_timeout() == 90
    monkeypatch.setenv(cache.LOCK_TIMEOUT_ENV, "soon")
    with pytest.raises(cache.CacheError, match="DISSECT_UNLEARNING_LOCK_TIMEOUT='soon': expected a number"):
        cache.lock_timeout()


def _worker(root, package_hash, out_q):
    os.environ["DISSECT_UNLEARNING_CACHE"] = root
    import time

    versions._PACKAGE_HASH = package_hash  # the parent's: files edited meanwhile must not split the key

    def build(folder):
        marker = os.path.join(root, "builds.log")
        with open(marker, "a") as f:
            f.write("built\n")
        time.sleep(0.3)
        (folder / "v.txt").write_text("v")

    out_q.put(str(cache.get_or_build("race", {"k": 1}, build)))


def test_two_processes_build_an_artefact_once(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), versions.package_hash(), q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = {q.get(timeout=5) for _ in procs}
    assert len(results) == 1
    assert (tmp_path / "builds.log").read_text().count("built") == 1
