"""Classifier-free guidance (Ho & Salimans 2022) against closed forms, and the class-conditional
U-Net, training step and sampling API around it."""

import dataclasses
import math

import pytest
import torch

from ddpm.guidance import classifier_free_guidance
from ddpm.models import UNet, UNetConfig
from ddpm.samplers import ancestral_sample, initial_noise
from ddpm.schedules import make_schedule
from ddpm.timesteps import make_timesteps
from ddpm.toy import gaussian_denoiser, mixture_denoiser

from conftest import ddpm_in_process as cli

T = 1000
SCHEDULE = make_schedule("linear", T)
# A 1-pixel, three-class mixture: class k is N(MEANS[k], STDS[k]^2), drawn with WEIGHTS[k].
WEIGHTS, MEANS, STDS = (0.5, 0.3, 0.2), (-1.5, 0.5, 2.0), (0.5, 0.4, 0.6)


def toy_model(weights=WEIGHTS, means=MEANS, stds=STDS):
    """The exact conditional eps-predictor of each class, and for the null label (len(weights))
    the exact unconditional one of the mixture: a perfectly trained conditional network."""
    classes = [gaussian_denoiser(SCHEDULE, m, s) for m, s in zip(means, stds, strict=True)]
    unconditional = mixture_denoiser(SCHEDULE, weights, means, stds)

    def model(x_t, t, y):
        out = torch.empty_like(x_t)
        for k, denoiser in enumerate([*classes, unconditional]):
            rows = y == k
            if rows.any():
                out[rows] = denoiser(x_t[rows], t[rows])
        if not bool((y <= len(classes)).all()):
            raise ValueError(f"labels run 0..{len(classes)}, got {y.max().item()}")
        return out

    return model


def log_densities(x, ab):
    """log p_t(x | k) for each class k of the 1-pixel mixture, ``[B, K]`` (x_t ~ N(sqrt(ab) m,
    ab s^2 + 1 - ab))."""
    cols = []
    for m, s in zip(MEANS, STDS, strict=True):
        var = ab * s**2 + 1 - ab
        cols.append(-0.5 * (x - math.sqrt(ab) * m) ** 2 / var - 0.5 * math.log(2 * math.pi * var))
    return torch.stack(cols, 1)


@pytest.mark.parametrize("w", [0.0, 1.0, 4.0])
def test_guided_prediction_is_the_score_of_p_x_given_c_times_p_c_given_x_to_the_w(w):
    """Eq. 6 read through Bayes: eps~ = -sqrt(1 - ab) grad[log p_t(x|c) + w log p_t(c|x)], with
    both terms differentiated by autograd from the mixture's explicit densities."""
    t_step, c = 300, 1
    ab = float(SCHEDULE.alphas_cumprod[t_step])
    x = torch.linspace(-3, 3, 41, dtype=torch.float64).requires_grad_(True)
    log_p = log_densities(x, ab)  # [B, K]
    log_prior = torch.log(torch.tensor(WEIGHTS, dtype=torch.float64))
    log_posterior = (log_p + log_prior).log_softmax(1)[:, c]  # log p_t(c | x)
    (score,) = torch.autograd.grad((log_p[:, c] + w * log_posterior).sum(), x)
    expected = -math.sqrt(1 - ab) * score

    guided = classifier_free_guidance(toy_model(), torch.full((41,), c), len(WEIGHTS), w)
    x_t = x.detach().reshape(41, 1, 1, 1)
    got = guided(x_t, torch.full((41,), t_step)).flatten()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_zero_guidance_samples_each_class_conditional_distribution():
    """w = 0 draws class c from N(m_c, s_c^2) itself: the mean within 4 standard errors and the
    standard deviation within 3% (1,000 ancestral steps; 20,000 samples give 0.5% error)."""
    n, g = 20_000, torch.Generator().manual_seed(0)
    timesteps = make_timesteps(T, T)
    for c in range(len(WEIGHTS)):
        guided = classifier_free_guidance(toy_model(), torch.full((n,), c), len(WEIGHTS), 0.0)
        x = ancestral_sample(guided, SCHEDULE, initial_noise((n, 1, 1, 1), g), timesteps,
                             x0_transform=None, generator=g).flatten()
        assert abs(x.mean() - MEANS[c]) < 4 * STDS[c] / math.sqrt(n), (c, x.mean())
        assert abs(x.std() / STDS[c] - 1) < 0.03, (c, x.std())


