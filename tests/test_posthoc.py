"""posthoc.py and `ddpm posthoc-ema`: power-function EMA with post-hoc reconstruction (Karras et
al. 2024) against closed forms; training that keeps its snapshots; the command, its refusals and
outputs that keep the run. (EDM's preconditioning, noise levels and weights: test_diffusion.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from ddpm.posthoc import (
    PowerEMA,
    gamma_from_std,
    list_snapshots,
    power_weights,
    reconstruct,
    solve_posthoc,
    std_from_gamma,
)

from conftest import assert_refused, ddpm_in_process, snapshot

# --- the power EMA's profile -----------------------------------------------------------------------


def test_gamma_and_sigma_rel_invert_each_other_and_match_the_papers_pairs():
    for std in (0.01, 0.05, 0.1, 0.2, 0.28):
        assert std_from_gamma(gamma_from_std(std)) == pytest.approx(std, rel=1e-12)
    # Karras et al. 2024, sec. 3.1: sigma_rel 0.05 is gamma 16.97, 0.10 is gamma 6.94
    assert gamma_from_std(0.05) == pytest.approx(16.97, abs=0.005)
    assert gamma_from_std(0.10) == pytest.approx(6.94, abs=0.005)
    # eq. 4 by numerical integration of the profile tau^gamma on [0, 1]
    gamma = gamma_from_std(0.1)
    tau = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    p = (gamma + 1) * tau ** gamma
    mean = torch.trapezoid(tau * p, tau)
    var = torch.trapezoid((tau - mean) ** 2 * p, tau)
    assert float(var.sqrt()) == pytest.approx(0.1, rel=1e-6)
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError, match="relative standard deviation"):
            gamma_from_std(bad)


def test_power_ema_is_the_closed_form_weighted_average_of_the_steps():
    """Unrolled, beta_n = (1 - 1/n)^(gamma + 1) gives weights (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1)."""
    torch.manual_seed(0)
    net = nn.Linear(3, 2).double()
    average = PowerEMA(net, 0.1)
    history = []
    for _ in range(40):
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn_like(p))
        history.append(torch.cat([p.flatten() for p in net.parameters()]).clone())
        average.update(net)
    w = power_weights(average.gamma, 40, 40)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    expected = (w[:, None] * torch.stack(history)).sum(0)
    got = torch.cat([p.flatten() for p in average.model.parameters()])
    # (the EMA rounds each update's weight to float32, as it does for the model's weights)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    # a skipped step (mask False) moves nothing and is not counted
    before = got.clone()
    average.update(nn.Linear(3, 2).double(), torch.tensor(False))
    assert average.num_updates == 40
    torch.testing.assert_close(torch.cat([p.flatten() for p in average.model.parameters()]), before)


def test_posthoc_solution_returns_a_snapshot_itself_and_approximates_other_lengths():
    g1, g2 = gamma_from_std(0.05), gamma_from_std(0.10)
    snapshots = [(g, s) for s in range(25, 401, 25) for g in (g1, g2)]
    x, error = solve_posthoc(snapshots, (g2, 400))
    assert error < 1e-10
    expected = torch.zeros(len(snapshots), dtype=torch.float64)
    expected[-1] = 1.0
    torch.testing.assert_close(x, expected, atol=1e-8, rtol=0)
    # another length at the last step: the combined profile is close to the wanted one ...
    target = (gamma_from_std(0.07), 400)
    x, error = solve_posthoc(snapshots, target)
    assert error < 0.05
    # ... and so are the weights it rebuilds, on a trajectory of random parameters
    theta = torch.randn(400, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    theta = theta.cumsum(0) / 20  # a random walk, as weights under SGD roughly are
    snaps = torch.stack([power_weights(g, s, 400) @ theta for g, s in snapshots])
    rebuilt = x @ snaps
    direct = power_weights(*target, 400) @ theta
    spread = (snaps[-1] - snaps[-2]).abs().max()  # how far apart the two kept lengths are
    assert (rebuilt - direct).abs().max() < 0.1 * spread
    # a length the snapshots cannot make (far longer than both) is reported as a poor fit
    _, far = solve_posthoc([(g1, 400), (g2, 400)], (gamma_from_std(0.28), 400))
    assert far > 0.1


# --- EDM's noise levels and weights ----------------------------------------------------------------


# --- EDM's preconditioning (Karras et al. 2022, sec. 5 and Table 1) ---------------------------


# --- training, resuming and the command ----------------------------------------------------------


@pytest.fixture(scope="module")
def posthoc_run(tmp_path_factory, fake_fashion):
    from conftest import ddpm_in_process as cli
    out = tmp_path_factory.mktemp("posthoc") / "run"
    r = cli("train", "--preset", "tiny", "--data-dir", fake_fashion, "--steps", "6",
            "--posthoc-ema", "0.05,0.2", "--ema-snapshot-every", "2", "--timestep-sampling",
            "log-normal", "--loss-weighting", "edm", "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    return out


def test_training_keeps_snapshots_that_rebuild_its_averages_and_resume_exactly(posthoc_run, fake_fashion,
                                                                               tmp_path):
    from ddpm.checkpoint import load_checkpoint

    from conftest import ddpm_in_process as cli
    assert [s for s, _ in list_snapshots(posthoc_run)] == [2, 4, 6]
    state = load_checkpoint(posthoc_run / "checkpoints" / "ckpt-00000006.pt")
    assert [p["std"] for p in state["posthoc_ema"]] == [0.05, 0.2]
    # a kept length at the last step is rebuilt as itself
    step, used, [(weights, error)] = reconstruct(posthoc_run, [0.2])
    assert (step, used) == (6, 3)
    assert error < 1e-9
    for name, value in state["posthoc_ema"][1]["weights"].items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6)
    # resuming from step 4 writes the snapshot of step 6 the uninterrupted run wrote
    partial = tmp_path / "partial"
    r = cli("train", "--preset", "tiny", "--data-dir", fake_fashion, "--steps", "4",
            "--posthoc-ema", "0.05,0.2", "--ema-snapshot-every", "2", "--timestep-sampling",
            "log-normal", "--loss-weighting", "edm", "--out", partial, "--no-progress")
    assert r.returncode == 0, r.stderr
    r = cli("train", "--resume", partial, "--steps", "6", "--no-progress")
    assert r.returncode == 0, r.stderr
    a, b = (torch.load(run / "ema" / "snapshot-00000006.pt", weights_only=True)
            for run in (posthoc_run, partial))
    for pa, pb in zip(a["profiles"], b["profiles"], strict=True):
        assert pa["num_updates"] == pb["num_updates"] == 6
        for name in pa["weights"]:
            assert torch.equal(pa["weights"][name], pb["weights"][name]), name


def test_posthoc_command_scores_lengths_and_writes_the_best_as_a_sampleable_checkpoint(posthoc_run, tmp_path):
    import json

    from conftest import ddpm_in_process as cli
    out = tmp_path / "best.pt"
    r = cli("posthoc-ema", posthoc_run, "--std", "0.05,0.1", "--n", "128", "--steps", "2",
            "--batch-size", "64", "--workers", "2", "--out", out, "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [row["std"] for row in rows] == [0.05, 0.1]
    assert rows[0]["fid"] != rows[1]["fid"], "each length's workers sampled that length's weights"
    best = min(rows, key=lambda row: row["fid"])
    state = torch.load(out, weights_only=True)
    assert state["ema_rebuilt"]["std"] == best["std"] and state["ema_rebuilt"]["step"] == 6
    # the power EMAs keep the one shape training writes, so the file reads like any checkpoint
    assert [p["std"] for p in state["posthoc_ema"]] == [0.05, 0.2]
    _, _, [(weights, _)] = reconstruct(posthoc_run, [best["std"]])
    for name, value in weights.items():
        assert torch.equal(state["ema"][name], value)
    r = cli("sample", out, "--n", "2", "--steps", "2", "--out", tmp_path / "g.png", "--no-progress")
    assert r.returncode == 0, r.stderr
    # one length is written without scoring, at an earlier step on request
    r = cli("posthoc-ema", posthoc_run, "--std", "0.15", "--step", "4", "--out", tmp_path / "one.pt")
    assert r.returncode == 0, r.stderr
    assert torch.load(tmp_path / "one.pt", weights_only=True)["ema_rebuilt"]["step"] == 4


def test_posthoc_command_refuses_bad_requests_in_one_line(posthoc_run, world, tmp_path):
    from conftest import ddpm_in_process as cli
    existing = tmp_path / "taken.pt"
    existing.write_bytes(b"keep me")
    cases = [
        ((world / "run", "--std", "0.1"), "no EMA snapshots"),
        ((posthoc_run, "--std", "0.5"), "relative standard deviation"),
        ((posthoc_run, "--std", "0.1", "--out", existing), "exists"),
        ((posthoc_run, "--std", "0.1", "--step", "9", "--out", tmp_path / "x.pt"), "outside"),
        ((posthoc_run, "--std", "0.1,0.2", "--n", "64", "--out", tmp_path / "y.pt"), "128"),
    ]
    for args, message in cases:
        r = cli("posthoc-ema", *args, "--no-progress")
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert existing.read_bytes() == b"keep me"
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "y.pt").exists()


# --- EDM's preconditioning in training, sampling and export -------------------------------------


# --- the EDM formulation as one option ----------------------------------------------------------


# --- posthoc-ema: a step with a snapshot, and outputs that keep the run ---------------------------


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory, fake_fashion) -> Path:
    """A tiny run with EMA snapshots at steps 5, 10, 15 and 20 and checkpoints at 10 and 20."""
    run = tmp_path_factory.mktemp("snapshots") / "run"
    r = ddpm_in_process("train", "--preset", "tiny", "--data-dir", fake_fashion, "--steps", 20,
                        "--posthoc-ema", "0.05,0.1", "--ema-snapshot-every", 5,
                        "--checkpoint-every", 10, "--sample-every", 0, "--no-progress",
                        "--out", run)
    assert r.returncode == 0, r.stderr
    return run


@pytest.mark.parametrize("args, message, absent", [
    ("--step 7", "step 7 has no EMA snapshot, and an average is rebuilt at a step that has one; "
                 "choose one of steps 5, 10, 15, 20", ()),
    (f"--step {'9' * 400}", "(400 characters) is outside the run's snapshots", ("9" * 100,)),
    ("--out {run}/checkpoints/ckpt-00000020.pt --force",
     "--out {run}/checkpoints/ckpt-00000020.pt is a file of the run", ()),
    ("--out {run}/ema/snapshot-00000010.pt --force", "is a file of the run", ()),
    ("--out {run}/config.json --force", "is a file of the run", ()),
    ("--out {run} --force", "--out {run} is a folder; give a file name", ()),
    ("--out {run}/config.json/x.pt", "which is a file; choose a folder", ()),
], ids=["step without a snapshot", "huge step", "checkpoint", "snapshot", "config", "the run",
        "under a file"])
def test_posthoc_ema_refuses_a_step_without_a_snapshot_and_outputs_over_the_run(
        snapshot_run, args, message, absent):
    before = snapshot(snapshot_run)
    r = ddpm_in_process("posthoc-ema", snapshot_run, "--std", "0.1",
                        *args.format(run=snapshot_run).split(), "--no-progress")
    assert_refused(r, message.format(run=snapshot_run), absent)
    assert snapshot(snapshot_run) == before


def test_posthoc_ema_refuses_an_empty_out_and_snapshots_not_of_the_run(snapshot_run, tmp_path):
    before = snapshot(snapshot_run)
    r = ddpm_in_process("posthoc-ema", snapshot_run, "--std", "0.1", "--out", "")
    assert_refused(r, "--out is empty")
    assert snapshot(snapshot_run) == before
    run = tmp_path / "run"
    shutil.copytree(snapshot_run, run)
    torch.save({"step": 25, "note": "not averages"}, run / "ema/snapshot-00000025.pt")
    before = snapshot(run)
    r = ddpm_in_process("posthoc-ema", run, "--std", "0.1", "--out", tmp_path / "p.pt")
    assert_refused(r, "snapshot-00000025.pt is a torch file but not an EMA snapshot")
    assert snapshot(run) == before and not (tmp_path / "p.pt").exists()
    last = torch.load(run / "ema/snapshot-00000020.pt", weights_only=True)
    for profile in last["profiles"]:  # the averages of a wider model, copied in from its run
        profile["weights"] = {k: torch.zeros(v.numel() + 1) for k, v in profile["weights"].items()}
    torch.save(last, run / "ema/snapshot-00000025.pt")
    before = snapshot(run)
    r = ddpm_in_process("posthoc-ema", run, "--std", "0.1", "--out", tmp_path / "p.pt")
    assert_refused(r, "snapshot-00000005.pt and snapshot-00000025.pt hold averages of different "
                      "models; keep only this run's snapshots")
    assert snapshot(run) == before and not (tmp_path / "p.pt").exists()
