"""A content-addressed artefact store. It knows nothing of models or concepts.

An artefact is found by the hash of every input that determines it (passed in as a JSON-able dict) plus the package's
own source and the versions of the libraries that compute it (versions.py), never by a path someone remembered or a
version number someone had to bump. So changed code or an upgraded library gets new entries; the old ones stay until
`prune()` (or `dissect-unlearning cache --prune`) removes them as stale.

Writes are atomic: an entry is built in a temporary sibling folder and renamed into place when complete (a rebuild
swaps the new folder with the old one in one step), so a crash leaves no entry and a reader sees the old entry or
the new one. A lock per key makes two processes asking for the same artefact build it once; the lock file records
who holds it, so a waiting process can say whom it waits for. Temporary names record their writer (host and pid), so
`prune()` can tell the leftovers of a killed build from a build in progress.

Root: $DISSECT_UNLEARNING_CACHE, else $XDG_CACHE_HOME/dissect-unlearning, else ~/.cache/dissect-unlearning.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

from . import validate, versions as _versions

CACHE_ENV = "DISSECT_UNLEARNING_CACHE"
# When set, every artefact built (not found) appends "<kind> <key>" to this file: how a build learns what its
# chapters computed themselves (book.build checks that its precompute stage left them nothing heavy to do).
BUILD_LOG_ENV = "DISSECT_UNLEARNING_BUILD_LOG"
# Seconds a process waits for a lock before giving up ("inf": forever).
LOCK_TIMEOUT_ENV = "DISSECT_UNLEARNING_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 2 * 3600.0  # longer than any single build of the default book
WAIT_NOTE_EVERY = 30.0  # seconds between "still waiting" lines

METADATA = "inputs.json"  # in every entry: kind, key, inputs, code hash, versions, when and where it was built
COMPLETE = ".complete"  # written last: an entry without it is not an entry
TEMP_PREFIX = ".tmp~"  # .tmp~<target>~<host>~<pid>~<random>: a folder or file being written, by whom


class CacheError(Exception):
    """A problem with the cache itself (a lock, a setting, a path), stated in one line."""


class LockTimeout(CacheError, TimeoutError):
    pass


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


# --------------------------------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------------------------------
def _keyed(kind: str, inputs: dict) -> dict:
    """Everything a key is the hash of."""
    return {"kind": kind, "inputs": inputs, "code": _versions.package_hash(),
            "libraries": _versions.library_versions()}


def content_hash(obj) -> str:
    """A hash of a value alone (not of the code), to stand for a large input inside another entry's inputs: two
    versions of the package that read the same value name it alike (a key also hashes the code)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:24]


def key(kind: str, inputs: dict) -> str:
    """Hex key of an artefact of `kind` determined by `inputs`, the package's source and the library versions."""
    return hashlib.sha256(canonical_json(_keyed(kind, inputs)).encode()).hexdigest()[:24]


def entry_path(kind: str, k: str) -> Path:
    return cache_root() / kind / k


def lookup(kind: str, inputs: dict) -> Path | None:
    final = entry_path(kind, key(kind, inputs))
    return final if (final / COMPLETE).exists() else None


# --------------------------------------------------------------------------------------------------------------------
# Who writes: temporary names and lock files say which process, so leftovers of a dead one can be told apart
# --------------------------------------------------------------------------------------------------------------------
HOST = re.sub(r"[~/\s]", "_", socket.gethostname()) or "localhost"


def _temp_prefix(target: str) -> str:
    return f"{TEMP_PREFIX}{target[:96]}~{HOST}~{os.getpid()}~"


def parse_temp_name(name: str) -> tuple[str, str, int] | None:
    """(target, host, pid) of a temporary name this module made, else None."""
    if not name.startswith(TEMP_PREFIX):
        return None
    parts = name[len(TEMP_PREFIX):].rsplit("~", 3)
    if len(parts) != 4 or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])


