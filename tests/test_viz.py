"""``ddpm viz``: every figure decodes, the pictures show what the math says, bad requests are refused."""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.data import load_dataset, to_model_range, to_uint8
from ddpm.pipeline import load_pipeline
from ddpm.rundir import PREVIEW_SEED, PROGRESS_FILE
from ddpm.samplers import initial_noise
from ddpm.schedules import make_schedule
from ddpm.viz import forward_noised, frame_grid, read_animation, reverse_frames, save_animation, upscale

from conftest import ddpm_in_process


def ddpm(*args):
    return subprocess.run([sys.executable, "-m", "ddpm", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory, fake_fashion):
    """A tiny run with a preview grid and a checkpoint every 4 steps (T = 100, 20 sampler steps)."""
    run = tmp_path_factory.mktemp("viz") / "run"
    r = ddpm("train", "--preset", "tiny", "--steps", 12, "--out", run, "--data-dir", fake_fashion,
             "--sample-every", 4, "--checkpoint-every", 4, "--no-progress")
    assert r.returncode == 0, r.stderr
    (run.parent / "train-stdout.txt").write_text(r.stdout)  # its summary names the precision
    return run


def cells(frame: np.ndarray, n: int, size: int = 28, nrow: int = 4, padding: int = 2) -> np.ndarray:
    """The images of a frame_grid frame [H, W, C] back as [n, C, size, size]."""
    out = []
    for i in range(n):
        r, c = divmod(i, nrow)
        y, x = padding + r * (size + padding), padding + c * (size + padding)
        out.append(frame[y:y + size, x:x + size].transpose(2, 0, 1))
    return np.stack(out)


# --- the forward strip ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_forward_strip_starts_at_the_data_and_its_variance_follows_the_schedule(name):
    schedule = make_schedule(name, 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(256, 1, 28, 28, generator=g) * 2 - 1  # iid pixels, variance 1/3
    eps = torch.randn(x0.shape, generator=g)
    ts = [0, 10, 50, 100, 150, 200, 250, 300, 400, 600, 800, 999]
    strip = forward_noised(x0, schedule, ts, eps)
    assert strip.shape == (len(ts), 256, 1, 28, 28)
    assert torch.equal(strip[0], x0)  # t = 0 is the data itself, not a lightly noised copy
    # Var(x_t) = alpha_bar_t Var(x0) + (1 - alpha_bar_t) (eq. 4, x0 and eps independent), where
    # alpha_bar_t is the product of (1 - beta_s) over the t steps s = 1..t.
    alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), schedule.betas.neg().add(1).cumprod(0)])
    for k, t in enumerate(ts):  # each column is eq. 4 after exactly t steps (t - 1 is 6e-5 off)
        expected = alpha_bar[t].sqrt() * x0.double() + (1 - alpha_bar[t]).sqrt() * eps.double()
        assert torch.allclose(strip[k].double(), expected, rtol=0, atol=1e-5), t  # float32 roots
    var0 = x0.var().item()
    variances = [strip[k].var().item() for k in range(len(ts))]
    for t, v in zip(ts, variances, strict=True):
        expected = alpha_bar[t].item() * var0 + 1 - alpha_bar[t].item()
        assert v == pytest.approx(expected, rel=0.02), t  # 200k iid values: std error ~0.3%
    assert all(a < b for a, b in zip(variances, variances[1:], strict=False))  # grows with t
    # and the pixels at t = 999 are almost all noise: correlation with x0 is sqrt(alpha_bar) small
    corr = torch.corrcoef(torch.stack([strip[-1].flatten(), x0.flatten()]))[0, 1].item()
    assert abs(corr) < 0.05


