"""Packed rows: position ids restart after every separator and at each row; blocks keep every token."""

import numpy as np
import torch

from cpt_lightning.data import position_ids_from_separators
from cpt_lightning.data.packing import BlockPacker, PackedCollate

SEP = 9


def test_position_ids_restart_after_separator_and_at_row_start():
    ids = torch.tensor([
        [5, 6, SEP, 1, 2, 3, SEP, 4],
        [7, SEP, SEP, 1, 1, 1, 1, SEP],  # an empty "document" between two separators
    ])
    assert position_ids_from_separators(ids, SEP).tolist() == [
        [0, 1, 2, 0, 1, 2, 3, 0],
        [0, 1, 0, 0, 1, 2, 3, 4],
    ]


def test_document_ids_from_position_ids_match_documents():
    ids = torch.tensor([[1, 2, SEP, 3, SEP, 4, 5, 6]])
    pos = position_ids_from_separators(ids, SEP)
    assert torch.cumsum(pos == 0, dim=-1).tolist() == [[1, 1, 1, 2, 2, 3, 3, 3]]


def test_position_ids_on_long_random_rows_match_a_loop():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 12, (4, 512), generator=g)
    expected = torch.zeros_like(ids)
    for r in range(ids.shape[0]):
        for i in range(1, ids.shape[1]):
            expected[r, i] = 0 if ids[r, i - 1] == SEP else expected[r, i - 1] + 1
    assert torch.equal(position_ids_from_separators(ids, SEP), expected)


def test_block_packer_keeps_order_and_reports_the_leftover():
    packer = BlockPacker(4, np.dtype(np.uint16))
    rows = packer.add(np.arange(6, dtype=np.uint16)) + packer.add(np.arange(6, 9, dtype=np.uint16))
    assert [r.tolist() for r in rows] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert packer.leftover == 1
    exact = BlockPacker(4, np.dtype(np.uint16))  # a stream ending on a row's end keeps that row
    assert len(exact.add(np.arange(8, dtype=np.uint16))) == 2 and exact.leftover == 0


def test_collate_gives_the_batch_contract():
    blocks = [np.array([50281, 7, 50282, 50281], np.uint16), np.array([8, 50282, 50281, 9], np.uint16)]
    batch = PackedCollate(50282)(blocks)
    assert set(batch) == {"input_ids", "position_ids"}
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].tolist()[1] == [8, 50282, 50281, 9]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]


def test_block_packer_carries_documents_shorter_than_a_block_across_adds():
    """Abstracts are far shorter than a row: the remainder grows over several adds before a row fills,
    and every token must come out once, in order (the existing test only adds arrays that fill a row)."""
    packer = BlockPacker(8, np.dtype(np.uint16))
    rows = [row for start in range(0, 30, 3) for row in packer.add(np.arange(start, start + 3, dtype=np.uint16))]
    assert np.concatenate(rows).tolist() == list(range(24))
    assert packer.leftover == 6
