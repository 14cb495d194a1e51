"""Config files for the CLI: ``--config run.yaml`` supplies option values (keys = option names), flags override.

The file's values become the command's Typer/Click ``default_map``, so the normal precedence holds: a flag given on
the command line wins, then the file, then the option's default. Unknown keys are an error naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
import yaml

# Options that never go into a config file or into run.json.
NOT_CONFIG = frozenset({"config", "token", "help", "debug"})


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a YAML or JSON mapping from ``path``."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise typer.BadParameter(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise typer.BadParameter(f"config file {path} does not parse: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise typer.BadParameter(f"config file {path} must hold a mapping of option names to values")
    return data


def config_file_callback(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """Eager callback of ``--config``: validate the keys and install the values as the command's defaults."""
    if value is None:
        return None
    data = read_config_file(value)
    params = [p for p in ctx.command.params if p.name and p.name not in NOT_CONFIG]
    known = {p.name: p for p in params}
    known.update({flag.lstrip("-").replace("-", "_"): p for p in params for flag in p.opts})  # --student: students
    defaults: dict[str, Any] = {}
    for key, val in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in known:
            options = ", ".join(sorted({p.opts[0].lstrip("-") for p in params}))
            raise typer.BadParameter(f"unknown key {key!r} in {value} (known: {options})")
        repeatable = getattr(known[name], "multiple", False)
        defaults[known[name].name] = [val] if repeatable and isinstance(val, (str, int, float)) else val  # `exclude: "x"`
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


ConfigOption = typer.Option(
    None,
    "--config",
    help="YAML or JSON file of option values (keys = option names, e.g. max-tokens: 4096). Flags override it.",
    callback=config_file_callback,
    is_eager=True,
    exists=False,
    dir_okay=False,
)
