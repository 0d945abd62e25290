"""Shared fixtures: small datasets in the real on-disk format, written by the tests themselves."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import gzip
import hashlib
import http.client
import io
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    """Write ``array`` (uint8) in LeCun's IDX format: magic 0x0000 08 ndim, big-endian dims."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_fake_fashion(folder: Path, n_train: int = 256, n_test: int = 64, seed: int = 0) -> Path:
    """Fashion-MNIST-shaped IDX files (gzipped, as Debian ships them) with random content."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)))
    return folder


def ddpm_in_process(*args) -> subprocess.CompletedProcess:
    """``ddpm ARGS`` through the CLI's ``main`` in this process, as ``subprocess.run`` reports it:
    the same exit code and output, without the seconds a new Python spends importing torch. An
    exception that escaped ``main`` (a traceback for a user) fails the calling test."""
    from ddpm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's errors and --help
            code = exc.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def fake_fashion(tmp_path_factory) -> Path:
    return make_fake_fashion(tmp_path_factory.mktemp("fashion"))


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def world(tmp_path_factory, fake_fashion):
    """A folder of existing outputs that every refused command (test_cli.py's tables and others)
    must leave exactly as it is: runs, checkpoints damaged in every way, folders of images, odd
    files."""
    from ddpm import get_preset, train
    from ddpm.checkpoint import load_checkpoint

    root = tmp_path_factory.mktemp("world")
    c = get_preset("tiny")
    plain = dataclasses.replace(c, data=dataclasses.replace(c.data, data_dir=str(fake_fashion)),
                                train=dataclasses.replace(c.train, steps=2, checkpoint_every=1,
                                                          sample_every=0))
    train(plain, root / "run", progress=False, final_grid=False)
    conditional = dataclasses.replace(c, model=dataclasses.replace(c.model, num_classes=10))
    conditional = dataclasses.replace(conditional, data=dataclasses.replace(
        c.data, data_dir=str(fake_fashion)), train=dataclasses.replace(c.train, sample_every=0))
    train(dataclasses.replace(conditional, train=dataclasses.replace(conditional.train, steps=1)),
          root / "crun", progress=False, final_grid=False)
    (root / "existing.png").write_bytes(b"an earlier grid")
    (root / "afile").write_text("a file, not a folder")
    (root / "empty").mkdir()
    make_image_folder(root / "pets")
    state = load_checkpoint(root / "run/checkpoints/ckpt-00000002.pt")
    torch.save({**state, "format_version": 99}, root / "other_version.pt")
    wider = {**state, "config": {**state["config"],
                                 "model": {**state["config"]["model"], "base_channels": 16}}}
    torch.save(wider, root / "other_config.pt")
    shutil.copytree(root / "run", root / "other_config_run")
    torch.save(wider, root / "other_config_run/checkpoints/ckpt-00000002.pt")
    whole = (root / "run/checkpoints/ckpt-00000002.pt").read_bytes()
    (root / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    (root / "junk.pt").write_bytes(b"these bytes are not a checkpoint")
    torch.save({"weights": torch.zeros(3)}, root / "foreign.pt")
    (root / "text.npz").write_text("a text file named like an npz\n")
    np.savez(root / "few.npz", arr_0=np.zeros((4, 28, 28, 1), np.uint8))
    (root / "text.pt").write_text("a text file named like a checkpoint\n")
    shutil.copytree(root / "run", root / "folder_run")  # its newest checkpoint became a folder
    (root / "folder_run/checkpoints/ckpt-00000002.pt").unlink()
    (root / "folder_run/checkpoints/ckpt-00000001.pt").unlink()
    (root / "folder_run/checkpoints/ckpt-00000002.pt").mkdir()
    return root


# Under pytest-xdist (``-n 3``, as scripts/check runs the suite) each worker runs torch on one
# thread, and so do the ``ddpm`` processes a test starts: the workers share the machine's cores
# instead of each one's threads fighting over all of them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def another_thread_count() -> int:
    """A torch thread count other than the current one, for tests that check it is restored."""
    return 2 if torch.get_num_threads() == 1 else 1


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Reference statistics go to a temporary folder, never the user's ~/.cache/ddpm."""
    os.environ["DDPM_CACHE_DIR"] = str(tmp_path_factory.mktemp("ddpm-cache"))
    yield


# --- the command line, run by the tests -----------------------------------------------------------


def cli(*args) -> tuple[int, str, str]:
    """``ddpm ARGS`` through the CLI's main, in this process: (exit code, stdout, stderr)."""
    r = ddpm_in_process(*args)
    return r.returncode, r.stdout, r.stderr


def ddpm(*args, cwd=None):
    """``ddpm ARGS`` in a new Python process, as a user's shell runs it."""
    return subprocess.run([sys.executable, "-m", "ddpm", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def assert_refused(r, message: str, absent=()) -> None:
    """One line on stderr saying ``message`` (and none of ``absent``), exit code 2, no traceback."""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert message in lines[0], r.stderr
    assert not any(word in lines[0] for word in absent), r.stderr
    assert "Traceback" not in r.stderr + r.stdout


# --- runs shared by several files (each trained once per session) ---------------------------------


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, fake_fashion):
    """The tiny preset trained by the command in a new process, 6 steps with checkpoints at 3 and
    6: (the run's folder, what train printed). Shared by the files of the command line and
    test_pipeline.py, trained once; a test that changes it works on a copy."""
    run = tmp_path_factory.mktemp("cli") / "run"
    r = ddpm("train", "--preset", "tiny", "--steps", 6, "--out", run, "--data-dir", fake_fashion,
             "--checkpoint-every", 3, "--no-progress")
    assert r.returncode == 0, r.stderr
    return run, r.stdout


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory, fake_fashion):
    """A tiny run with learned variances (v-prediction), 4 steps; test_pipeline.py resumes it to
    6, test_cli_eval.py scores it. Trained once for both."""
    out = tmp_path_factory.mktemp("learned") / "run"
    r = ddpm_in_process("train", "--preset", "tiny", "--data-dir", fake_fashion,
                        "--learn-variance", "--prediction-type", "v", "--steps", "4", "--out", out,
                        "--no-progress")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def run_copy(world, tmp_path) -> Path:
    """A copy of the world's run, for a test that changes it or checks what a refusal leaves."""
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    return run


def tiny_config(data_dir, **train_overrides):
    """The tiny preset on ``data_dir`` with dropout and flips (so that a resume must restore the
    global RNG), no preview grids, and ``train_overrides``."""
    from ddpm import get_preset

    c = get_preset("tiny")
    return dataclasses.replace(
        c,
        model=dataclasses.replace(c.model, dropout=0.1),  # exercise the global RNG on resume
        data=dataclasses.replace(c.data, data_dir=str(data_dir), hflip=True),
        train=dataclasses.replace(c.train, **{"sample_every": 0, **train_overrides}),
    )


# --- the Gaussian toy of the variational bound (test_diffusion, test_samplers, test_pipeline) -----

MU, S = 0.1, 0.4  # the toy's law, N(MU, S^2) per pixel, discretised to the 256 levels


def _toy_images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (MU + S * torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)).clamp(-1, 1)
    return ((x + 1) * 127.5).round() / 127.5 - 1  # on the grid of 256 levels