def test_null_label_samples_the_mixture():
    """The null label is the unconditional model: classes appear in their prior proportions."""
    n, g = 20_000, torch.Generator().manual_seed(1)
    model = toy_model()
    null = len(WEIGHTS)
    x = ancestral_sample(lambda x_t, t: model(x_t, t, torch.full((x_t.shape[0],), null)),
                         SCHEDULE, initial_noise((n, 1, 1, 1), g), make_timesteps(T, T),
                         x0_transform=None, generator=g).flatten()
    nearest = (x[:, None] - torch.tensor(MEANS)).abs().argmin(1)
    share = torch.bincount(nearest, minlength=3).double() / n
    # The components overlap a little, so the nearest mean mislabels ~1-2% of the samples.
    torch.testing.assert_close(share, torch.tensor(WEIGHTS, dtype=torch.float64), atol=0.03, rtol=0)


def guided_gaussian_moments(m, s, w, timesteps):
    """The exact output distribution of ancestral sampling guided between a class N(m, s^2) and
    an unconditional N(0, 1): both eps-predictors are affine in x_t, so every step of Algorithm 2
    maps a Gaussian x_t to a Gaussian x_{t-1}; its mean and variance follow in closed form."""
    mean, var = 0.0, 1.0  # x_T ~ N(0, 1)
    for t, t_prev in zip(timesteps, timesteps[1:] + [-1], strict=True):
        ab = float(SCHEDULE.alphas_cumprod[t])
        ab_prev = 1.0 if t_prev < 0 else float(SCHEDULE.alphas_cumprod[t_prev])
        v_c = ab * s**2 + 1 - ab
        # eps~ = (1 + w) sqrt(1-ab) (x - sqrt(ab) m) / v_c - w sqrt(1-ab) x  =  a x + b
        a = math.sqrt(1 - ab) * ((1 + w) / v_c - w)
        b = -math.sqrt(1 - ab) * (1 + w) * math.sqrt(ab) * m / v_c
        # x0 = (x - sqrt(1-ab) eps~) / sqrt(ab), then eq. 7's posterior mean and beta-tilde
        x0_a, x0_b = (1 - math.sqrt(1 - ab) * a) / math.sqrt(ab), -math.sqrt(1 - ab) * b / math.sqrt(ab)
        beta = 1 - ab / ab_prev
        c0, ct = math.sqrt(ab_prev) * beta / (1 - ab), math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
        noise = 0.0 if t_prev < 0 else beta * (1 - ab_prev) / (1 - ab)
        mean, var = (c0 * x0_a + ct) * mean + c0 * x0_b, (c0 * x0_a + ct) ** 2 * var + noise
    return mean, var


def test_guidance_sharpens_the_class_as_the_closed_form_says():
    """Class N(1, 0.5^2) inside an unconditional N(0, 1): samples match the exact Gaussian that
    guided Algorithm 2 produces (on 250 of the 1,000 timesteps, as respaced sampling runs it), and
    w > 0 narrows the class and pushes it away from the unconditional mean, more with each larger
    w (variances 0.24 > 0.10 > 0.041 > 0.025)."""
    m, s, n = 1.0, 0.5, 20_000
    conditional, unconditional = gaussian_denoiser(SCHEDULE, m, s), gaussian_denoiser(SCHEDULE, 0.0, 1.0)

    def model(x_t, t, y):
        return torch.where((y == 0).reshape(-1, 1, 1, 1), conditional(x_t, t), unconditional(x_t, t))

    timesteps = make_timesteps(T, 250)
    previous = None
    for w in (0.0, 1.0, 3.0, 5.0):
        g = torch.Generator().manual_seed(2)
        guided = classifier_free_guidance(model, torch.zeros(n, dtype=torch.long), 1, w)
        x = ancestral_sample(guided, SCHEDULE, initial_noise((n, 1, 1, 1), g), timesteps,
                             x0_transform=None, generator=g).flatten().double()
        mean, var = guided_gaussian_moments(m, s, w, timesteps)
        assert abs(x.mean() - mean) < 4 * math.sqrt(var / n), (w, x.mean(), mean)
        assert abs(x.var() / var - 1) < 0.05, (w, x.var(), var)
        if previous is not None:
            assert var < previous[1] and mean > previous[0]
        previous = (mean, var)
    assert previous[1] < 0.2 * s**2  # w = 5: a fifth of the class's own variance or less


