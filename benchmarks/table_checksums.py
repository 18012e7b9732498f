"""Checksums of every table and unlearned model a build's cache holds, to compare two builds' numbers.

    python benchmarks/table_checksums.py CACHE [--entries]

CACHE is a build's artefact cache ($DISSECT_UNLEARNING_CACHE of that build). For each kind it prints how many
entries there are and one checksum over all of them: the sha256 of the sorted (inputs, content) pairs, where an
entry's inputs are resolved as bench_precompute matches them (another entry's key replaced by that entry's
inputs, the code fingerprint left out) and its content is the table's values written out exactly (floats by their
shortest round-trip repr, NaN as NaN) or, for an unlearned model, its weights' sha256. Two builds whose checksums
agree computed the same numbers for the same artefacts, whatever code computed them; `--entries` lists each entry.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path

from bench_precompute import KINDS, entries
from dissect_unlearning import cache as artefacts
from dissect_unlearning.unlearning import adapter, storage


def _plain(value):
    """A value of a table cell as JSON can write it exactly (numpy scalars and arrays made plain)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return value


def table_digest(path: Path) -> str:
    import pandas as pd

    table = pd.read_parquet(path)
    text = json.dumps({"columns": [str(c) for c in table.columns],
                       "rows": [[_plain(v) for v in row] for row in table.itertuples(index=False)]})
    return hashlib.sha256(text.encode()).hexdigest()


def digests(cache: Path, kind: str) -> dict[str, str]:
    """{resolved inputs (JSON): content digest} of one kind's complete entries."""
    out = {}
    for inputs, folder in entries(cache, kind).items():
        if not (folder / artefacts.COMPLETE).exists():
            continue
        if kind == "unlearned":  # a full fine-tune stores a delta, a LoRA fine-tune an adapter: each names its sha256
            (manifest,) = [folder / name for name in (storage.MANIFEST, adapter.MANIFEST) if (folder / name).exists()]
            out[inputs] = json.loads(manifest.read_text())["sha256"]
        else:
            (table,) = list(folder.glob("*.parquet"))
            out[inputs] = table_digest(table)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cache", type=Path)
    ap.add_argument("--entries", action="store_true", help="list every entry's digest too")
    args = ap.parse_args()
    if not args.cache.is_dir():
        raise SystemExit(f"{args.cache}: not a folder (give a build's artefact cache)")
    for kind in ("unlearned", *KINDS):
        found = digests(args.cache, kind)
        whole = hashlib.sha256(json.dumps(sorted(found.items())).encode()).hexdigest()
        print(f"{kind:12s} {len(found):4d} entries  sha256 {whole[:16]}")
        if args.entries:
            for inputs, digest in sorted(found.items(), key=lambda item: item[1]):
                print(f"    {digest[:16]}  {inputs[:160]}")


if __name__ == "__main__":
    main()
