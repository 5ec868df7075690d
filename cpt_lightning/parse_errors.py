"""A config problem as one ``error:`` line naming the field, instead of jsonargparse's usage and type-union dump."""

from __future__ import annotations

import re
import sys

from lightning.pytorch.cli import LightningArgumentParser

from cpt_lightning.config_files import CONFIG_FILE
from cpt_lightning.errors import did_you_mean, long_options, one_line

_PATH_STEP = re.compile(r"""^(?:- )?(?:Parser key "(?P<key>[^"]+)"|Problem with given class_path '(?P<cls>[^']+)'):$""")
_NOISE = ("Does not validate against", "Subtypes:", "Errors:")
_WHOLE_FLOAT = re.compile(r"Expected a <class 'int'>\. Got value: (\d+)\.0$")
_GOT_VALUE = re.compile(r"^(?P<kind>.*)\. Got value: (?P<value>.*)$")
_NOT_A_FILE = re.compile(r"^path but .* either not accessible or invalid$")
_TYPE_MISMATCH = ("Expected a <class 'str'>", "Not a valid subclass of")  # a union's branches the value was not for
_SOURCE_LISTS = ("sources", "val_sources")  # PackedDataModule's lists of {name, path, weight}
_ABSTRACT = re.compile(r"^Expected an instantiatable class, but (?P<path>[\w.]+) is abstract$")
_NOT_IMPORTABLE = re.compile(r"^Unexpected import path format: (?P<path>\S+)$")  # e.g. a misspelled file name
_MODEL_REQUIRED = re.compile(r"^the following arguments are required: .*?\b(?:(?P<command>\w+)\.)?model\b")
_NOT_ACCEPTED = re.compile(r"^Option '(?P<name>\w+)' is not accepted$")  # an init argument the class does not take
_UNRECOGNIZED = re.compile(r"^unrecognized arguments: (?P<option>--[^\s=]+)")  # the command line's first
_NOT_A_KEY = re.compile(r"^(?:Subcommand '\w+'|Group '(?P<group>[\w.]+)') does not accept option '(?P<key>[^']+)'")


def condense_parse_error(message: str) -> str:
    """jsonargparse explains a bad config as an indented tree of every union branch it tried.

    Keep the first branch only, as one line: the path of keys/classes down to the actual problem,
    e.g. ``trainer.callbacks → callbacks.ObjectiveSchedule → phases → ... : the following
    arguments are required: tokens``. A message without that shape is returned unchanged.
    """
    if message.startswith("Unexpected config:"):  # jsonargparse's words for an empty file, or one holding a list
        given = " ".join(message.removeprefix("Unexpected config:").split())
        held = f"no mapping of settings ({given})" if given else "nothing"
        return (f"a --config file holds {held}: a config is a YAML mapping of model:, data: and trainer: settings, "
                "e.g. configs/demo_cpu.yaml")
    if required := _MODEL_REQUIRED.match(message):  # `cpt fit` with no --config, or a config without a model:
        example = ("cpt validate --config runs/demo/config.yaml --ckpt_path runs/demo/checkpoints/last.ckpt"
                   if required["command"] == "validate" else "cpt fit --config configs/demo_cpu.yaml")
        return (f"{one_line(message)}; a run's model:, data: and trainer: settings come from a config, "
                f"e.g. {example}")
    path: list[str] = []
    raw_lines = message.splitlines()
    for i, line in enumerate(raw.strip() for raw in raw_lines):
        if not line or line.startswith(_NOISE):
            continue
        step = _PATH_STEP.match(line)
        if step:
            path.append(step["key"] or step["cls"])
            continue
        reason = line.removeprefix("- ")
        if path and reason.startswith(_TYPE_MISMATCH) and (given := _class_path_branch(raw_lines[i:])):
            return f"{' → '.join(path)} → {condense_parse_error(given)}"
        if line.startswith("- Expected a ") and path:
            reason = _expected_types(raw_lines[i:]) or reason
        if path and path[-1] in _SOURCE_LISTS and (named := _named_config_file(raw_lines[i:])):
            reason = _no_such_file(named)  # a recipe's recipe/data/en_mix.yaml, copied without its parts
        elif path and path[-1] in _SOURCE_LISTS:  # a folder, or a list of folders, where mappings go
            reason += (f"; {path[-1]} is a list of mappings, e.g. --data.init_args.{path[-1]}="
                       "'[{name: pubmed, path: data/prepared/pubmed, weight: 0.6}]'")
        if (missing := _NOT_IMPORTABLE.match(reason)) and CONFIG_FILE.search(missing["path"]):
            reason = _no_such_file(missing["path"])  # jsonargparse took it for a class path, since no file was there
        elif path and CONFIG_FILE.search(path[-1]) and reason.startswith("No module named"):  # a bare file name
            reason = _no_such_file(path.pop())
        if abstract := _ABSTRACT.match(reason):
            reason += _abstract_methods(abstract["path"])
        if (unknown := _NOT_ACCEPTED.match(reason)) and path:
            reason += _nearest_argument(path[-1], unknown["name"])
        if whole := _WHOLE_FLOAT.search(reason):  # YAML reads a budget written 55e9 as a float
            reason += f" (a number written 1e5 is a float in YAML: write {int(float(whole[1])):_})"
        return f"{' → '.join(path)}: {reason}" if path else one_line(message)
    return one_line(message)


