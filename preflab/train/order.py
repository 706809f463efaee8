"""The order in which pairs are visited: a seeded permutation per epoch, addressable by batch number.

Batch ``k`` of the run is a pure function of ``(seed, k)``, so a resumed run visits exactly the batches an
uninterrupted one would, without replaying the ones before.
"""

from __future__ import annotations

import math

import torch


class BatchOrder:
    def __init__(self, num_items: int, batch_size: int, seed: int):
        if num_items < 1:
            raise ValueError("no training pairs")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.batches_per_epoch = math.ceil(num_items / batch_size)
        self._epoch, self._perm = -1, None

    def batch(self, k: int) -> list[int]:
        """Item indices of run-wide batch ``k`` (the last batch of an epoch may be smaller)."""
        epoch, j = divmod(k, self.batches_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_items, generator=gen).tolist()
        return self._perm[j * self.batch_size:(j + 1) * self.batch_size]