def test_negative_guidance_is_refused():
    with pytest.raises(ValueError, match="0 or more"):
        classifier_free_guidance(toy_model(), torch.zeros(2, dtype=torch.long), 3, -1.0)


# --- the class-conditional U-Net ---------------------------------------------------------------


def small_unet(num_classes):
    return UNet(UNetConfig(in_channels=1, image_size=8, base_channels=8, channel_mults=(1, 2),
                           num_res_blocks=1, attention_resolutions=(), dropout=0.0, norm_groups=4,
                           num_classes=num_classes))


def test_unet_label_changes_the_output_and_none_is_the_null_class():
    torch.manual_seed(0)
    net = small_unet(3)
    for p in net.parameters():  # blocks start as the identity: give every weight a value
        torch.nn.init.normal_(p, std=0.2)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([10, 200, 500, 900])
    out = {k: net(x, t, torch.full((4,), k)) for k in range(4)}
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(net(x, t), out[3])  # y = None -> the null class, 3
    assert net.class_emb.num_embeddings == 4 and net.null_class == 3
    assert not hasattr(small_unet(0), "class_emb") or small_unet(0).class_emb is None


def test_guidance_batches_both_evaluations_into_one_call():
    calls = []

    def model(x_t, t, y):
        calls.append(y.clone())
        return x_t * (y.reshape(-1, 1, 1, 1) + 1).to(x_t.dtype)

    x = torch.ones(3, 1, 2, 2)
    guided = classifier_free_guidance(model, torch.tensor([0, 1, 2]), 5, 2.0)
    out = guided(x, torch.zeros(3, dtype=torch.long))
    assert len(calls) == 1 and calls[0].tolist() == [0, 1, 2, 5, 5, 5]
    # (1 + w) (y + 1) - w (5 + 1) with w = 2
    assert out[:, 0, 0, 0].tolist() == [3 * 1 - 12, 3 * 2 - 12, 3 * 3 - 12]


# --- training and sampling a class-conditional run ----------------------------------------------


