"""Issue 21's levers: power-function EMA with post-hoc reconstruction (Karras et al. 2024), and
EDM's log-normal noise levels and loss weights (Karras et al. 2022), against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ddpm.diffusion import (draw_t_eps, edm_weight, min_snr_weight, timestep_probs,
                            training_loss, v_from_eps_x0)
from ddpm.posthoc import (PowerEMA, gamma_from_std, list_snapshots, power_weights, reconstruct,
                          solve_posthoc, std_from_gamma)
from ddpm.schedules import make_schedule

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


def test_log_normal_timestep_law_is_the_normal_mass_of_each_steps_log_sigma_bin():
    schedule = make_schedule("linear", 1000)
    probs = timestep_probs(schedule, "log-normal", log_sigma_mean=-1.2, log_sigma_std=1.2)
    assert probs.dtype == torch.float64 and probs.shape == (1000,)
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-12) and (probs >= 0).all()
    ab = schedule.alphas_cumprod.tolist()
    log_sigma = [0.5 * math.log((1 - a) / a) for a in ab]
    cdf = lambda x: 0.5 * (1 + math.erf((x + 1.2) / (1.2 * math.sqrt(2))))  # noqa: E731
    for t in (0, 1, 57, 300, 999):
        lo = cdf((log_sigma[t - 1] + log_sigma[t]) / 2) if t > 0 else 0.0
        hi = cdf((log_sigma[t] + log_sigma[t + 1]) / 2) if t < 999 else 1.0
        assert float(probs[t]) == pytest.approx(hi - lo, rel=1e-9, abs=1e-15)
    # the draws follow it: the share below the median step within 4 standard errors
    gen = torch.Generator().manual_seed(0)
    t, _ = draw_t_eps(schedule, (20_000, 1, 2, 2), gen, probs)
    median = int(torch.searchsorted(probs.cumsum(0), torch.tensor(0.5, dtype=torch.float64)))
    share = float((t <= median).double().mean())
    assert abs(share - float(probs[:median + 1].sum())) < 4 * math.sqrt(0.25 / 20_000)
    assert timestep_probs(schedule, "uniform") is None
    # uniform draws are Algorithm 1's, as before (old runs reproduce)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    t1, e1 = draw_t_eps(schedule, (8, 1, 2, 2), g1)
    t2 = torch.randint(0, 1000, (8,), generator=g2)
    assert torch.equal(t1, t2) and torch.equal(e1, torch.randn(8, 1, 2, 2, generator=g2))
    with pytest.raises(ValueError, match="timestep sampling"):
        timestep_probs(schedule, "beta")


def test_edm_weight_is_lambda_sigma_on_x0_and_uniform_on_v_for_unit_data():
    snr = torch.tensor([0.01, 0.3, 1.0, 7.0, 400.0], dtype=torch.float64)
    sigma = snr.rsqrt()
    for sigma_data in (0.5, 1.0):
        lam = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2  # Karras et al. Table 1
        torch.testing.assert_close(edm_weight(snr, sigma_data, "x0"), lam)
        torch.testing.assert_close(edm_weight(snr, sigma_data, "eps"), lam / snr)
        torch.testing.assert_close(edm_weight(snr, sigma_data, "v"), lam / (snr + 1))
    torch.testing.assert_close(edm_weight(snr, 1.0, "v"), torch.ones_like(snr))
    # the conversion between targets is the one min-SNR uses
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "v") * (snr + 1), snr.clamp(max=5.0))


def test_training_loss_with_edm_weights_weights_each_sample_by_lambda():
    schedule = make_schedule("linear", 100)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 4, 4, generator=gen) * 2 - 1
    t = torch.tensor([0, 5, 20, 50, 80, 99])
    eps = torch.randn(6, 1, 4, 4, generator=gen)
    net = lambda x, t: 0.3 * x  # noqa: E731
    ab = schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    per_sample = ((0.3 * x_t - v_from_eps_x0(eps, x0, ab)) ** 2).flatten(1).mean(1)
    snr = (ab / (1 - ab)).flatten().double()
    expected = (per_sample.double() * edm_weight(snr, 0.5, "v")).mean()
    got = training_loss(net, schedule, x0, t=t, eps=eps, prediction_type="v", weighting="edm",
                        sigma_data=0.5)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


def test_log_normal_sampling_with_learned_variances_is_refused():
    from ddpm.config import RunConfig, with_overrides
    config = with_overrides(RunConfig(), {"model": {"learn_variance": True},
                                          "diffusion": {"timestep_sampling": "log-normal"}})
    with pytest.raises(ValueError, match="uniform with --learn-variance"):
        config.validate()


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


def test_training_keeps_snapshots_that_rebuild_its_averages_and_resume_exactly(posthoc_run, fake_fashion, tmp_path):
    from conftest import ddpm_in_process as cli
    from ddpm.checkpoint import load_checkpoint
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
    for pa, pb in zip(a["profiles"], b["profiles"]):
        assert pa["num_updates"] == pb["num_updates"] == 6
        for name in pa["weights"]:
            assert torch.equal(pa["weights"][name], pb["weights"][name]), name


def test_posthoc_command_scores_lengths_and_writes_the_best_as_a_sampleable_checkpoint(posthoc_run, tmp_path):
    import json
    from conftest import ddpm_in_process as cli
    out = tmp_path / "best.pt"
    r = cli("posthoc-ema", posthoc_run, "--std", "0.05,0.1", "--n", "128", "--steps", "2",
            "--out", out, "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [row["std"] for row in rows] == [0.05, 0.1]
    best = min(rows, key=lambda row: row["fid"])
    state = torch.load(out, weights_only=True)
    assert state["posthoc_ema"]["std"] == best["std"] and state["posthoc_ema"]["step"] == 6
    _, _, [(weights, _)] = reconstruct(posthoc_run, [best["std"]])
    for name, value in weights.items():
        assert torch.equal(state["ema"][name], value)
    r = cli("sample", out, "--n", "2", "--steps", "2", "--out", tmp_path / "g.png", "--no-progress")
    assert r.returncode == 0, r.stderr
    # one length is written without scoring, at an earlier step on request
    r = cli("posthoc-ema", posthoc_run, "--std", "0.15", "--step", "4", "--out", tmp_path / "one.pt")
    assert r.returncode == 0, r.stderr
    assert torch.load(tmp_path / "one.pt", weights_only=True)["posthoc_ema"]["step"] == 4


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