def _no_such_file(path: str) -> str:
    return f"no such file: {path} (a relative path is read from the folder of the file naming it)"


def _abstract_methods(class_path: str) -> str:
    """What a class jsonargparse calls abstract leaves undefined: an objective whose ``build_inputs`` is misspelt
    was only "abstract"."""
    import inspect

    if (cls := _imported_class(class_path)) is None:
        return ""

    def arguments(method: str) -> str:
        parameters = inspect.signature(getattr(cls, method)).parameters
        return ", ".join(parameter for parameter in parameters if parameter != "self")

    methods = ", ".join(f"{method}({arguments(method)})" for method in sorted(getattr(cls, "__abstractmethods__", ())))
    return f": it does not define {methods} (see docs/objectives.md)" if methods else ""


def _nearest_argument(class_path: str, given: str) -> str:
    """``; did you mean learning_rate?`` where the class takes an argument a letter or two from ``given``."""
    import inspect

    try:
        parameters = inspect.signature(_imported_class(class_path)).parameters
    except (TypeError, ValueError):  # None (not importable), or no signature to read
        return ""
    return did_you_mean(given, parameters)


def _imported_class(class_path: str):
    """The class a config's class path names, or None where it cannot be imported."""
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _named_config_file(lines: list[str]) -> str | None:
    """The value jsonargparse got, where it names a YAML or JSON file (not there, or jsonargparse would have read it)."""
    got = next((match["value"] for raw in lines if (match := _GOT_VALUE.match(raw.strip().removeprefix("- ")))), None)
    return got if got is not None and CONFIG_FILE.search(got) else None


def _class_path_branch(lines: list[str]) -> str | None:
    """The branch of a union that took the class_path the config gives (``trainer.strategy``: ``str`` or a Strategy;
    ``trainer.plugins``: four plugin types): its problem is the user's mistake, while the first branch only said the
    value is not a string, or not a Precision."""
    start = next((j for j, raw in enumerate(lines) if "Problem with given class_path" in raw), None)
    return None if start is None else "\n".join(lines[start:])


def _expected_types(lines: list[str]) -> str | None:
    """A value no type of a union takes (``trainer.precision: bf17``): jsonargparse lists an "Expected a …" per type
    and then the value given; the first line alone ("Expected a <class 'int'>") hid both the value and the choices.
    Only the first list counts (its indentation): an enclosing union's types (``data``'s NoneType) are not choices
    for this field. A list may also be given as the path of a file holding it (jsonargparse's "path" type)."""
    indent = len(lines[0]) - len(lines[0].lstrip())
    expected, given = [], None
    for j, raw in enumerate(lines):
        line = raw.strip()
        if len(raw) - len(raw.lstrip()) != indent or not line.startswith("- Expected a "):
            break
        kind = line.removeprefix("- Expected a ")
        if got := _GOT_VALUE.match(kind):
            kind, given = got["kind"], got["value"]
        kind = "the path of a file holding it" if _NOT_A_FILE.match(kind) else kind
        expected.append(re.sub(r"<class '(\w+)'>", r"\1", kind).replace("typing.", ""))
    given = given or next((line.strip().removeprefix("Given value:").strip() for line in lines[j:j + 3]
                           if line.strip().startswith("Given value:")), None)
    if len(expected) < 2 or given is None:
        return None
    return f"got {given}; expected {' | '.join(expected)}"


class ConciseErrorParser(LightningArgumentParser):
    """Prints a config problem as one line naming the field, instead of usage + a type-union dump."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        sys.stderr.write(f"error: {condense_parse_error(message)}{self._nearest_key(message)}\n")
        self.exit(2)

    def _nearest_key(self, message: str) -> str:
        """``; did you mean --trainer.max_steps?`` for a misspelt option of the command line, or
        ``trainer.max_steps`` for a config file's key (the root parser reads the files: its subcommands' options)."""
        known = long_options(self)
        if unknown := _UNRECOGNIZED.match(message):
            return did_you_mean(unknown["option"], known)
        if unknown := _NOT_A_KEY.match(message):
            key = f"{unknown['group'] + '.' if unknown['group'] else ''}{unknown['key']}"
            return did_you_mean(key, [option.removeprefix("--") for option in known])
        return ""
