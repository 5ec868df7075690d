"""Peak memory and time of the CLM head + loss: dense logits (Hugging Face path) vs the fused chunked loss.

Each variant runs in a fresh process so its peak resident memory is its own. ModernBERT-base head
dimensions (hidden 768, vocabulary 50,368); N predicted positions (CLM predicts every token).

    .venv/bin/python benchmarks/fused_loss.py --positions 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

HIDDEN, VOCAB = 768, 50368


def run_variant(variant: str, positions: int, chunk: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from cpt_lightning.fused_loss import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(positions, HIDDEN, requires_grad=True)
    weight = (torch.randn(VOCAB, HIDDEN) * 0.02).requires_grad_()
    labels = torch.randint(VOCAB, (positions,))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        if variant == "dense":
            loss = F.cross_entropy(F.linear(hidden, weight).float(), labels)
        else:
            loss, _ = linear_cross_entropy(hidden, weight, None, labels, chunk)
        loss.backward()
        times.append(time.perf_counter() - start)
        hidden.grad = weight.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "seconds": min(times), "extra_peak_gib": (peak - baseline) / 2**20, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=4096 // 4, help="loss_chunk_size of the fused variant")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=("dense", "fused"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.positions, args.chunk, args.repeats)))
        return
    results = {}
    for variant in ("dense", "fused"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--positions", str(args.positions),
                              "--chunk", str(args.chunk), "--repeats", str(args.repeats)],
                             check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.splitlines()[-1])
    logits_gib = args.positions * VOCAB * 4 / 2**30
    print(f"{args.positions} positions × {VOCAB} vocab (fp32 logits alone: {logits_gib:.2f} GiB), chunk {args.chunk}")
    print(f"{'variant':<8} {'fwd+bwd s':>10} {'extra peak GiB':>15} {'loss':>8}")
    for r in results.values():
        print(f"{r['variant']:<8} {r['seconds']:>10.2f} {r['extra_peak_gib']:>15.2f} {r['loss']:>8.4f}")
    dense, fused = results["dense"], results["fused"]
    print(f"fused / dense: time {fused['seconds'] / dense['seconds']:.2f}×, "
          f"extra peak memory {fused['extra_peak_gib'] / dense['extra_peak_gib']:.2f}×")


if __name__ == "__main__":
    main()
