"""Before a request goes to NDIF: one check, with nnsight's own API, that it can run at all.

Three things stop a remote run, and each would otherwise surface late, as a job that fails or hangs after the local
work is done: no API key, the model not running on NDIF now, an nnsight whose version differs from the server's
(the request format changes between versions). preflight() asks all three before any work and raises one
RemoteUnavailableError that lists every problem found.

The key is read from the environment variable NDIF_API_KEY or nnsight's own configuration (nnsight.CONFIG, which
`nnsight.login()` fills): never from a notebook parameter, and never written to a notebook, a cache entry or a log.
"""
from __future__ import annotations

import os
from pathlib import Path

from .common import RemoteUnavailableError

# Packages whose versions must match the server's: nnsight's request format changes between its versions. torch and
# transformers differences are reported by nnsight.compare() too, but the adapter's traces use neither's internals.
MUST_MATCH = ("nnsight",)


def api_key() -> str | None:
    """The NDIF API key nnsight will send: NDIF_API_KEY, else nnsight's configuration; None if there is none."""
    from nnsight import CONFIG

    key = os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY
    if key and CONFIG.API.APIKEY != key:
        CONFIG.API.APIKEY = key  # in memory only (set after nnsight was imported); never saved
    return key or None


def hosted_name(model) -> str:
    """The name NDIF knows `model` (a loaded model, or its name) by: its hub id; a ValueError for a model that exists
    only on this machine (a folder, or a registry model provisioned here)."""
    if isinstance(model, str):
        name = model
    else:
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    from .. import models

    if not name or name in models.REGISTRY or Path(str(name)).expanduser().exists():
        raise ValueError(f"remote=True needs the vanilla model under the hub id NDIF hosts it by (e.g. "
                         f"'meta-llama/Llama-3.1-8B'), but this one was loaded from {name!r} on this machine; the "
                         f"adapter travels with the request, the vanilla weights must be NDIF's")
    return str(name)


def preflight(model) -> None:
    """Raise RemoteUnavailableError (every problem in one message) unless a request for `model` (a loaded model or
    its name) can run on NDIF."""
    import nnsight

    name = hosted_name(model)
    problems = []
    if api_key() is None:
        problems.append("no NDIF API key: set the environment variable NDIF_API_KEY, or run nnsight.login() once")
    try:
        running = nnsight.is_model_running(name)
    except Exception as exc:  # noqa: BLE001 - the hub or NDIF unreachable: the same answer to the user
        problems.append(f"cannot ask NDIF whether {name!r} is running ({exc})")
    else:
        if not running:
            problems.append(f"{name!r} is not running on NDIF now (nnsight.is_model_running; see nnsight.status() "
                            f"for the models that are), or NDIF cannot be reached")
    try:
        packages = nnsight.compare().packages
    except Exception as exc:  # noqa: BLE001
        problems.append(f"cannot read NDIF's package versions ({exc})")
    else:
        for pkg in MUST_MATCH:
            v = packages.get(pkg)
            if v is not None and not v["match"]:
                problems.append(f"{pkg} {v['local']} here but {v['remote']} on NDIF: install {pkg}=={v['remote']}")
    if problems:
        raise RemoteUnavailableError("remote=True cannot run: " + "; ".join(problems)
                                     + ". Or use remote='local' (nnsight's offline simulation of the request)")
