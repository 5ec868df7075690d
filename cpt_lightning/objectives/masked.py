"""Masked language modelling (BERT's 80/10/10 corruption) with bidirectional attention."""

from __future__ import annotations

import torch

from cpt_lightning.objectives.base import IGNORE_INDEX, Objective, TokenizerFacts
from cpt_lightning.errors import UserError


class MaskedLM(Objective):
    """Mask ``mask_rate`` of the non-special tokens; of those, 80% → [MASK], 10% → random, 10% kept.

    Only masked positions carry labels, so the head and the loss run on them alone.
    """

    name = "mlm"
    attention = "bidirectional"

    def __init__(self, mask_rate: float = 0.15, mask_token_ratio: float = 0.8, random_token_ratio: float = 0.1):
        if not 0.0 < mask_rate < 1.0:
            raise UserError(f"MaskedLM.mask_rate must be in (0, 1), got {mask_rate}")
        if mask_token_ratio < 0 or random_token_ratio < 0 or mask_token_ratio + random_token_ratio > 1:
            raise UserError(
                "MaskedLM.mask_token_ratio and random_token_ratio must be >= 0 and sum to at most 1, "
                f"got {mask_token_ratio} and {random_token_ratio}"
            )
        self.mask_rate = mask_rate
        self.mask_token_ratio = mask_token_ratio
        self.random_token_ratio = random_token_ratio

    def bind(self, tokens: TokenizerFacts) -> None:
        if tokens.mask_id is None:
            raise UserError("MaskedLM needs a tokenizer with a mask token and this one has none: set mask_token "
                            "([MASK], <mask>) in its tokenizer_config.json; a run with no MLM phase also sets "
                            "model.init_args.objective (MaskedLM when unset)")
        super().bind(tokens)
        # how many ordinary ids lie below each special id, in order (see random_ordinary_ids); kept on the
        # host: computing them per batch on a GPU (unique, then a length) would synchronise every step
        self._ordinary_below_special = tuple(s - j for j, s in enumerate(sorted(set(tokens.special_ids))))
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # per device, see _device_tables

    def _device_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The id tables on ``device``: built from Python tuples once per device, since a host-to-GPU copy of
        pageable memory waits for the GPU to finish everything queued (two such waits per batch otherwise)."""
        if device not in self._tables:
            self._tables[device] = (torch.as_tensor(self.tokens.special_ids, device=device),
                                    torch.as_tensor(self._ordinary_below_special, device=device))
        return self._tables[device]

    def build_inputs(self, input_ids, position_ids, generator):
        special = self._device_tables(input_ids.device)[0]
        maskable = ~torch.isin(input_ids, special)
        draw = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
        masked = maskable & (draw < self.mask_rate)
        labels = torch.where(masked, input_ids, IGNORE_INDEX)

        # Reuse the draw for the 80/10/10 split: conditioned on masking it is uniform on [0, rate).
        within = draw / self.mask_rate
        to_mask = masked & (within < self.mask_token_ratio)
        to_random = masked & ~to_mask & (within < self.mask_token_ratio + self.random_token_ratio)
        corrupted = torch.where(to_mask, self.tokens.mask_id, input_ids)
        random_ids = self.random_ordinary_ids(input_ids.shape, generator, input_ids.device)
        corrupted = torch.where(to_random, random_ids, corrupted)
        return corrupted, labels

    def random_ordinary_ids(self, shape, generator, device) -> torch.Tensor:
        """Uniform over the ordinary ids: never [MASK], [SEP] or an [unused] slot the model has not seen.

        A draw ``r`` among the ``vocab_size − |special|`` ordinary ids becomes the ``r``-th of them
        by stepping over every special id at or below it (sorted ``special[j] − j ≤ r``).
        """
        below = self._device_tables(device)[1]
        r = torch.randint(self.tokens.vocab_size - len(below), shape, generator=generator, device=device)
        return r + torch.searchsorted(below, r, right=True)
