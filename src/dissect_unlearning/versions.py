"""What code and which libraries this process runs: the part of every cache key that no caller has to remember.

Bottom layer: imports nothing from the package, so any module can use it.
"""
from __future__ import annotations

import hashlib
import platform
from functools import lru_cache
from importlib import metadata
from pathlib import Path

PACKAGE_DIST = "dissect-unlearning"
# The libraries whose version can change what an artefact contains: part of every cache key.
KEYED_LIBRARIES = ("torch", "transformers", "nnsight")


def dist_version(dist: str) -> str | None:
    """The installed version of a distribution, None when it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=None)
def _versions(extra: tuple[str, ...]) -> dict:
    out = {dist: dist_version(dist) for dist in (PACKAGE_DIST, *KEYED_LIBRARIES, *extra)}
    out["python"] = platform.python_version()
    return out


def versions(*extra: str) -> dict:
    """{distribution: version or None} for the package, torch, transformers, nnsight and any `extra` distributions,
    plus "python". Read once per process: an upgrade under a running process does not change the code it runs."""
    return dict(_versions(tuple(extra)))


def library_versions() -> dict:
    """The versions that cache keys include."""
    all_versions = versions()
    return {dist: all_versions[dist] for dist in KEYED_LIBRARIES}


PACKAGE_ROOT = Path(__file__).resolve().parent
_PACKAGE_HASH: str | None = None


def package_files(root: Path = PACKAGE_ROOT) -> list[Path]:
    """The files of a package folder that its code runs or reads: everything but documentation, bytecode and hidden
    files (an editor's swap file is no code)."""
    def counts(p: Path) -> bool:
        parts = p.relative_to(root).parts
        return (p.is_file() and "__pycache__" not in parts and not any(part.startswith(".") for part in parts)
                and p.suffix not in (".pyc", ".md"))

    return sorted(p for p in root.rglob("*") if counts(p))


def tree_hash(root: Path) -> str:
    """sha256 (16 hex digits) over package_files(root), their contents and their paths relative to root."""
    h = hashlib.sha256()
    for p in package_files(root):
        rel = p.relative_to(root).as_posix().encode()
        data = p.read_bytes()
        # Lengths delimit the parts: two different sets of files never feed the same bytes.
        h.update(f"{len(rel)}:{len(data)}:".encode() + rel + data)
    return h.hexdigest()[:16]


def package_hash() -> str:
    """tree_hash of the installed package, computed once per process (from the files as they are when first asked:
    the code a long-running process started with, give or take modules it imports late)."""
    global _PACKAGE_HASH
    if _PACKAGE_HASH is None:
        _PACKAGE_HASH = tree_hash(PACKAGE_ROOT)
    return _PACKAGE_HASH
