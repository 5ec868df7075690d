"""Attention masks for packed rows, causal or bidirectional, for Hugging Face ModernBERT.

ModernBERT (transformers 5) builds bidirectional masks unless it is handed a ready mapping
``{"full_attention": ..., "sliding_attention": ...}``. Passing our own mapping is how both the
CLM detour (causal in *every* layer) and document masking (no token sees another packed
document) reach the kernels without patching the model.

One definition of the local window is used everywhere: a key is visible from a query when
``|q - k| <= config.sliding_window`` (64 for ModernBERT-base, i.e. ``local_attention=128``),
the same inclusive window transformers uses at inference time, restricted to ``k <= q`` when
causal. Training and the exported model therefore see the same neighbourhoods.

Kernels, fastest first (``auto`` picks the first that can run): FlashAttention-2 varlen (packed
rows flattened, documents given by cumulative sequence lengths, ``is_causal`` flag and a
``(w, w)`` window, so no mask tensor at all), FlexAttention block masks (GPU), SDPA with dense
boolean masks (portable), eager with additive masks (reference).
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
from cpt_lightning.errors import UserError

AttentionKind = Literal["causal", "bidirectional"]
SUPPORTED_IMPLEMENTATIONS = ("auto", "flash_attention_2", "flex_attention", "sdpa", "eager")


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_implementation(name: str) -> str:
    """``auto`` → the fastest kernel this machine has; an explicit choice is checked to be usable here."""
    if name not in SUPPORTED_IMPLEMENTATIONS:
        raise UserError(f"model.init_args.attn_implementation={name!r}; choose one of {SUPPORTED_IMPLEMENTATIONS}")
    cuda = torch.cuda.is_available()
    if name == "auto":
        return "flash_attention_2" if cuda and flash_attn_installed() else "flex_attention" if cuda else "sdpa"
    if name == "flash_attention_2" and not (cuda and flash_attn_installed()):
        raise UserError(
            "attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn package "
            "(pip install 'cpt-lightning[gpu]'); use auto, flex_attention (GPU) or sdpa"
        )
    return name


def kernel_problem(kernel: str, device_type: str, dtype: torch.dtype, dropout: float, training: bool) -> str | None:
    """Why ``kernel`` cannot run a stage on this device, precision and model, or None when it can."""
    if kernel == "flash_attention_2" and device_type != "cuda":
        return f"needs a CUDA device (this run is on {device_type})"
    if kernel == "flash_attention_2" and dtype not in (torch.bfloat16, torch.float16):
        return (f"computes in bf16 or fp16 only (this run computes in {str(dtype).removeprefix('torch.')}): "
                "use trainer.precision bf16-mixed")
    if kernel == "flex_attention" and training and device_type != "cuda":
        return f"cannot train on {device_type.upper()} (PyTorch's FlexAttention has no backward there: it trains on CUDA)"
    if kernel == "flex_attention" and training and dropout > 0:
        return f"cannot train with attention dropout (model config attention_dropout={dropout})"
    return None


def kernel_for_run(requested: str, kernel: str, device_type: str, dtype: torch.dtype, dropout: float,
                   training: bool) -> str:
    """The kernel a run uses once its device and precision are known. ``auto`` was resolved from the machine alone
    (a GPU node's ``auto`` is a GPU kernel even for a CPU run), so it steps down, in its own order, past kernels that
    cannot run here; a kernel the user named is refused instead, saying why."""
    problem = kernel_problem(kernel, device_type, dtype, dropout, training)
    if problem is None:
        return kernel
    if requested != "auto":
        raise UserError(f"attn_implementation={kernel} {problem}: use auto or sdpa")
    order = ("flash_attention_2", "flex_attention", "sdpa")
    return next(k for k in order[order.index(kernel) + 1:]
                if kernel_problem(k, device_type, dtype, dropout, training) is None)


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document index of every token: a new document starts wherever the position restarts at 0."""
    return torch.cumsum(position_ids == 0, dim=-1)


def dense_mask(
    position_ids: torch.Tensor, kind: AttentionKind, window: int | None = None
) -> torch.Tensor:
    """Boolean ``[B, 1, L, L]`` mask (True = may attend) for SDPA / eager attention.

    Every condition is a broadcast comparison of ``[L, 1]`` with ``[1, L]`` vectors, so no integer
    ``[L, L]`` tensor is ever built (at 8192 tokens one would be 512 MB).
    """
    docs = document_ids(position_ids)
    allowed = docs[:, :, None] == docs[:, None, :]
    q = torch.arange(position_ids.shape[-1], device=position_ids.device)[:, None]
    k = q.view(1, -1)
    if kind == "causal":
        allowed &= k <= q
    if window is not None:
        allowed &= (k >= q - window) & (k <= q + window)
    return allowed[:, None]


FLEX_BLOCK = 128  # FlexAttention's default sparse block (tile) size


def block_mask(position_ids: torch.Tensor, kind: AttentionKind, window: int | None = None):
    """FlexAttention ``BlockMask`` with the same rule as :func:`dense_mask` (a GPU path: no CPU backward).

    ``create_block_mask`` evaluates the rule at all ``L × L`` positions (for 4 × 8192 rows, 268M
    elements per mask, two masks per step) just to classify 128 × 128 tiles. Packed documents are
    contiguous, so the tiles can be classified from each tile's first and last document id alone
    (:func:`tile_layout`): the same BlockMask from ``(L/128)²`` comparisons. The rule itself
    (``mask_mod``) is still what the kernel applies inside partially visible tiles.
    """
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    mask_mod = document_mask_mod(position_ids, kind, window)
    batch, length = position_ids.shape
    if length % FLEX_BLOCK:  # a ragged last tile: let the library classify it
        return create_block_mask(mask_mod, batch, None, length, length, device=position_ids.device)
    partial, full = tile_layout(document_ids(position_ids), kind == "causal", window)
    return BlockMask.from_kv_blocks(
        *_ordered(partial), *_ordered(full), BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(length, length)
    )


def document_mask_mod(position_ids: torch.Tensor, kind: AttentionKind, window: int | None = None):
    """:func:`dense_mask`'s rule as a FlexAttention ``mask_mod(b, h, q, k)``."""
    docs = document_ids(position_ids)
    causal = kind == "causal"

    def mask_mod(b, h, q, k):
        allowed = docs[b, q] == docs[b, k]
        if causal:
            allowed = allowed & (q >= k)
        if window is not None:
            allowed = allowed & ((q - k).abs() <= window)
        return allowed

    return mask_mod


def tile_layout(docs: torch.Tensor, causal: bool, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which ``FLEX_BLOCK²`` tiles are partly and which fully visible: two ``[B, T, T]`` bool tensors.

    Document ids never decrease along a row, so a query tile and a key tile share a document iff
    their ``[first, last]`` id ranges overlap, and then that document covers the two tiles' closest
    positions too; every pair shares one iff both tiles hold that single document. Each condition
    (document, causal, window) is thus decided by the tiles' closest and farthest pairs, and the
    conjunction of the per-condition answers is exact (tested against ``create_block_mask``).
    """
    tiles = docs.view(docs.shape[0], -1, FLEX_BLOCK)
    first, last = tiles[..., 0], tiles[..., -1]
    q_first, q_last, k_first, k_last = first[:, :, None], last[:, :, None], first[:, None, :], last[:, None, :]
    some = (q_first <= k_last) & (k_first <= q_last)
    every = (q_first == q_last) & (k_first == k_last) & (q_first == k_first)
    q_tile = torch.arange(tiles.shape[1], device=docs.device)[:, None]
    k_tile = q_tile.view(1, -1)
    if causal:
        some &= k_tile <= q_tile
        every &= k_tile < q_tile
    if window is not None:
        start_gap = (q_tile - k_tile).abs() * FLEX_BLOCK
        some &= (start_gap - (FLEX_BLOCK - 1)).clamp(min=0) <= window  # the closest pair
        every &= start_gap + FLEX_BLOCK - 1 <= window  # the farthest pair
    return some & ~every, every


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T, T]`` tiles → BlockMask's (count ``[B, 1, T]``, visible key-tile indices first ``[B, 1, T, T]``)."""
    tiles = tiles[:, None].to(torch.int32)
    indices = torch.argsort(tiles, dim=-1, descending=True, stable=True)
    return tiles.sum(-1, dtype=torch.int32), indices.to(torch.int32)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Eager attention adds its mask to the scores: 0 where allowed, the dtype's minimum elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def varlen_arguments(position_ids: torch.Tensor) -> dict:
    """FlashAttention varlen keywords: the ``[B, L]`` rows flattened, one sequence per packed document.

    A row's first token always starts a sequence, even where a custom data module carries the
    positions of a document on from the previous row: rows never attend to each other, as with
    the mask kernels.
    """
    flat = position_ids.reshape(-1)
    row_starts = torch.arange(flat.numel(), device=flat.device) % position_ids.shape[-1] == 0
    starts = torch.nonzero((flat == 0) | row_starts).flatten()
    cu_seq_lens = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    longest = int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": longest, "max_length_k": longest}


def attention_inputs(
    model_config, position_ids: torch.Tensor, kind: AttentionKind, dtype: torch.dtype = torch.float32
) -> dict:
    """Keyword arguments for ModernBERT's forward that make its kernel attend within documents only.

    Mask-based kernels get the per-layer-type mapping ``attention_mask`` accepts; FlashAttention
    gets no mask, the varlen boundaries and ``is_causal`` (which it prefers to the modules' flag).
    """
    if model_config._attn_implementation == "flash_attention_2":
        return {"attention_mask": {"full_attention": None, "sliding_attention": None},
                "is_causal": kind == "causal", **varlen_arguments(position_ids)}
    return {"attention_mask": attention_masks(model_config, position_ids, kind, dtype)}


def attention_masks(
    model_config, position_ids: torch.Tensor, kind: AttentionKind, dtype: torch.dtype = torch.float32
) -> dict:
    """The per-layer-type mask mapping ModernBertModel.forward accepts as ``attention_mask``."""
    impl = model_config._attn_implementation
    if impl == "sdpa":
        build = dense_mask
    elif impl == "eager":
        def build(position_ids, kind, window=None):
            return additive_mask(dense_mask(position_ids, kind, window), dtype)
    elif impl == "flex_attention":
        build = block_mask
    else:
        raise UserError(
            f"attn_implementation={impl!r} is not supported for packed training; "
            f"use one of {SUPPORTED_IMPLEMENTATIONS}"
        )
    return {
        "full_attention": build(position_ids, kind),
        "sliding_attention": build(position_ids, kind, window=model_config.sliding_window),
    }
