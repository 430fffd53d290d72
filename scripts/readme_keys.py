"""Regenerate README.md's key table from the config itself (orpo_dist.config.keys.markdown_table).

python scripts/readme_keys.py           # rewrite the table between the markers in README.md
python scripts/readme_keys.py --check   # exit 1 if README.md's table is stale (tests/test_help.py does this)
"""

from __future__ import annotations

import sys
from pathlib import Path

from orpo_dist.config.keys import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- keys:start (python scripts/readme_keys.py) -->", "<!-- keys:end -->"


def with_table(text: str) -> str:
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{markdown_table()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    text = README.read_text()
    if START not in text or END not in text:
        print(f"{README}: markers {START} / {END} not found", file=sys.stderr)
        return 1
    if "--check" in argv:
        return 0 if with_table(text) == text else 1
    README.write_text(with_table(text))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
