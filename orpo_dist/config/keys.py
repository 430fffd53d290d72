"""Every key described from one source: `--help`, and docs/options.md's key table (tests/test_help.py checks it).

A key's description is the docstring under its field in schema.py, read with `ast`; its default and
choices come from the dataclass, and the other tools' names from aliases.py's ALIASES, SWITCHES and
OTHER_KEYS. Regenerate docs/options.md's table with `python scripts/options_doc.py`.
"""

from __future__ import annotations

import ast
import inspect
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any, Literal

from orpo_dist.config import schema
from orpo_dist.config.aliases import ALIASES, IGNORED, OTHER_KEYS, REFUSED, SWITCHES
from orpo_dist.config.load import HINTS
from orpo_dist.config.schema import CHAT_TEMPLATES, SECTIONS


@dataclass
class Key:
    name: str
    section: str
    default: Any
    choices: tuple[str, ...]
    aliases: tuple[str, ...]
    doc: str


def field_docs() -> dict[str, str]:
    """{key: its docstring on one line}, from the string literal under each field in schema.py."""
    docs = {}
    for node in ast.walk(ast.parse(inspect.getsource(schema))):
        if isinstance(node, ast.ClassDef):
            body = node.body
            for field, after in zip(body, body[1:]):
                is_doc = isinstance(after, ast.Expr) and isinstance(
                    getattr(after, "value", None), ast.Constant
                )
                if isinstance(field, ast.AnnAssign) and is_doc and isinstance(after.value.value, str):
                    docs[field.target.id] = " ".join(after.value.value.split())
    return docs


def _choices(hint: Any) -> tuple[str, ...]:
    for arg in (hint, *typing.get_args(hint)):
        if typing.get_origin(arg) is Literal:
            return tuple(str(a) for a in typing.get_args(arg))
        if typing.get_origin(arg) is list:
            return _choices(typing.get_args(arg)[0])
    return ()


def _default(f) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def keys() -> list[Key]:
    docs = field_docs()
    out = []
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            aliases = [a for a, target in ALIASES.items() if target == f.name]
            aliases += [f"{s} (={v})" for s, (target, v) in SWITCHES.items() if target == f.name]
            choices = (
                CHAT_TEMPLATES + ("<file>.jinja",) if f.name == "chat_template" else _choices(HINTS[f.name])
            )
            out.append(Key(f.name, section, _default(f), choices, tuple(aliases), docs.get(f.name, "")))
    return out


def other_keys() -> list[tuple[str, str]]:
    """Other tools' keys that are checked or translated but not stored: (name, description)."""
    return [(name, " ".join((handler.__doc__ or "").split())) for name, (handler, _) in OTHER_KEYS.items()]


def help_text() -> str:
    lines = []
    for section in SECTIONS:
        lines.append(f"\n{section}:")
        for k in (k for k in keys() if k.section == section):
            extra = f"  {{{','.join(k.choices)}}}" if k.choices else ""
            also = f"  (also --{', --'.join(k.aliases)})" if k.aliases else ""
            lines.append(f"  --{k.name}  default: {k.default}{extra}{also}")
            if k.doc:
                lines.append(f"      {k.doc}")
    lines.append("\nother tools' keys (checked or translated, not stored):")
    for name, doc in other_keys():
        lines.append(f"  --{name}\n      {doc}")
    lines.append("\nother tools' keys that change nothing here (accepted, named in one warning line):")
    lines += [f"  --{name}  ({why})" for name, why in IGNORED.items()]
    lines.append("\nother tools' keys refused when set (the reason):")
    lines += [f"  --{name}  ({why})" for name, why in REFUSED.items()]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """docs/options.md's key table."""
    rows = ["| key | section | default | choices | also accepted | meaning |", "|---|---|---|---|---|---|"]
    for k in keys():
        choices = ", ".join(f"`{c}`" for c in k.choices)
        aliases = ", ".join(f"`{a}`" for a in k.aliases)
        rows.append(f"| `{k.name}` | {k.section} | `{k.default}` | {choices} | {aliases} | {_cell(k.doc)} |")
    for name, doc in other_keys():
        rows.append(f"| `{name}` | (other tools) | | | | {_cell(doc)} |")
    for name, why in IGNORED.items():
        rows.append(f"| `{name}` | (other tools: ignored, one warning line) | | | | {_cell(why)} |")
    for name, why in REFUSED.items():
        rows.append(f"| `{name}` | (other tools: refused when set) | | | | {_cell(why)} |")
    return "\n".join(rows)
