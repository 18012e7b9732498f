"""A content-addressed artefact store. It knows nothing of models or concepts.

An artefact is found by the hash of every input that determines it (passed in as a JSON-able dict), never by a path
someone remembered. Writes are atomic (build in a temporary sibling, then rename), so a crash leaves no entry; a
lock per key makes two processes asking for the same artefact build it once.

Root: $DISSECT_UNLEARNING_CACHE, else $XDG_CACHE_HOME/dissect-unlearning, else ~/.cache/dissect-unlearning.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

CACHE_ENV = "DISSECT_UNLEARNING_CACHE"
# When set, every artefact built (not found) appends "<kind> <key>" to this file: how a build learns what its
# chapters computed themselves (book.build checks that its precompute stage left them nothing heavy to do).
BUILD_LOG_ENV = "DISSECT_UNLEARNING_BUILD_LOG"
# Bump when a change of code changes what an artefact contains: every key includes it.
CODE_VERSION = "2"


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dissect-unlearning"


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cache key part of type {type(obj).__name__} is not JSON-serialisable: {obj!r}")


def key(kind: str, inputs: dict) -> str:
    """Hex key of an artefact of `kind` determined by `inputs` (plus the code version)."""
    payload = canonical_json({"kind": kind, "code_version": CODE_VERSION, "inputs": inputs})
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def entry_path(kind: str, k: str) -> Path:
    return cache_root() / kind / k


@contextlib.contextmanager
def lock(path: Path, timeout: float = -1) -> Iterator[None]:
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path), timeout=timeout):
        yield


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def get_or_build(kind: str, inputs: dict, build: Callable[[Path], None], *, force: bool = False) -> Path:
    """Return the folder of the artefact for (kind, inputs), building it with `build(tmp_folder)` if absent.

    `build` writes files into the folder it is given. The folder becomes the entry only if `build` returns; any
    exception (or interrupt) removes it. `inputs.json` is written beside the files, for people reading the cache.
    """
    k = key(kind, inputs)
    final = entry_path(kind, k)
    done = final / ".complete"
    if done.exists() and not force:
        return final
    with lock(final.with_name(final.name + ".lock")):
        if done.exists() and not force:
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{k}-", dir=final.parent))
        try:
            build(tmp)
            (tmp / "inputs.json").write_text(canonical_json({"kind": kind, "code_version": CODE_VERSION,
                                                             "inputs": inputs}))
            (tmp / ".complete").write_text("")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _log_build(kind, k)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _log_build(kind: str, k: str) -> None:
    log = os.environ.get(BUILD_LOG_ENV)
    if log:
        # One short line in append mode: writes from processes side by side do not interleave.
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{kind} {k}\n")


def built(log: str | Path) -> list[tuple[str, str]]:
    """The (kind, key) pairs a build log holds, in order."""
    path = Path(log)
    if not path.is_file():
        return []
    return [tuple(line.split(" ", 1)) for line in path.read_text(encoding="utf-8").splitlines() if " " in line]


def lookup(kind: str, inputs: dict) -> Path | None:
    final = entry_path(kind, key(kind, inputs))
    return final if (final / ".complete").exists() else None


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
