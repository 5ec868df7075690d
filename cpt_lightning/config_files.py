"""What jsonargparse would do silently with the command line's configs, refused before it reads them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import yaml

from cpt_lightning.errors import DuplicateKeyError, UniqueKeyLoader, UserError


def check_arguments(argv: list[str]) -> None:
    """The command line of ``cpt fit``/``validate``/``bench``, before jsonargparse merges it (``UserError``)."""
    check_included_files(argv)
    check_list_appends(argv)
    check_blocks_over_includes(argv)
    check_source_lists(argv)
    warn_of_replaced_dicts(argv)
    warn_of_replaced_callbacks(argv)
    warn_of_last_callback_settings(argv)


SOURCE_EXAMPLES = {"sources": "[{name: pubmed, path: data/prepared/pubmed, weight: 0.6}, ...]",
                   "val_sources": "[{name: pubmed_holdout, path: data/prepared/pubmed/holdout}, ...]"}


def check_source_lists(argv: list[str]) -> None:
    """A ``sources`` or ``val_sources`` list given over the config's (on the command line, in a file named as its
    value, or in a later ``--config``) is merged entry by entry into the config's list of the same length: an entry
    without its ``weight`` took the weight of the config's entry at the same place, so a reordered mix read
    case_reports at PubMed's 60%; one without its ``name`` or ``path`` took that entry's, so a holdout's curve was
    drawn under another's name. Every entry must give its name and path, and of two or more sources its weight."""
    for field, example in SOURCE_EXAMPLES.items():
        for where, value, folder in _given_lists(argv, field):
            entries = _given_value(value, folder)
            if not isinstance(entries, list):
                continue
            needed = ("name", "path", "weight") if field == "sources" and len(entries) > 1 else ("name", "path")
            missing = next((key for key in needed for entry in entries if isinstance(entry, dict) and key not in entry),
                           None)
            if missing:
                default = ", not 1.0" if missing == "weight" else ""
                raise UserError(f"{where}: give every entry its {missing} (over the config's list of as many entries, "
                                f"jsonargparse takes a missing one from the entry at the same place{default}), e.g. "
                                f"'{example}'")


def _given_lists(argv: list[str], field: str) -> Iterator[tuple[str, object, Path]]:
    """Each value given to ``data.init_args.<field>`` after the first ``--config``: where, the value, and the
    folder a file it names is read in."""
    for option in (f"--data.init_args.{field}", f"--data.{field}"):
        for value in option_values(argv, option):
            yield option, value, Path.cwd()
    for later in list(config_arguments(argv))[1:]:
        settings = _read(Path(later)) or {}
        data = settings.get("data") if isinstance(settings.get("data"), dict) else {}
        init_args = data.get("init_args") if isinstance(data.get("init_args"), dict) else {}
        for value in (settings.get(f"data.init_args.{field}"), data.get(f"init_args.{field}"), init_args.get(field)):
            if value is not None:
                yield f"{later}: data.init_args.{field}", value, Path(later).parent


def _given_value(value, folder: Path):
    """What a value gives: written out, or in the file it names (read beside the file naming it; an option's, in the
    current folder)."""
    if isinstance(value, str):
        value = _safe_load(value)
    return _load(folder / value) if isinstance(value, str) else value


def check_list_appends(argv: list[str]) -> None:
    """``key+:`` appends to a list only in a ``--config`` file that neither includes another (``config:``) nor is
    included: anywhere in such a chain of files jsonargparse replaces the list with the items given, even the list
    of an earlier ``--config``. A recipe included by a file that appended one ``TokenCheckpoint`` (as recipes.md's
    milestones suggest) trained without its ObjectiveSchedule: the module's MaskedLM, with no end."""
    for given in config_arguments(argv):
        chain = include_chain(Path(given))
        if len(chain) < 2:
            continue
        for path, settings in chain:
            if appended := next(appended_keys(settings), None):
                files = " → ".join(str(path) for path, _ in chain)
                raise UserError(
                    f"{path}: `{appended}` replaces that list instead of appending to it, in a file that includes "
                    f"another or is included ({files}); jsonargparse appends only in a file that --config names "
                    f"and that includes no other: put it in such a file, given after the others (e.g. cpt fit "
                    f"--config configs/en_detour.yaml --config milestones.yaml)")


