"""The offline PubMed tasks: labels from the NLM records, disjoint seeded splits, and the harness on them."""

import json
import random
import re

import pytest

from cpt_lightning.errors import UserError
from cpt_lightning.evaluate import main
from cpt_lightning.evaluate.pubmed_tasks import (
    CHECK_TAGS, WORD, build_pubmed_tasks, chemical_examples, load_pubmed_records, mesh_examples, publication_class,
    split_by_pmid, tag_chemicals,
)
from cpt_lightning.evaluate.tasks import load_task
from test_evaluate import tiny_encoder  # noqa: F401  (fixture)

SIZES = dict(per_class=12, mesh_labels=5, mesh_docs=40, ner_docs=8)


@pytest.fixture(scope="module")
def records(sample_corpus):
    return load_pubmed_records(sample_corpus.root)


@pytest.fixture(scope="module")
def built(records, tmp_path_factory):
    out = tmp_path_factory.mktemp("pubmed_tasks")
    return out, build_pubmed_tasks(records, out, seed=13, **SIZES)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    "types, label",
    [
        (["Journal Article", "Case Reports", "Review"], "case_report"),
        (["Clinical Trial, Phase II", "Journal Article"], "clinical_trial"),
        (["Randomized Controlled Trial"], "clinical_trial"),
        (["Systematic Review", "Journal Article"], "review"),
        (["Journal Article", "Comparative Study"], "other"),
    ],
)
def test_publication_class(types, label):
    assert publication_class(types) == label


def test_chemical_tags_longest_match_case_insensitive():
    words, tags = tag_chemicals("Blood glucose fell after insulin; glucose rose.", ["Glucose", "Blood Glucose", "Insulin"])
    assert words == ["Blood", "glucose", "fell", "after", "insulin", ";", "glucose", "rose", "."]
    assert tags == ["B-Chemical", "I-Chemical", "O", "O", "B-Chemical", "O", "B-Chemical", "O", "O"]
    assert tag_chemicals("Vitamin D helps.", ["Vitamin", "Vitamin D"])[1] == ["B-Chemical", "I-Chemical", "O", "O"]


def test_chemical_examples_keep_every_sentence_of_abstracts_with_a_tagged_substance_only():
    records = [
        {"pmid": "1", "text": "Aspirin helps. It works.", "chemicals": ["Aspirin"]},
        {"pmid": "2", "text": "Nothing here. Really.", "chemicals": ["Insulin"]},  # listed, never written
        {"pmid": "3", "text": "Insulin was given.", "chemicals": ["Insulin"]},
        {"pmid": "4", "text": "No list.", "chemicals": []},
    ]
    rows = chemical_examples(records, max_docs=5, rng=random.Random(0))
    assert sorted({r["pmid"] for r in rows}) == ["1", "3"]
    assert [r["tokens"] for r in rows if r["pmid"] == "1"] == [["Aspirin", "helps", "."], ["It", "works", "."]]
    assert len({r["pmid"] for r in chemical_examples(records, max_docs=1, rng=random.Random(0))}) == 1


def test_mesh_labels_tied_in_count_are_chosen_by_name_not_by_set_order():
    """Terms are counted from sets of strings, whose order moves with Python's hash seed: a tie at the last label
    must not pick a different label set (and other abstracts) from one build to the next."""
    records = [{"pmid": str(i), "text": f"Abstract {i}.", "mesh_terms": [term]}
               for i, term in enumerate(["Zebrafish", "Neoplasms", "Zebrafish", "Mice", "Neoplasms", "Mice", "Neoplasms"])]
    examples, labels = mesh_examples(records, num_labels=2, max_docs=10, rng=random.Random(0))
    assert labels == ["Mice", "Neoplasms"]  # Zebrafish ties with Mice and was counted first
    assert sorted(e["pmid"] for e in examples) == ["1", "3", "4", "5", "6"]


def test_split_by_pmid_puts_every_example_in_one_split_70_15_15():
    for n in range(1, 40):
        examples = [{"pmid": str(100 + i), "sentence": j} for i in range(n) for j in range(2)]  # two per abstract
        splits = split_by_pmid(examples, random.Random(n))
        pmids = {split: {e["pmid"] for e in rows} for split, rows in splits.items()}
        assert sum(len(rows) for rows in splits.values()) == 2 * n, n  # none lost, none twice
        assert set().union(*pmids.values()) == {e["pmid"] for e in examples}
        assert len(pmids["train"]) == round(0.7 * n) and len(pmids["dev"]) == min(round(0.15 * n), n - round(0.7 * n))


