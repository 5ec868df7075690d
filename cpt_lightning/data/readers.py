"""Raw corpora → documents: JSONL, Parquet and plain text (``.gz`` accepted), read in ranges.

``cpt prepare`` splits a source into byte-balanced ranges so every worker tokenizes about the
same amount of text, and each worker reads only its range. A cheap index pass (newline scan,
Parquet metadata) gives record counts and byte offsets; documents are decoded in the workers.
Errors name the file and line (or row) so the user can fix the input.
"""

from __future__ import annotations

import codecs
import gzip
import os
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cpt_lightning.errors import UserError, json_object, utf8_codec

FORMATS = {".jsonl": "jsonl", ".parquet": "parquet", ".txt": "text"}
CHECKPOINT_EVERY = 64  # records between seekable offsets in a file index (the finest shard cut)
_READ_BLOCK = 1 << 23


def gzipped(path: Path) -> bool:
    return path.suffix.lower() == ".gz"


def file_format(path: Path) -> str:
    """``jsonl`` / ``parquet`` / ``text`` from the name; ``.gz`` allowed on JSONL and text."""
    suffixes = path.suffixes[-2:] if gzipped(path) else path.suffixes[-1:]
    fmt = FORMATS.get(suffixes[0].lower()) if suffixes else None
    if fmt is None or (gzipped(path) and fmt == "parquet"):
        raise UserError(f"{path}: unsupported input; use .jsonl, .parquet or .txt (.jsonl.gz / .txt.gz for gzip)")
    return fmt


