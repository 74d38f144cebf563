"""A trial's train images, two ways behind one interface: kept in memory (small sets, the demo)
or streamed shard by shard each epoch (ImageNet: 1.28 M images would need ~190 GB as uint8).

Both yield uint8 (N, C, H, W) batches at the model's input size, with open_clip's eval resize
and crop, and int64 labels. The streamed order is a function of (seed, epoch) alone: shards are
shuffled, dealt to ``workers`` torch DataLoader processes that each read theirs one at a time
and draw images at random from a shuffle buffer, and the main process takes a chunk of 32 images
from each worker in turn. So a resumed trial replays an epoch exactly, and the memory a trial holds is the
buffer, not the split. See docs/finetune.md.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

from ..data import shards

Batch = tuple[torch.Tensor, torch.Tensor]
CHUNK = 32  # images a DataLoader worker hands over at once


class MemoryTrain:
    """The split decoded once; each epoch a permutation from torch's global RNG."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, epoch: int) -> Iterator[Batch]:
        order = torch.randperm(len(self.labels))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield self.images[idx], self.labels[idx]


class _ShardImages(torch.utils.data.IterableDataset):
    """One epoch's images, decoded in the DataLoader worker that owns their shard."""

    def __init__(self, uri: str, info: dict, transform: Callable, seed: int, epoch: int, buffer: int):
        super().__init__()
        self.uri, self.info, self.transform = uri, info, transform
        self.seed, self.epoch, self.buffer = seed, epoch, buffer

    def __iter__(self):
        """Chunks of up to CHUNK decoded images as (uint8 stack, int64 labels): one hand-over
        between processes per chunk, not per image."""
        images: list[torch.Tensor] = []
        labels: list[int] = []
        for image, label in self._images():
            images.append(image)
            labels.append(label)
            if len(images) == CHUNK:
                yield torch.stack(images), torch.tensor(labels, dtype=torch.int64)
                images, labels = [], []
        if images:
            yield torch.stack(images), torch.tensor(labels, dtype=torch.int64)

    def _images(self):
        worker = torch.utils.data.get_worker_info()
        w, n_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.info["shards"]))
        rng = np.random.default_rng([self.seed, self.epoch, w])
        pool: list[tuple[bytes, int, str]] = []
        for s in order[w::n_workers]:
            table = shards.read_shard(self.uri, int(s), self.info)
            images, labels = table.column("image").to_pylist(), table.column("label").to_pylist()
            where = f"{self.uri}/{self.info['shards'][s]['file']} row"
            for i in rng.permutation(len(labels)):
                pool.append((images[i], labels[i], f"{where} {i}"))
                if len(pool) >= self.buffer:
                    yield self._decode(self._take(pool, rng))
        rng.shuffle(pool)
        for item in pool:
            yield self._decode(item)

    @staticmethod
    def _take(pool: list, rng) -> tuple:
        k = int(rng.integers(len(pool)))
        pool[k], pool[-1] = pool[-1], pool[k]
        return pool.pop()

    def _decode(self, item) -> tuple[torch.Tensor, int]:
        data, label, source = item
        return self.transform(shards.decode_image(data, source=source)).to(torch.uint8), label


class StreamTrain:
    """The split read shard by shard each epoch (see the module doc)."""

    def __init__(self, uri: str, transform: Callable, *, seed: int, workers: int, buffer: int):
        self.uri, self.transform = uri, transform
        self.info = shards.split_info(uri)
        self.seed, self.workers, self.buffer = seed, workers, buffer

    def __len__(self) -> int:
        return int(self.info["num_rows"])

    def batches(self, batch_size: int, epoch: int) -> Iterator[Batch]:
        dataset = _ShardImages(self.uri, self.info, self.transform, self.seed, epoch, self.buffer)
        # batch_size=None: workers hand over their chunks as they are, taken from each worker in
        # turn, so a batch mixes every worker's shards
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.workers,
                                             prefetch_factor=8 if self.workers else None)
        images, labels, held = [], [], 0
        for chunk_images, chunk_labels in loader:
            images.append(chunk_images)
            labels.append(chunk_labels)
            held += len(chunk_labels)
            while held >= batch_size:
                x, y = torch.cat(images), torch.cat(labels)
                yield x[:batch_size], y[:batch_size]
                images, labels, held = [x[batch_size:]], [y[batch_size:]], held - batch_size
        if held:
            yield torch.cat(images), torch.cat(labels)


def memory_bytes(n_images: int, image_shape: tuple[int, ...]) -> int:
    """What keeping ``n_images`` uint8 images of ``image_shape`` costs."""
    return n_images * int(np.prod(image_shape))
