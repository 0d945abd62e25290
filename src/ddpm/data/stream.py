"""Endless shuffled batches from a split in memory or streamed, every random draw from one
generator, resumable from a ``state_dict``: :class:`BatchStream`."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from .pixels import flip_draws, random_crop, random_hflip, to_model_range
from .sources import ImageData, LatentData, StreamingImages


class _EpochBatches(torch.utils.data.Sampler):
    """The index lists of the current epoch's remaining batches; BatchStream sets ``perm`` and
    ``start`` before each ``iter(loader)``, so workers persist while epochs change."""

    def __init__(self, batch_size: int):
        self.batch_size, self.perm, self.start = batch_size, torch.empty(0, dtype=torch.long), 0

    def __iter__(self) -> Iterator[list[int]]:
        ends = range(self.start + self.batch_size, len(self.perm) + 1, self.batch_size)
        return iter([self.perm[end - self.batch_size : end].tolist() for end in ends])

    def __len__(self) -> int:
        return (len(self.perm) - self.start) // self.batch_size


def _own_process_group(worker_id: int) -> None:
    """A decoding worker leaves the training process's group, so that Ctrl-C at a terminal (or
    a signal to the group) reaches only the training process, which finishes its step with the
    batch the worker is preparing and saves a checkpoint. The worker ends with it (DataLoader
    stops its workers, and they watch their parent)."""
    if hasattr(os, "setpgid"):  # not on Windows, where there are no signals to the group
        os.setpgid(0, 0)


class BatchStream:
    """Endless shuffled batches, resumable from its ``state_dict``.

    Every draw comes from ``generator``, in the same order whether ``source`` is in memory or
    streamed: a permutation at each epoch's start, then per batch the crop offsets (when
    ``crop_size``) and the horizontal flips (when ``hflip``), applied to the whole batch at once.
    A streamed source is decoded by ``workers`` DataLoader processes, a few batches ahead.

    With a ``generator`` on a GPU, a source in memory is held there as uint8 and every draw,
    crop and flip happens there too: no batch crosses from the host, and nothing waits for the
    GPU. ``pin_memory`` returns batches made on the host in pinned memory, so that their copy to
    a GPU can be asynchronous (``non_blocking``).
    """

    def __init__(self, source: ImageData | StreamingImages | LatentData, batch_size: int, *, hflip: bool,
                 generator: torch.Generator, crop_size: int | None = None, workers: int = 0,
                 pin_memory: bool = False):
        if batch_size > len(source):
            n = len(source)
            raise ValueError(
                f"batch size {batch_size} is larger than the dataset ({n} image{'s' * (n != 1)}); "
                f"use --batch-size {n} or less, or more images")
        stored = source.image_shape[-1]
        if crop_size is not None and not 0 < crop_size <= stored:
            raise ValueError(f"crop size {crop_size} does not fit the stored {stored}x{stored} "
                             f"images; load them with crop 'random' at that image size")
        self.device = generator.device
        if self.device.type != "cpu":
            if isinstance(source, StreamingImages):
                raise ValueError("a streamed dataset is decoded on the host: give its BatchStream "
                                 "a CPU generator")
            if isinstance(source, LatentData):
                source = source.to(self.device)
            else:
                source = ImageData(source.images.to(self.device), source.labels.to(self.device),
                                   source.name, source.classes, source.cached)
        self.data = source
        self.batch_size = batch_size
        self.hflip = hflip
        self.crop_size = crop_size
        self.workers = workers
        self.pin_memory = pin_memory
        self.generator = generator
        self.perm = torch.randperm(len(source), generator=generator, device=self.device)
        self.pos = 0
        self.epoch = 0
        self._loader: torch.utils.data.DataLoader | None = None  # built on the first streamed batch
        self._batches: Iterator[Any] | None = None  # the loader's iterator over the epoch from pos
        self._warned: set[str] = set()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch ``(x, y)``: x float32 ``[B, C, S, S]`` in [-1, 1], y int64 ``[B]``
        labels (drops an epoch's ragged tail)."""
        if self.pos + self.batch_size > len(self.data):
            self.perm = torch.randperm(len(self.data), generator=self.generator, device=self.device)
            self.pos = 0
            self.epoch += 1
            self._batches = None
        idx = self.perm[self.pos : self.pos + self.batch_size]
        if isinstance(self.data, LatentData):
            self.pos += self.batch_size
            return self._latents(self.data, idx)
        if isinstance(self.data, StreamingImages):
            images, labels = self._fetch(self.data, idx)
        else:
            images, labels = self.data.images[idx], self.data.labels[idx]
        self.pos += self.batch_size
        if self.crop_size is not None:
            images = random_crop(images, self.crop_size, self.generator)
        x = to_model_range(images)
        if self.hflip:
            x = random_hflip(x, self.generator)
        if self.pin_memory:
            x, labels = x.pin_memory(), labels.pin_memory()
        return x, labels

    def _latents(self, data: LatentData, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents at ``idx`` drawn as images are: the flips drawn as :func:`random_hflip` draws
        them, then (``data.sample``) the posterior's noise, all from the stream's generator."""
        mean, std = data.mean[idx], data.std[idx]
        if self.hflip:
            assert data.flipped is not None, "the latents of the mirrored images were not encoded"
            flip = flip_draws(len(idx), self.generator)
            mean = torch.where(flip, data.flipped[0][idx], mean)
            std = torch.where(flip, data.flipped[1][idx], std)
        z = mean
        if data.sample:  # z = mean + std * eps, the reparameterisation of q(z | x)
            z = mean + std * torch.randn(mean.shape, generator=self.generator, device=self.device)
        labels = data.labels[idx]
        if self.pin_memory:
            z, labels = z.pin_memory(), labels.pin_memory()
        return z, labels

    def _fetch(self, data: StreamingImages, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoded images at ``idx`` from the workers (``data`` is ``self.data``), with
        undecodable ones replaced."""
        if self._loader is None:
            self._sampler = _EpochBatches(self.batch_size)
            self._loader = torch.utils.data.DataLoader(
                data, batch_sampler=self._sampler, num_workers=self.workers,
                persistent_workers=self.workers > 0, worker_init_fn=_own_process_group)
        if self._batches is None:
            self._sampler.perm, self._sampler.start = self.perm, self.pos
            self._batches = iter(self._loader)
        got, images, errors = next(self._batches)
        assert torch.equal(got, idx), "the loader's batches left the stream's order"
        labels = data.labels[idx]
        bad = [k for k, error in enumerate(errors) if error]
        if bad:
            paths = [str(data.paths[int(idx[k])]) for k in bad]
            if data.strict or len(bad) == len(errors):
                raise ValueError(f"cannot decode image {paths[0]} ({errors[bad[0]]}); delete or "
                                 f"replace it")
            new = [p for p in paths if p not in self._warned]
            if new:
                self._warned.update(new)
                warnings.warn(f"could not decode {len(new)} image file(s), e.g. "
                              f"{', '.join(new[:3])}; each is replaced by another image of its "
                              f"batch", stacklevel=2)
            good = next(k for k, error in enumerate(errors) if not error)
            images[bad], labels[bad] = images[good].clone(), labels[good].clone()
        return images, labels

    def state_dict(self) -> dict:
        return {"perm": self.perm.clone(), "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.perm = state["perm"].to(self.device, copy=True)
        self.pos, self.epoch = int(state["pos"]), int(state["epoch"])
        self._batches = None  # the workers restart from the loaded position