def test_training_drops_labels_at_the_class_dropout_rate():
    """Algorithm 1 of Ho & Salimans: each label becomes the null class with probability p, the
    others reach the network unchanged."""
    from ddpm import get_preset
    from ddpm.data import ImageData
    from ddpm.runtime import make_accelerator
    from ddpm.step import train_step
    from ddpm.train import build_training

    c = get_preset("tiny")
    config = dataclasses.replace(c, model=dataclasses.replace(c.model, num_classes=10),
                                 train=dataclasses.replace(c.train, class_dropout=0.25))
    cpu = torch.device("cpu")
    accelerator = make_accelerator(cpu)
    data = ImageData(torch.zeros(64, 1, 28, 28, dtype=torch.uint8), torch.arange(64) % 10, "x")
    run = build_training(config, accelerator, cpu, lambda: data)
    net, model, optimizer = run.net, run.model, run.optimizer
    seen = []
    forward = net.forward
    net.forward = lambda x, t, y=None: (seen.append(y.clone()), forward(x, t, y))[1]
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 10
    for _ in range(20):
        batch = (torch.rand(64, 1, 28, 28) * 2 - 1, labels)
        train_step(model, make_schedule("linear", 100), optimizer, [batch], accelerator=accelerator,
                   generator=g, config=config, device=torch.device("cpu"), lr=1e-3)
    y = torch.stack(seen)  # [20, 64]
    dropped = y == 10
    assert abs(dropped.float().mean().item() - 0.25) < 0.04  # 1,280 draws: 3 sigma = 0.036
    assert torch.equal(y[~dropped], labels.expand(20, 64)[~dropped])


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory, fake_fashion):
    out = tmp_path_factory.mktemp("cond") / "run"
    r = cli("train", "--preset", "tiny", "--data-dir", fake_fashion, "--conditional",
            "--steps", "4", "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    return out


def test_conditional_run_saves_classes_and_draws_a_grid_row_per_class(conditional_run, tmp_path):
    from PIL import Image

    from ddpm.pipeline import load_pipeline

    pipe = load_pipeline(conditional_run)
    assert pipe.num_classes == 10 and pipe.classes[7] == "Sneaker"
    assert pipe.model.class_emb.num_embeddings == 11
    r = cli("sample", conditional_run, "--class", "all", "--n", "3", "--out", tmp_path / "g.png",
            "--steps", "5", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "3 of each of 10 classes" in r.stdout
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == (3 * 30 + 2, 10 * 30 + 2)  # 28-px cells, 2-px padding: 10 rows of 3


def test_class_by_name_or_index_and_guidance_change_the_images(conditional_run, tmp_path):
    import numpy as np

    def draw(name, *extra):
        r = cli("sample", conditional_run, "--n", "4", "--steps", "5", "--sampler", "ddim",
                "--out", tmp_path / f"{name}.npz", "--no-progress", *extra)
        assert r.returncode == 0, r.stderr
        with np.load(tmp_path / f"{name}.npz") as z:
            return z["arr_0"]

    by_index = draw("index", "--class", "7", "--guidance", "3")
    assert np.array_equal(by_index, draw("name", "--class", "sneaker", "--guidance", "3"))
    assert not np.array_equal(by_index, draw("other", "--class", "2", "--guidance", "3"))
    assert not np.array_equal(by_index, draw("w0", "--class", "7", "--guidance", "0"))


@pytest.mark.parametrize("args, message", [
    (("--class", "10"), "--class 10 is out of range: this model has classes 0..9"),
    (("--class", "-1"), "--class -1 is out of range"),
    (("--class", "boots"), "not a class of this model; give one of T-shirt/top"),
    (("--guidance", "-1"), "expected a number in [0, 100], got -1"),
])
def test_bad_class_requests_are_one_line_errors(conditional_run, tmp_path, args, message):
    r = cli("sample", conditional_run, "--out", tmp_path / "x.png", "--no-progress", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "x.png").exists()


def test_guidance_or_label_dropout_without_conditional_is_refused(fake_fashion, tmp_path):
    # (a class or guidance asked of an unconditional model: tests/test_cli.py)
    for option in ("--guidance", "--class-dropout"):
        r = cli("train", "--preset", "tiny", "--data-dir", fake_fashion, option, "0.2",
                "--out", tmp_path / "other")
        assert r.returncode == 2 and "add --conditional" in r.stderr, r.stderr
        assert not (tmp_path / "other").exists()


# --- classifier guidance (Dhariwal & Nichol 2021) on the toy mixture ------------------------------

# Four-pixel images, each drawn whole from one of three well separated components: the nearest
# component mean tells a sample's component apart with an error below 1e-3.
CG_WEIGHTS, CG_MEANS, CG_STDS = (0.5, 0.3, 0.2), (-1.0, 0.2, 1.2), (0.3, 0.3, 0.3)


def _component_of(images):
    per_image = images.flatten(1)  # [N, 4]
    return torch.stack([((per_image - m) ** 2).sum(1) for m in CG_MEANS], 1).argmin(1)


@pytest.mark.parametrize("label", [1, 2])
def test_guided_ancestral_sampling_with_the_exact_classifier_draws_the_chosen_component(label):
    from ddpm.toy import mixture_class_grad
    unconditional = mixture_denoiser(SCHEDULE, CG_WEIGHTS, CG_MEANS, CG_STDS)
    grad = mixture_class_grad(SCHEDULE, CG_WEIGHTS, CG_MEANS, CG_STDS, label)  # s = 1
    x_T = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    out = ancestral_sample(unconditional, SCHEDULE, x_T, make_timesteps(T, T), x0_transform=None,
                           variance="beta", generator=torch.Generator().manual_seed(1),
                           guidance_grad=grad)
    share = (_component_of(out) == label).float().mean().item()
    assert share > 0.998  # the unguided mixture gives it weight 0.3 or 0.2
    n = out.numel()
    m, s = CG_MEANS[label], CG_STDS[label]
    assert abs(out.mean().item() - m) < 4 * s / math.sqrt(n)
    assert abs(out.std().item() - s) < 4 * s / math.sqrt(2 * n)


def test_classifier_guidance_at_scale_zero_is_unguided_sampling_bit_for_bit():
    from ddpm.toy import mixture_class_grad
    unconditional = mixture_denoiser(SCHEDULE, CG_WEIGHTS, CG_MEANS, CG_STDS)
    grad = mixture_class_grad(SCHEDULE, CG_WEIGHTS, CG_MEANS, CG_STDS, 2)
    x_T = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    ts = make_timesteps(T, 50)
    plain = ancestral_sample(unconditional, SCHEDULE, x_T, ts, generator=torch.Generator().manual_seed(1))
    zero = ancestral_sample(unconditional, SCHEDULE, x_T, ts, generator=torch.Generator().manual_seed(1),
                            guidance_grad=lambda x, t: 0.0 * grad(x, t))
    assert torch.equal(plain, zero)
    guided = ancestral_sample(unconditional, SCHEDULE, x_T, ts, generator=torch.Generator().manual_seed(1),
                              guidance_grad=grad)
    assert not torch.equal(plain, guided)


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_algorithm_2_with_the_exact_classifier_is_the_exact_conditional_model(prediction_type):
    # eps-hat = eps - sqrt(1 - ab) grad log p(y | x_t) = -sqrt(1 - ab) grad log p(x_t | y): the
    # exact classifier turns the mixture's predictor into the component's, for every target.
    from ddpm.diffusion import eps_x0_from_prediction, training_target
    from ddpm.guidance import classifier_guidance
    from ddpm.samplers import ddim_sample
    from ddpm.toy import mixture_class_grad
    label = 1
    mixture = mixture_denoiser(SCHEDULE, CG_WEIGHTS, CG_MEANS, CG_STDS)

    def as_type(denoiser):
        def predict(x_t, t):
            ab = SCHEDULE.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
            eps, x0 = eps_x0_from_prediction(denoiser(x_t, t), x_t, ab, "eps")
            return training_target(prediction_type, x0, eps, ab)
        return predict

    guided = classifier_guidance(as_type(mixture), SCHEDULE,
                                 mixture_class_grad(SCHEDULE, CG_WEIGHTS, CG_MEANS, CG_STDS, label),
                                 prediction_type)
    component = as_type(gaussian_denoiser(SCHEDULE, CG_MEANS[label], CG_STDS[label]))
    x_t = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 1.3
    for step in (10, 300, 900):
        t = torch.full((64,), step)
        torch.testing.assert_close(guided(x_t, t), component(x_t, t), rtol=1e-4, atol=1e-4)
    ts = make_timesteps(T, 50)
    torch.testing.assert_close(
        ddim_sample(guided, SCHEDULE, x_T := torch.randn(512, 1, 2, 2), ts, x0_transform=None,
                    prediction_type=prediction_type),
        ddim_sample(component, SCHEDULE, x_T, ts, x0_transform=None, prediction_type=prediction_type),
        rtol=1e-4, atol=1e-4)


def test_classifier_free_guidance_leaves_a_learned_variance_unmixed():
    def model(x_t, t, y):  # 2C channels: prediction then variance interpolation
        pred = torch.where((y == 3)[:, None, None, None], torch.zeros_like(x_t), torch.ones_like(x_t))
        var = torch.where((y == 3)[:, None, None, None], -torch.ones_like(x_t), torch.ones_like(x_t) * 0.5)
        return torch.cat([pred, var], 1)

    guided = classifier_free_guidance(model, torch.tensor([0, 1]), 3, 2.0)
    out = guided(torch.zeros(2, 1, 2, 2), torch.tensor([5, 5]))
    assert out.shape == (2, 2, 2, 2)
    assert torch.equal(out[:, :1], torch.full((2, 1, 2, 2), 3.0))  # 1 + 2 (1 - 0)
    assert torch.equal(out[:, 1:], torch.full((2, 1, 2, 2), 0.5))  # the conditional variance


# --- classifier guidance through the command line ---------------------------------------------------


@pytest.fixture(scope="module")
def noisy_classifier(world, tmp_path_factory):
    """A noise-aware classifier made for the world's tiny runs (their schedule, their data)."""
    out = tmp_path_factory.mktemp("clf") / "clf.pt"
    r = cli("train-classifier", "--noisy", "--like", world / "run", "--epochs", "1", "--out", out,
            "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout
    return out


def _sample(run, out, *args):
    return cli("sample", run, "--n", "4", "--steps", "10", "--seed", "1", "--out", out,
               "--no-progress", *args)


def test_classifier_guidance_from_the_command_line(world, noisy_classifier, tmp_path):
    from ddpm.noisy_classifier import load_noisy_classifier
    from ddpm.pipeline import load_pipeline
    pipe = load_pipeline(world / "run")
    clf = load_noisy_classifier(noisy_classifier)
    plain = pipe.generate(4, seed=1, num_sample_steps=10)
    zero = pipe.generate(4, seed=1, num_sample_steps=10, labels=7, classifier=clf, classifier_scale=0.0)
    assert torch.equal(plain, zero)  # scale 0 is unguided sampling, bit for bit
    for sampler in ("ddpm", "ddim", "dpm++"):  # Algorithm 1, then Algorithm 2
        guided = pipe.generate(4, seed=1, num_sample_steps=10, labels=7, classifier=clf,
                               classifier_scale=10.0, sampler=sampler)
        assert torch.isfinite(guided).all()
        if sampler == "ddpm":
            assert not torch.equal(guided, plain)
    r = _sample(world / "run", tmp_path / "g.npz", "--classifier", noisy_classifier,
                "--classifier-scale", "3", "--class", "sneaker")
    assert r.returncode == 0, r.stderr
    assert "classifier scale 3" in r.stdout and "class 7 (Sneaker)" in r.stdout
    # a class-conditional model: classifier guidance on top of classifier-free guidance
    r = _sample(world / "crun", tmp_path / "c.png", "--classifier", noisy_classifier,
                "--guidance", "2", "--class", "3")
    assert r.returncode == 0, r.stderr
    r = cli("viz", "reverse", world / "run", "--n", "4", "--steps", "4", "--out", tmp_path / "r.gif",
            "--classifier", noisy_classifier, "--class", "1", "--no-progress")
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def foreign_classifiers(noisy_classifier, tmp_path_factory, fake_fashion):
    """The classifier as if trained on another dataset, and a run with another schedule."""
    root = tmp_path_factory.mktemp("foreign")
    blob = torch.load(noisy_classifier, weights_only=True)
    torch.save({**blob, "dataset": "mnist"}, root / "mnist.pt")
    r = cli("train", "--preset", "tiny", "--data-dir", fake_fashion, "--schedule", "cosine",
            "--steps", "1", "--sample-every", "0", "--out", root / "cosine", "--no-progress")
    assert r.returncode == 0, r.stderr
    return root


@pytest.mark.parametrize("make_args, message", [
    (lambda w, c, f: [w / "run", "--classifier", f / "mnist.pt"], "trained on mnist"),
    (lambda w, c, f: [f / "cosine", "--classifier", c], "cosine schedule"),
    (lambda w, c, f: [w / "run", "--classifier", c, "--class", "12"], "out of range"),
    (lambda w, c, f: [w / "run", "--classifier-scale", "2"], "needs --classifier"),
    (lambda w, c, f: [w / "run", "--classifier", w / "run/checkpoints/ckpt-00000002.pt"],
     "training checkpoint"),
    (lambda w, c, f: [w / "run", "--classifier", c, "--classifier-scale", "-1"], "--classifier-scale"),
])
def test_bad_classifier_requests_are_one_line_errors(world, noisy_classifier, foreign_classifiers,
                                                     tmp_path, make_args, message):
    args = make_args(world, noisy_classifier, foreign_classifiers)
    r = cli("sample", args[0], "--n", "2", "--out", tmp_path / "g.png", *args[1:])
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "g.png").exists()
