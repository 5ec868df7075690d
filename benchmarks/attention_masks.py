"""Time to build one step's attention masks for packed rows, per kernel, on CPU or a GPU.

Every training forward builds two masks (global and sliding-window layers) for the objective's
kind. Compared: SDPA's dense boolean masks, FlexAttention's BlockMask as ``create_block_mask``
derives it (the rule evaluated at all L × L positions) and as ``cpt_lightning.attention.block_mask``
derives it (tiles classified from document ranges). Rows are random packings of 50- to 4000-token
documents, or real rows of a prepared source (``--prepared``). ModernBERT-base's window (64). Prints
one line per (kind, builder) with the median of the repeats in milliseconds, then how much of the
``L × L`` square FlexAttention's tiles cover against the pairs the mask allows (SDPA computes it all).

    .venv/bin/python benchmarks/attention_masks.py --rows 4 --length 8192 --repeats 5 [--device cuda]
    .venv/bin/python benchmarks/attention_masks.py --prepared .bench-kit/prepared/pubmed --rows 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask

from cpt_lightning.attention import block_mask, dense_mask, document_ids, document_mask_mod, tile_layout

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


def prepared_rows(path: str, rows: int, device: str) -> torch.Tensor:
    """The first ``rows`` rows of a prepared source, as the training loader gives them."""
    from cpt_lightning.data import PackedDataModule
    from cpt_lightning.data.datamodule import Source

    data = PackedDataModule(sources=[Source(name="bench", path=path, weight=1.0)], micro_batch_size=rows,
                            num_workers=0, block_size=None)
    return next(iter(data.train_dataloader()))["position_ids"].to(device)


def tile_coverage(position_ids: torch.Tensor, kind: str, window: int | None) -> tuple[float, float]:
    """Shares of the ``L × L`` square: covered by visible tiles, and allowed by the mask."""
    partial, full = tile_layout(document_ids(position_ids), kind == "causal", window)
    allowed = dense_mask(position_ids, kind, window)
    return (partial | full).float().mean().item(), allowed.float().mean().item()


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
    parser.add_argument("--prepared", help="a prepared source folder to read rows from (its block size is the length)")
    args = parser.parse_args()
    if args.prepared:
        position_ids = prepared_rows(args.prepared, args.rows, args.device)
    else:
        position_ids = packed_rows(args.rows, args.length, args.device)
    rows, length = position_ids.shape
    documents = int((position_ids == 0).sum())
    name = torch.cuda.get_device_name() if position_ids.is_cuda else "cpu"
    print(f"{rows} rows × {length} tokens ({documents} documents, {args.prepared or 'random packing'}) on {name}, "
          f"torch {torch.__version__}; both masks of one step, median of {args.repeats}")
    for kind in ("causal", "bidirectional"):
        for label, build in BUILDERS.items():
            print(f"{kind:13} {label:24} {step_masks_ms(build, position_ids, kind, args.repeats):9.1f} ms")
    for kind in ("causal", "bidirectional"):
        for layers, window in (("global", None), ("sliding", WINDOW)):
            tiles, allowed = tile_coverage(position_ids, kind, window)
            print(f"{kind:13} {layers:8} flex tiles cover {tiles:6.2%} of L², the mask allows {allowed:6.2%} "
                  f"({tiles / allowed:.1f}× the needed pairs; SDPA computes 100%)")


if __name__ == "__main__":
    main()
