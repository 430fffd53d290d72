"""`~` and `$VAR` in path settings, expanded as a shell would when the config is read; an unset variable is
an error naming it, never a directory literally called `$VAR`."""

from __future__ import annotations

import os
import re

from orpo_dist.config.schema import Config, ConfigError

_VAR = re.compile(r"\$(\w+)|\$\{(\w+)(:?-[^}]*)?\}")  # $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}


def expand(value: str, key: str) -> str:
    """`~` and `$VAR` / `${VAR}` / `${VAR:-default}` expanded as a shell would; an unset variable (without a
    default) is a ConfigError naming it, never a directory literally called `$VAR`."""
    unset = []

    def substitute(m: re.Match) -> str:
        name, default = m.group(1) or m.group(2), m.group(3)
        value = os.environ.get(name)
        if default is not None and (value is None or (default.startswith(":") and not value)):
            return default.lstrip(":")[1:]
        if value is None:
            unset.append(f"${name}")
            return m.group(0)
        return value

    expanded = _VAR.sub(substitute, value)
    if unset:
        raise ConfigError(
            f"{key}={value!r}: {', '.join(dict.fromkeys(unset))} is not set; set it, or write the path out"
        )
    return os.path.expanduser(expanded)


# path settings ((section, key)), expanded once when the config is read
PATH_KEYS = (("model", "model"), ("data", "data_path"), ("data", "eval_data_path"), ("data", "cache_dir"),
             ("data", "chat_template"), ("train", "output_dir"), ("train", "resume"))  # fmt: skip


def expand_settings(cfg: Config) -> list[str]:
    """Expand `~` and `$VAR` in every path setting of `cfg` in place; the problems (an unset variable,
    an empty output_dir, which would write the whole run into the current directory)."""
    problems = []
    for section, key in PATH_KEYS:
        value = getattr(getattr(cfg, section), key)
        if isinstance(value, str) and ("$" in value or value.startswith("~")):
            try:
                setattr(getattr(cfg, section), key, expand(value, key))
            except ConfigError as e:
                problems.append(str(e))
    if not cfg.train.output_dir.strip():
        problems.append(
            "output_dir is empty: the run would be written into the current directory; name one, e.g. outputs/run"
        )
    return problems
