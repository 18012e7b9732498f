"""Tidy tables: the checks that charts and verdicts run on them, and writing one to a file (the bottom layer:
pandas, and the cache's atomic write)."""
from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from .cache import atomic_write_bytes


def write_parquet(df: pd.DataFrame, path: str | Path) -> None:
    """Write `df` (without its index) to a parquet file at `path`, whole or not at all: a failed or interrupted
    write leaves the previous file, or none, never half of one."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(Path(path), buf.getvalue())


def require_columns(df: pd.DataFrame, columns, what: str, allow_empty: bool = True) -> None:
    """Raise a TypeError / ValueError naming `what` unless `df` is a DataFrame with every one of `columns` (and, with
    allow_empty=False, at least one row)."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{what}: expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: the table lacks column(s) {', '.join(missing)}; "
                         f"it has {', '.join(map(str, df.columns))}")
    if not allow_empty and df.empty:
        raise ValueError(f"{what}: the table is empty")
