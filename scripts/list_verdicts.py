"""List the verdicts a build glued into its chapters: chapter, verdict, answer, sentence.

    python scripts/list_verdicts.py [BUILD_FOLDER]      # default: _build

Reads the executed chapters of the build (<BUILD_FOLDER>/book/notebooks/*.ipynb) and prints every verdict glued by
book.glue_verdict (a name with `<name>_answer` and `<name>_status` beside it), in chapter order: what a reader
sees at a glance, and what a change's note compares before and after.
"""
from __future__ import annotations

import ast
import json
import sys
from pathlib import Path


def glued(notebook: Path) -> dict:
    """{name: value} of every glued output of an executed notebook (values as the page shows them)."""
    values = {}
    for cell in json.loads(notebook.read_text()).get("cells", []):
        for out in cell.get("outputs", []):
            name = (out.get("metadata") or {}).get("scrapbook", {}).get("name")
            if name is None:
                continue
            data = out.get("data") or {}
            prefix = (out.get("metadata") or {}).get("scrapbook", {}).get("mime_prefix", "")
            text = "".join(data.get(prefix + "text/plain") or data.get("text/plain") or "")
            try:
                values[name] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                values[name] = text
    return values


def main() -> None:
    build = Path(sys.argv[1] if len(sys.argv) > 1 else "_build")
    notebooks = sorted((build / "book" / "notebooks").glob("*.ipynb"))
    if not notebooks:
        raise SystemExit(f"no executed chapters under {build / 'book' / 'notebooks'}: build the book first")
    for nb in notebooks:
        values = glued(nb)
        # book.glue_verdict glues `<name>_answer` and `<name>_status` side by side; a chapter's other glued values
        # (a lab's `n_answer`, say) are not verdicts.
        names = [n[:-len("_answer")] for n in values if n.endswith("_answer")]
        for name in [n for n in names if n + "_status" in values]:
            print(f"{nb.stem} / {name}: {values[name + '_answer']} - {values.get(name, '')}")


if __name__ == "__main__":
    main()