def test_forward_command_writes_a_figure_per_format(tmp_path, fake_fashion):
    heights = {}
    for schedules in ("linear", "linear,cosine"):
        out = tmp_path / f"forward-{schedules.count(',')}.png"
        r = ddpm_in_process("viz", "forward", "--out", out, "--data-dir", fake_fashion, "--n", 3,
                            "--schedule", schedules, "--timesteps", "0,50,999")
        assert r.returncode == 0, r.stderr
        with Image.open(out) as im:
            assert im.format == "PNG"
            heights[schedules] = im.size[1]
            pixels = np.asarray(im.convert("L"))
        assert pixels.min() < 60 and pixels.max() > 200  # images drawn, not a blank canvas
    assert heights["linear,cosine"] > 1.7 * heights["linear"]  # one row block per schedule
    for suffix, magic in ((".svg", b"<svg"), (".pdf", b"%PDF")):
        out = tmp_path / f"forward{suffix}"
        r = ddpm_in_process("viz", "forward", "--out", out, "--data-dir", fake_fashion, "--n", 2)
        assert r.returncode == 0, r.stderr
        assert magic in out.read_bytes()[:400]


# --- the reverse process --------------------------------------------------------------------------


def test_reverse_gif_ends_at_the_samplers_output_and_starts_at_the_noise(run, tmp_path):
    gif, npz = tmp_path / "reverse.gif", tmp_path / "samples.npz"
    r = ddpm("viz", "reverse", run, "--out", gif, "--n", 16, "--frames", 7, "--seed", 3,
             "--sampler", "ddim", "--steps", 12, "--scale", 1, "--show-x0", "--no-progress")
    assert r.returncode == 0, r.stderr
    r = ddpm("sample", run, "--out", npz, "--n", 16, "--seed", 3, "--sampler", "ddim",
             "--steps", 12, "--no-progress")
    assert r.returncode == 0, r.stderr
    frames = read_animation(gif)
    grid_w = 4 * 30 + 2
    assert frames.shape == (7, grid_w, 2 * grid_w + 6, 1) and frames.dtype == np.uint8
    samples = np.load(npz)["arr_0"].transpose(0, 3, 1, 2)  # [16, 1, 28, 28]
    last = frames[-1]
    assert np.array_equal(cells(last[:, :grid_w], 16), samples)  # x_t at the end is the output
    assert np.array_equal(cells(last[:, grid_w + 6:], 16), samples)  # and so is its x0
    noise = initial_noise((16, 1, 28, 28), torch.Generator().manual_seed(3))
    assert np.array_equal(cells(frames[0][:, :grid_w], 16), to_uint8(noise).numpy())
    assert not np.array_equal(frames[0], frames[3])  # the frames in between move


def test_reverse_mp4_and_contact_sheet(run, tmp_path):
    mp4, sheet = tmp_path / "reverse.mp4", tmp_path / "sheet.png"
    r = ddpm("viz", "reverse", run, "--out", mp4, "--n", 4, "--frames", 5, "--fps", 10,
             "--hold", 1.0, "--scale", 2, "--sheet", sheet, "--sheet-columns", 4, "--no-progress")
    assert r.returncode == 0, r.stderr
    video = read_animation(mp4)
    side = 2 * (2 * 30 + 2)  # 2x2 grid of 28 px images, doubled
    assert video.shape == (5 + 10, side, side, 3)  # 5 frames, then the last held 1 s at 10 fps
    assert np.array_equal(video[-1], video[-2])  # the hold repeats the output
    # H.264 is lossy; the output frame still matches the sampler's output closely
    pipe = load_pipeline(run, device="cpu")
    expected = upscale(frame_grid(pipe.generate(4, seed=0)), 2)[..., 0].astype(float)
    assert np.abs(video[-1].mean(axis=2) - expected).mean() < 12
    with Image.open(sheet) as im:
        assert im.format == "PNG" and im.size[0] > 4 * 28 * 2