def _bound_by_code(schedule, x0, variance):
    """The same bound through diffusion.py, with the same draws."""
    from ddpm.diffusion import p_mean_log_variance, prior_bpd, q_sample, vlb_term
    from ddpm.toy import gaussian_denoiser

    T = schedule.num_train_timesteps
    g = torch.Generator().manual_seed(7)
    denoiser = gaussian_denoiser(schedule, MU, S, prediction_type="eps")
    total = prior_bpd(schedule, x0)
    for step in range(T):
        t = torch.full((len(x0),), step, dtype=torch.long)
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        x_t = q_sample(schedule, x0, t, eps)
        mean, log_var = p_mean_log_variance(schedule, denoiser(x_t, t), x_t, t, prediction_type="eps",
                                            variance=variance, learned=False,
                                            x0_transform=lambda x: x.clamp(-1, 1))
        total = total + vlb_term(schedule, x0, x_t, t, mean, log_var)
    return total


# --- EDM's preconditioning (Karras et al. 2022, Table 1: test_diffusion, test_pipeline) -----------


def _table_1(ab: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """c_in, c_skip, c_out at sigma = sqrt((1 - ab) / ab), written as the paper writes them."""
    sigma = ((1 - ab) / ab).sqrt()
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma ** 2 + sigma_data ** 2).sqrt()
    return c_in, c_skip, c_out


