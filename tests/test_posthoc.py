"""Power-function EMA with post-hoc reconstruction (Karras et al. 2024), and
EDM's preconditioning, log-normal noise levels and loss weights (Karras et al. 2022), against
closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ddpm.diffusion import (
    draw_t_eps,
    edm_weight,
    eps_x0_from_prediction,
    min_snr_weight,
    precondition,
    timestep_probs,
    training_loss,
    v_from_eps_x0,
)
from ddpm.posthoc import (
    PowerEMA,
    gamma_from_std,
    list_snapshots,
    power_weights,
    reconstruct,
    solve_posthoc,
    std_from_gamma,
)
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


# --- EDM's preconditioning (Karras et al. 2022, sec. 5 and Table 1) ---------------------------


def _table_1(ab: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """c_in, c_skip, c_out at sigma = sqrt((1 - ab) / ab), written as the paper writes them."""
    sigma = ((1 - ab) / ab).sqrt()
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma ** 2 + sigma_data ** 2).sqrt()
    return c_in, c_skip, c_out


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_edm_preconditioning_is_table_1_in_edms_variables(prediction_type):
    schedule = make_schedule("linear", 1000)
    gen = torch.Generator().manual_seed(1)
    x_t = torch.randn(5, 2, 3, 3, generator=gen, dtype=torch.float64)
    seen = {}

    def network(x, t):
        seen["input"] = x
        return torch.sin(3 * x) + 0.1 * t.view(-1, 1, 1, 1)

    for t, ab in ((torch.tensor([0, 10, 300, 700, 999]), None),
                  (torch.tensor([0.0, 10.5, 299.25, 700.75, 998.5], dtype=torch.float64), None)):
        ab = (schedule.alpha_bar_at(t) if t.is_floating_point() else schedule.alphas_cumprod[t])
        ab = ab.view(-1, 1, 1, 1)
        c_in, c_skip, c_out = _table_1(ab, 0.5)
        x = x_t / ab.sqrt()  # EDM's x = x0 + sigma eps
        expected_x0 = c_skip * x + c_out * network(c_in * x, t)
        prediction = precondition(network, schedule, "edm", sigma_data=0.5,
                                  prediction_type=prediction_type)(x_t, t)
        torch.testing.assert_close(seen["input"], c_in * x)
        _, x0 = eps_x0_from_prediction(prediction, x_t, ab, prediction_type)
        torch.testing.assert_close(x0, expected_x0)


def test_edm_preconditioning_denoises_gaussian_data_optimally_with_a_zero_network():
    """For x0 ~ N(0, sigma_data^2), c_skip x alone is E[x0 | x_t] (F* = 0), and both the
    network's input c_in x and its ideal output (x0 - c_skip x) / c_out have unit variance."""
    schedule = make_schedule("linear", 1000)
    sigma_data = 0.6
    gen = torch.Generator().manual_seed(2)
    t = torch.tensor([1, 50, 250, 500, 999]).repeat_interleave(100_000)
    ab = schedule.alphas_cumprod[t].view(-1, 1)
    x0 = sigma_data * torch.randn(len(t), 1, generator=gen, dtype=torch.float64)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn(len(t), 1, generator=gen, dtype=torch.float64)
    denoised = precondition(lambda x, t: torch.zeros_like(x), schedule, "edm", sigma_data=sigma_data,
                            prediction_type="x0")(x_t, t)
    posterior_mean = ab.sqrt() * sigma_data ** 2 / (ab * sigma_data ** 2 + 1 - ab) * x_t
    torch.testing.assert_close(denoised, posterior_mean)
    c_in, c_skip, c_out = _table_1(ab, sigma_data)
    x = x_t / ab.sqrt()
    for j in range(5):
        rows = slice(j * 100_000, (j + 1) * 100_000)
        assert float((c_in * x)[rows].var()) == pytest.approx(1.0, abs=0.02)
        assert float(((x0 - c_skip * x) / c_out)[rows].var()) == pytest.approx(1.0, abs=0.02)


def test_edm_preconditioning_at_unit_data_std_is_v_prediction():
    schedule = make_schedule("cosine", 100)
    x_t = torch.randn(4, 1, 5, 5, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 33, 66, 99])
    network = lambda x, t: x ** 2 - 0.5  # noqa: E731
    out = precondition(network, schedule, "edm", sigma_data=1.0, prediction_type="v")(x_t, t)
    torch.testing.assert_close(out, -network(x_t, t))  # c_in = 1, v = -F
    assert precondition(network, schedule, "none", sigma_data=0.5, prediction_type="v") is network