def test_reverse_frames_spread_evenly_over_the_states():
    states = torch.arange(11, dtype=torch.uint8).view(11, 1, 1, 1, 1).expand(11, 2, 1, 2, 2)
    frames, chosen = reverse_frames(states, None, 6)
    assert chosen == [0, 2, 4, 6, 8, 10] and len(frames) == 6
    assert [int(f[2, 2, 0]) for f in frames] == chosen  # each frame shows its own state
    with pytest.raises(ValueError, match="between 2 and 11"):
        reverse_frames(states, None, 12)


def test_gif_frame_count_size_and_hold(tmp_path):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (10, 14, 3), dtype=np.uint8) for _ in range(4)]
    out = save_animation(frames, tmp_path / "a.gif", fps=5, hold_s=2.0)
    decoded = read_animation(out)
    assert decoded.shape == (4, 10, 14, 3)
    with Image.open(out) as im:
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            durations.append(im.info["duration"])
    assert durations == [200, 200, 200, 2200]
    odd = save_animation([f[:9, :13] for f in frames], tmp_path / "odd.mp4", fps=5, hold_s=0)
    assert read_animation(odd).shape == (4, 10, 14, 3)  # padded to even sides for H.264


# --- data, schedules, curves, training progress ---------------------------------------------------


def test_data_grid_shows_real_images(tmp_path, fake_fashion):
    out = tmp_path / "data.png"
    r = ddpm("viz", "data", "--out", out, "--data-dir", fake_fashion, "--n", 9, "--seed", 1)
    assert r.returncode == 0, r.stderr
    grid = np.asarray(Image.open(out).convert("L"))
    assert grid.shape == (3 * 30 + 2, 3 * 30 + 2)
    data = load_dataset("fashion-mnist", fake_fashion).images
    first = grid[2:30, 2:30]
    assert any(np.array_equal(first, img[0].numpy()) for img in data)  # a real training image


def test_schedule_and_curves_figures(run, tmp_path):
    out = tmp_path / "schedules.png"
    r = ddpm("viz", "schedule", "--out", out, "--schedule", "linear,cosine,sigmoid,quadratic")
    assert r.returncode == 0, r.stderr
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 200
    out = tmp_path / "curves.svg"
    r = ddpm("viz", "curves", run, "--out", out)
    assert r.returncode == 0, r.stderr
    assert b"<svg" in out.read_bytes()[:400]


def test_preview_grids_use_fixed_noise_and_make_the_progress_gif(run):
    grids = sorted((run / "samples").glob("step-*.png"))
    assert [g.name for g in grids] == ["step-00000004.png", "step-00000008.png", "step-00000012.png"]
    trained_in = re.findall(r", (fp32|bf16) \((?:as asked|auto: [^)]*)\), on ",
                            (run.parent / "train-stdout.txt").read_text())
    assert len(trained_in) == 1, "the summary's training line names one precision"
    precision = trained_in[0]
    for grid in grids:
        step = int(grid.stem.split("-")[1])
        # the preview is the EMA weights of that step sampled from PREVIEW_SEED's noise, in the
        # precision the run trains in (auto's training measurement, which sampling's own
        # measurement need not agree with: the summary line says which it chose)
        pipe = load_pipeline(run / "checkpoints" / f"ckpt-{step:08d}.pt", device="cpu",
                             precision=precision)
        images = pipe.generate(pipe.config.train.sample_n, seed=PREVIEW_SEED,
                               num_sample_steps=pipe.config.train.sample_steps)
        expected = frame_grid(images, nrow=2)
        assert np.array_equal(np.asarray(Image.open(grid))[..., :1], expected)
    animation = read_animation(run / PROGRESS_FILE)
    assert animation.shape[0] == len(grids)
    first = np.asarray(Image.open(grids[0]))[..., :1]  # grey grids, kept grey in the GIF
    assert np.array_equal(animation[0][: first.shape[0]], first)  # the grid, captioned below
    assert animation.shape[1] > first.shape[0]