def pid_alive(pid: int) -> bool:
    """Whether a process of this host runs with this pid (a zombie does not count: it is dead, just not reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def writer_gone(host: str, pid: int) -> bool:
    """True only when we can tell: same host and no such process. A writer on another host may still be running."""
    return host == HOST and not pid_alive(pid)


# --------------------------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    # Makes a rename durable. Some file systems cannot fsync a folder; the rename is still atomic there.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Flush every file and folder under `path` to disk, so a rename after it never exposes half-written files."""
    for folder, _, files in os.walk(path):
        for name in files:
            p = os.path.join(folder, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file whole or not at all: a temporary sibling, flushed to disk, renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~_umask()  # what open() would have given (mkstemp makes 0600 files)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


_RENAMEAT2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE). False where the system cannot."""
    global _RENAMEAT2
    if not sys.platform.startswith("linux"):
        return False
    if _RENAMEAT2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):
            return False
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        _RENAMEAT2 = fn
    at_fdcwd, rename_exchange = -100, 2
    if _RENAMEAT2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _swap_in(tmp: Path, dest: Path) -> None:
    try:
        os.rename(tmp, dest)  # dest absent (or an empty folder): one rename
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if _exchange(tmp, dest):
            old = tmp  # the exchange left the old folder under the temporary name
        else:
            # Two renames: for a moment dest does not exist. get_or_build readers then wait on the entry's lock,
            # which the writer holds until the new folder is in place.
            old = dest.with_name(f"{_temp_prefix(dest.name)}{secrets.token_hex(4)}")
            os.rename(dest, old)
            os.rename(tmp, dest)
        _remove(old)
    _fsync_dir(dest.parent)


@contextlib.contextmanager
def atomic_folder(dest: Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to `dest`; when the block ends normally it becomes `dest` (replacing
    any folder there in one step), when it raises (or is interrupted) it is removed.

        with cache.atomic_folder(out) as tmp:
            model.save_pretrained(tmp)
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise CacheError(f"{dest} exists and is not a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest.name), dir=dest.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; the result should look like any other
        yield tmp
        _fsync_tree(tmp)
        _swap_in(tmp, dest)
    except BaseException:
        _remove(tmp)
        raise


# --------------------------------------------------------------------------------------------------------------------
# Locks
# --------------------------------------------------------------------------------------------------------------------
def lock_timeout() -> float:
    """Seconds to wait for a lock: $DISSECT_UNLEARNING_LOCK_TIMEOUT, else two hours."""
    value, text = validate.seconds_from_env(LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT)
    if math.isnan(value):
        raise CacheError(f"{LOCK_TIMEOUT_ENV}={text!r}: expected a number of seconds (0 or more, or inf)")
    return value


def _note(message: str) -> None:
    print(f"[dissect-unlearning] {message}", file=sys.stderr, flush=True)


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def format_age(seconds: float) -> str:
    if math.isinf(seconds):
        return "forever"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}" if seconds >= 10 * size else f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _read_info(fd: int) -> dict | None:
    data = os.pread(fd, 65536, 0)
    if not data.strip():
        return None
    try:
        info = json.loads(data)
    except ValueError:
        return {}  # being written right now, or written by someone else
    return info if isinstance(info, dict) else {}


def describe_holder(info: dict | None, holding: bool = False) -> str:
    """'pid 123 on host-a since 2026-05-09 12:00:01 (3 min ago), running "dissect-unlearning build"'. With `holding`
    (the lock is held right now), says when that is this process, or a pid that is gone."""
    if not info:
        return "a process that has not recorded itself"
    pid, host, since = info.get("pid"), info.get("host", "?"), info.get("since")
    text = f"pid {pid} on {host}"
    if isinstance(since, (int, float)):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
        text += f" since {stamp} ({format_age(max(0.0, time.time() - since))} ago)"
    if info.get("command"):
        text += f', running "{info["command"]}"'
    if holding and pid == os.getpid() and host == HOST:
        text += " (this process)"
    elif holding and isinstance(pid, int) and writer_gone(host, pid):
        text += " (gone; a process it started may still hold the lock)"
    return text


def _describe_lock(path: Path) -> str:
    name = path.with_suffix("") if path.suffix == ".lock" else path
    with contextlib.suppress(ValueError):
        return name.relative_to(cache_root()).as_posix()
    return str(name)


def _command() -> str:
    """What the holder runs, for people deciding whether to wait: "dissect-unlearning build --jobs 2"."""
    argv = list(sys.argv) or [""]
    program = Path(argv[0]).name if argv[0] not in ("", "-", "-c") else Path(sys.executable).name
    text = " ".join([program, *argv[1:]])
    return text if len(text) <= 120 else text[:117] + "..."


@contextlib.contextmanager
def lock(path: Path, timeout: float | None = None, what: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if absent) for the block.

    The holder writes its pid, host, start time and command into the lock file. A waiting process prints who holds
    it once, then every 30 s, and raises LockTimeout after `timeout` seconds (default: lock_timeout()). The lock is
    an flock, which the system releases when its holder dies: a process finding the record of a holder that died
    holding it says so and takes the lock over.
    """
    import fcntl

    path = Path(path)
    what = what or _describe_lock(path)
    limit = lock_timeout() if timeout is None else float(timeout)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _acquire(fd, path, limit, what)
        try:
            left = _read_info(fd)
            if left is not None:
                _note(f"note: took over the lock of {what} from {describe_holder(left)}, which died holding it")
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": HOST, "since": time.time(), "what": what,
                                      "command": _command()}).encode(), 0)
            yield
        finally:
            os.ftruncate(fd, 0)  # an empty lock file: released cleanly
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, path: Path, limit: float, what: str) -> None:
    import fcntl

    start = time.monotonic()
    next_note = start
    delay = 0.02
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        except OSError as exc:
            raise CacheError(f"cannot lock {path}: {exc.strerror} (does this file system support locks?)") from None
        now = time.monotonic()
        if now - start >= limit:
            holder = describe_holder(_read_info(fd), holding=True)
            raise LockTimeout(f"gave up after {format_age(limit)} waiting for the lock of {what}, held by {holder}; "
                              f"set {LOCK_TIMEOUT_ENV} (seconds) to wait longer")
        if now >= next_note:
            _note(f"waiting for the lock of {what}, held by {describe_holder(_read_info(fd), holding=True)}")
            next_note = now + WAIT_NOTE_EVERY
        time.sleep(max(0.0, min(delay, start + limit - now, next_note - now)))
        delay = min(delay * 2, 0.5)


