"""Regenerate docs/options.md's key table from the config itself (orpo_dist.config.keys.markdown_table).

python scripts/options_doc.py           # rewrite the table between the markers in docs/options.md
python scripts/options_doc.py --check   # exit 1 if docs/options.md's table is stale (tests/test_help.py does this)
"""

from __future__ import annotations

import sys
from pathlib import Path

from orpo_dist.config.keys import markdown_table

DOC = Path(__file__).resolve().parents[1] / "docs" / "options.md"
START, END = "<!-- keys:start (python scripts/options_doc.py) -->", "<!-- keys:end -->"


def with_table(text: str) -> str:
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{markdown_table()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    text = DOC.read_text()
    if START not in text or END not in text:
        print(f"{DOC}: markers {START} / {END} not found", file=sys.stderr)
        return 1
    if "--check" in argv:
        return 0 if with_table(text) == text else 1
    DOC.write_text(with_table(text))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
