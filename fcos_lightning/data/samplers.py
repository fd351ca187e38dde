"""Samplers that shard for DDP themselves (the Trainer runs with ``use_distributed_sampler=False``).

Lightning's automatic ``DistributedSampler`` does not compose with a batch sampler, and ranks must run the
same number of steps or collectives hang. Both samplers here therefore give every rank
the same, precomputable number of items.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

__all__ = ["AspectRatioGroupedBatchSampler", "InferenceSampler", "dist_info"]


def dist_info(num_replicas: int | None = None, rank: int | None = None) -> tuple[int, int]:
    """``(num_replicas, rank)``: as given, else torch.distributed's if initialised, else ``(1, 0)``."""
    initialized = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"invalid num_replicas={num_replicas}, rank={rank}")
    return int(num_replicas), int(rank)


class AspectRatioGroupedBatchSampler(Sampler[list[int]]):
    """Batches whose images are all landscape (w >= h) or all portrait (w < h), as detectron2 groups them.

    Each epoch: a permutation of the dataset (seeded by ``seed + epoch``, identical on all ranks) is padded by
    wrapping to a multiple of ``num_replicas`` and dealt out (``perm[rank::num_replicas]``, exactly
    ``DistributedSampler``), so every rank gets ``n = ceil(N / num_replicas)`` indices. The rank streams its
    share into two buckets and yields a bucket when it holds ``batch_size`` indices. ``len(self)`` does not
    depend on the permutation, so it is the same on every rank and every epoch:

    - ``drop_last=True``: ``n // batch_size`` full batches. Grouping can leave up to two partial buckets short
      of that count; the stream then continues over the rank's share from its start until the count is
      reached. Leftover partial buckets are dropped.
    - ``drop_last=False``: every index of the share appears at least once; partial buckets are completed with
      indices of the same orientation taken from the share, so every batch is full. ``len`` is the largest
      count this can need (at most ``ceil(n / batch_size) + 1``); a rank that needs fewer completes it with
      more grouped batches from its share.

    Call :meth:`set_epoch` each epoch (Lightning does) for a new permutation.
    """

    def __init__(
        self,
        aspect_ratios: Sequence[float],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_replicas, self.rank = dist_info(num_replicas, rank)
        self.bucket = (torch.as_tensor(aspect_ratios, dtype=torch.float64) < 1.0).to(torch.int64).tolist()
        self.batch_size = int(batch_size)
        self.drop_last = bool(drop_last)
        # The per-rank share is exactly DistributedSampler's (seed + epoch permutation, wrap-padded, strided).
        # It is exposed as ``.sampler`` because Lightning calls ``set_epoch`` on ``batch_sampler.sampler``.
        self.sampler = DistributedSampler(
            self.bucket, num_replicas=self.num_replicas, rank=self.rank, shuffle=shuffle, seed=seed
        )
        self.num_samples = len(self.sampler)  # ceil(N / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Use the permutation of ``epoch`` on the next iteration (same on every rank)."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        if self.drop_last or b == 1:
            return n // b
        q, r = divmod(n, b)
        # Worst case over how the share splits into the two buckets: k full batches + non-empty leftovers.
        if r >= 2:
            return q + 2
        if q == 0:
            return r
        return q + 1

    def __iter__(self) -> Iterator[list[int]]:
        shard = list(self.sampler) if self.bucket else []
        target = len(self)
        if target == 0:
            return
        buckets: tuple[list[int], list[int]] = ([], [])
        emitted = 0

        def feed(indices):
            nonlocal emitted
            for idx in indices:
                bucket = buckets[self.bucket[idx]]
                bucket.append(idx)
                if len(bucket) == self.batch_size:
                    yield bucket[:]
                    bucket.clear()
                    emitted += 1
                    if emitted == target:
                        return

        yield from feed(shard)
        if emitted == target:
            return
        if not self.drop_last:
            for b, bucket in enumerate(buckets):
                if bucket:
                    same = itertools.cycle([i for i in shard if self.bucket[i] == b])
                    bucket.extend(itertools.islice(same, self.batch_size - len(bucket)))
                    yield bucket[:]
                    bucket.clear()
                    emitted += 1
        if emitted < target:
            yield from feed(itertools.cycle(shard))


class InferenceSampler(Sampler[int]):
    """Contiguous shards of ``range(size)`` for evaluation, equal in length on every rank.

    Rank ``r`` gets indices ``[r*n, (r+1)*n)`` of ``range(size)`` extended cyclically to ``n * num_replicas``
    with ``n = ceil(size / num_replicas)``, so the last shards repeat the first images. Equal counts keep
    ranks in step (no hang at the next collective); the evaluator must de-duplicate predictions by
    ``image_id`` after gathering them, and can check that every image id was seen.
    """

    def __init__(self, size: int, num_replicas: int | None = None, rank: int | None = None) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.size = int(size)
        self.num_replicas, self.rank = dist_info(num_replicas, rank)
        self.num_samples = -(-self.size // self.num_replicas)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if self.size == 0:
            return iter(())
        start = self.rank * self.num_samples
        return iter((torch.arange(start, start + self.num_samples) % self.size).tolist())