# --- tiny datasets in the other on-disk formats (tests/test_data.py) -------------------------------
# Each image carries its label in its pixels, so a test can check that the right image got the
# right label: a flat colour ``label_colour(label)``, exact in PNG and within a few levels in JPEG.


def label_colour(label: int) -> tuple[int, int, int]:
    return (20 * (label % 10) + 10, 40 * (label // 10 % 5) + 30, 200)


def _write_picture(path: Path, label: int, size: tuple[int, int], mode: str = "RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, label_colour(label))
    im = im.convert(mode)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        im.save(path, format="JPEG", quality=95)
    elif path.suffix.lower() == ".webp":
        im.save(path, lossless=True)
    else:
        im.save(path)


def cifar_rows(labels: np.ndarray) -> np.ndarray:
    """CIFAR rows [N, 3072]: R plane 2 * label, G plane a ramp along x, B along y (so a wrong
    reshape or transpose shows)."""
    n = len(labels)
    ramp = np.arange(32, dtype=np.uint8) * 8
    planes = np.empty((n, 3, 32, 32), np.uint8)
    planes[:, 0] = (2 * labels).astype(np.uint8)[:, None, None]
    planes[:, 1] = ramp[None, None, :]
    planes[:, 2] = ramp[None, :, None]
    return planes.reshape(n, 3072)


def make_fake_cifar(root: Path, kind: str = "cifar10", n_per_batch: int = 6, seed: int = 0,
                    str_keys: bool = False, protocol: int = 2) -> Path:
    """CIFAR's python batches as the real archive unpacks them: dicts with bytes keys (Python 2
    wrote them), data uint8 [N, 3072], labels a list. ``str_keys``/``protocol`` vary the writer."""
    import pickle

    rng = np.random.default_rng(seed)
    key = (lambda k: k) if str_keys else (lambda k: k.encode())
    if kind == "cifar10":
        folder, n_classes = root / "cifar-10-batches-py", 10
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        label_key, meta_name = "labels", "batches.meta"
        meta = {key("label_names"): [f"class{i}".encode() for i in range(10)],
                key("num_cases_per_batch"): n_per_batch}
    else:
        folder, n_classes = root / "cifar-100-python", 100
        files, label_key, meta_name = ["train", "test"], "fine_labels", "meta"
        meta = {key("fine_label_names"): [f"fine{i}".encode() for i in range(100)],
                key("coarse_label_names"): [f"coarse{i}".encode() for i in range(20)]}
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        labels = rng.integers(0, n_classes, n_per_batch)
        batch = {key("batch_label"): name.encode(), key(label_key): labels.tolist(),
                 key("data"): cifar_rows(labels), key("filenames"): [b"x.png"] * n_per_batch}
        if kind == "cifar100":
            batch[key("coarse_labels")] = (labels // 5).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    with open(folder / meta_name, "wb") as f:
        pickle.dump(meta, f, protocol=protocol)
    return root


def make_fake_flowers102(root: Path, n: int = 12) -> dict[str, list[int]]:
    """Flowers-102 as torchvision downloads it: flowers-102/jpg/image_00001.jpg ...,
    imagelabels.mat ('labels', 1-based) and setid.mat (trnid, valid, tstid: 1-based image ids).
    Returns the 1-based ids of each set."""
    from scipy.io import savemat

    base = root / "flowers-102"
    labels = [(i * 7) % 102 + 1 for i in range(n)]  # 1-based classes
    for i in range(1, n + 1):  # sizes vary and are not square, like the real photos
        _write_picture(base / "jpg" / f"image_{i:05d}.jpg", labels[i - 1] - 1, (40 + 3 * i, 30 + 2 * i))
    savemat(base / "imagelabels.mat", {"labels": np.array([labels], np.uint8)})
    sets = {"trnid": [1, 5, 9], "valid": [2, 6, 10], "tstid": [3, 4, 7, 8, 11, 12][: max(0, n - 6)]}
    savemat(base / "setid.mat", {k: np.array([v], np.uint16) for k, v in sets.items()})
    return sets


def make_fake_tinyimagenet(root: Path, wnids=("n01443537", "n01629819", "n01641577"),
                           per_class: int = 3, n_val: int = 5) -> list[int]:
    """tiny-imagenet-200/ as its zip unpacks: wnids.txt, words.txt (with synsets beyond the 200,
    as the real one lists all of ImageNet), train/<wnid>/images/*.JPEG and <wnid>_boxes.txt,
    val/images + val_annotations.txt. Some images are greyscale JPEGs, as a few real ones are.
    Returns the labels of the validation images in file-name order."""
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    (base / "words.txt").write_text("n00000001\tentity\n" + "".join(
        f"{w}\tthing {i}, other name\n" for i, w in enumerate(wnids)))
    for i, w in enumerate(wnids):
        for k in range(per_class):
            _write_picture(base / "train" / w / "images" / f"{w}_{k}.JPEG", i, (64, 64),
                           mode="L" if k == 0 and i == 0 else "RGB")
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
    val_labels, lines = [], []
    for k in range(n_val):
        label = (k * 2) % len(wnids)
        _write_picture(base / "val" / "images" / f"val_{k}.JPEG", label, (64, 64))
        lines.append(f"val_{k}.JPEG\t{wnids[label]}\t0\t0\t63\t63\n")
        val_labels.append(label)
    (base / "val" / "val_annotations.txt").write_text("".join(reversed(lines)))
    (base / "test" / "images").mkdir(parents=True)  # unlabelled; never read
    return val_labels


def make_image_folder(root: Path) -> dict[str, int]:
    """A nested folder of PNGs and JPEGs in two class folders, plus a corrupt 'x.png' and a
    'notes.txt'. Returns {relative path: label} of the good images (labels as in label_colour;
    classes 'cats' = 0 and 'dogs' = 1)."""
    images = {"cats/a.png": 0, "cats/deep/b.png": 0, "cats/c.JPG": 0, "dogs/d.PNG": 1,
              "dogs/e.webp": 1, "dogs/more/f.bmp": 1}
    for i, (rel, label) in enumerate(images.items()):
        _write_picture(root / rel, label, (20 + 4 * i, 16 + 2 * i))
    (root / "dogs" / "x.png").write_bytes(np.random.default_rng(0).bytes(300))
    (root / "dogs" / "notes.txt").write_text("not an image")
    return images


# --- the web server, as a page talks to it (test_serve, test_latent) ---------------------------------


class Client:
    """Requests to one server over loopback, with a timeout on every read."""

    def __init__(self, url: str, timeout: float = 60.0):
        u = urlparse(url)
        self.host, self.port, self.timeout = u.hostname, u.port, timeout

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def get(self, path: str) -> tuple[int, bytes, str]:
        status, body, headers = self.request("GET", path)
        return status, body, headers.get("content-type", "")

    def request(self, method: str, path: str, body: bytes = b"",
                headers: dict | None = None) -> tuple[int, bytes, dict]:
        """Any request (a Host among ``headers`` replaces the client's); the status, the whole
        body and the headers (lower-case names)."""
        conn = self.connect()
        try:
            conn.request(method, path, body=body or None, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.read(), {k.lower(): v for k, v in r.getheaders()}
        finally:
            conn.close()

    def json(self, path: str) -> dict:
        status, body, _ = self.get(path)
        assert status == 200, body
        return json.loads(body)

    def open_stream(self, body, raw: bytes | None = None):
        """POST /api/generate; the connection and the response (its body not read yet)."""
        conn = self.connect()
        data = raw if raw is not None else json.dumps(body).encode()
        conn.request("POST", "/api/generate", body=data,
                     headers={"content-type": "application/json"})
        return conn, conn.getresponse()

    @staticmethod
    def events(response):
        """The server-sent events of a response, as (kind, data), until its end."""
        kind = None
        while line := response.readline():
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                yield kind, json.loads(line[6:])

    def generate(self, body=None, raw: bytes | None = None) -> tuple[int, list | dict]:
        """(200, [events]) for a generation that ran, or (status, {"error": ...})."""
        conn, r = self.open_stream(body, raw)
        try:
            if r.status != 200:
                return r.status, json.loads(r.read())
            return 200, list(self.events(r))
        finally:
            conn.close()


def png_pixels(data: bytes | str) -> np.ndarray:
    if isinstance(data, str):  # a data URL
        data = base64.b64decode(data.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)))
