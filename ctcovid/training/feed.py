"""The training feed: shuffled, fixed-size batches of slices read from the memory-mapped cache."""

from __future__ import annotations

import math
import time

import keras
import numpy as np

from ctcovid.errors import ConfigError


class SliceBatches(keras.utils.PyDataset):
    """Shuffled training batches read from the memory-mapped cache.

    Every batch has exactly ``batch_size`` slices (the remainder of an epoch is dropped, and
    reshuffled into the next) so that one compiled training step serves the whole run.
    """

    def __init__(
        self,
        slices: np.ndarray,
        indices: np.ndarray,
        targets: np.ndarray,
        batch_size: int,
        *,
        class_weight: dict[int, float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(workers=1, use_multiprocessing=False)
        if len(indices) == 0:
            raise ConfigError("no training slices")
        self.slices = slices
        self.indices = np.asarray(indices, np.int64)
        self.targets = np.asarray(targets, np.float32)
        self.batch_size = min(batch_size, len(indices))
        weights = class_weight or {0: 1.0, 1: 1.0}
        self.weights = np.where(self.targets >= 0.5, weights[1], weights[0]).astype(np.float32)
        self.seed = seed
        self.order = np.arange(len(self.indices))
        self.shuffle(0)

    def shuffle(self, epoch: int) -> None:
        self.order = np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))

    def __len__(self) -> int:
        return len(self.indices) // self.batch_size

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pick = np.sort(self.order[i * self.batch_size : (i + 1) * self.batch_size])
        # Sorted reads are sequential in the memory map; the pairing with targets is kept.
        x = np.asarray(self.slices[self.indices[pick]], np.float32)[..., np.newaxis]
        return x, self.targets[pick, np.newaxis], self.weights[pick]


def input_rate(feed: SliceBatches, max_batches: int = 20) -> float:
    """Slices per second the feed delivers on its own (no model): the input pipeline's ceiling."""
    n = min(len(feed), max_batches)
    start = time.perf_counter()
    for i in range(n):
        feed[i]
    seconds = time.perf_counter() - start
    return n * feed.batch_size / seconds if seconds > 0 else math.inf
