"""Pictures: sample grids, the forward-noising strip, the reverse process as GIF/MP4 and its
contact sheet, the noise schedules, training curves and the training-progress GIF.

Figures with labels (strips, sheets, schedules, curves) go through matplotlib and take any format
it writes (.png, .pdf, .svg, .jpg); grids and animation frames are exact pixels: image i of a
frame is ``data.to_uint8`` of sample i, so a frame can be compared with the sampler's output.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from .checkpoint import atomic_write_bytes, sync_folder
from .data import to_uint8, to_unit_range
from .diffusion import q_sample
from .schedules import NoiseSchedule

FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")
ANIMATION_SUFFIXES = (".gif", ".mp4")


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 0.0) -> torch.Tensor:
    """Images ``[B, C, H, W]`` -> one grid ``[C', H', W']``, ``nrow`` to a row, ``padding``
    pixels of ``pad_value`` around each; one channel is repeated three times (``C'`` = 3), and a
    single image comes back as it is. torchvision's make_grid does the same; ours spares
    ``ddpm sample`` the ~2 s that importing torchvision.utils costs (it imports torch._dynamo)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    b, c, h, w = images.shape
    if b == 1:
        return images[0].clone()
    cols = min(nrow, b)
    rows = math.ceil(b / cols)
    grid = images.new_full((c, rows * (h + padding) + padding, cols * (w + padding) + padding),
                           pad_value)
    for i, image in enumerate(images):
        top, left = (i // cols) * (h + padding) + padding, (i % cols) * (w + padding) + padding
        grid[:, top : top + h, left : left + w] = image
    return grid


def grid_image(x: torch.Tensor, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """Images ``[B, C, H, W]`` in [-1, 1] -> one grid ``[C, H', W']`` in [0, 1], near-square."""
    nrow = nrow or max(1, math.ceil(math.sqrt(x.shape[0])))
    return make_grid(to_unit_range(x.cpu()), nrow=nrow, padding=padding, pad_value=1.0)


GRID_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}  # -> Pillow's


def _image_bytes(image: torch.Tensor, format: str = "png") -> bytes:
    """An image ``[C, H, W]`` in [0, 1] as the bytes of a file in ``format``: PNG (exact), JPEG
    (quality 95) or lossless WebP."""
    from PIL import Image

    buf = io.BytesIO()
    pixels = image.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    if format == "png":  # RGB, grey repeated, as torchvision's save_image wrote them before
        Image.fromarray(pixels.repeat(3, axis=2) if pixels.shape[-1] == 1 else pixels).save(
            buf, format="png")
    else:
        options = {"quality": 95} if format == "jpeg" else {"lossless": True}
        Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(
            buf, format=format, **options)
    return buf.getvalue()


def grid_png(x: torch.Tensor, nrow: int | None = None) -> bytes:
    """Images ``[B, C, H, W]`` in [-1, 1] as the bytes of one PNG grid, the file ``save_grid``
    writes to a .png path."""
    return _image_bytes(grid_image(x, nrow), "png")


def save_grid(x: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Write images ``[B, C, H, W]`` in [-1, 1] as one grid, atomically: PNG, or JPEG or
    (lossless) WebP by the suffix of ``path``."""
    path = Path(path)
    format = GRID_SUFFIXES.get(path.suffix.lower())
    if format is None:
        raise ValueError(f"{path}: a grid is written as {', '.join(GRID_SUFFIXES)}")
    atomic_write_bytes(_image_bytes(grid_image(x, nrow), format), path)
    return path


def save_images(x: torch.Tensor, folder: str | os.PathLike, start_index: int = 0) -> list[Path]:
    """Write each image of ``[B, C, H, W]`` in [-1, 1] as ``folder/000000.png`` and so on, each
    whole or not at all; the folder is synced once at the end, not after every file (two disk
    syncs a file took 2.6 s of a 1,000-image 'ddpm sample')."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(to_unit_range(x.cpu())):
        path = folder / f"{start_index + i:06d}.png"
        atomic_write_bytes(_image_bytes(img), path, sync=False)
        paths.append(path)
    sync_folder(folder)
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


def metric_records(path: str | os.PathLike) -> tuple[list[dict], list[int]]:
    """The records of a metrics JSONL file, and the numbers of the lines that are not records: a
    line cut off by a crash mid-write (the last one, usually), or anything else unreadable."""
    records, bad = [], []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            bad.append(number)
    return records, bad


def read_metrics(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A run's metrics.jsonl as {name: (steps, values)}; a line that is not a record (cut off by
    a crash mid-write) is skipped with a warning."""
    records, bad = metric_records(path)
    if bad:
        warnings.warn(f"skipped line {', '.join(map(str, bad[:3]))} of {path}, which "
                      f"{'is' if len(bad) == 1 else 'are'} not whole records (cut off by an "
                      f"interrupted write?)", stacklevel=2)
    series: dict[str, tuple[list, list]] = {}
    for record in records:
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                steps, values = series.setdefault(name, ([], []))
                steps.append(record["step"])
                values.append(value)
    return {k: (np.asarray(s), np.asarray(v, dtype=float)) for k, (s, v) in series.items()}


def _pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or opened
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, out: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a matplotlib figure atomically, in the format its suffix names, and close it."""
    out = Path(out)
    buf = io.BytesIO()
    fig.savefig(buf, format=out.suffix.lstrip(".").lower().replace("jpg", "jpeg"), dpi=dpi)
    _pyplot().close(fig)
    atomic_write_bytes(buf.getvalue(), out)
    return out


def plot_curves(metrics_path: str | os.PathLike, out: str | os.PathLike) -> Path | None:
    """Loss against step (raw and smoothed), and FID against step with the real-image floor when
    the run measured it, as one PNG. Returns None when there is nothing to plot yet."""
    metrics_path = Path(metrics_path)
    if not metrics_path.is_file():
        return None
    series = read_metrics(metrics_path)
    if "loss" not in series:
        return None
    plt = _pyplot()
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
    return _save_figure(fig, out)


# --- labelled image tables (forward strip, reverse contact sheet) ---------------------------------


def save_image_table(
    blocks: Sequence[tuple[str, torch.Tensor]],
    column_labels: Sequence[str],
    out: str | os.PathLike,
    *,
    title: str | None = None,
    scale: float = 2.0,
) -> Path:
    """One figure of image tables stacked top to bottom: each block ``(name, [R, K, C, H, W])``
    in [-1, 1] (or uint8) shows R rows of K images, labelled ``name`` on the left and ``column_labels`` on
    top. Pixels are shown unsmoothed, ``scale`` screen pixels per image pixel at 100 dpi."""
    plt = _pyplot()
    padding = 2
    grids = [frame_grid(images.flatten(0, 1), nrow=images.shape[1], padding=padding)
             for _, images in blocks]
    width = grids[0].shape[1]
    heights = [g.shape[0] for g in grids]
    dpi = 100
    label_w, label_h = 0.9, 0.35  # inches for the row names and the column labels
    fig_w = width * scale / dpi + label_w + 0.15
    fig_h = sum(heights) * scale / dpi + label_h * len(grids) + (0.35 if title else 0.1)
    fig, axes = plt.subplots(len(grids), 1, figsize=(fig_w, fig_h), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    cell = blocks[0][1].shape[-1] + padding
    centres = [padding + cell * j + (cell - padding) / 2 for j in range(len(column_labels))]
    for ax, grid, (name, _) in zip(axes[:, 0], grids, blocks, strict=True):
        ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_xticks(centres, list(column_labels), fontsize=7)
        ax.xaxis.tick_top()
        ax.tick_params(length=0)
        ax.set_yticks([])
        ax.set_ylabel(name, fontsize=9)
        for side in ax.spines.values():
            side.set_visible(False)
    top = 1.0
    if title:
        fig.suptitle(title, fontsize=10)
        top = 1.0 - 0.3 / fig_h  # keep the title clear of the first row of column labels
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, top))
    return _save_figure(fig, out, dpi=dpi)


# --- the forward process --------------------------------------------------------------------------


def forward_noised(
    x0: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int], eps: torch.Tensor
) -> torch.Tensor:
    """x_t after t forward steps for each t of ``timesteps``: ``[K, B, C, H, W]`` from data
    ``x0 [B, C, H, W]`` and one noise ``eps`` shared by every column, so a row shows the same
    image drowning. Eq. 4 (:func:`~ddpm.diffusion.q_sample`), counting t as the paper does: t = 0
    is the data itself (alpha_bar_0 = 1), t = k is k noising steps, which is
    ``alphas_cumprod_prev[k]`` of the 0-based schedule."""
    t = torch.tensor(list(timesteps))  # [K], noising steps counted from the data
    k = len(t)
    x0, eps = x0.expand(k, *x0.shape), eps.expand(k, *eps.shape)  # [K, B, C, H, W]
    # Index i of the schedule holds the paper's t = i + 1, so k steps are index k - 1.
    noised = q_sample(schedule, x0, (t - 1).clamp(min=0), eps)
    return torch.where((t == 0).view(-1, 1, 1, 1, 1), x0, noised)


# --- animations -----------------------------------------------------------------------------------


def frame_grid(x: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Images ``[B, C, H, W]`` in [-1, 1] (or uint8) -> one uint8 frame ``[H', W', C]`` whose
    cell i is exactly ``to_uint8(x[i])``, on a white background."""
    images = x.cpu() if x.dtype == torch.uint8 else to_uint8(x.cpu())
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    grid = make_grid(images, nrow=nrow, padding=padding, pad_value=255).permute(1, 2, 0).numpy()
    # make_grid repeats one channel three times; keep grey frames grey (GIFs stay lossless)
    return grid[..., :1] if images.shape[1] == 1 else grid


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 6) -> np.ndarray:
    """Two frames ``[H, W, C]`` next to each other with a white gap."""
    white = np.full((left.shape[0], gap, left.shape[2]), 255, dtype=np.uint8)
    return np.concatenate([left, white, right], axis=1)


def upscale(frame: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour enlargement by a whole factor (small images stay crisp)."""
    return frame if scale == 1 else frame.repeat(scale, axis=0).repeat(scale, axis=1)


def enlarged(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images ``[..., H, W]`` enlarged by nearest neighbour to ``size`` a side (a cascade's smaller
    stages drawn at its last stage's size)."""
    factor = size // images.shape[-1]
    return images.repeat_interleave(factor, -1).repeat_interleave(factor, -2)


def _even(frame: np.ndarray) -> np.ndarray:
    """Pad with white to even height and width: H.264 in yuv420p needs both."""
    h, w = frame.shape[:2]
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), constant_values=255)


def video_writer() -> Any:
    """The imageio_ffmpeg module, or a ValueError saying how to install it."""
    try:
        import imageio_ffmpeg
    except ImportError:
        raise ValueError(
            "writing MP4 needs imageio-ffmpeg (its wheel carries ffmpeg): pip install "
            "'ddpm[video]', or write a .gif instead"
        ) from None
    return imageio_ffmpeg


def save_animation(
    frames: Sequence[np.ndarray], out: str | os.PathLike, *, fps: float = 12.0, hold_s: float = 1.5
) -> Path:
    """Write uint8 frames ``[H, W, C]`` (C = 1 or 3) as a looping GIF or an H.264 MP4, by the
    suffix of ``out``, holding the last frame ``hold_s`` seconds longer, atomically.

    A GIF gets exactly ``len(frames)`` frames (the hold is the last frame's duration; note that
    Pillow merges a frame identical to the one before into it); an MP4 runs at ``fps`` constant,
    so it repeats the last frame ``round(hold_s * fps)`` times."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in ANIMATION_SUFFIXES:
        raise ValueError(f"{out}: an animation is written as {' or '.join(ANIMATION_SUFFIXES)}")
    frames = [np.ascontiguousarray(f) for f in frames]
    if suffix == ".gif":
        atomic_write_bytes(gif_bytes(frames, fps=fps, hold_s=hold_s), out)
        return out
    imageio_ffmpeg = video_writer()
    frames = [_even(f if f.shape[2] == 3 else f.repeat(3, axis=2)) for f in frames]
    frames += [frames[-1]] * round(hold_s * fps)
    h, w = frames[0].shape[:2]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".mp4", dir=out.parent)
    os.close(fd)
    try:
        writer = imageio_ffmpeg.write_frames(
            tmp, (w, h), fps=fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
            macro_block_size=1, quality=None, output_params=["-crf", "18"], ffmpeg_log_level="error",
        )
        writer.send(None)  # start ffmpeg
        for f in frames:
            writer.send(f)
        writer.close()
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def gif_bytes(frames: Sequence[np.ndarray], *, fps: float = 12.0, hold_s: float = 1.5) -> bytes:
    """uint8 frames ``[H, W, C]`` as the bytes of a looping GIF (see :func:`save_animation`)."""
    from PIL import Image

    frame_ms = round(1000.0 / fps)
    durations = [frame_ms] * (len(frames) - 1) + [frame_ms + round(1000.0 * hold_s)]
    # Grey frames are written as grey ('L'), which GIF holds exactly; colour frames are
    # reduced to a 256-colour palette by Pillow, as GIF requires.
    grey = all(f.shape[2] == 1 or (f == f[..., :1]).all() for f in frames)
    images = [Image.fromarray(np.ascontiguousarray(f[..., 0]), "L") if grey
              else Image.fromarray(np.ascontiguousarray(f), "RGB") for f in frames]
    buf = io.BytesIO()
    # optimize=False: Pillow's palette optimisation remaps grey levels of a frame that uses
    # more than ~250 of them (measured: up to 3 levels off on 1/3 of the pixels)
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:],
                   duration=durations, loop=0, optimize=False)
    return buf.getvalue()


def read_animation(path: str | os.PathLike) -> np.ndarray:
    """Decode a GIF or MP4 into uint8 frames ``[N, H, W, C]``: C = 1 for a grey GIF, else 3."""
    path = Path(path)
    if path.suffix.lower() == ".gif":
        from PIL import Image, ImageSequence

        with Image.open(path) as im:  # each frame may carry its own palette: decode through RGB
            frames = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
        grey = (frames == frames[..., :1]).all()
        return frames[..., :1] if grey else frames
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    w, h = meta["size"]
    return np.stack([np.frombuffer(b, dtype=np.uint8).reshape(h, w, 3) for b in reader])


# --- the reverse process --------------------------------------------------------------------------


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` indices into ``n`` items, evenly spread, the first and the last always among them."""
    if not 2 <= k <= n:
        raise ValueError(f"frames must be between 2 and {n}, got {k}")
    # spacing (n - 1) / (k - 1) >= 1, so the rounded indices are distinct
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def reverse_frames(
    states: torch.Tensor,
    x0_preds: torch.Tensor | None,
    frames: int,
    *,
    nrow: int | None = None,
    scale: int = 1,
) -> tuple[list[np.ndarray], list[int]]:
    """``frames`` frames from the S + 1 states of a reverse process (x_T, ..., the output), evenly
    spread over them and always holding the first and the last; with ``x0_preds`` each frame
    shows the prediction of x0 at that state on the right. Returns the frames and the indices."""
    chosen = evenly_spaced(states.shape[0], frames)
    out = []
    for i in chosen:
        frame = frame_grid(states[i], nrow)
        if x0_preds is not None:
            frame = side_by_side(frame, frame_grid(x0_preds[i], nrow))
        out.append(upscale(frame, scale))
    return out, chosen


# --- noise schedules ------------------------------------------------------------------------------


def plot_schedules(schedules: Sequence[NoiseSchedule], out: str | os.PathLike) -> Path:
    """beta_t, alpha_bar_t and log-SNR_t = log(alpha_bar / (1 - alpha_bar)) against t, one line
    per schedule."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.3))
    for s in schedules:
        t = np.arange(s.num_train_timesteps)
        axes[0].plot(t, s.betas.numpy(), label=s.name)
        axes[1].plot(t, s.alphas_cumprod.numpy(), label=s.name)
        axes[2].plot(t, s.log_snr.numpy(), label=s.name)
    axes[0].set(xlabel="t", ylabel=r"$\beta_t$", yscale="log", title="noise added per step")
    axes[1].set(xlabel="t", ylabel=r"$\bar\alpha_t$", title="signal kept (eq. 4)")
    axes[2].set(xlabel="t", ylabel=r"$\log(\bar\alpha_t / (1 - \bar\alpha_t))$", title="log-SNR")
    axes[0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, out)


# --- training progress ----------------------------------------------------------------------------


def caption(frame: np.ndarray, text: str, height: int = 14) -> np.ndarray:
    """A white band with ``text`` under a frame ``[H, W, C]``."""
    from PIL import Image, ImageDraw

    band = Image.new("L", (frame.shape[1], height), 255)
    ImageDraw.Draw(band).text((3, 1), text, fill=0)
    band_pixels = np.asarray(band)[..., None].repeat(frame.shape[2], axis=2)
    return np.concatenate([frame, band_pixels], axis=0)


def progress_animation(
    samples_dir: str | os.PathLike, out: str | os.PathLike, *, fps: float = 4.0
) -> Path | None:
    """The preview grids ``samples_dir/step-*.png`` (drawn from the same noise at every step) as
    one animation, each frame captioned with its step. Grids of another size than the newest
    (a run resumed with another --sample-n) are left out. None when there are fewer than two."""
    from PIL import Image

    grids = []
    for path in sorted(Path(samples_dir).glob("step-*.png")):
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
        grids.append((int(path.stem.split("-")[1]), image))
    if grids:
        size = grids[-1][1].shape
        grids = [(step, g) for step, g in grids if g.shape == size]
    if len(grids) < 2:
        return None
    frames = [caption(g, f"step {step}") for step, g in grids]
    return save_animation(frames, out, fps=fps, hold_s=1.5)