def check_included_files(argv: list[str]) -> None:
    """An included file (``config: part.yaml``) that holds a list or a value, not settings: jsonargparse said "a
    --config file holds no mapping of settings", naming neither the file nor the one that includes it."""
    for given in config_arguments(argv):
        if not (chain := include_chain(Path(given))):
            continue
        path, settings = chain[-1]
        if not isinstance(include := settings.get("config"), str):
            continue
        included = path.parent / include
        held = _load(included)
        if held is not None and not isinstance(held, dict):
            raise UserError(f"{included} (included by {path}: config: {include}) holds no mapping of settings "
                            f"({_flow(held)[:80]}): a config is a YAML mapping of model:, data: and trainer: settings")


CONFIG_FILE = re.compile(r"\.(?:ya?ml|json)$")  # a value that names a config file, not a class path or a list


def check_blocks_over_includes(argv: list[str]) -> None:
    """A block (``trainer: {max_steps: 3}``, ``model.init_args: {...}``) in a file that includes another replaces
    everything the included files set under its key, and the rest goes back to its defaults: ``config:
    configs/en_detour.yaml`` with ``trainer: {devices: 8}`` trained without the recipe's schedule, GlobalBatch,
    FSDP2 and logger, exit 0, without a word. Dotted keys override one value each (docs/recipes.md). A block that
    names another class (``trainer.logger: {class_path: ...CSVLogger}``) replaces on purpose: the included class's
    settings are not the new one's."""
    for given in config_arguments(argv):
        chain = include_chain(Path(given))
        for i, (path, settings) in enumerate(chain[:-1]):
            included: dict[str, object] = {}
            for _, deeper in chain[i + 1:]:  # the nearest file's value wins
                for key, value in _dotted(deeper):
                    included.setdefault(key, value)
            for key, value in settings.items():
                if key == "config" or not isinstance(value, dict) or not value:
                    continue
                if "class_path" in value and value["class_path"] != included.get(f"{key}.class_path"):
                    continue
                if any(setting == key or setting.startswith(f"{key}.") for setting in included):
                    example, example_value = next(_dotted({key: value}))
                    raise UserError(
                        f"{path}: `{key}:` as a block replaces everything {chain[i + 1][0]} sets under {key} (what "
                        f"the block does not set goes back to its default); write each setting as a dotted key "
                        f"instead, e.g. `{example}: {_flow(example_value)}`")


def warn_of_replaced_callbacks(argv: list[str]) -> None:
    """A later ``--config`` (or ``--trainer.callbacks``) that gives ``trainer.callbacks`` replaces the earlier list
    whole: a second file holding only an ObjectiveSchedule, to shorten a phase, dropped the recipe's GlobalBatch
    (16 sequences a step, not 384), checkpoints and exports, exit 0. Said, naming what is dropped; ``callbacks+:``
    appends instead (docs/recipes.md)."""
    earlier: tuple[str, list[str]] | None = None
    given = [(later, _chain_callbacks(Path(later))) for later in config_arguments(argv)]
    given += [(f"--trainer.callbacks {value}", _item_classes(_option_items(value), Path.cwd()))
              for value in option_values(argv, "--trainer.callbacks")]
    for where, classes in given:
        if classes is None:
            continue
        if earlier is not None and (dropped := [name for name in earlier[1] if name not in classes]):
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"{where}: trainer.callbacks replaces the list of {earlier[0]} whole, so this run has no "
                           f"{', '.join(dropped)}; list them too, or add to the list with trainer.callbacks+: in a "
                           f"--config of its own (docs/recipes.md)")
        earlier = (where, classes)


def warn_of_last_callback_settings(argv: list[str]) -> None:
    """``--trainer.callbacks.init_args.KEY VALUE`` sets the last callback listed alone (jsonargparse's rule): over a
    recipe, ``--trainer.callbacks.init_args.keep_last 3`` reached its StepLearningRateMonitor ("Option 'keep_last' is
    not accepted"), and a KEY the last callback takes too would change that one, not the one meant. Said, naming the
    callback it reaches, where that is the last of a config's list of several (not one the command line appends)."""
    listed: list[str] = []
    from_a_config = False
    reached: dict[str, list[str]] = {}  # a callback listed last by a config → the options that set it
    lists = ("--config", "-c", "--trainer.callbacks", "--trainer.callbacks+")
    for option, value in _ordered_values(argv, lists, prefix=SETTING_OF_THE_LAST):
        if option in ("--config", "-c"):
            if (after := _listed_after(Path(value), listed)) is not None:
                listed, from_a_config = after, True
        elif option in ("--trainer.callbacks", "--trainer.callbacks+"):
            given = _item_classes(_option_items(value), Path.cwd())
            listed, from_a_config = (listed if option.endswith("+") else []) + given, False
        elif from_a_config and len(listed) > 1:  # a setting of the last callback listed so far
            reached.setdefault(listed[-1], []).append(option)
    for callback, options in reached.items():
        from lightning.pytorch.utilities import rank_zero_warn

        keys = ", ".join(option.removeprefix(SETTING_OF_THE_LAST) for option in options)
        rank_zero_warn(f"{', '.join(options)} {'sets' if len(options) == 1 else 'set'} the last callback listed alone, "
                       f"{callback} (jsonargparse's rule), not another that takes {keys}: change another callback's "
                       "settings in the config file, or in a copy of it (docs/recipes.md)")


