"""Where the book lives, and the one error every part of the build raises."""
from __future__ import annotations

import os
from pathlib import Path

BOOK_ENV = "DISSECT_UNLEARNING_BOOK"  # the project folder (with _toc.yml, notebooks/, profiles/), if not found


class BookError(ValueError):
    """The book cannot be built: a bad profile or parameter, a chapter that raised, or a broken page."""


def project_root(start: str | Path | None = None) -> Path:
    """The folder with `_toc.yml` and `notebooks/`: $DISSECT_UNLEARNING_BOOK, the current folder or one above it,
    or the source checkout the package is installed from."""
    if os.environ.get(BOOK_ENV):
        root = Path(os.environ[BOOK_ENV]).expanduser().resolve()
        if not (root / "_toc.yml").is_file():
            raise BookError(f"${BOOK_ENV}={root} has no _toc.yml")
        return root
    here = Path(start or Path.cwd()).resolve()
    for p in (here, *here.parents):
        if (p / "_toc.yml").is_file() and (p / "notebooks").is_dir():
            return p
    checkout = Path(__file__).resolve().parents[3]  # src/dissect_unlearning/book/project.py -> the checkout
    if (checkout / "_toc.yml").is_file() and (checkout / "notebooks").is_dir():
        return checkout
    raise BookError("no book found: run this in the project folder (the one with _toc.yml and notebooks/), "
                    f"or set ${BOOK_ENV}")