def test_the_split_is_the_seeds_shuffle_of_the_pmids_in_number_order():
    """Shuffled from a set of strings, the PMIDs would come in the per-process hash order: a rebuild in another
    process with the same seed would give other splits."""
    pmids = ["9", "10", "100", "11", "2", "30", "7", "1000", "5", "64"]
    splits = split_by_pmid([{"pmid": pmid} for pmid in pmids], random.Random(0))
    shuffled = sorted(pmids, key=int)
    random.Random(0).shuffle(shuffled)
    assert [e["pmid"] for e in splits["train"]] == [pmid for pmid in pmids if pmid in shuffled[:7]]


def test_tasks_load_with_disjoint_splits_and_record_labels(built, records):
    out, info = built
    by_pmid = {r["pmid"]: r for r in records}
    for folder, name, kind in (("pubmed_pubtype", "PubMed-PubType", "classification"),
                               ("pubmed_mesh", "PubMed-MeSH", "multilabel"), ("pubmed_chem", "PubMed-Chem", "ner")):
        task = load_task(out / f"{folder}.yaml")
        assert (task.name, task.type, task.family) == (name, kind, "PubMed")
        assert task.metric == {"classification": "macro_f1", "multilabel": "micro_f1", "ner": "entity_f1"}[kind]
        assert (task.epochs, task.lr, task.batch_size) == (3, 5e-5, 16)  # the task defaults, written out
        pmids = {split: {r["pmid"] for r in _rows(path)} for split, path in task.splits.items()}
        assert not (pmids["train"] & pmids["dev"] or pmids["train"] & pmids["test"] or pmids["dev"] & pmids["test"])
        assert {s: len(_rows(p)) for s, p in task.splits.items()} == info["examples"][folder]
    for row in _rows(out / "pubmed_pubtype" / "test.jsonl"):
        assert row["label"] == publication_class(by_pmid[row["pmid"]]["publication_types"])
    assert info["pubtype_classes"] == {"case_report": 12, "clinical_trial": 12, "other": 12, "review": 12}
    labels = set(info["mesh_labels"])
    assert len(labels) == 5 and not labels & CHECK_TAGS
    for row in _rows(out / "pubmed_mesh" / "train.jsonl"):
        assert row["labels"] and set(row["labels"]) == set(by_pmid[row["pmid"]]["mesh_terms"]) & labels
    names = {pmid: {tuple(WORD.findall(c.lower())) for c in r["chemicals"]} for pmid, r in by_pmid.items()}
    entities = 0
    for row in _rows(out / "pubmed_chem" / "train.jsonl"):
        for start, tag in enumerate(row["tags"]):
            if tag == "B-Chemical":
                end = start + 1
                while end < len(row["tags"]) and row["tags"][end] == "I-Chemical":
                    end += 1
                assert tuple(w.lower() for w in row["tokens"][start:end]) in names[row["pmid"]]
                entities += 1
    assert entities > 0


def test_an_abstract_published_under_two_pmids_is_kept_once(records):
    """Republications (e.g. PMIDs 402568 and 402569 in the sample) would put one text in two splits."""
    texts = [" ".join(WORD.findall(r["text"].lower())) for r in records]
    assert len(set(texts)) == len(texts)
    pmids = {r["pmid"] for r in records}
    assert "402568" in pmids and "402569" not in pmids


def test_a_republished_abstract_is_kept_under_its_lowest_pmid_whichever_file_holds_it(tmp_path, monkeypatch):
    monkeypatch.setattr("cpt_lightning.data.sample.write_sample", lambda folder: None)
    (tmp_path / "raw").mkdir()
    fields = {"publication_types": [], "mesh_terms": [], "chemicals": []}
    (tmp_path / "raw" / "pubmed.jsonl").write_text(json.dumps({"pmid": "20", "text": "Same words.", **fields}) + "\n")
    (tmp_path / "raw" / "case_reports.jsonl").write_text(json.dumps({"pmid": "10", "text": "same words", **fields}) + "\n")
    assert [r["pmid"] for r in load_pubmed_records(tmp_path)] == ["10"]