def test_edm_preconditioning_keeps_learned_variances_and_is_finite_at_zero_terminal_snr():
    schedule = make_schedule("linear", 100, zero_terminal_snr=True)
    assert float(schedule.alphas_cumprod[-1]) == 0.0
    x_t = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0, 99])
    network = lambda x, t: torch.cat([x, torch.full_like(x, 0.25)], dim=1)  # noqa: E731
    out = precondition(network, schedule, "edm", sigma_data=0.5, prediction_type="v")(x_t, t)
    assert out.shape == (2, 2, 4, 4) and bool(torch.isfinite(out).all())
    assert bool((out[:, 1:] == 0.25).all())  # the interpolation passes unchanged
    # at alpha_bar = 0 the input is x_t itself and x0 = sigma_data F
    _, x0 = eps_x0_from_prediction(out[1:, :1], x_t[1:], 0.0, "v")
    torch.testing.assert_close(x0, 0.5 * x_t[1:])


def test_edm_weights_through_the_preconditioning_are_a_uniform_loss_on_f():
    """EDM's lambda(sigma) = 1 / c_out^2 on the x0-error: the loss through the preconditioned
    network is the plain mean of (F - F_target)^2, F_target = (x0 - c_skip x) / c_out."""
    schedule = make_schedule("linear", 1000)
    gen = torch.Generator().manual_seed(5)
    x0 = torch.rand(8, 1, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(8, 1, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 3, 40, 200, 450, 600, 850, 999])
    network = lambda x, t: 0.2 * x - 0.1  # noqa: E731
    ab = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    c_in, c_skip, c_out = _table_1(ab, 0.5)
    x = x0 + ((1 - ab) / ab).sqrt() * eps
    f_target = (x0 - c_skip * x) / c_out
    expected = ((network(c_in * x, t) - f_target) ** 2).mean()
    for prediction_type in ("eps", "x0", "v"):
        denoiser = precondition(network, schedule, "edm", sigma_data=0.5,
                                prediction_type=prediction_type)
        got = training_loss(denoiser, schedule, x0, t=t, eps=eps, prediction_type=prediction_type,
                            weighting="edm", sigma_data=0.5)
        assert float(got) == pytest.approx(float(expected), rel=1e-4), prediction_type


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
            "--out", out, "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [row["std"] for row in rows] == [0.05, 0.1]
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


def test_training_step_and_pipeline_call_the_network_through_the_preconditioning(fake_fashion, tmp_path):
    import dataclasses

    from ddpm import get_preset
    from ddpm.models import UNet
    from ddpm.pipeline import load_pipeline
    from ddpm.runtime import make_accelerator
    from ddpm.step import train_step

    from conftest import ddpm_in_process as cli

    # the training step's loss is the preconditioned network's (lr 0: the weights stay)
    config = get_preset("tiny")
    config = dataclasses.replace(config, diffusion=dataclasses.replace(
        config.diffusion, prediction_type="v", preconditioning="edm", sigma_data=0.5))
    model, schedule = UNet(config.model), make_schedule("linear", 100)
    x0 = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(6)) * 2 - 1
    losses = {}
    for name, c in (("edm", config), ("none", dataclasses.replace(config, diffusion=dataclasses.replace(
            config.diffusion, preconditioning="none")))):
        losses[name] = float(train_step(
            model, schedule, torch.optim.AdamW(model.parameters(), lr=0.0),
            [(x0, torch.zeros(4, dtype=torch.long))], accelerator=make_accelerator(torch.device("cpu")),
            generator=torch.Generator().manual_seed(7), config=c, device=torch.device("cpu"),
            lr=0.0).loss)
    t, eps = draw_t_eps(schedule, x0.shape, torch.Generator().manual_seed(7))
    expected = training_loss(precondition(lambda x, t: model(x, t, None), schedule, "edm",
                                          sigma_data=0.5, prediction_type="v"),
                             schedule, x0, t=t, eps=eps, prediction_type="v",
                             weighting=config.diffusion.loss_weighting)
    assert losses["edm"] == pytest.approx(float(expected.detach()), rel=1e-5)
    assert abs(losses["edm"] - losses["none"]) > 1e-3

    # a run trained with it samples through it: Table 1 around the loaded weights
    run = tmp_path / "edm"
    r = cli("train", "--preset", "tiny", "--data-dir", fake_fashion, "--steps", "2",
            "--preconditioning", "edm", "--sigma-data", "0.5", "--prediction-type", "v",
            "--out", run, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "predicts v through EDM's preconditioning (sigma_data 0.5)" in r.stdout + r.stderr
    pipe = load_pipeline(run)
    assert pipe.config.diffusion.preconditioning == "edm"
    x_t = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(8))
    steps = torch.tensor([5, 50, 99])
    ab = pipe.schedule.alphas_cumprod[steps].float().view(-1, 1, 1, 1)
    c_in, c_skip, c_out = _table_1(ab, 0.5)
    with torch.inference_mode():
        x0_expected = c_skip * x_t / ab.sqrt() + c_out * pipe.model(c_in * x_t / ab.sqrt(), steps, None)
        _, x0_got = eps_x0_from_prediction(pipe._predict(x_t, steps, None), x_t, ab, "v")
    torch.testing.assert_close(x0_got, x0_expected, rtol=1e-4, atol=1e-5)
    r = cli("sample", run, "--n", "2", "--sampler", "dpm++", "--steps", "3", "--out",
            tmp_path / "s.png", "--no-progress")
    assert r.returncode == 0 and (tmp_path / "s.png").exists(), r.stderr

    # diffusers has no such step: the export says so and writes nothing
    pytest.importorskip("diffusers")
    r = cli("export", run, tmp_path / "hf", "--format", "diffusers")
    assert r.returncode == 2 and "--preconditioning edm" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "hf").exists()


