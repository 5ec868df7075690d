"""Peak memory and time of the CLM head + loss: dense logits (Hugging Face path) vs the fused chunked loss,
eager and compiled (``compile: true``).

Each variant runs in a fresh process so its peak memory is its own (resident set on CPU, the CUDA
allocator's peak on a GPU). ModernBERT-base head dimensions (hidden 768, vocabulary 50,368); N
predicted positions (CLM predicts every token). ``--bf16`` runs under bf16 autocast as training does.
Times are the best of ``--repeats`` forward + backward passes. Every variant first runs one chunk (the
compiled one compiles there), and on CUDA one full pass, before its peak is reset: on CPU the resident
high-water mark (Linux's ``/proc/self/clear_refs``), on CUDA the allocator's peak.

    .venv/bin/python benchmarks/fused_loss.py --positions 8192 --chunk 4096 --repeats 3
    python3 benchmarks/fused_loss.py --positions 32768 --chunk 4096 --repeats 5 --device cuda --bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, VOCAB = 768, 50368
VARIANTS = ("dense", "fused", "fused_compiled")


def resident_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (the peak since the last reset) of this process, from Linux's /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}: the CPU memory figure needs Linux")


def reset_resident_peak() -> int:
    """Reset the resident high-water mark (``VmHWM``) to the resident set, and return it in bytes. Before, the peak
    was ``ru_maxrss``, which no call resets: a variant warmed up on one chunk (the compiled one) had that chunk's
    memory in its baseline and reported half of eager's extra peak, which measured alike is less."""
    Path("/proc/self/clear_refs").write_text("5")
    return resident_kib("VmRSS") * 1024


def run_variant(variant: str, positions: int, chunk: int, repeats: int, device: str, bf16: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from cpt_lightning.fused_loss import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(positions, HIDDEN, device=device, requires_grad=True)
    weight = (torch.randn(VOCAB, HIDDEN, device=device) * 0.02).requires_grad_()
    labels = torch.randint(VOCAB, (positions,), device=device)
    cuda = device == "cuda"

    def loss_fn(rows):
        h, y = hidden[:rows], labels[:rows]
        if variant == "dense":
            return F.cross_entropy(F.linear(h, weight).float(), y)
        return linear_cross_entropy(h, weight, None, y, chunk, compiled=variant == "fused_compiled")[0]

    def step(rows=positions):
        autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            loss = loss_fn(rows)
        loss.backward()
        hidden.grad = weight.grad = None
        return loss

    step(rows=chunk)  # every variant alike: compiles the dynamic-row graph on one chunk, before memory is counted
    if cuda:
        step()  # CUDA: warm the allocator and kernels; its peak statistic is reset below
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:  # CPU: the resident set now, and its high-water mark reset so the warm-up's peak is not counted
        baseline = reset_resident_peak()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else resident_kib("VmHWM") * 1024
    return {"variant": variant, "seconds": min(times), "extra_peak_gib": (peak - baseline) / 2**30, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--positions", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=4096 // 4, help="loss_chunk_size of the fused variants")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, as training with precision bf16-mixed")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {VARIANTS}")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.positions, args.chunk, args.repeats, args.device, args.bf16)))
        return
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {VARIANTS}")
    logits_gib = args.positions * VOCAB * 4 / 2**30
    print(f"{args.positions} positions × {VOCAB} vocab (fp32 logits alone: {logits_gib:.2f} GiB), chunk {args.chunk}, "
          f"{args.device}{', bf16 autocast' if args.bf16 else ', fp32'}; best of {args.repeats}")
    print(f"{'variant':<15} {'fwd+bwd s':>10} {'extra peak GiB':>15} {'loss':>8} {'time × first':>13}", flush=True)
    first, failed = None, []
    for variant in variants:  # each in its own process (a clean peak); its row printed as soon as it is measured
        command = [sys.executable, __file__, "--variant", variant, "--positions", str(args.positions), "--chunk",
                   str(args.chunk), "--repeats", str(args.repeats), "--device", args.device] + ["--bf16"] * args.bf16
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # its errors go straight to stderr
        if done.returncode:
            print(f"{variant:<15} failed (exit {done.returncode}, its error is above)", flush=True)
            failed.append(variant)
            continue
        r = json.loads(done.stdout.splitlines()[-1])
        first = first or r
        print(f"{r['variant']:<15} {r['seconds']:>10.3f} {r['extra_peak_gib']:>15.2f} {r['loss']:>8.4f} "
              f"{r['seconds'] / first['seconds']:>13.2f}", flush=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")

if __name__ == "__main__":
    main()
