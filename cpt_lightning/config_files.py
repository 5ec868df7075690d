"""What jsonargparse does silently with a ``--config`` file, refused before it reads one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import yaml

from cpt_lightning.errors import UserError


def check_list_appends(argv: list[str]) -> None:
    """``key+:`` appends to a list only across ``--config`` arguments: in a file that includes another (``config:``),
    jsonargparse replaces the included list with the items given. A recipe included by a file that appended one
    ``TokenCheckpoint`` (as recipes.md's milestones suggest) trained without its ObjectiveSchedule: the module's
    MaskedLM, with no end. Each ``--config`` file and the files it includes are looked at."""
    for given in config_arguments(argv):
        path, seen = Path(given), set()
        while path not in seen and (settings := _read(path)) is not None and isinstance(settings.get("config"), str):
            seen.add(path)
            included = path.parent / settings["config"]  # as jsonargparse reads it: beside the file that names it
            if appended := next(appended_keys(settings), None):
                raise UserError(
                    f"{path}: `{appended}` inside a file that includes another (config: {settings['config']}) "
                    f"replaces that list instead of appending to it; drop the config: line and give both files, "
                    f"in order: --config {included} --config {path}")
            path = included


def config_arguments(argv: list[str]) -> Iterator[str]:
    """The values of ``--config FILE`` and ``--config=FILE``."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            yield argv[i + 1]
        elif arg.startswith("--config="):
            yield arg.removeprefix("--config=")


def appended_keys(settings: dict, prefix: str = "") -> Iterator[str]:
    """Every ``key+`` among the settings, nested or dotted, with the keys above it."""
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if str(key).endswith("+"):
            yield name
        if isinstance(value, dict):
            yield from appended_keys(value, f"{name}.")


def _read(path: Path) -> dict | None:
    """The file's settings; anything else (missing, not YAML, not a mapping) is for jsonargparse to explain. A pipe
    (``--config <(...)``) is left unread: jsonargparse reads it once."""
    if not path.is_file():
        return None
    try:
        settings = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return settings if isinstance(settings, dict) else None
