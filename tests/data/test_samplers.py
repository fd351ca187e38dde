import itertools

import pytest
import torch
from lightning_fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader

from fcos_lightning.data import AspectRatioGroupedBatchSampler, InferenceSampler


def _ratios(n: int, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    r = torch.tensor([0.5, 0.75, 1.0, 4 / 3, 2.0])[torch.randint(0, 5, (n,), generator=g)]
    return r.tolist()


def _bucket(ratio: float) -> int:
    return 0 if ratio >= 1.0 else 1  # w >= h vs w < h


@pytest.mark.parametrize("drop_last", [True, False])
def test_len_is_exact_equal_across_ranks_and_batches_are_homogeneous(drop_last):
    for n, batch_size, replicas in itertools.product([0, 1, 2, 5, 13, 31], [1, 2, 3, 4], [1, 2, 3]):
        ratios = _ratios(n, seed=n)
        lengths = set()
        for rank in range(replicas):
            for epoch in (0, 1):
                s = AspectRatioGroupedBatchSampler(
                    ratios, batch_size, seed=3, num_replicas=replicas, rank=rank, drop_last=drop_last
                )
                s.set_epoch(epoch)
                batches = list(s)
                assert len(batches) == len(s), (n, batch_size, replicas, rank, epoch)
                lengths.add(len(s))
                for b in batches:
                    assert len(b) == batch_size
                    assert len({_bucket(ratios[i]) for i in b}) == 1
        assert len(lengths) == 1, (n, batch_size, replicas, lengths)


def test_two_ranks_cover_the_dataset_without_drop_last():
    ratios = _ratios(37)
    seen = []
    lens = []
    for rank in (0, 1):
        s = AspectRatioGroupedBatchSampler(ratios, 4, seed=0, num_replicas=2, rank=rank, drop_last=False)
        lens.append(len(s))
        seen += [i for b in s for i in b]
    assert lens[0] == lens[1]
    assert set(seen) == set(range(37))


def test_drop_last_loses_at_most_the_two_partial_buckets_per_rank():
    n, batch_size = 50, 4
    ratios = _ratios(n, seed=1)
    for rank in (0, 1):
        s = AspectRatioGroupedBatchSampler(ratios, batch_size, num_replicas=2, rank=rank)
        share = set(s.sampler)  # this rank's 25 indices
        seen = {i for b in s for i in b}
        assert seen <= set(range(n))
        assert len(share - seen) <= 2 * (batch_size - 1)
        assert len(s) == 25 // batch_size


def test_epochs_reshuffle_deterministically_and_lightning_sets_the_epoch():
    ratios = _ratios(40)
    a = AspectRatioGroupedBatchSampler(ratios, 2, seed=5)
    b = AspectRatioGroupedBatchSampler(ratios, 2, seed=5)
    assert list(a) == list(b)
    first = list(a)
    # Lightning calls set_epoch on dataloader.sampler and dataloader.batch_sampler.sampler,
    # not on the batch sampler itself.
    _set_sampler_epoch(DataLoader(range(40), batch_sampler=a), 1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    unshuffled = AspectRatioGroupedBatchSampler([1.0] * 6, 2, shuffle=False)
    assert list(unshuffled) == [[0, 1], [2, 3], [4, 5]]


def test_inference_sampler_shards_contiguously_and_pads_by_repeating():
    shards = [list(InferenceSampler(10, num_replicas=3, rank=r)) for r in range(3)]
    assert shards == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    assert all(len(InferenceSampler(10, num_replicas=3, rank=r)) == 4 for r in range(3))
    assert set(itertools.chain(*shards)) == set(range(10))
    tiny = [list(InferenceSampler(2, num_replicas=4, rank=r)) for r in range(4)]
    assert tiny == [[0], [1], [0], [1]]
    assert list(InferenceSampler(5)) == [0, 1, 2, 3, 4]
    assert list(InferenceSampler(0, num_replicas=2, rank=1)) == []


def test_invalid_rank_is_rejected():
    with pytest.raises(ValueError):
        InferenceSampler(5, num_replicas=2, rank=2)
    with pytest.raises(ValueError):
        AspectRatioGroupedBatchSampler([1.0], 1, num_replicas=2, rank=-1)
