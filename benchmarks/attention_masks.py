"""Time to build one step's attention masks for packed rows, per kernel, on CPU or a GPU.

Every training forward builds two masks (global and sliding-window layers) for the objective's
kind. Compared: SDPA's dense boolean masks, FlexAttention's BlockMask as ``create_block_mask``
derives it (the rule evaluated at all L × L positions) and as ``cpt_lightning.attention.block_mask``
derives it (tiles classified from document ranges). Documents of 50 to 4000 tokens, ModernBERT-base's
window (64). Prints one line per (kind, builder) with the median of the repeats in milliseconds.

    .venv/bin/python benchmarks/attention_masks.py --rows 4 --length 8192 --repeats 5 [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask

from cpt_lightning.attention import block_mask, dense_mask, document_mask_mod

WINDOW = 64


def library_block_mask(position_ids: torch.Tensor, kind: str, window: int | None):
    rows, length = position_ids.shape
    mask_mod = document_mask_mod(position_ids, kind, window)
    return create_block_mask(mask_mod, rows, None, length, length, device=position_ids.device)


BUILDERS = {"sdpa dense": dense_mask, "flex create_block_mask": library_block_mask, "flex tiles (ours)": block_mask}


def packed_rows(rows: int, length: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    position_ids = []
    for _ in range(rows):
        lengths = torch.randint(50, 4000, (length // 50,), generator=generator).tolist()
        position_ids.append(torch.cat([torch.arange(n) for n in lengths])[:length])
    return torch.stack(position_ids).to(device)


def step_masks_ms(build, position_ids: torch.Tensor, kind: str, repeats: int) -> float:
    """Median wall time of building both of a step's masks (global + sliding), after one warm-up."""
    times = []
    for _ in range(repeats + 1):
        if position_ids.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        build(position_ids, kind, None), build(position_ids, kind, WINDOW)
        if position_ids.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    position_ids = packed_rows(args.rows, args.length, args.device)
    name = torch.cuda.get_device_name() if position_ids.is_cuda else "cpu"
    print(f"{args.rows} rows × {args.length} tokens on {name}, torch {torch.__version__}; "
          f"both masks of one step, median of {args.repeats}")
    for kind in ("causal", "bidirectional"):
        for label, build in BUILDERS.items():
            print(f"{kind:13} {label:24} {step_masks_ms(build, position_ids, kind, args.repeats):9.1f} ms")


if __name__ == "__main__":
    main()
