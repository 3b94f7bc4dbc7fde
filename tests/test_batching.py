"""Smart batching: every row once per epoch, similar lengths together, padding cut to the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vadsearch.batching import BUCKET_BATCHES, PAD_MULTIPLE, collate, eval_batches, train_batches
from vadsearch.encoding import EncodedSplit, pad_rows


def _lengths(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 60, size=n)


def _split(lengths: list[int]) -> EncodedSplit:
    rows = [list(range(2, 2 + n)) for n in lengths]
    ids, lens = pad_rows(rows, pad_id=0)
    targets = np.arange(3 * len(rows), dtype=np.float32).reshape(-1, 3)
    return EncodedSplit(ids, lens, targets)


# ------------------------------------------------------------------------------------- train_batches


@pytest.mark.parametrize(("n", "batch_size"), [(1, 4), (7, 8), (8, 8), (100, 8), (1000, 3), (2000, 32)])
def test_train_batches_cover_every_row_exactly_once(n: int, batch_size: int) -> None:
    batches = train_batches(_lengths(n), batch_size, np.random.default_rng(0))
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(n))
    assert all(1 <= len(b) <= batch_size for b in batches)


def test_train_batch_sizes() -> None:
    batches = train_batches(_lengths(100), 8, np.random.default_rng(0))
    assert sorted(len(b) for b in batches) == [4] + [8] * 12  # one bucket: one short batch
    # Several buckets: only each bucket's last batch may be short.
    n = 8 * BUCKET_BATCHES * 2 + 5
    sizes = [len(b) for b in train_batches(_lengths(n), 8, np.random.default_rng(0))]
    assert sizes.count(8) == 2 * BUCKET_BATCHES and sorted(set(sizes)) == [5, 8]


def test_train_batches_are_deterministic_per_seed() -> None:
    lengths = _lengths(500)

    def order(seed: int) -> list[list[int]]:
        return [b.tolist() for b in train_batches(lengths, 16, np.random.default_rng(seed))]

    assert order(1) == order(1)
    assert order(1) != order(2)
    # Different seeds also give different batch compositions, not just a different batch order.
    assert sorted(map(sorted, order(1))) != sorted(map(sorted, order(2)))


def test_train_batches_group_similar_lengths() -> None:
    lengths = _lengths(2000)
    batches = train_batches(lengths, 16, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    random_batches = np.array_split(rng.permutation(len(lengths)), len(batches))

    def mean_spread(groups) -> float:
        return float(np.mean([np.ptp(lengths[g]) for g in groups]))

    def padding(groups) -> int:
        return int(sum(lengths[g].max() * len(g) - lengths[g].sum() for g in groups))

    assert mean_spread(batches) < 0.2 * mean_spread(random_batches)
    assert padding(batches) < 0.2 * padding(random_batches)


def test_train_batch_order_is_shuffled() -> None:
    lengths = _lengths(2000)
    batches = train_batches(lengths, 16, np.random.default_rng(0))
    longest = [int(lengths[b].max()) for b in batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


# -------------------------------------------------------------------------------------- eval_batches


def test_eval_batches_are_sorted_and_cover_every_row() -> None:
    lengths = _lengths(103)
    batches = eval_batches(lengths, 10)
    assert [len(b) for b in batches] == [10] * 10 + [3]
    order = np.concatenate(batches)
    assert sorted(order.tolist()) == list(range(103))
    assert (np.diff(lengths[order]) >= 0).all()
    assert [b.tolist() for b in eval_batches(lengths, 10)] == [b.tolist() for b in batches]


def test_eval_batches_of_nothing() -> None:
    assert eval_batches(np.array([], dtype=np.int64), 8) == []


# ------------------------------------------------------------------------------------------- collate


def test_collate_pads_to_a_multiple_of_eight() -> None:
    split = _split([3, 9, 20, 30])
    ids, lengths, targets = collate(split, np.array([0, 1]), torch.device("cpu"))
    assert ids.shape == (2, 16)  # longest 9 → next multiple of 8
    assert ids.shape[1] % PAD_MULTIPLE == 0
    assert ids.dtype == torch.int64 and targets.dtype == torch.float32
    assert ids[0, :3].tolist() == [2, 3, 4] and not ids[0, 3:].any()
    assert lengths.tolist() == [3, 9]
    assert targets.tolist() == split.targets[[0, 1]].tolist()


def test_collate_never_pads_beyond_the_split() -> None:
    split = _split([3, 9, 20, 30])  # split width 30: 32 would index past it
    ids, _, _ = collate(split, np.array([3, 0]), torch.device("cpu"))
    assert ids.shape == (2, 30)
    ids, _, _ = collate(split, np.array([2]), torch.device("cpu"))
    assert ids.shape == (1, 24)


def test_collate_keeps_row_order_and_lengths_on_cpu() -> None:
    split = _split([5, 1, 8])
    rows = np.array([2, 0, 1])
    ids, lengths, targets = collate(split, rows, torch.device("cpu"))
    assert lengths.device.type == "cpu" and lengths.dtype == torch.int64
    assert lengths.tolist() == [8, 5, 1]
    assert ids.shape == (3, 8)
    assert torch.equal(ids, torch.from_numpy(split.ids[rows, :8]))
    assert targets[:, 0].tolist() == [6.0, 0.0, 3.0]


def test_collate_does_not_alias_the_split_rows() -> None:
    # A fancy-indexed slice is a copy: training can never write into the stored split.
    split = _split([4, 4])
    ids, _, _ = collate(split, np.array([0, 1]), torch.device("cpu"))
    ids.zero_()
    assert split.ids[0, 0] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_collate_on_cuda_keeps_lengths_on_cpu() -> None:
    split = _split([5, 1, 8])
    ids, lengths, targets = collate(split, np.array([0, 1, 2]), torch.device("cuda"))
    assert ids.device.type == "cuda" and targets.device.type == "cuda"
    assert lengths.device.type == "cpu" and lengths.is_pinned()  # its copy to the device never waits
    assert lengths.tolist() == [5, 1, 8]