def _try_lock(path: Path):
    """An fd holding the lock at `path` if nobody holds it, else None."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlock(fd: int) -> None:
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def build_lock(build_dir: Path, timeout: float | None = None) -> Iterator[None]:
    """Hold `<build_dir>/.build.lock` for a whole book build: a second build sharing the folder waits (printing
    who builds) or gives up after `timeout` seconds (default: lock_timeout())."""
    build_dir = Path(build_dir).resolve()
    with lock(build_dir / ".build.lock", timeout=timeout, what=f"the book build in {build_dir}"):
        yield


# --------------------------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------------------------
def get_or_build(kind: str, inputs: dict, build: Callable[[Path], None], *, force: bool = False) -> Path:
    """Return the folder of the artefact for (kind, inputs), building it with `build(tmp_folder)` if absent.

    `build` writes files into the folder it is given. The folder becomes the entry only if `build` returns; any
    exception (or interrupt) removes it. `inputs.json` is written beside the files: the inputs, the code hash and
    the library versions the key was made of, and when, where and how fast the entry was built. With `force` the
    entry is rebuilt; the old one stays readable until the new one replaces it.
    """
    k = key(kind, inputs)
    final = entry_path(kind, k)
    if not force and (final / COMPLETE).exists():
        return final
    with lock(final.with_name(k + ".lock"), what=f"{kind}/{k}"):
        if not force and (final / COMPLETE).exists():
            return final
        started = time.time()
        with atomic_folder(final) as tmp:
            build(tmp)
            record = {**json.loads(canonical_json(_keyed(kind, inputs))), "key": k,
                      "versions": _versions.versions(),
                      "built": {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                                "seconds": round(time.time() - started, 3), "host": HOST, "pid": os.getpid()}}
            (tmp / METADATA).write_text(json.dumps(record, indent=1, sort_keys=True, ensure_ascii=False),
                                        encoding="utf-8")
            (tmp / COMPLETE).write_text("")
        _log_build(kind, k)
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


def folder_size(path: Path) -> int:
    path = Path(path)
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


# --------------------------------------------------------------------------------------------------------------------
# What the cache holds, and pruning it
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Entry:
    kind: str
    key: str
    path: Path
    bytes: int
    built: float  # epoch seconds
    stale: str | None  # why the current code would not find it, None when it would


@dataclass
class Leftover:
    """A temporary folder or file: a write in progress, or what a killed writer left behind."""
    path: Path
    bytes: int
    writer: str
    gone: bool  # its writer is known to be dead


@dataclass
class Contents:
    root: Path
    entries: list[Entry] = field(default_factory=list)
    leftovers: list[Leftover] = field(default_factory=list)
    unkeyed: dict[str, int] = field(default_factory=dict)  # folder -> bytes not in entries (provisioned models, ...)
    dead_locks: list[Path] = field(default_factory=list)  # lock files still naming a holder that died holding them


def _read_metadata(path: Path) -> dict | None:
    try:
        meta = json.loads((path / METADATA).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def staleness(kind: str, k: str, meta: dict | None) -> str | None:
    """Why an entry would not be found by the running code (its key would differ), or None if it would."""
    if meta is None or "inputs" not in meta:
        return f"no readable {METADATA}"
    if "code" not in meta:
        return "built before keys included the code"
    try:
        if key(kind, meta["inputs"]) == k:
            return None
    except TypeError:
        return f"unreadable inputs in {METADATA}"
    reasons = []
    if meta["code"] != _versions.package_hash():
        reasons.append("package code changed")
    before = meta.get("libraries") or {}
    for lib, now in _versions.library_versions().items():
        if before.get(lib) != now:
            reasons.append(f"{lib} {before.get(lib)} -> {now}")
    return ", ".join(reasons) or "key scheme changed"


_LEGACY_TEMP = re.compile(r"\.(.+)-[a-z0-9_]{8}")  # tempfile.mkdtemp(prefix=".<target>-") of earlier versions


def _leftover(path: Path) -> Leftover | None:
    parsed = parse_temp_name(path.name)
    if parsed:
        _, host, pid = parsed
        return Leftover(path, folder_size(path), f"pid {pid} on {host}", writer_gone(host, pid))
    legacy = _LEGACY_TEMP.fullmatch(path.name)
    if legacy and path.is_dir():
        # Written under the lock of its target: a free lock means its writer is gone.
        lock_path = path.with_name(legacy.group(1) + ".lock")
        if lock_path.is_file():
            fd = _try_lock(lock_path)
            if fd is not None:
                _unlock(fd)
            return Leftover(path, folder_size(path), "an earlier version", fd is not None)
    return None


def _lock_left_by_dead_holder(path: Path) -> bool:
    fd = _try_lock(path)
    if fd is None:
        return False  # held now, or gone
    try:
        return _read_info(fd) is not None  # holders empty the file before releasing it
    finally:
        _unlock(fd)


def contents(kind: str | None = None) -> Contents:
    """Every entry (with size, age and staleness), temporary leftover and dead lock record under the cache root,
    or under one kind's folder."""
    root = cache_root()
    out = Contents(root)
    if not root.is_dir():
        return out
    if kind is not None and not (root / kind).is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise CacheError(f"no kind {kind!r} in the cache at {root} (present: {', '.join(present) or 'none'})")
    for top in sorted(root.iterdir()):
        if kind is not None and top.name != kind:
            continue
        if top.name.startswith("."):
            leftover = _leftover(top)
            if leftover:
                out.leftovers.append(leftover)
            continue
        if not top.is_dir():
            out.unkeyed[top.name] = out.unkeyed.get(top.name, 0) + folder_size(top)
            continue
        for child in sorted(top.iterdir()):
            leftover = _leftover(child) if child.name.startswith(".") else None
            if leftover:
                out.leftovers.append(leftover)
            elif child.is_dir() and not child.name.startswith(".") and (child / COMPLETE).is_file():
                meta = _read_metadata(child)
                out.entries.append(Entry(top.name, child.name, child, folder_size(child),
                                         (child / COMPLETE).stat().st_mtime, staleness(top.name, child.name, meta)))
            elif child.name.endswith(".lock") and child.is_file():
                if child.stat().st_size and _lock_left_by_dead_holder(child):
                    out.dead_locks.append(child)
            else:
                out.unkeyed[top.name] = out.unkeyed.get(top.name, 0) + folder_size(child)
    return out