SETTING_OF_THE_LAST = "--trainer.callbacks.init_args."  # jsonargparse gives it to the last callback listed so far


def _listed_after(path: Path, listed: list[str]) -> list[str] | None:
    """The callbacks' class names once the --config file ``path`` is read over ``listed``: its list (or its includes'),
    or ``listed`` with what its ``callbacks+`` appends; None where it gives neither."""
    classes = _chain_callbacks(path)
    if classes is not None:
        return classes
    settings = _read(path) or {}
    trainer = settings.get("trainer") if isinstance(settings.get("trainer"), dict) else {}
    appended = settings.get("trainer.callbacks+", trainer.get("callbacks+"))
    if appended is None:
        return None
    return listed + _item_classes(appended if isinstance(appended, list) else [appended], path.parent)


# Settings typed as a dict, which a later value (a later --config, an arm's overlay, an option) replaces whole:
# jsonargparse merges the settings of a block, not the keys of a dict. What becomes of the keys it leaves out.
WHOLE_DICTS = {
    "model.init_args.model_config": "go back to their defaults; give them too, or change one setting with "
                                    "--model.init_args.model_config.KEY VALUE",
    "model.init_args.val_objectives": "are no longer validated; give them too",
}


def warn_of_replaced_dicts(argv: list[str]) -> None:
    """``model_config: {num_hidden_layers: 2}`` in an arm's overlay (``--config recipe.yaml --config arm.yaml``) or
    as ``--model.init_args.model_config`` left every other setting of the earlier one to its default: the demo
    trained a 49.4M-parameter model for its 7.2M (hidden size 768, not 128), exit 0, without a word; a later
    ``val_objectives`` dropped the earlier figures from validation. Said, naming the keys left out (a whole new
    ``model_config``, a smaller model for a dry run, replaces on purpose)."""
    from lightning.pytorch.utilities import rank_zero_warn

    for key, lost in WHOLE_DICTS.items():
        earlier: tuple[str, set[str]] | None = None
        for where, names in _dict_settings(argv, key):
            if earlier is not None and (dropped := sorted(earlier[1] - names)):
                rank_zero_warn(f"{where}: its {key} replaces the whole one {earlier[0]} gives (jsonargparse merges no "
                               f"dict), so {', '.join(dropped)} {lost}")
            earlier = (where, names)


def _dict_settings(argv: list[str], key: str) -> Iterator[tuple[str, set[str]]]:
    """In the order jsonargparse reads them, each ``--config`` (with the files it includes) and option value that
    gives the dict ``key`` (``model.init_args.model_config``, or as jsonargparse also takes it ``model.model_config``,
    and inside a ``--model`` or ``--model.init_args`` value), with the names of its entries."""
    owner = key.partition(".")[0]
    options = {f"--{owner}": owner, f"--{owner}.init_args": f"{owner}.init_args", f"--{key}": key,
               f"--{_without_init_args(key)}": key}
    for option, value in _ordered_values(argv, ("--config", "-c", *options)):
        if option in options:
            given = _given_value(value, Path.cwd())
            if not isinstance(given, dict):
                continue
            if options[option] == key:  # the dict itself, {} included
                yield option, set(given)
                continue
            settings = [{options[option]: given}]
        else:
            settings = [settings for _, settings in include_chain(Path(value))]
        pairs = [(dotted, setting) for one in settings for dotted, setting in _dotted(one)]
        names = {entry for dotted, _ in pairs if (entry := _entry_of(dotted, key))}
        empty = any(setting == {} and _without_init_args(dotted) == _without_init_args(key)
                    for dotted, setting in pairs)
        if names or empty:
            yield option if option in options else value, names


def _entry_of(dotted: str, key: str) -> str | None:
    """The entry of the dict ``key`` a dotted setting gives, however it names the class's arguments."""
    dotted, key = _without_init_args(dotted), _without_init_args(key)
    return dotted[len(key) + 1:].partition(".")[0] if dotted.startswith(f"{key}.") else None


def _without_init_args(dotted: str) -> str:
    return dotted.replace(".init_args.", ".", 1)