# --- the EDM formulation as one option ----------------------------------------------------------


def _dry_run(*options):
    import json

    from conftest import ddpm_in_process as cli

    r = cli("train", "--preset", "tiny", "--dry-run", *options)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["config"]


def test_formulation_edm_lays_its_settings_over_the_preset_and_the_options_win(tmp_path):
    from ddpm.config import FORMULATIONS

    plain, edm = _dry_run(), _dry_run("--formulation", "edm")
    changed = {(s, k): v for s in edm for k, v in edm[s].items() if plain[s][k] != v}
    # exactly Karras et al.'s pieces, each its own setting, and nothing else of the preset
    assert changed == {("diffusion", "preconditioning"): "edm",
                       ("diffusion", "timestep_sampling"): "log-normal",
                       ("diffusion", "loss_weighting"): "edm",
                       ("sample", "sampler"): "heun", ("sample", "num_sample_steps"): 18,
                       ("sample", "spacing"): "karras"}
    assert changed == {(s, k): v for s, d in FORMULATIONS["edm"].items() for k, v in d.items()}
    # an option given, and a --config file, override the formulation's value; the rest stays
    given = _dry_run("--formulation", "edm", "--loss-weighting", "min-snr", "--sigma-data", "0.8")
    assert given["diffusion"]["loss_weighting"] == "min-snr"
    assert given["diffusion"]["preconditioning"] == "edm" and given["diffusion"]["sigma_data"] == 0.8
    file = tmp_path / "c.json"
    file.write_text('{"diffusion": {"timestep_sampling": "uniform"}}')
    from_file = _dry_run("--formulation", "edm", "--config", file)
    assert from_file["diffusion"]["timestep_sampling"] == "uniform"
    assert from_file["sample"]["sampler"] == "heun"


def test_a_run_of_the_edm_formulation_trains_samples_and_resumes(fake_fashion, tmp_path):
    from ddpm.pipeline import load_pipeline

    from conftest import ddpm_in_process as cli

    run = tmp_path / "edm"
    r = cli("train", "--preset", "tiny", "--formulation", "edm", "--sigma-data", "0.8",
            "--data-dir", fake_fashion, "--steps", "2", "--out", run, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "preset: tiny, formulation edm" in r.stdout
    assert "through EDM's preconditioning (sigma_data 0.8)" in r.stdout and "EDM weights" in r.stdout
    config = load_pipeline(run).config
    assert (config.diffusion.preconditioning, config.diffusion.timestep_sampling,
            config.diffusion.loss_weighting) == ("edm", "log-normal", "edm")
    assert (config.sample.sampler, config.sample.num_sample_steps) == ("heun", 18)
    r = cli("sample", run, "--n", "2", "--steps", "3", "--out", tmp_path / "s.png", "--no-progress")
    assert r.returncode == 0 and (tmp_path / "s.png").exists(), r.stderr
    # a job script run again with --resume added goes on; the formulation named on a run that
    # was not trained with it is refused before anything is written
    r = cli("train", "--resume", run, "--formulation", "edm", "--steps", "3", "--no-progress")
    assert r.returncode == 0 and "trained 3 steps" in r.stdout, r.stderr
    plain = tmp_path / "plain"
    assert cli("train", "--preset", "tiny", "--data-dir", fake_fashion, "--steps", "1", "--out",
               plain, "--no-progress").returncode == 0
    before = sorted(p.name for p in (plain / "checkpoints").iterdir())
    r = cli("train", "--resume", plain, "--formulation", "edm", "--steps", "2", "--no-progress")
    assert r.returncode == 2, r.stderr
    assert "changes diffusion.preconditioning from 'none' to 'edm'" in r.stderr, r.stderr
    assert sorted(p.name for p in (plain / "checkpoints").iterdir()) == before