@dataclass
class Removed:
    path: Path
    what: str
    bytes: int


def prune(kind: str | None = None) -> list[Removed]:
    """Remove stale entries, the temporary folders and files of writers that are gone, and the records of lock
    holders that died; return what was removed. Writes in progress and entries the current code uses stay."""
    import fcntl

    found = contents(kind)
    removed = []
    for e in found.entries:
        if not e.stale:
            continue
        # Out of sight first, in one step: a reader sees the entry or nothing, never half of it.
        aside = e.path.with_name(f"{_temp_prefix(e.key)}{secrets.token_hex(4)}")
        try:
            os.rename(e.path, aside)
        except FileNotFoundError:
            continue  # pruned by someone else meanwhile
        _remove(aside)
        removed.append(Removed(e.path, f"stale entry ({e.stale})", e.bytes))
    for leftover in found.leftovers:
        if leftover.gone and leftover.path.exists():
            _remove(leftover.path)
            removed.append(Removed(leftover.path, f"temporary left by {leftover.writer}, which is gone",
                                   leftover.bytes))
    for path in found.dead_locks:
        fd = _try_lock(path)
        if fd is None:
            continue
        try:
            holder = describe_holder(_read_info(fd))
            os.ftruncate(fd, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        removed.append(Removed(path, f"lock record of {holder}, which died holding it", 0))
    removed += _prune_resume_checkpoints(kind)
    return removed


RESUME_PREFIX = ".resume~"  # <kind>/.resume~<key>/: the last checkpoint of an interrupted training run
RESUME_MAX_AGE = 7 * 24 * 3600


def _prune_resume_checkpoints(kind: str | None) -> list[Removed]:
    """Training checkpoints (about 1.6 GB for the default model) of runs whose entry is now in place, or that no
    run has touched for a week (the code or settings that would resume them have most likely changed): a checkpoint
    of a run that is still training (its lock is held) stays."""
    import fcntl

    root = cache_root()
    removed = []
    for folder in sorted(root.glob(f"{kind or '*'}/{RESUME_PREFIX}*")):
        key = folder.name[len(RESUME_PREFIX):]
        done = (folder.parent / key).is_dir()
        old = time.time() - folder.stat().st_mtime > RESUME_MAX_AGE
        if not (done or old):
            continue
        fd = _try_lock(folder.parent / f"{key}.lock")
        if fd is None:
            continue  # training right now
        try:
            size = folder_size(folder)
            _remove(folder)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        why = "its run finished" if done else "untouched for a week"
        removed.append(Removed(folder, f"training checkpoint ({why})", size))
    return removed
