"""Data pipeline speed: `cpt prepare` against bare `tokenizers`, and the streaming loader's tokens/s.

    .venv/bin/python benchmarks/data_pipeline.py [--sample data/sample] [--workers 2]

1. ``cpt prepare`` on the full PubMed sample (block 8192), end to end in a fresh process and as the
   in-process ``prepare()`` call, against the same texts tokenized by ``tokenizers`` alone
   (``encode_batch_fast`` over the whole list, its own thread pool on the same cores; JSON already
   parsed, so the baseline does strictly less work). Goal: prepare ≤ 1.3× the bare time.
2. The 3-source mix (0.6/0.2/0.2) at block 8192 through ``PackedDataModule``'s loader with worker
   processes: tokens/s delivered once the workers run, and over ``--batches`` including start-up.
   Goal: ≥ 6M tokens/s.
Wall times need a quiet machine (the load average is printed); CPU seconds of prepare (parent +
workers) against the bare encode are reported too, as an overhead measure that a busy machine
disturbs less.
Figures go to docs/benchmarks.md with the command, date and machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"pubmed": 0.6, "medical_qa": 0.2, "case_reports": 0.2}


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the prepare workers): robust to a busy machine."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_prepare(sample: Path, work: Path, workers: int, repeats: int) -> dict:
    from tokenizers import Tokenizer

    from cpt_lightning.data.prepare import prepare

    raw, tokenizer = sample / "raw" / "pubmed.jsonl", sample / "tokenizer"
    with open(raw, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    backend = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    command = [sys.executable, "-m", "cpt_lightning.data.prepare", str(raw), "--output", str(work / "cli"),
               "--tokenizer", str(tokenizer), "--block-size", "8192", "--num-workers", str(workers), "--overwrite",
               "--quiet"]
    bare, bare_cpu, cli, inproc, inproc_cpu = [], [], [], [], []
    for _ in range(repeats):  # interleaved, so a busy machine slows both sides of each ratio alike
        for output in ("cli", "inproc"):  # an up-to-date output is kept even with --overwrite: start from none
            shutil.rmtree(work / output, ignore_errors=True)
        start, cpu = time.perf_counter(), cpu_seconds()
        tokens = sum(len(e.ids) for e in backend.encode_batch_fast(texts))
        bare.append(time.perf_counter() - start)
        bare_cpu.append(cpu_seconds() - cpu)
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT)
        cli.append(time.perf_counter() - start)
        start, cpu = time.perf_counter(), cpu_seconds()
        manifest, _ = prepare([str(raw)], str(work / "inproc"), str(tokenizer), 8192, num_workers=workers,
                              overwrite=True, progress=False)
        inproc.append(time.perf_counter() - start)
        inproc_cpu.append(cpu_seconds() - cpu)
    best_bare = min(bare)
    return {
        "documents": len(texts),
        "tokens": tokens,
        "tokens_stored": manifest.num_tokens,
        "bare_encode_s": best_bare,
        "bare_tokens_per_s": tokens / best_bare,
        "prepare_cli_s": min(cli),
        "prepare_inprocess_s": min(inproc),
        "prepare_cli_tokens_per_s": tokens / min(cli),
        "prepare_inprocess_tokens_per_s": tokens / min(inproc),
        "ratio_cli": min(cli) / best_bare,
        "ratio_inprocess": min(inproc) / best_bare,
        "bare_cpu_s": min(bare_cpu),
        "prepare_inprocess_cpu_s": min(inproc_cpu),
        "ratio_cpu": min(inproc_cpu) / min(bare_cpu),
        "ratio_inprocess_median_of_pairs": statistics.median(i / b for i, b in zip(inproc, bare)),
        "ratio_cli_median_of_pairs": statistics.median(c / b for c, b in zip(cli, bare)),
        "runs_s": {"bare": bare, "cli": cli, "inprocess": inproc, "bare_cpu": bare_cpu, "inprocess_cpu": inproc_cpu},
        "command": " ".join(Path(c).name if c == sys.executable else c for c in command),
    }


def bench_loader(sample: Path, work: Path, workers: int, micro_batch: int, batches: int) -> dict:
    from cpt_lightning.data import PackedDataModule, Source
    from cpt_lightning.data.prepare import prepare

    for name in SOURCES:
        prepare([str(sample / "raw" / f"{name}.jsonl")], str(work / name), str(sample / "tokenizer"), 8192,
                num_workers=workers, progress=False)
    dm = PackedDataModule([Source(n, str(work / n), w) for n, w in SOURCES.items()], micro_batch_size=micro_batch,
                          num_workers=workers)
    steady_tokens, total_tokens, first = 0, 0, None
    start = time.perf_counter()
    for batch in itertools.islice(dm.train_dataloader(), batches):  # the mix is endless
        tokens = batch["input_ids"].numel()
        total_tokens += tokens
        if first is None:
            first = time.perf_counter()  # workers are up; count from here
        else:
            steady_tokens += tokens
    end = time.perf_counter()
    return {
        "block_size": 8192,
        "micro_batch_size": micro_batch,
        "num_workers": workers,
        "batches": batches,
        "tokens": total_tokens,
        "steady_tokens_per_s": steady_tokens / (end - first),
        "with_startup_tokens_per_s": total_tokens / (end - start),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", default="data/sample", help="`cpt data sample` output (written if missing)")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=180, help="loader batches read (180 × 8 × 8192 ≈ 11.8M tokens)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    from cpt_lightning.data.sample import write_sample

    sample = Path(args.sample)
    write_sample(sample)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="cpt-bench-") as tmp:
        results = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()}-core {platform.processor() or platform.machine()}, {platform.system()}",
            "prepare": bench_prepare(sample, Path(tmp) / "prepare", args.workers, args.repeats),
            "loader": bench_loader(sample, Path(tmp) / "mix", args.workers, args.micro_batch, args.batches),
            "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2),
        }
    p, l = results["prepare"], results["loader"]
    print(f"prepare: {p['documents']:,} PubMed docs, {p['tokens']:,} tokens")
    print(f"  bare tokenizers encode_batch_fast: {p['bare_encode_s']:.2f} s ({p['bare_tokens_per_s'] / 1e6:.2f}M tokens/s)")
    print(f"  cpt prepare (process, end to end): {p['prepare_cli_s']:.2f} s "
          f"({p['prepare_cli_tokens_per_s'] / 1e6:.2f}M tokens/s) = {p['ratio_cli']:.2f}x bare")
    print(f"  prepare() in process:             {p['prepare_inprocess_s']:.2f} s "
          f"({p['prepare_inprocess_tokens_per_s'] / 1e6:.2f}M tokens/s) = {p['ratio_inprocess']:.2f}x bare")
    print(f"  median ratio of interleaved pairs: in process {p['ratio_inprocess_median_of_pairs']:.2f}x, "
          f"end to end {p['ratio_cli_median_of_pairs']:.2f}x")
    print(f"  CPU seconds: prepare() {p['prepare_inprocess_cpu_s']:.1f} vs bare {p['bare_cpu_s']:.1f} "
          f"= {p['ratio_cpu']:.2f}x")
    print(f"  load average before/after: {results['load_before']} / {results['load_after']}")
    print(f"loader: 3-source mix, block 8192, batch {l['micro_batch_size']}, {l['num_workers']} workers: "
          f"{l['steady_tokens_per_s'] / 1e6:.1f}M tokens/s steady, {l['with_startup_tokens_per_s'] / 1e6:.1f}M "
          f"tokens/s over {l['batches']} batches with worker start-up")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
