import json
import multiprocessing as mp
import os

import pytest

from dissect_unlearning import cache


def test_key_depends_on_every_input_and_not_on_order():
    a = cache.key("x", {"model": "m", "lr": 1e-5, "layers": [1, 2]})
    assert a == cache.key("x", {"layers": [1, 2], "lr": 1e-5, "model": "m"})
    assert a != cache.key("x", {"model": "m", "lr": 2e-5, "layers": [1, 2]})
    assert a != cache.key("y", {"model": "m", "lr": 1e-5, "layers": [1, 2]})


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


def test_failed_build_leaves_no_entry_and_no_temporary_folder():
    def build(folder):
        (folder / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.get_or_build("unit", {"fails": True}, build)
    assert cache.lookup("unit", {"fails": True}) is None
    leftovers = [p for p in (cache.cache_root() / "unit").iterdir() if not p.name.endswith(".lock")]
    assert all(p.name != cache.key("unit", {"fails": True}) and not p.name.startswith(".") for p in leftovers)


def test_unserialisable_key_part_is_a_clear_error():
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        cache.key("x", {"bad": object()})


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "f.txt"
    cache.atomic_write_text(p, "one")
    cache.atomic_write_text(p, "two")
    assert p.read_text() == "two" and sorted(os.listdir(tmp_path)) == ["f.txt"]


def _worker(root, out_q):
    os.environ["DISSECT_UNLEARNING_CACHE"] = root
    import time

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
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = {q.get(timeout=5) for _ in procs}
    assert len(results) == 1
    assert (tmp_path / "builds.log").read_text().count("built") == 1
