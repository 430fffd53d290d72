"""YAML that cannot hurt or mislead: safe tags only, no alias bomb, no key given twice.

PyYAML's SafeLoader shares an aliased node instead of copying it, so a "billion laughs" file loads
fast, and then whatever walks the value (a repr in an error message, a copy, a dump) expands it: minutes
and gigabytes. `load_yaml` counts the values the document stands for, aliases expanded, without
expanding anything, and refuses a document of more than `MAX_VALUES`. A key written twice in one
mapping (PyYAML keeps the last one silently) is refused with both lines; `repeated_keys` does the same
for one setting written both flat and under its section (`lr:` and `train: {lr:}`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import yaml

from orpo_dist.config.schema import ConfigError

MAX_VALUES = 100_000  # a real config has a few hundred; the 9-level "billion laughs" has 10^9


class _SafeLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then overrides: YAML's own rule
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise ConfigError(
                            f"{self.name}: key {key!r} is given twice in one mapping (lines {seen[key]} and "
                            f"{line}); keep one"
                        )
                    seen[key] = line
                except TypeError:  # an unhashable key: SafeConstructor reports it below
                    pass
        return super().construct_mapping(node, deep=deep)


def expanded_size(root: yaml.Node) -> int:
    """How many values the document stands for with every alias expanded (stops counting at MAX_VALUES)."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in in_progress:
            raise ConfigError("an alias refers to the value that contains it (a recursive alias); remove it")
        in_progress.add(id(node))
        children: Iterable[yaml.Node] = ()
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = (n for pair in node.value for n in pair)
        total = 1
        for child in children:
            total = min(total + size(child), MAX_VALUES + 1)
        in_progress.discard(id(node))
        sizes[id(node)] = total
        return total

    return size(root)


def load_yaml(text: str, name: str = "<yaml>") -> Any:
    """`yaml.safe_load`, refusing (ConfigError) an alias bomb, a recursive alias and a key given twice."""
    loader = _SafeLoader(text)
    loader.name = name
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if expanded_size(node) > MAX_VALUES:
            raise ConfigError(
                f"{name}: its aliases (*name) expand to more than {MAX_VALUES:,} values (an alias bomb?); "
                "write the values out"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def repeated_keys(
    data: dict, where: str, canonical: Callable[[str], str], sections: Iterable[str], old: dict[str, str]
) -> list[str]:
    """Settings given more than once in one config mapping (flat and nested, or by two names, e.g. `lr` and
    `train.learning_rate`): one problem per setting, naming every place."""
    places: dict[str, list[str]] = {}
    for key, value in data.items():
        if old.get(key, key) in sections and isinstance(value, dict):
            for sub in value:
                places.setdefault(canonical(str(sub)), []).append(f"{key}.{sub}")
        else:
            places.setdefault(canonical(str(key)), []).append(str(key))
    return [
        f"{where}: {leaf} is given {len(at)} times ({' and '.join(f'`{p}`' for p in at)}); keep one"
        for leaf, at in places.items()
        if len(at) > 1
    ]