def find_input_files(paths: list[str]) -> list[Path]:
    """Files named directly, plus supported files found (recursively, sorted) under folders, where hidden
    files and folders (``.ipynb_checkpoints/`` copies, ``.git/``) are skipped, not trained on twice."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found, others = [], []
            for p in sorted(_files_under(path)):
                (found if _supported(p) else others).append(p)
            if not found:
                raise UserError(f"{path}: no .jsonl, .parquet or .txt files (optionally .gz) in this folder")
            if others:  # a .json or .jsonl.zst part of the corpus left out
                print(f"warning: {path}: {len(others)} files of other kinds not read (e.g. "
                      f"{others[0].relative_to(path)}); inputs are .jsonl, .parquet or .txt (optionally .gz)",
                      file=sys.stderr)
            files.extend(found)
        elif path.is_file():
            file_format(path)
            files.append(path)
        elif any(mark in raw for mark in "*?["):
            raise UserError(f"{path}: no such file or folder; a pattern is the shell's to expand: leave it unquoted, "
                            "or give the folder that holds the files")
        else:
            raise UserError(f"{path}: no such file or folder")
    return files


def _files_under(folder: Path) -> list[Path]:
    """Every file under ``folder`` but hidden ones, through linked sub-folders too (``rglob`` skipped them, and their
    documents, without a word), each folder once (a link back up ends there). A broken link is refused: a part of
    the corpus that is not there."""
    files, seen = [], set()
    for root, folders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = [name for name in folders if not _hidden(name)]  # not walked: .git/, .ipynb_checkpoints/
        for name in names:
            if _hidden(name):
                continue
            file = Path(root, name)
            if file.is_symlink() and not file.exists():
                raise UserError(f"{file}: a link to {os.readlink(file)}, which does not exist; fix or remove it")
            if file.is_file():
                files.append(file)
    return files


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _supported(path: Path) -> bool:
    try:
        file_format(path)
    except UserError:
        return False
    return True


def open_binary(path: Path):
    return gzip.open(path, "rb") if gzipped(path) else open(path, "rb")


@dataclass(frozen=True)
class FileIndex:
    """Seek points of one file: ``records[i]`` starts at byte ``offsets[i]`` (decompressed).

    The last entry is (record count, size), so byte differences weigh record ranges.
    ``unit`` says what a record is: a JSONL line, a text line, a whole text file, a Parquet row.
    """

    path: Path
    unit: str
    records: np.ndarray
    offsets: np.ndarray

    @property
    def num_records(self) -> int:
        return int(self.records[-1])


def index_file(path: Path, text_unit: str, text_field: str) -> FileIndex:
    fmt = file_format(path)
    if fmt == "parquet":
        return _index_parquet(path, text_field)
    _refuse_utf16(path)
    if fmt == "text" and text_unit == "file":
        size = path.stat().st_size  # compressed size for .gz: only a weight
        return FileIndex(path, "file", np.array([0, 1 if size else 0]), np.array([0, size]))
    records, offsets = _scan_lines(path)
    return FileIndex(path, "jsonl" if fmt == "jsonl" else "line", records, offsets)


def _refuse_utf16(path: Path) -> None:
    """UTF-16 text with its byte-order mark (what Windows PowerShell 5's ``>`` writes) was refused as invalid UTF-8
    with the advice to skip such documents, and, skipped, as invalid JSON: say what it is."""
    with _gzip_errors(path), open_binary(path) as f:
        start = f.read(2)
    if start in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        raise UserError(f"{path}: UTF-16 text (it starts with UTF-16's byte-order mark); convert it to UTF-8, e.g. "
                        "iconv -f UTF-16 -t UTF-8")


def _scan_lines(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Count lines and keep the start offset of every CHECKPOINT_EVERY-th one (vectorised scan)."""
    records, offsets = [np.zeros(1, np.int64)], [np.zeros(1, np.int64)]
    count = pos = 0
    last = b""
    with _gzip_errors(path), open_binary(path) as f:
        while block := f.read(_READ_BLOCK):
            ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10) + pos + 1  # start of the next line
            first = (count // CHECKPOINT_EVERY + 1) * CHECKPOINT_EVERY
            marks = np.arange(first, count + len(ends) + 1, CHECKPOINT_EVERY)
            records.append(marks)
            offsets.append(ends[marks - count - 1])
            count += len(ends)
            pos += len(block)
            last = block[-1:]
    if pos and last != b"\n":
        count += 1  # a final line without a newline
    records.append(np.array([count]))
    offsets.append(np.array([pos]))
    recs, offs = np.concatenate(records), np.concatenate(offsets)
    keep = np.r_[recs[:-1] < count, True]  # drop a mark equal to the final count
    return recs[keep], offs[keep]


def count_lines(path: Path) -> int:
    return int(_scan_lines(path)[0][-1])


def _index_parquet(path: Path, text_field: str) -> FileIndex:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path}: not a readable Parquet file ({err})") from None
    names = meta.schema_arrow.names
    if text_field not in names:
        raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); choose one with --text-field")
    kind = meta.schema_arrow.field(text_field).type
    if not _is_text(kind):
        raise UserError(f"{path}: column {text_field!r} has type {kind}, expected strings")
    records, offsets = [0], [0]
    for group in range(meta.num_row_groups):  # seek points inside a row group are interpolated by size
        rows, size = meta.metadata.row_group(group).num_rows, meta.metadata.row_group(group).total_byte_size
        first, base = records[-1], offsets[-1]
        marks = range(CHECKPOINT_EVERY, rows, CHECKPOINT_EVERY)
        records += [first + m for m in marks] + [first + rows]
        offsets += [base + m * size // rows for m in marks] + [base + size]
    return FileIndex(path, "parquet", np.array(records), np.array(offsets))


def _is_text(kind) -> bool:
    """Arrow's string types: plain, large, view (newer writers), and a dictionary of strings (a pandas categorical);
    each reads back as Python strings."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        return _is_text(kind.value_type)
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


class _gzip_errors:
    """Turns a damaged gzip stream into a one-line error naming the file."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if isinstance(err, (gzip.BadGzipFile, EOFError, zlib.error)):
            raise UserError(f"{self.path}: damaged or truncated gzip data ({err})") from None
        return False


@dataclass(frozen=True)
class Segment:
    """Records ``[start, stop)`` of one file; ``offset`` is where ``start`` begins (for seeking)."""

    path: str
    unit: str
    start: int
    stop: int
    offset: int = 0


def plan_shards(files: list[FileIndex], num_shards: int, max_records: int | None = None) -> list[tuple[Segment, ...]]:
    """Split the concatenated records into ≤ ``num_shards`` contiguous, byte-balanced shards.

    Shards keep input order, so the token stream of a source is its documents in order.
    Cuts fall on seek points; ``max_records`` keeps only the first records (a quick subset).
    """
    stops, left = [], max_records if max_records is not None else float("inf")
    for index in files:
        stops.append(int(min(index.num_records, left)))
        left -= stops[-1]
    points, base = [], 0  # seek points: (global byte position, file number, record, offset)
    for number, (index, stop) in enumerate(zip(files, stops)):
        points += [(base + int(o), number, int(r), int(o)) for r, o in zip(index.records, index.offsets) if r < stop]
        base += int(index.offsets[-1])
    if not points:
        return []
    positions = np.array([p[0] for p in points])
    total = _end_position(files, stops)
    cuts = sorted({0} | {int(np.argmin(np.abs(positions - total * k / num_shards))) for k in range(1, num_shards)})
    bounds = [points[i][1:] for i in cuts] + [(len(files) - 1, stops[-1], None)]
    shards = []
    for (first_file, first, offset), (last_file, last, _) in zip(bounds, bounds[1:]):
        segments = []
        for number in range(first_file, last_file + 1):
            start, seek = (first, offset) if number == first_file else (0, 0)
            stop = last if number == last_file else stops[number]
            if stop > start:
                segments.append(Segment(str(files[number].path), files[number].unit, start, stop, seek))
        shards.append(tuple(segments))
    return shards


def _end_position(files: list[FileIndex], stops: list[int]) -> float:
    """Global byte position (interpolated inside a file) where the kept records end."""
    base = 0.0
    for index, stop in zip(files, stops):
        if stop < index.num_records:
            return base + float(np.interp(stop, index.records, index.offsets))
        base += float(index.offsets[-1])
    return base


@dataclass
class SkipCounts:
    """Documents left out, reported in the summary and the manifest."""

    empty: int = 0
    invalid_utf8: int = 0


def iter_segment(segment: Segment, text_field: str, skip_invalid_utf8: bool, skipped: SkipCounts) -> Iterator[str]:
    """Non-empty documents of one segment, in order; bad records raise with file and line, and a failed read names
    the file (a read's OSError has no file name: an I/O error on a flaky mount blamed the output)."""
    path = Path(segment.path)
    if segment.unit == "parquet":
        texts = _parquet_texts(path, segment, text_field, skip_invalid_utf8, skipped)
    elif segment.unit == "file":
        texts = _whole_file(path, skip_invalid_utf8, skipped)
    else:
        texts = _lines(path, segment, text_field, skip_invalid_utf8, skipped)
    try:
        for text in texts:
            if text is None:
                continue
            if text.isspace() or not text:
                skipped.empty += 1
                continue
            yield text
    except OSError as err:
        err.filename = err.filename or str(path)
        raise


def _lines(path: Path, segment: Segment, text_field: str, skip_invalid: bool, skipped: SkipCounts):
    with _gzip_errors(path), open_binary(path) as f:
        f.seek(segment.offset)  # gzip seeks forward by decompressing
        for number, raw in zip(range(segment.start + 1, segment.stop + 1), f):
            try:
                line = raw.decode(utf8_codec(number))
            except UnicodeDecodeError as err:
                yield _invalid_utf8(f"{path}:{number}", _bad_byte(err), skip_invalid, skipped)
                continue
            if segment.unit == "jsonl":
                yield _json_text(line, path, number, text_field, skip_invalid, skipped)
            elif "\0" in line:
                yield _invalid_utf8(f"{path}:{number}", NUL_BYTE, skip_invalid, skipped)
            else:
                yield line.rstrip("\r\n")


# Valid UTF-8, but no text holds one: ASCII saved as UTF-16 without a byte-order mark decodes as UTF-8 with a NUL
# after every letter, and trained as such (2.4x the tokens, each a letter and a NUL), as would a binary file.
NUL_BYTE = "a NUL byte: UTF-16 text without a byte-order mark, or a binary file?"


def _bad_byte(err: UnicodeDecodeError) -> str:
    return f"byte {err.object[err.start]:#04x}"


def _invalid_utf8(where: str, culprit: str, skip: bool, skipped: SkipCounts) -> None:
    """``where``: ``FILE:LINE``, or ``FILE row N`` for Parquet."""
    if not skip:
        raise UserError(
            f"{where}: invalid UTF-8 ({culprit}); fix the file or pass --skip-invalid-utf8 "
            "to skip such documents"
        )
    skipped.invalid_utf8 += 1


def _json_text(line: str, path: Path, number: int, text_field: str, skip_invalid: bool, skipped: SkipCounts):
    if not line.strip():
        return ""
    record = json_object(line, f"{path}:{number}")
    if text_field not in record:
        fields = ", ".join(record) or "none"
        nested = " (a nested field is not read: flatten the records first)" if text_field.partition(".")[0] in record \
            else ""
        raise UserError(f"{path}:{number}: no field {text_field!r} (fields: {fields}); choose one with "
                        f"--text-field{nested}")
    text = record[text_field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise UserError(f"{path}:{number}: field {text_field!r} is a {type(text).__name__}, expected a string")
    if "\\ud" in line.lower():  # a JSON escape may encode a lone surrogate: not valid UTF-8 either
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            culprit = f"lone surrogate \\u{ord(text[err.start]):04x}"
            return _invalid_utf8(f"{path}:{number}", culprit, skip_invalid, skipped)
    if "\0" in text:  # escaped as \u0000: a text file's NUL bytes carried into JSON
        return _invalid_utf8(f"{path}:{number}", NUL_BYTE, skip_invalid, skipped)
    return text


def _whole_file(path: Path, skip_invalid: bool, skipped: SkipCounts):
    with _gzip_errors(path), open_binary(path) as f:
        data = f.read()
    try:
        text = data.decode(utf8_codec(1))
    except UnicodeDecodeError as err:
        line = err.object.count(b"\n", 0, err.start) + 1
        yield _invalid_utf8(f"{path}:{line}", _bad_byte(err), skip_invalid, skipped)
        return
    if (nul := text.find("\0")) >= 0:
        line = text.count("\n", 0, nul) + 1
        yield _invalid_utf8(f"{path}:{line}", NUL_BYTE, skip_invalid, skipped)
    else:
        yield text


def _parquet_texts(path: Path, segment: Segment, text_field: str, skip_invalid: bool, skipped: SkipCounts):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
    firsts = np.cumsum([0] + sizes)
    groups = [i for i in range(len(sizes)) if firsts[i] < segment.stop and firsts[i + 1] > segment.start]
    row = int(firsts[groups[0]]) if groups else segment.stop
    for batch in pf.iter_batches(batch_size=4096, columns=[text_field], row_groups=groups):
        lo, hi = max(segment.start - row, 0), min(segment.stop - row, batch.num_rows)
        if hi > lo:
            column = batch.column(0).slice(lo, hi - lo)
            for number, value in enumerate(_parquet_strings(column), start=row + lo + 1):
                if isinstance(value, UnicodeDecodeError):
                    yield _invalid_utf8(f"{path} row {number}", _bad_byte(value), skip_invalid, skipped)
                elif value is not None and "\0" in value:
                    yield _invalid_utf8(f"{path} row {number}", NUL_BYTE, skip_invalid, skipped)
                else:
                    yield value or ""  # null: an empty document
        row += batch.num_rows


def _parquet_strings(column) -> list:
    """The column's strings, each value that is not UTF-8 as its UnicodeDecodeError: pyarrow checks no string's
    bytes when a file is written, so another writer's may hold any (to_pylist then failed for the whole batch)."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        values = []
        for i in range(len(column)):
            try:
                values.append(column[i].as_py())
            except UnicodeDecodeError as err:
                values.append(err)
        return values
