"""Errors the user fixes in their config or data: the CLI prints them as one line, no traceback."""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import yaml

from cpt_lightning.model_names import is_local_path

E = TypeVar("E", bound=BaseException)


class UserError(ValueError):
    """A bad config value, file or data; the message names what to fix."""


def one_line(err: BaseException) -> str:
    """A library's error message for a one-line ``error:`` (transformers' span several lines)."""
    return " ".join(str(err).split())


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "*.model")  # fast, WordPiece, BPE, SentencePiece


def tokenizer_load_reason(name: str, err: BaseException) -> str:
    """Why a tokenizer did not load, in one line. A folder holding none of a tokenizer's files (a model folder
    copied without them) got transformers' advice to install sentencepiece or tiktoken, and a folder that is not
    there, or a tokenizer.json file itself, its words on hub repo ids: say what is missing."""
    if is_local_path(str(name)) and not Path(name).exists():
        return "no such folder"
    if Path(name).is_file():  # tokenizer.json itself: transformers took it for a hub repo id
        return f"a file, not a tokenizer folder: give the folder that holds it ({Path(name).parent})"
    if holds_no_tokenizer(name):
        return "the folder holds no tokenizer files (tokenizer.json): save the tokenizer into it with save_pretrained"
    return one_line(err)


def holds_no_tokenizer(name: str) -> bool:
    """Whether ``name`` is a folder without any tokenizer file (a model saved without its tokenizer)."""
    folder = Path(name)
    return folder.is_dir() and not any(next(folder.glob(pattern), None) for pattern in TOKENIZER_FILES)


def read_yaml(path: str | Path, what: str):
    """``load_yaml`` of a file; an unreadable one is a UserError ``{what} ({why})`` in one line."""
    return load_yaml(read_text(path, what), what)


def read_text(path: str | Path, what: str) -> str:
    """A UTF-8 text file's text; one that cannot be read, or is not UTF-8 (a YAML file saved as Latin-1: a
    UnicodeDecodeError traceback), is a UserError ``{what} ({why})`` in one line."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"{what} ({one_line(err)})") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{what} (invalid UTF-8: byte {err.object[err.start]:#04x} at offset {err.start}; save the "
                        "file as UTF-8)") from None


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping."""


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping: PyYAML keeps the last without a word, so a
    second ``trainer:`` block appended to change one setting dropped every setting of the first, and a task's
    ``epochs`` given twice trained the second. Keys a merge (``<<: *base``) brings may be overridden, as YAML says."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            marks: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key, mark = self.construct_object(key_node), key_node.start_mark
                if (first := marks.setdefault(key, mark)) is not mark:
                    raise DuplicateKeyError(None, None, f"key {key!r} given twice (lines {first.line + 1} and "
                                            f"{mark.line + 1}): YAML keeps only the last; merge the two", mark)
        return super().construct_mapping(node, deep)