def test_to_model_range_round_trips_frames():
    x = torch.randint(0, 256, (3, 1, 5, 5), dtype=torch.uint8)
    assert torch.equal(to_uint8(to_model_range(x)), x)


# --- bad requests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["forward", "--timesteps", "0,1000"], "--timesteps 1000 is outside 0..999"),
    (["forward", "--timesteps", "0,50", "--num-timesteps", "50"], "--timesteps 50 is outside 0..49"),
    (["forward", "--schedule", "linear,wavy"], "unknown 'wavy'; choose from linear, cosine"),
    (["forward", "--timesteps", "0,-5"], "expected comma-separated whole numbers"),
    (["schedule", "--schedule", "cosin"], "unknown 'cosin'"),
    (["data", "--n", "100000"], "--n 100000 but the split holds only 256 images"),
])
def test_bad_figure_requests_are_one_line(args, message, tmp_path, fake_fashion):
    out = tmp_path / "f.png"
    extra = ["--data-dir", str(fake_fashion)] if args[0] in ("forward", "data") else []
    r = ddpm_in_process("viz", *args, "--out", out, *extra)
    assert r.returncode == 2 and r.stdout == ""
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_bad_reverse_requests_are_one_line(run, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    gif = tmp_path / "r.gif"
    cases = [
        (["--out", gif, "--frames", 21], "--frames 21 is more than the 20 sampling steps"),
        (["--out", gif, "--steps", 5, "--frames", 6], "--frames 6 is more than the 5 sampling steps"),
        (["--out", gif, "--steps", 101], "--steps 101 is more than the model's 100 training"),
        (["--out", tmp_path / "r.avi"], "the file must end in .gif, .mp4"),
        (["--out", blocker / "r.gif"], f"cannot write in {blocker}"),
        (["--out", tmp_path], "is a folder"),
        (["--out", gif, "--sheet", blocker / "s.png"], f"--sheet {blocker / 's.png'}: cannot write"),
        (["--out", gif, "--frames", 1], "expected a number >= 2"),
        (["--out", gif, "--steps", 1], "needs --steps 2 or more"),
    ]
    for args, message in cases:
        r = ddpm_in_process("viz", "reverse", run, *args, "--no-progress")
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert not gif.exists()
    r = ddpm_in_process("viz", "curves", tmp_path, "--out", tmp_path / "c.png")
    assert r.returncode == 2 and "has no metrics.jsonl" in r.stderr


def test_mp4_without_imageio_ffmpeg_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if it were not installed
    frame = np.zeros((4, 4, 1), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"pip install 'ddpm\[video\]', or write a \.gif"):
        save_animation([frame, frame], tmp_path / "a.mp4")
    assert not (tmp_path / "a.mp4").exists()


@pytest.mark.parametrize("shape, nrow, padding, pad_value", [
    ((7, 1, 5, 6), 3, 2, 1.0), ((1, 1, 5, 5), 2, 2, 1.0), ((4, 3, 4, 4), 8, 0, 0.0),
    ((10, 3, 3, 3), 4, 3, 0.5)])
def test_our_grid_and_png_are_torchvisions(shape, nrow, padding, pad_value):
    """The grid and the PNG bytes that torchvision's make_grid and save_image give (ours spare
    the command line the import of torchvision)."""
    import io

    from torchvision.utils import make_grid as torchvision_grid
    from torchvision.utils import save_image

    from ddpm.viz import _image_bytes, make_grid

    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(make_grid(x, nrow, padding, pad_value),
                       torchvision_grid(x, nrow=nrow, padding=padding, pad_value=pad_value))
    u = (x * 255).to(torch.uint8)
    assert torch.equal(make_grid(u, nrow, padding, 255),
                       torchvision_grid(u, nrow=nrow, padding=padding, pad_value=255))
    buf = io.BytesIO()
    save_image(x[0], buf, format="png")
    assert _image_bytes(x[0], "png") == buf.getvalue()
