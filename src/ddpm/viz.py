"""Pictures: sample grids and per-image PNGs (the reverse-process figures build on these)."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid, save_image

from .checkpoint import atomic_write_bytes
from .data import to_uint8, to_unit_range


def grid_image(x: torch.Tensor, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """Images ``[B, C, H, W]`` in [-1, 1] -> one grid ``[C, H', W']`` in [0, 1], near-square."""
    nrow = nrow or max(1, math.ceil(math.sqrt(x.shape[0])))
    return make_grid(to_unit_range(x.cpu()), nrow=nrow, padding=padding, pad_value=1.0)


def _png_bytes(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    save_image(image, buf, format="png")
    return buf.getvalue()


def save_grid(x: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Write images ``[B, C, H, W]`` in [-1, 1] as one PNG grid, atomically."""
    path = Path(path)
    atomic_write_bytes(_png_bytes(grid_image(x, nrow)), path)
    return path


def save_images(x: torch.Tensor, folder: str | os.PathLike, start_index: int = 0) -> list[Path]:
    """Write each image of ``[B, C, H, W]`` in [-1, 1] as ``folder/000000.png`` and so on."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(to_unit_range(x.cpu())):
        path = folder / f"{start_index + i:06d}.png"
        atomic_write_bytes(_png_bytes(img), path)
        paths.append(path)
    return paths


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """Images ``[B, C, H, W]`` in [-1, 1] -> uint8 ``[B, H, W, C]`` (the layout FID tools read)."""
    return to_uint8(x.cpu()).permute(0, 2, 3, 1).numpy()


def save_npz(x: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write images ``[B, C, H, W]`` in [-1, 1] as ``arr_0``, uint8 ``[B, H, W, C]``, atomically."""
    buf = io.BytesIO()
    np.savez(buf, arr_0=to_uint8_nhwc(x))
    path = Path(path)
    atomic_write_bytes(buf.getvalue(), path)
    return path


def read_metrics(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A run's metrics.jsonl as {name: (steps, values)}; lines without a name are skipped."""
    series: dict[str, tuple[list, list]] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                steps, values = series.setdefault(name, ([], []))
                steps.append(record["step"])
                values.append(value)
    return {k: (np.asarray(s), np.asarray(v, dtype=float)) for k, (s, v) in series.items()}


def plot_curves(metrics_path: str | os.PathLike, out: str | os.PathLike) -> Path | None:
    """Loss against step (raw and smoothed), and FID against step with the real-image floor when
    the run measured it, as one PNG. Returns None when there is nothing to plot yet."""
    metrics_path = Path(metrics_path)
    if not metrics_path.is_file():
        return None
    series = read_metrics(metrics_path)
    if "loss" not in series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_fid = "fid" in series
    fig, axes = plt.subplots(1, 2 if has_fid else 1, figsize=(10 if has_fid else 5.5, 3.6),
                             squeeze=False)
    ax = axes[0, 0]
    steps, loss = series["loss"]
    ax.plot(steps, loss, color="0.75", lw=0.8, label="logged")
    if len(loss) >= 5:  # a running median shows the trend, unmoved by the huge first losses
        h = max(1, len(loss) // 20)
        smooth = np.array([np.median(loss[max(0, i - h):i + h + 1]) for i in range(len(loss))])
        ax.plot(steps, smooth, color="C0", lw=1.5, label=f"running median of {2 * h + 1}")
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title="loss")
    ax.legend(frameon=False)
    if has_fid:
        ax = axes[0, 1]
        ax.plot(*series["fid"], "o-", color="C3", label="generated")
        if "floor_fid" in series:
            ax.plot(*series["floor_fid"], "--", color="0.4", label="real images (floor)")
        n = int(series["fid_n"][1][-1]) if "fid_n" in series else None
        ax.set(xlabel="step", ylabel="FID", yscale="log", title=f"FID (n = {n})" if n else "FID")
        ax.legend(frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    out = Path(out)
    atomic_write_bytes(buf.getvalue(), out)
    return out
