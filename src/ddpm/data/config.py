"""The data section of a run's config: :class:`DataConfig`, one declaration per setting, and
:func:`resolve_data`, which fills in what the dataset's own facts (:mod:`.registry`) imply."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..settings import check_fields, setting
from . import registry


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """What to train on; :func:`resolve_data` fills in the Nones from the dataset's own facts."""

    dataset: str = setting("fashion-mnist", flag="--dataset", choices=registry.DATASETS,
                           help="training data; docs/datasets.md has a section on each")
    data_dir: str | None = setting(
        None, flag="--data-dir", metavar="DIR",
        help="the dataset's folder (default: /usr/share/datasets/fashion-mnist for "
             "fashion-mnist, ~/.cache/ddpm/data/DATASET for the others; folder and "
             "flowers-folder need it)")
    split: str = setting("train", flag="--split", choices=registry.SPLITS,
                         help="which images to train on (all: every labelled one)")
    image_size: int | None = setting(
        None, flag="--image-size", at_least=8,
        help="side of the square images the model sees (default: the dataset's own; 64 for "
             "flowers and folders)")
    channels: int | None = setting(
        None, flag="--channels", choices=(1, 3),
        help="1 (grey) or 3 (RGB), converting images as needed (default: the dataset's)")
    crop: str = setting(
        "center", flag="--crop", choices=registry.CROPS,
        help="how images reach the size: center (resize the shorter side, centre crop), resize "
             "(squash) or random (a random crop from 9/8 of the size)")
    hflip: bool | None = setting(
        None, flag="--hflip",
        help="random horizontal flips (default: on, except for MNIST and Fashion-MNIST, whose "
             "digits and shoes have one orientation)")
    folder_labels: bool = setting(False, flag="--folder-labels",
                                  help="folder: one class per first-level subfolder (for "
                                       "--conditional)")
    download: bool = setting(False, flag="--download",
                             help="fetch the dataset if it is missing (needs internet)")
    cache_dir: str | None = setting(
        None, flag="--cache-dir", metavar="DIR",
        help="where decoded image files are cached (default: $DDPM_CACHE_DIR or ~/.cache/ddpm)")
    max_memory_gb: float = setting(
        4.0, flag="--max-memory-gb", above=0,
        help="image files whose decoded images would take more stream from disk")
    workers: int = setting(2, flag="--workers", at_least=0,
                           help="processes decoding image files (DataLoader workers)")
    strict: bool = setting(False, flag="--strict",
                           help="stop at a corrupt image file instead of skipping it")

    def validate(self) -> None:
        check_fields(self)
        registry.check_options(self.dataset, self.split, self.image_size, self.channels, self.crop)


def resolve_data(data: DataConfig) -> DataConfig:
    """``data`` checked, with data_dir, image_size, channels and hflip filled in from the
    dataset's facts (``data.registry``), so that a saved run config says exactly what was read."""
    registry.check_options(data.dataset, data.split, data.image_size, data.channels, data.crop)
    if not data.max_memory_gb > 0:
        raise ValueError(f"max_memory_gb must be positive, got {data.max_memory_gb!r}")
    if not (isinstance(data.workers, int) and data.workers >= 0):
        raise ValueError(f"workers must be 0 (decode in this process) or more, got {data.workers!r}")
    image_size, channels = registry.size_and_channels(data.dataset, data.image_size, data.channels)
    hflip = data.hflip if data.hflip is not None else registry.dataset_spec(data.dataset).flips_by_default
    return dataclasses.replace(data, data_dir=str(registry.data_root(data.dataset, data.data_dir)),
                               image_size=image_size, channels=channels, hflip=hflip)