def load_yaml(text: str, what: str):
    """``yaml.load`` of ``text`` (``UniqueKeyLoader``); a syntax error is a UserError ``{what} (line L, column C:
    problem)``. PyYAML's messages span five lines with an excerpt and a caret; the line and column are what the user
    needs."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        why = one_line(err) if mark is None else f"line {mark.line + 1}, column {mark.column + 1}: {err.problem}"
        raise UserError(f"{what} ({why})") from None


def utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """A text file's lines with their numbers, without the byte-order mark some editors write first (JSON
    refused it; a CoNLL file's first word kept it); a line that is not UTF-8 is a UserError naming ``FILE:LINE``
    (Python's own error names a byte offset, in a traceback)."""
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            try:
                yield number, raw.decode(utf8_codec(number))
            except UnicodeDecodeError as err:
                raise UserError(f"{path}:{number}: invalid UTF-8 (byte {err.object[err.start]:#04x}); "
                                "save the file as UTF-8") from None


def utf8_codec(line_number: int) -> str:
    """UTF-8 that drops a byte-order mark (Windows tools write one) from a file's first line."""
    return "utf-8-sig" if line_number == 1 else "utf-8"


def json_object(line: str, where: str) -> dict:
    """One JSONL line as a dict; anything else is a UserError naming ``where`` (``FILE:LINE``)."""
    try:
        record = json.loads(line.rstrip("\r\n"))  # with its newline, an error at the line's end was said at column 1
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
    except (ValueError, RecursionError) as err:  # valid JSON Python will not read: a number over 4,300 digits, deep nesting
        raise UserError(f"{where}: JSON that Python cannot read ({str(err).split(';')[0]})") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object per line, found {type(record).__name__}")
    return record


def found_in_chain(err: BaseException, kind: type[E], matches: Callable[[E], bool] = lambda error: True) -> E | None:
    """The first exception of ``kind`` (that ``matches``) among ``err`` and what caused it (``__cause__``, else
    ``__context__``).

    Each exception is visited once: Lightning's error handling can chain a failure back to itself
    (a full disk: OSError → ValueError from it → the same OSError), and the search must end.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind) and matches(err):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def user_error_in(err: BaseException) -> UserError | None:
    """The UserError behind an exception, if any (jsonargparse wraps errors raised while instantiating)."""
    return found_in_chain(err, UserError)


def report_user_error(err: Exception) -> int:
    """Exit code 2 after one ``error:`` line when a UserError, or a file system's refusal, is behind ``err``;
    anything else is re-raised."""
    user_error = user_error_in(err)
    message = one_line(user_error) if user_error is not None else file_system_refusal(err)
    if message is None:
        raise err
    print(f"error: {message}", file=sys.stderr)
    return 2


# What the user fixes on the machine, not in the code: a full disk or quota, a read-only or forbidden folder.
FILE_SYSTEM_FIXES = {errno.ENOSPC: "free space on that disk", errno.EDQUOT: "free space within the quota",
                     errno.EROFS: "give a folder this user can write", errno.EACCES: "give this user access to it",
                     errno.EIO: "check that disk or network mount, then retry",
                     errno.EFBIG: "lift the file size limit (ulimit -f)"}


def file_system_refusal(err: BaseException) -> str | None:
    """One line for a file system's refusal anywhere in ``err``'s chain (TensorBoard's writer on a full disk, a
    read-only run folder: 150-line tracebacks through Lightning), or None."""
    found = found_in_chain(err, OSError, lambda error: error.errno in FILE_SYSTEM_FIXES)
    if found is None:
        return None
    where = f": {os.fsdecode(found.filename)}" if found.filename else ""
    return f"{os.strerror(found.errno)}{where} ({FILE_SYSTEM_FIXES[found.errno]})"


def refuse_on_every_rank(trainer, refusal: Callable[[], str | None]) -> None:
    """Rank 0 runs ``refusal`` (why the run must not go on, or None) and every rank raises its verdict as a
    UserError: a rank refusing alone leaves the others waiting for it in a collective (srun and torchrun
    do not stop them)."""
    verdict = trainer.strategy.broadcast(refusal() if trainer.is_global_zero else None)
    if verdict:
        raise UserError(verdict)


def raise_on_every_rank(trainer, refusal: UserError | None, elsewhere: str) -> None:
    """Where any rank refused (a check of its own data), every rank raises: its ``refusal``, or ``elsewhere``. A rank
    refusing alone left the others going on into the next collective, where they waited for it (NCCL: until its
    timeout) or died of its closed connection (gloo: a traceback instead of the refusal). Every rank must call it."""
    if trainer.strategy.reduce_boolean_decision(refusal is not None, all=False):
        raise refusal or UserError(elsewhere)


def nearest_name(given: str, known: Iterable[str]) -> str | None:
    """The one of ``known`` a letter or two from a misspelt ``given`` (at difflib's default cutoff of 0.6, --verbose
    got --overwrite), or None."""
    import difflib

    nearest = difflib.get_close_matches(given, list(known), n=1, cutoff=0.8)
    return nearest[0] if nearest else None


def did_you_mean(given: str, known: Iterable[str]) -> str:
    """``; did you mean NAME?`` for :func:`nearest_name`, or nothing."""
    nearest = nearest_name(given, known)
    return f"; did you mean {nearest}?" if nearest else ""


def long_options(parser: argparse.ArgumentParser) -> list[str]:
    """The parser's long options and its subcommands' (``cpt data sample --ot`` is reported by ``cpt data``)."""
    options = []
    for action in parser._actions:
        options += [option for option in action.option_strings if option.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):
            options += [option for command in action.choices.values() for option in long_options(command)]
    return options


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are a UserError: one ``error:`` line and exit code 2, as for every other mistake,
    instead of the usage block and a ``PROG: error:`` line. An option it does not know is named first, with the
    nearest it knows: argparse reported a misspelt required option (``--ouput DIR``) as the option missing."""

    def parse_args(self, args=None, namespace=None):
        unknown = self._unknown(args)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}{self._nearest_options(unknown)}")
        return super().parse_args(args, namespace)

    def _unknown(self, args) -> list[str]:
        """What argparse would leave unrecognized, found by a pass in which nothing is required (none where help is
        asked for: that pass would print the usage with every option optional)."""
        tokens = sys.argv[1:] if args is None else args
        if any(token == "-h" or len(token) > 2 and "--help".startswith(token) for token in tokens):
            return []
        required = [item for item in (*self._actions, *self._mutually_exclusive_groups) if item.required]
        for item in required:
            item.required = False
        try:
            return self.parse_known_args(args, argparse.Namespace())[1]
        finally:
            for item in required:
                item.required = True

    def _nearest_options(self, unknown: list[str]) -> str:
        """``; did you mean --output?`` for each unknown long option close to a known one."""
        known = long_options(self)
        pairs = [(token, nearest) for token in unknown if token.startswith("--")
                 if (nearest := nearest_name(token.partition("=")[0], known))]
        if len(pairs) == 1:
            return f"; did you mean {pairs[0][1]}?"
        return f"; did you mean {', '.join(f'{option} for {token}' for token, option in pairs)}?" if pairs else ""

    def error(self, message: str):
        raise UserError(f"{message} ({self.prog} --help lists the options)")


INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a requeue script tests for


class Terminated(KeyboardInterrupt):
    """SIGTERM in a tool, raised where a Ctrl-C would be, so that the same clean-up runs (a staging folder of
    weights, a pool of workers): a preempted export left gigabytes behind, a data sample its workers running."""


_sigterm_received: bool | None = None  # None outside sigterm_raises; within it, whether a SIGTERM came


@contextlib.contextmanager
def sigterm_raises():
    """SIGTERM raises ``Terminated`` in this process while the block runs; a forked worker still dies of it.

    The signal is also recorded (``sigterm_received``): raised inside a hook whose exceptions Python ignores
    (logging's at-fork hook as a pool forked, a finalizer), ``Terminated`` was printed as "Exception ignored"
    and dropped, and ``cpt prepare`` ran on, replaced its output and exited 0 (seen in CI). A dropped one is
    not printed: the tool raises it again where it can still stop cleanly. A tool run by another's ``main``
    (a nested block) shares the outer block's handler and record."""
    global _sigterm_received
    if threading.current_thread() is not threading.main_thread() or _sigterm_received is not None:
        yield  # no signal handlers but in the main thread; or the outer block's already runs
        return
    pid = os.getpid()

    def terminate(signum, frame):
        global _sigterm_received
        if os.getpid() != pid:  # a forked worker (a pool's, which terminate() stops with SIGTERM): dies as before
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        _sigterm_received = True
        raise Terminated

    def quiet_dropped_sigterm(unraisable):
        if not isinstance(unraisable.exc_value, Terminated):
            unraisable_hook(unraisable)

    previous, unraisable_hook = signal.signal(signal.SIGTERM, terminate), sys.unraisablehook
    _sigterm_received, sys.unraisablehook = False, quiet_dropped_sigterm
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _sigterm_received, sys.unraisablehook = None, unraisable_hook


def sigterm_received() -> bool:
    """Whether a SIGTERM came while ``sigterm_raises`` ran: a tool checks it before a step it cannot undo
    (publishing its output), since Python may have dropped the ``Terminated`` the signal raised."""
    return bool(_sigterm_received)


def report_interrupt(err: BaseException) -> int:
    """One line and the exit code of a Ctrl-C (130) or a SIGTERM raised as ``Terminated`` (143)."""
    if isinstance(err, Terminated):
        print("error: terminated (SIGTERM)", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    print("error: interrupted", file=sys.stderr)
    return INTERRUPTED_EXIT_CODE


def command(main):
    """Decorates a ``cpt`` subcommand's ``main(argv) -> int``: a UserError becomes one line and exit code 2,
    a Ctrl-C (KeyboardInterrupt) one line and 130, a SIGTERM (raised as ``Terminated``) one line and 143.

    Only a UserError the tool raised itself: a bug raised while handling one keeps its traceback.
    """

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            with sigterm_raises():
                return main(argv)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as err:  # Terminated too
            return report_interrupt(err)
        except Exception as err:  # a full disk or a read-only folder under a library's error
            if (interrupt := found_in_chain(err, KeyboardInterrupt)) is not None:  # inside a lazy import: ImportError
                return report_interrupt(interrupt)
            if (refusal := file_system_refusal(err)) is None:
                raise
            print(f"error: {refusal}", file=sys.stderr)
            return 2

    return run
