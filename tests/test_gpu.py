"""On a CUDA device: every preset trains 20 steps in bf16 and in fp16, compiled and not, then
samples and is evaluated; the training step never waits for the device. Reported as skipped on a
machine without CUDA (run them on the GPU)."""

from __future__ import annotations

import json

import pytest
import torch

from ddpm.presets import PRESETS

from conftest import ddpm_in_process, make_fake_cifar, make_image_folder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device: these run on the GPU")


def data_options(preset: str, tmp_path, fake_fashion) -> list:
    """Small data in each preset's format, written here (no downloads)."""
    if preset == "cifar10-ddpm":
        make_fake_cifar(tmp_path / "cifar", "cifar10", n_per_batch=8)  # 40 training images
        return ["--data-dir", tmp_path / "cifar", "--batch-size", 16]
    if preset == "flowers64":
        make_image_folder(tmp_path / "pics")
        return ["--dataset", "folder", "--data-dir", tmp_path / "pics", "--batch-size", 4]
    return ["--data-dir", fake_fashion, "--batch-size", 32]


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_trains_samples_and_evaluates_on_cuda(preset, precision, compile_, tmp_path,
                                                          fake_fashion):
    run = tmp_path / "run"
    r = ddpm_in_process("train", "--preset", preset, *data_options(preset, tmp_path, fake_fashion),
                        "--steps", 20, "--precision", precision,
                        "--compile" if compile_ else "--no-compile", "--device", "cuda",
                        "--sample-every", 0, "--fid-every", 0, "--checkpoint-every", 0,
                        "--out", run, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "trained 20 steps" in r.stdout and "torch.compile failed" not in r.stderr
    r = ddpm_in_process("sample", run, "--n", 8, "--sampler", "dpm++", "--steps", 5,
                        "--out", tmp_path / "grid.png", "--device", "cuda", "--no-progress")
    assert r.returncode == 0, r.stderr
    r = ddpm_in_process("eval", run, "--n", 128, "--sampler", "dpm++", "--steps", 5,
                        "--extractor", "fashion-mnist-cnn", "--json", "--device", "cuda",
                        "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["n"] == 128


def test_the_training_step_never_waits_for_the_gpu(fake_fashion):
    """With the data held on the GPU, steps run with CUDA's synchronisation check set to raise:
    no .item(), no host copy, no data-dependent shape anywhere in a step."""
    from ddpm import get_preset, with_overrides
    from ddpm.data import load_dataset
    from ddpm.runtime import make_accelerator
    from ddpm.train import build_training

    cuda = torch.device("cuda")
    config = with_overrides(get_preset("tiny"), {"train": {"device": "cuda", "precision": "bf16"},
                                                 "data": {"data_dir": str(fake_fashion)}})
    run = build_training(config, make_accelerator(cuda), cuda,
                         lambda: load_dataset("fashion-mnist", fake_fashion))
    assert run.stream.device.type == "cuda" and run.stream.data.images.is_cuda
    run.update(run.next_batches(), 1e-3)  # the first step allocates; then none may wait
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            stats = run.update(run.next_batches(), 1e-3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(stats.updated) and float(stats.loss) > 0
