"""checkpoint.py and rundir.py: what a checkpoint holds, atomic writes, loading that falls back
and runs no code; what a crash or a careless edit leaves in a run folder, and side outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ddpm import train
from ddpm.checkpoint import (
    CheckpointError,
    atomic_save,
    list_checkpoints,
    load_checkpoint,
    load_run_or_file,
    save_checkpoint,
)
from ddpm.config import RunConfig, resolve
from ddpm.data import load_dataset

from conftest import cli, ddpm_in_process, tiny_config

# --- what a checkpoint holds, and TrainState, its one layout --------------------------------------


def test_checkpoint_holds_the_state_and_keeps_the_newest(tmp_path, fake_fashion):
    train(tiny_config(fake_fashion, steps=6, checkpoint_every=2, keep_checkpoints=2),
          tmp_path / "run", progress=False, final_grid=False)
    names = [p.name for p in list_checkpoints(tmp_path / "run")]
    assert names == ["ckpt-00000006.pt", "ckpt-00000004.pt"]
    state = load_checkpoint(tmp_path / "run/checkpoints/ckpt-00000006.pt")
    assert state["step"] == 6 and state["config"]["train"]["steps"] == 6
    assert state["ema_state"] == {"num_updates": 6} and state["data_stream"]["pos"] == 6 * 16 % 256
    assert state["scaler"] is None and state["elapsed_s"] > 0 and state["best_fid"] == float("inf")
    # the weights a checkpoint names are the ones that sample: its EMA copy differs from the model
    assert any(not torch.equal(state["model"][k], state["ema"][k]) for k in state["model"])


def test_train_state_round_trip(tmp_path, fake_fashion):
    """TrainState.load_state_dict puts a checkpoint back into fresh objects, whose state_dict is
    the checkpoint again: the layout is written in one place and read back whole."""
    from ddpm.runtime import make_accelerator
    from ddpm.train import build_training

    config = resolve(tiny_config(fake_fashion, steps=3))
    train(config, tmp_path / "run", progress=False, final_grid=False)
    path, saved = load_run_or_file(tmp_path / "run")
    cpu = torch.device("cpu")
    fresh = build_training(config, make_accelerator(cpu), cpu,
                           lambda: load_dataset("fashion-mnist", fake_fashion))
    state = fresh.state()
    state.load_state_dict(saved, path)
    again = state.state_dict()
    assert again.keys() == saved.keys() - {"format_version"}
    for key in ("model", "ema"):
        assert all(torch.equal(again[key][k], saved[key][k]) for k in saved[key])
    for key in ("step", "config", "ema_state", "classes", "skipped_steps", "best_fid", "num_params"):
        assert again[key] == saved[key], key
    assert torch.equal(again["data_stream"]["perm"], saved["data_stream"]["perm"])
    assert all(torch.equal(again["rng"][k], saved["rng"][k]) for k in saved["rng"])
    assert again["optimizer"]["state"][0]["step"] == saved["optimizer"]["state"][0]["step"] == 3
    assert again["elapsed_s"] >= saved["elapsed_s"]


# --- atomic writes, and loading that falls back ---------------------------------------------------


def test_interrupted_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"format_version": 1, "config": {}, "value": torch.arange(3)}, path)

    def torch_save_that_dies(obj, f):
        f.write(b"PK\x03\x04 half a zip file")  # some bytes reach the disk, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr("ddpm.checkpoint.torch.save", torch_save_that_dies)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"value": torch.arange(5)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["value"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"], "temporary file left behind"


def test_newest_unloadable_checkpoint_falls_back(tmp_path):
    save_checkpoint({"step": 1, "config": {}}, tmp_path)
    newest = save_checkpoint({"step": 2, "config": {}}, tmp_path)
    newest.write_bytes(newest.read_bytes()[:50])  # e.g. a disk that lost the file's tail
    with pytest.warns(UserWarning, match=r"ckpt-00000002\.pt does not load .* using the newest "
                                         r"checkpoint that does, .*ckpt-00000001\.pt"):
        path, state = load_run_or_file(tmp_path)
    assert state["step"] == 1 and path.name == "ckpt-00000001.pt"
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(newest)


# --- crafted files --------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this calls open(marker, 'w'): a stand-in for any code an attacker could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_crafted_to_run_code_does_not_run_it(world, tmp_path):
    marker = tmp_path / "the-code-ran"
    state = load_checkpoint(world / "run/checkpoints/ckpt-00000002.pt")
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    for target in (tmp_path / "evil.pt", *list_checkpoints(run)):
        torch.save({**state, "payload": _RunsCode(marker)}, target)
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the file works: unpickled, it runs
    assert marker.exists()
    marker.unlink()
    for command in (("sample", tmp_path / "evil.pt", "--out", tmp_path / "x.png"),
                    ("eval", tmp_path / "evil.pt", "--n", 4),
                    ("train", "--resume", run, "--steps", 4)):
        code, _, err = cli(*command)
        assert code == 2, err
        assert "not a readable ddpm checkpoint" in err or "no loadable checkpoint" in err, err
        assert not marker.exists(), f"ddpm {command[0]} ran the file's code"
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


# --- the run folder: what a crash or a careless edit leaves in it, and side outputs ---------------


def test_a_metrics_line_cut_off_mid_write_is_dropped_on_resume(run_copy, tmp_path):
    text = (run_copy / "metrics.jsonl").read_text()
    (run_copy / "metrics.jsonl").write_text(text[: len(text) - 20])  # a write cut short
    r = ddpm_in_process("viz", "curves", run_copy, "--out", tmp_path / "c.png")
    assert r.returncode == 0 and "warning: skipped line 2 of" in r.stderr, r.stderr
    r = ddpm_in_process("train", "--resume", run_copy, "--steps", 4, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "warning: dropped line 2 of" in r.stderr and "cut off by an interrupted write" in r.stderr
    records = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == [1, 4]  # the torn line of step 2 is gone


@pytest.mark.parametrize("damage", ["cut", "missing", "other"])
def test_a_damaged_config_json_is_written_again_from_the_checkpoint(run_copy, damage):
    path = run_copy / "config.json"
    whole = path.read_text()
    if damage == "cut":
        path.write_text(whole[: len(whole) // 2])
    elif damage == "missing":
        path.unlink()
    else:
        edited = json.loads(whole)
        edited["model"]["base_channels"] = 64
        path.write_text(json.dumps(edited))
    r = ddpm_in_process("train", "--resume", run_copy, "--steps", 3, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "config.json was not the run's config" in r.stderr and "wrote it again from" in r.stderr
    saved = RunConfig.from_dict(load_checkpoint(run_copy / "checkpoints/ckpt-00000002.pt")["config"])
    assert RunConfig.from_dict(json.loads(path.read_text())) == saved
    assert "resuming" in r.stdout and "with the config saved in it" in r.stdout
    assert load_run_or_file(run_copy)[1]["step"] == 3


def test_a_side_output_that_cannot_be_written_warns_once_and_training_goes_on(capsys):
    from ddpm.rundir import SideOutputs

    def full(*_):
        raise OSError(28, "No space left on device")

    outputs = SideOutputs()
    assert outputs.best_effort("preview grid", full) is None
    assert outputs.best_effort("preview grid", full) is None
    assert outputs.best_effort("progress animation", lambda: "written") == "written"
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["warning: could not write the preview grid (No space left on device); "
                     "training goes on"]
