"""Input ranges: shards are contiguous, cover every record once, balance bytes, and seek correctly."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cpt_lightning.data.readers import SkipCounts, find_input_files, index_file, iter_segment, plan_shards
from cpt_lightning.errors import UserError

# documents of very different sizes, so record counts and bytes disagree
DOCS = [f"doc {i} " + "word " * (5 if i < 2100 else 60) for i in range(3000)]


def read_all(shards, field="text"):
    return [[t for seg in shard for t in iter_segment(seg, field, False, SkipCounts())] for shard in shards]


def jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def test_a_folder_names_the_files_it_does_not_read_and_reads_gzip_whatever_the_case(tmp_path, capsys):
    """A corpus exported as .json or .jsonl.zst beside a readme.txt trained on the readme alone, without a word;
    part-1.JSONL.GZ was left out too."""
    (tmp_path / "corpus").mkdir()
    jsonl(tmp_path / "corpus" / "part-0.jsonl", ["first"])
    with gzip.open(tmp_path / "corpus" / "part-1.JSONL.GZ", "wt") as f:
        f.write(json.dumps({"text": "second"}) + "\n")
    for name in ("part-2.jsonl.zst", "README.md"):
        (tmp_path / "corpus" / name).write_text("x")
    found = find_input_files([str(tmp_path / "corpus")])
    assert [p.name for p in found] == ["part-0.jsonl", "part-1.JSONL.GZ"]
    assert "corpus: 2 files of other kinds not read (e.g. README.md)" in capsys.readouterr().err
    assert read_all(plan_shards([index_file(p, "file", "text") for p in found], 1)) == [["first", "second"]]
    find_input_files([str(tmp_path / "corpus" / "part-0.jsonl")])
    assert capsys.readouterr().err == ""


def test_a_folder_yields_its_inputs_sorted_without_hidden_files_or_folders(tmp_path):
    """Jupyter's .ipynb_checkpoints/ copies were read beside the originals: their documents trained twice."""
    for name in ["notes/b.txt", "notes/a.jsonl", "notes/sub/c.txt.gz", "notes/.draft.txt", "notes/readme.md",
                 "notes/.ipynb_checkpoints/a-checkpoint.jsonl", "notes/sub/.cache/d.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    found = [str(p.relative_to(tmp_path)) for p in find_input_files([str(tmp_path / "notes")])]
    assert found == ["notes/a.jsonl", "notes/b.txt", "notes/sub/c.txt.gz"]
    hidden_named = tmp_path / ".hidden" / "inputs"  # hidden above the folder given: the user's choice
    hidden_named.mkdir(parents=True)
    (hidden_named / "e.txt").write_text("x")
    assert find_input_files([str(hidden_named)]) == [hidden_named / "e.txt"]


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "parquet", "two-files"])
def test_shards_cover_every_record_once_in_order(tmp_path, kind):
    if kind == "jsonl":
        files = [jsonl(tmp_path / "a.jsonl", DOCS)]
    elif kind == "jsonl.gz":
        with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
            f.write("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
        files = [tmp_path / "a.jsonl.gz"]
    elif kind == "parquet":
        pq.write_table(pa.table({"text": DOCS}), tmp_path / "a.parquet", row_group_size=250)
        files = [tmp_path / "a.parquet"]
    else:
        files = [jsonl(tmp_path / "a.jsonl", DOCS[:1450]), jsonl(tmp_path / "b.jsonl", DOCS[1450:])]
    indexes = [index_file(f, "file", "text") for f in files]
    shards = plan_shards(indexes, 3)
    parts = read_all(shards)
    assert len(shards) == 3 and sum(parts, []) == DOCS
    sizes = [sum(map(len, part)) for part in parts]
    assert max(sizes) < 1.5 * min(sizes)  # balanced by bytes, not by record count
    assert len(parts[0]) > len(parts[-1])


@pytest.mark.parametrize("column", [
    pa.array(DOCS[:600], pa.large_string()),
    pa.array(DOCS[:600], pa.string_view()),
    pa.array(DOCS[:600]).dictionary_encode(),  # a pandas categorical
], ids=["large_string", "string_view", "dictionary"])
def test_every_arrow_string_type_is_read_as_text(tmp_path, column):
    """string_view and dictionary-of-string columns were refused as "has type ..., expected strings"."""
    pq.write_table(pa.table({"text": column}), tmp_path / "a.parquet", row_group_size=250)
    assert sum(read_all(plan_shards([index_file(tmp_path / "a.parquet", "file", "text")], 2)), []) == DOCS[:600]
    pq.write_table(pa.table({"text": pa.array(range(3))}), tmp_path / "b.parquet")
    with pytest.raises(UserError, match="column 'text' has type int64, expected strings"):
        index_file(tmp_path / "b.parquet", "file", "text")


def test_max_records_keeps_the_first_ones(tmp_path):
    files = [jsonl(tmp_path / "a.jsonl", DOCS[:100]), jsonl(tmp_path / "b.jsonl", DOCS[100:300])]
    shards = plan_shards([index_file(f, "file", "text") for f in files], 2, max_records=150)
    assert sum(read_all(shards), []) == DOCS[:150]


def test_a_subset_ending_on_a_seek_point_makes_no_empty_shard(tmp_path):
    """More shards asked for than seek points: the one at the subset's end starts no shard (an empty one would
    give a worker nothing to tokenize and a holdout quota nothing to take from)."""
    pq.write_table(pa.table({"text": DOCS[:600]}), tmp_path / "a.parquet", row_group_size=100)
    shards = plan_shards([index_file(tmp_path / "a.parquet", "file", "text")], 8, max_records=100)
    assert all(shards) and sum(read_all(shards), []) == DOCS[:100]


def test_line_counts_with_and_without_final_newline(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\nthree")
    (tmp_path / "b.txt").write_text("one\ntwo\n")
    (tmp_path / "c.txt").write_text("")
    assert [index_file(tmp_path / n, "line", "text").num_records for n in ("a.txt", "b.txt", "c.txt")] == [3, 2, 0]
    assert read_all(plan_shards([index_file(tmp_path / "a.txt", "line", "text")], 1)) == [["one", "two", "three"]]


BOM = b"\xef\xbb\xbf"  # what Notepad, PowerShell 5 and Excel's "UTF-8" write first


@pytest.mark.parametrize("name, unit, body, documents", [
    ("a.jsonl", "file", b'{"text": "Aspirin helps."}\n{"text": "It works."}\n', ["Aspirin helps.", "It works."]),
    ("a.txt", "line", b"Aspirin helps.\r\nIt works.\r\n", ["Aspirin helps.", "It works."]),
    ("a.txt", "file", b"Aspirin helps.\nIt works.\n", ["Aspirin helps.\nIt works.\n"]),
], ids=["jsonl", "txt-lines-crlf", "txt-file"])
def test_a_byte_order_mark_is_not_part_of_the_first_document(tmp_path, name, unit, body, documents):
    """A BOM-marked JSONL file was refused as invalid JSON; in text it became a token of the first document."""
    (tmp_path / name).write_bytes(BOM + body)
    index = index_file(tmp_path / name, unit, "text")
    assert read_all(plan_shards([index], 1)) == [documents]


def test_invalid_utf8_after_a_byte_order_mark_names_the_byte_and_line(tmp_path):
    (tmp_path / "a.txt").write_bytes(BOM + b"fine\nbad \xe9 byte\n")
    for unit, line in (("line", 2), ("file", 2)):
        with pytest.raises(UserError, match=rf"a\.txt:{line}: invalid UTF-8 \(byte 0xe9\)"):
            read_all(plan_shards([index_file(tmp_path / "a.txt", unit, "text")], 1))


def test_a_jsonl_line_that_is_no_object_or_no_json_names_its_line_and_column():
    from cpt_lightning.errors import json_object

    with pytest.raises(UserError, match=r"^docs\.jsonl:2: expected a JSON object per line, found list$"):
        json_object('["text"]', "docs.jsonl:2")  # not a traceback from the reader's `record[field]`
    with pytest.raises(UserError, match=r"^docs\.jsonl:3: invalid JSON \(Expecting property name enclosed in double "
                                        r"quotes at column 14\)$"):
        json_object('{"text": "a",}', "docs.jsonl:3")  # the column an editor shows, counted from 1
    with pytest.raises(UserError, match=r"^docs\.jsonl:4: invalid JSON \(Expecting ',' delimiter at column 33\)$"):
        json_object('{"text": "abc", "meta": {"k": 1}\n', "docs.jsonl:4")  # unclosed: just past the line's end


@pytest.mark.parametrize("value", ["1" * 5000, "[" * 100_000 + "]" * 100_000],
                         ids=["number-over-4300-digits", "deep-nesting"])
def test_a_line_pythons_json_cannot_read_names_its_line(value):
    """Valid JSON that json.loads refuses with a ValueError or RecursionError, not a JSONDecodeError: a worker's
    traceback without the file's name (exit 1), where any other bad line is one line naming it."""
    from cpt_lightning.errors import json_object

    with pytest.raises(UserError, match=r"^docs\.jsonl:4: JSON that Python cannot read \((Exceeds|maximum recursion)"):
        json_object('{"text": "a", "n": ' + value + '}', "docs.jsonl:4")


def test_a_character_cut_short_at_the_end_names_its_first_byte(tmp_path):
    from cpt_lightning.errors import utf8_lines

    cut = tmp_path / "cut.txt"
    cut.write_bytes("fine\nend \u4e2d".encode()[:-1])
    with pytest.raises(UserError, match=r"cut\.txt:2: invalid UTF-8 \(byte 0xe4\)"):
        list(utf8_lines(cut))