@pytest.mark.parametrize("line, said", [
    ('{"pmid": "20", "text": "cut sh', "invalid JSON"),
    ('{"pmid": "20", "text": "x", "mesh_terms": [], "chemicals": []}', "a PubMed record with no publication_types"),
    ('{"pmid": "PMC1", "text": "x", "publication_types": [], "mesh_terms": [], "chemicals": []}',
     "a PubMed record with pmid 'PMC1' is not a number"),
], ids=["cut-short", "field-missing", "pmid-not-a-number"])
def test_a_damaged_sample_record_is_one_line_naming_its_line(tmp_path, monkeypatch, line, said):
    """The up-to-date check reads no record: a sample cut short or edited was a JSONDecodeError, KeyError or
    ValueError traceback."""
    monkeypatch.setattr("cpt_lightning.data.sample.write_sample", lambda folder: None)
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "pubmed.jsonl").write_text(line + "\n")
    (tmp_path / "raw" / "case_reports.jsonl").write_text("")
    with pytest.raises(UserError, match=rf"^{tmp_path / 'raw' / 'pubmed.jsonl'}:1: {re.escape(said)}"):
        load_pubmed_records(tmp_path)


def test_too_few_documents_for_three_splits_is_refused_before_anything_is_written(tmp_path):
    records = [{"pmid": str(i), "text": f"Aspirin dose {i}.", "publication_types": ["Review"], "mesh_terms": ["X"],
                "chemicals": ["Aspirin"]} for i in (1, 2)]
    with pytest.raises(UserError, match="too few documents for train/dev/test splits"):
        build_pubmed_tasks(records, tmp_path / "out", 13, 10, 1, 10, 10)
    assert list(tmp_path.iterdir()) == []


def test_a_size_below_one_is_a_usage_error_before_the_sample_is_written(tmp_path, capsys):
    from cpt_lightning.evaluate.pubmed_tasks import main as build

    assert build(["--per-class", "0", "--sample", str(tmp_path / "sample"), "--out", str(tmp_path / "out")]) == 2
    assert "error: sizes must be positive" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_rebuild_is_identical_and_the_seed_moves_the_splits(built, records, tmp_path):
    out, _ = built
    build_pubmed_tasks(records, tmp_path / "again", seed=13, **SIZES)
    build_pubmed_tasks(records, tmp_path / "other", seed=14, **SIZES)
    for folder in ("pubmed_pubtype", "pubmed_mesh", "pubmed_chem"):
        assert (tmp_path / "again" / folder / "test.jsonl").read_bytes() == (out / folder / "test.jsonl").read_bytes()
    assert (tmp_path / "other" / "pubmed_pubtype" / "test.jsonl").read_bytes() != (out / "pubmed_pubtype" / "test.jsonl").read_bytes()


def test_a_rebuild_cut_short_leaves_the_earlier_tasks_whole(built, records, tmp_path, monkeypatch):
    """Written in place, a rebuild with another seed stopped after one task's train split left it beside the test
    split of the old seed: a quarter of the test abstracts were in train, and cpt evaluate read them without a word."""
    import shutil

    import cpt_lightning.evaluate.pubmed_tasks as pubmed_tasks

    out = tmp_path / "tasks"
    shutil.copytree(built[0], out)
    before = {path: path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}
    write_task = pubmed_tasks.write_task

    def stopped_in_the_second_task(out, folder, *args):
        if folder == "pubmed_mesh":
            raise KeyboardInterrupt
        return write_task(out, folder, *args)

    monkeypatch.setattr(pubmed_tasks, "write_task", stopped_in_the_second_task)
    with pytest.raises(KeyboardInterrupt):
        build_pubmed_tasks(records, out, seed=14, **SIZES)
    assert {path: path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tasks"]  # no staging folder left
    (out / "notes.txt").write_text("mine")
    monkeypatch.undo()
    with pytest.raises(UserError, match=r"holds other files than the PubMed tasks \(notes.txt\)"):
        build_pubmed_tasks(records, out, seed=14, **SIZES)
    with pytest.raises(UserError, match=r"notes.txt: .*notes.txt is a file, not a folder; give another --out"):  # it was moved aside and deleted
        build_pubmed_tasks(records, out / "notes.txt", seed=14, **SIZES)
    assert (out / "notes.txt").read_text() == "mine"


def test_harness_runs_end_to_end_on_the_pubmed_tasks(built, tiny_encoder, tmp_path):  # noqa: F811
    out, _ = built
    for yaml_file in out.glob("*.yaml"):  # one quick epoch for the test
        yaml_file.write_text(yaml_file.read_text().replace("epochs: 3", "epochs: 1"))
    assert main(["--tasks", str(out), "--models", tiny_encoder, "--seeds", "1", "--out", str(tmp_path / "eval")]) == 0
    table = (tmp_path / "eval" / "results.md").read_text()
    assert table.splitlines()[0] == "| Model | Context | PubMed-Chem | PubMed-MeSH | PubMed-PubType | PubMed avg | Avg |"