def _safe_load(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None  # jsonargparse explains it


def _chain_callbacks(path: Path) -> list[str] | None:
    """The callbacks' class names a --config file and the files it includes give (the nearest file's list wins)."""
    for file, settings in include_chain(path):
        trainer = settings.get("trainer") if isinstance(settings.get("trainer"), dict) else {}
        items = settings.get("trainer.callbacks", trainer.get("callbacks"))
        if isinstance(items, (str, dict)):  # one callback: jsonargparse makes it a list of one
            items = [items]
        if isinstance(items, list):
            return _item_classes(items, file.parent)
    return None


def _option_items(value: str) -> list:
    """The callbacks a ``--trainer.callbacks`` value gives: a file, a class path, or a YAML list or mapping."""
    if CONFIG_FILE.search(value):
        return [value]
    items = _safe_load(value)
    return items if isinstance(items, list) else [items]


def _item_classes(items: list, folder: Path) -> list[str]:
    """Each callback's class name: given as a mapping, or as the file holding one (read beside the file naming it)."""
    names = []
    for item in items:
        spec = _load(folder / item) if isinstance(item, str) and CONFIG_FILE.search(item) else item
        class_path = spec.get("class_path") if isinstance(spec, dict) else spec
        if isinstance(class_path, str):
            names.append(class_path.rpartition(".")[2])
    return names


def _dotted(settings: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    """Every setting of nested blocks and dotted keys alike, as ``(dotted.key, value)``."""
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _flow(value) -> str:
    """A value as it would be written after a YAML key on one line."""
    return yaml.safe_dump(value, default_flow_style=True, width=1_000).removesuffix("...\n").strip()


def config_arguments(argv: list[str]) -> Iterator[str]:
    """The values of ``--config FILE``, ``-c FILE`` and ``--config=FILE``."""
    yield from option_values(argv, "--config", "-c")


def option_values(argv: list[str], option: str, short: str | None = None) -> Iterator[str]:
    """The values given to ``option`` (``--option VALUE`` or ``--option=VALUE``) or its ``short`` form."""
    for _, value in _ordered_values(argv, (option, short) if short else (option,)):
        yield value


def _ordered_values(argv: list[str], options: tuple[str, ...], prefix: str | None = None
                    ) -> Iterator[tuple[str, str]]:
    """Each ``(option, value)`` of ``options`` (and of every option starting with ``prefix``) in the command line's
    order, as ``--option VALUE`` or ``--option=VALUE`` (a short form as ``-c VALUE``)."""
    def wanted(option: str) -> bool:
        return option in options or (prefix is not None and option.startswith(prefix))

    for i, arg in enumerate(argv):
        option, equals, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if wanted(option) and equals:
            yield option, value
        elif wanted(option) and i + 1 < len(argv):
            yield option, argv[i + 1]


def include_chain(path: Path) -> list[tuple[Path, dict]]:
    """The file and the files it includes through ``config:`` (each read beside the file naming it, as jsonargparse
    reads it), with their settings; it stops at a file it cannot read or has seen (jsonargparse explains those)."""
    chain: list[tuple[Path, dict]] = []
    while (settings := _read(path)) is not None and path.resolve() not in {seen.resolve() for seen, _ in chain}:
        chain.append((path, settings))
        if not isinstance(include := settings.get("config"), str):
            break
        path = path.parent / include
    return chain


def appended_keys(settings: dict, prefix: str = "") -> Iterator[str]:
    """Every ``key+`` among the settings, nested or dotted, with the keys above it."""
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if str(key).endswith("+"):
            yield name
        if isinstance(value, dict):
            yield from appended_keys(value, f"{name}.")


def _read(path: Path) -> dict | None:
    """The file's settings; anything else (not a mapping) is for jsonargparse to explain."""
    settings = _load(path)
    return settings if isinstance(settings, dict) else None


def _load(path: Path):
    """The file's YAML; None for a file missing or not YAML (jsonargparse explains it). A pipe (``--config <(...)``)
    is left unread: jsonargparse reads it once. A key given twice in one mapping is refused (``UniqueKeyLoader``):
    jsonargparse keeps the last, so a ``trainer:`` block appended to a recipe to change one setting trained without
    the recipe's schedule, callbacks and precision, exit 0, without a word (a second ``--config``, or dotted keys,
    change one setting each)."""
    try:
        return yaml.load(path.read_text(), Loader=UniqueKeyLoader) if path.is_file() else None
    except DuplicateKeyError as err:
        raise UserError(f"{path}:{err.problem_mark.line + 1}: {err.problem}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
