"""`ddpm eval` end to end through the command line: FID tracked while training, FID and KID of a
run or of images from elsewhere, bits per dimension (--nll), and its bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ddpm.metrics import INCEPTION_FILE

from conftest import ddpm_in_process as cli

KEYS = {"fid", "kid", "n", "split", "extractor", "sampler", "steps", "seed", "floor_fid"}


def ddpm(*args, env_cache=None):
    import os

    env = dict(os.environ, DDPM_CACHE_DIR=str(env_cache)) if env_cache else None
    return subprocess.run([sys.executable, "-m", "ddpm", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def fid_run(tmp_path_factory, fake_fashion):
    root = tmp_path_factory.mktemp("eval")
    run = root / "run"
    r = ddpm("train", "--preset", "tiny", "--steps", 4, "--out", run, "--data-dir", fake_fashion,
             "--fid-every", 2, "--fid-n", 128, "--fid-steps", 2, "--no-progress",
             env_cache=root / "cache")
    assert r.returncode == 0, r.stderr
    return run, root / "cache", fake_fashion


def test_training_logs_fid_and_plots_loss_and_fid(fid_run):
    run, cache, _ = fid_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    fid = [r for r in records if "fid" in r]
    assert [r["step"] for r in fid] == [2, 4]
    for r in fid:
        assert r["fid"] > 0 and np.isfinite(r["kid"]) and r["floor_fid"] >= 0 and r["fid_n"] == 128
    with Image.open(run / "curves.png") as im:
        assert im.format == "PNG" and im.size[0] > 500
    assert any((cache / "reference").iterdir())  # the reference statistics were cached


def test_the_checkpoint_of_the_lowest_fid_is_kept(fid_run):
    from ddpm.checkpoint import list_checkpoints, load_checkpoint

    run = fid_run[0]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = min((r for r in records if "fid" in r), key=lambda r: r["fid"])
    state = load_checkpoint(run / "checkpoints/best.pt")
    assert (state["step"], state["fid"], state["best_fid"]) == (best["step"], best["fid"], best["fid"])
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-00000004.pt"]  # apart from the rotation
    assert load_checkpoint(run / "checkpoints/ckpt-00000004.pt")["best_fid"] == best["fid"]


def test_eval_checkpoint_json_line(fid_run, tmp_path):
    run, cache, _ = fid_run
    r = cli("eval", run, "--n", 128, "--sampler", "dpm++", "--steps", 3, "--json", "--no-progress",
             "--cache-dir", cache, "--save-samples", tmp_path / "s.npz")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert KEYS <= set(result)
    assert (result["n"], result["split"], result["extractor"]) == (128, "train", "fashion-mnist-cnn")
    assert (result["sampler"], result["steps"], result["seed"]) == ("dpm++", 3, 0)
    # the floor: as many held-out real images as there are (the fake test split has 64)
    assert result["fid"] > 0 and result["floor_fid"] >= 0 and result["floor_n"] == 64
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (128, 28, 28, 1)


def test_eval_table_and_images_from_elsewhere(fid_run, tmp_path):
    run, cache, data = fid_run
    r = cli("sample", run, "--n", 128, "--steps", 3, "--out", tmp_path / "pngs", "--no-progress")
    assert r.returncode == 0, r.stderr
    # The same images as a folder of PNGs and as an npz, as other tools write them.
    arr = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "pngs").glob("*.png"))])
    np.savez(tmp_path / "x.npz", arr_0=arr.reshape(128, 28, 28, -1)[..., :1])
    scores = []
    for source in (tmp_path / "pngs", tmp_path / "x.npz"):
        r = cli("eval", "--images", source, "--dataset", "fashion-mnist", "--data-dir", data,
                 "--split", "test", "--json", "--no-progress", "--cache-dir", cache)
        assert r.returncode == 0, r.stderr
        scores.append(json.loads(r.stdout))
    assert scores[0]["fid"] == pytest.approx(scores[1]["fid"], rel=1e-6)
    assert scores[0]["split"] == "test" and scores[0]["n"] == 128 and scores[0]["sampler"] is None
    assert scores[0]["seed"] == 0  # KID's subsets and the floor's images
    # an npz from another tool: its one array under another name, or one of several by --npz-key
    np.savez(tmp_path / "named.npz", samples=np.load(tmp_path / "x.npz")["arr_0"])
    np.savez(tmp_path / "two.npz", labels=np.zeros(20, np.int64),
             samples=np.load(tmp_path / "x.npz")["arr_0"])
    for source, key in ((tmp_path / "named.npz", ()), (tmp_path / "two.npz", ("--npz-key", "samples"))):
        r = cli("eval", "--images", source, *key, "--dataset", "fashion-mnist", "--data-dir", data,
                 "--split", "test", "--json", "--no-progress", "--cache-dir", cache)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["fid"] == pytest.approx(scores[0]["fid"], rel=1e-6)
    r = cli("eval", "--images", tmp_path / "x.npz", "--dataset", "fashion-mnist", "--data-dir", data,
             "--prc", "--no-progress", "--cache-dir", cache)
    assert r.returncode == 0, r.stderr
    assert "floor (real)" in r.stdout and "precision" in r.stdout and "FID" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["{run}", "--images", "{tmp}/x.npz"], "not both"),
    ([], "not both"),
    (["--images", "{tmp}/x.npz"], "--images needs --dataset"),
    (["--images", "{tmp}/none.npz", "--dataset", "fashion-mnist"], "neither a folder of images"),
    (["--images", "{tmp}/x.npz", "--dataset", "fashion-mnist", "--steps", "3"], "--steps only apply"),
    (["--images", "{tmp}/x.npz", "--dataset", "fashion-mnist", "--n", "99"], "holds only 4 images"),
    (["--images", "{tmp}/bad.npz", "--dataset", "fashion-mnist"], "must be uint8"),
    (["--images", "{tmp}/big.npz", "--dataset", "fashion-mnist", "--extractor", "inception-v3",
      "--data-dir", "{data}"], INCEPTION_FILE),
    (["--images", "{tmp}/x.npz", "--dataset", "fashion-mnist", "--extractor", "inception-v3",
      "--data-dir", "{data}"], "at least 2048 images"),
    (["{run}", "--steps", "500"], "more than the model's 100"),
    (["{run}", "--n", "1"], "expected a number >= 2"),
    (["{run}", "--save-samples", "{tmp}/x.npz"], "exists; choose a new file"),
    (["--images", "{tmp}/two.npz", "--dataset", "fashion-mnist"],
     "holds several arrays (a, b) and none named 'arr_0'; pick one with --npz-key NAME"),
    (["--images", "{tmp}/two.npz", "--dataset", "fashion-mnist", "--npz-key", "c"], "only a, b"),
    (["{run}", "--npz-key", "a"], "--npz-key names an array of --images"),
])
def test_eval_bad_input_is_one_line_exit_2(fid_run, tmp_path, monkeypatch, args, message):
    run, cache, data = fid_run
    np.savez(tmp_path / "x.npz", arr_0=np.zeros((4, 28, 28, 1), np.uint8))
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((4, 28, 28, 1), np.float32))
    np.savez(tmp_path / "two.npz", a=np.zeros((4, 28, 28, 1), np.uint8), b=np.zeros(3, np.uint8))
    np.savez(tmp_path / "big.npz", arr_0=np.zeros((2048, 28, 28, 1), np.uint8))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights there
    cmd = [a.replace("{run}", str(run)).replace("{tmp}", str(tmp_path)).replace("{data}", str(data))
           for a in args]
    r = cli("eval", *cmd, "--cache-dir", cache)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert message in lines[0]


# --- ddpm eval --nll: bits per dimension (conftest's learned_run) ---------------------------------


def test_eval_nll_reports_bits_per_dim_for_fixed_and_learned_variances(learned_run, world):
    results = {}
    for name, run, extra in (("learned", learned_run, []), ("posterior", world / "run", []),
                             ("beta", world / "run", ["--variance", "beta"])):
        r = cli("eval", run, "--nll", "--n", "8", "--nll-timesteps", "4", "--json", "--no-progress", *extra)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["n"] == 8 and out["split"] == "test" and out["variance"] == name
        assert out["bits_per_dim"] > 0 and out["bits_per_dim_se"] > 0 and out["timesteps"] == 4
        results[name] = out["bits_per_dim"]
    assert results["posterior"] != results["beta"]
    r = cli("eval", world / "run", "--nll", "--n", "4", "--nll-timesteps", "all", "--no-progress")
    assert r.returncode == 0 and "bits/dim" in r.stdout and "all terms" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--nll-timesteps", "0"], "--nll-timesteps"),
    (["--nll-timesteps", "5000"], "middle terms"),
    (["--sampler", "ddim"], "does not apply to --nll"),
    (["--n", "100000"], "holds"),
])
def test_bad_nll_requests_are_one_line_errors(world, args, message):
    r = cli("eval", world / "run", "--nll", *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
