"""noisy_classifier.py: the noise-aware classifier of classifier guidance (Dhariwal & Nichol
2021): the network, its training and file, the compatibility checks, the gradient guided sampling
takes, and the CLI (train-classifier, and damaged classifier files given to sample)."""

import dataclasses
import hashlib
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.classifier import shipped_weights
from ddpm.data import FASHION_MNIST_CLASSES
from ddpm.guidance import classifier_log_prob_grad
from ddpm.models import UNet, UNetConfig
from ddpm.models.unet import NoisyClassifier
from ddpm.noisy_classifier import (
    FORMAT,
    KIND,
    NoisyClassifierFile,
    check_compatible,
    evaluation_timesteps,
    load_noisy_classifier,
    train_noisy_classifier,
)
from ddpm.presets import get_preset

from conftest import assert_refused, ddpm_in_process, snapshot, write_idx

# A classifier small enough to train in a second.
SMALL = UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                   attention_resolutions=(), norm_groups=4, dropout=0.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The networks here are tiny, so one thread is as fast as two; and on a machine whose
    other core is busy, two threads oversubscribe it: the brightness training took 150 s with
    two against 2.4 s with one, measured side by side. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomise(model, seed=0):
    """Random values for every weight (the network zero-initialises its head and the blocks'
    last convs, so its gradient at initialisation is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


# --- the network ----------------------------------------------------------------------------------


@pytest.mark.parametrize("channels,size,patch", [(1, 28, 1), (3, 32, 2)])
def test_classifier_maps_images_and_steps_to_logits(channels, size, patch):
    config = dataclasses.replace(SMALL, in_channels=channels, image_size=size, patch_size=patch,
                                 num_classes=5)
    model = _randomise(NoisyClassifier(config)).eval()
    x = torch.randn(3, channels, size, size)
    logits = model(x, torch.tensor([0, 10, 999]))
    assert logits.shape == (3, 5) and logits.dtype == torch.float32
    real = model(x, torch.tensor([0.0, 10.0, 999.0]))  # real-valued steps
    assert torch.allclose(real, logits, atol=1e-5)
    assert not torch.allclose(model(x, torch.tensor([500, 500, 500])), logits)  # t matters


def test_classifier_has_no_class_embedding_and_ignores_learn_variance():
    config = dataclasses.replace(SMALL, num_classes=10)
    model = NoisyClassifier(config)
    names = [n for n, _ in model.named_parameters()]
    assert not any("class" in n for n in names)
    assert model.head.out_features == 10 and model.num_classes == 10
    torch.manual_seed(0)
    a = NoisyClassifier(dataclasses.replace(config, learn_variance=True)).state_dict()
    torch.manual_seed(0)
    b = NoisyClassifier(config).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_classifier_shares_the_unets_down_path():
    """Same names, shapes and (from one seed) values as an unconditional U-Net's way down."""
    config = dataclasses.replace(SMALL, attention_resolutions=(14,))
    torch.manual_seed(3)
    unet = UNet(config).state_dict()
    torch.manual_seed(3)
    clf = NoisyClassifier(dataclasses.replace(config, num_classes=4)).state_dict()
    own = {k for k in clf if k.startswith(("norm_out.", "head."))}
    assert own == {"norm_out.weight", "norm_out.bias", "head.weight", "head.bias"}
    shared = [k for k in clf if k not in own]
    assert any(k.startswith("mid_attn.") for k in shared)
    assert any("attns.0.qkv" in k for k in shared)
    assert all(torch.equal(clf[k], unet[k]) for k in shared)
    assert not any(k.startswith(("up_levels", "upsamples")) for k in clf)


def test_a_classifier_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes, got num_classes=0"):
        NoisyClassifier(SMALL)


# The U-Net's parameter names are in every checkpoint: recorded from the U-Net before its down
# path became shared with the classifier (sha256 of the names in order, and of name:shape).
UNET_KEYS = [
    (UNetConfig(), 244, "4a22886e5a95828d", "5280fb53dc1d01a2"),
    (UNetConfig(num_classes=10, block="convnext", patch_size=2, channel_mults=(1, 2)),
     209, "cb14e670b56d9c4a", "66441ffbc42b7ea9"),
    (UNetConfig(learn_variance=True, num_classes=3, attention_resolutions=(14, 7),
                num_res_blocks=1), 185, "2ecca4eeffdabd66", "54ca22d50b38693e"),
]


@pytest.mark.parametrize("config,count,names_hash,shapes_hash", UNET_KEYS)
def test_unet_parameter_names_are_unchanged(config, count, names_hash, shapes_hash):
    state = UNet(config).state_dict()
    digest = lambda lines: hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]  # noqa: E731
    assert len(state) == count
    assert digest(state) == names_hash
    assert digest(f"{k}:{tuple(v.shape)}" for k, v in state.items()) == shapes_hash


def test_unet_representative_keys():
    state = UNet(UNetConfig()).state_dict()
    expected = {"time_mlp.0.weight": (256, 64), "conv_in.weight": (64, 1, 3, 3),
                "down_levels.0.blocks.0.norm1.weight": (64,),
                "down_levels.1.blocks.0.skip.weight": (128, 64, 1, 1),
                "down_levels.2.attns.0.norm.weight": (128,),
                "downsamples.1.conv.weight": (128, 128, 3, 3),
                "mid_block1.conv1.weight": (128, 128, 3, 3),
                "mid_attn.qkv.weight": (384, 128, 1, 1),
                "up_levels.0.blocks.2.skip.weight": (128, 256, 1, 1),
                "up_levels.2.blocks.0.skip.weight": (64, 192, 1, 1),
                "upsamples.1.conv.weight": (128, 128, 3, 3), "conv_out.weight": (1, 64, 3, 3)}
    assert {k: tuple(state[k].shape) for k in expected} == expected
    assert list(state)[:6] == ["time_mlp.0.weight", "time_mlp.0.bias", "time_mlp.2.weight",
                               "time_mlp.2.bias", "conv_in.weight", "conv_in.bias"]
    assert list(UNet(UNetConfig(num_classes=10)).state_dict())[4] == "class_emb.weight"


# --- training and the file ------------------------------------------------------------------------


def write_brightness_data(folder, n_train=512, n_test=96, seed=0):
    """Fashion-MNIST-shaped IDX files whose class says how bright the image is: label 0 dark
    (mean 50), label 1 bright (mean 205), plus pixel noise. Trivial at small t, hopeless at T."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 2, n)
        images = np.where(labels[:, None, None] == 1, 205, 50) + rng.normal(0, 25, (n, 28, 28))
        write_idx(folder / f"{prefix}-images-idx3-ubyte", np.clip(images, 0, 255).astype(np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
    return folder


# 64 steps: the zero-initialised 10-way head (the IDX reader names Fashion-MNIST's ten classes)
# first spends its steps pushing the eight unused classes down.
BRIGHT_TRAINING = dict(epochs=4, batch_size=32, lr=1e-2, model=SMALL, seed=5, progress=False)


@pytest.fixture(scope="module")
def bright(tmp_path_factory):
    """A classifier trained on the brightness data, its result and the data's folder."""
    root = tmp_path_factory.mktemp("bright")
    data = write_brightness_data(root / "data")
    state = torch.get_rng_state()
    result = train_noisy_classifier("fashion-mnist", data, root / "clf.pt", **BRIGHT_TRAINING)
    assert torch.equal(torch.get_rng_state(), state)  # the global random state is left alone
    return result, data, root


def test_training_writes_the_documented_file(bright):
    result, _, root = bright
    blob = torch.load(root / "clf.pt", weights_only=True)
    assert set(blob) == {"format", "kind", "dataset", "num_classes", "classes", "image_size",
                         "channels", "schedule", "model", "weights", "accuracy_by_t", "epochs",
                         "seed"}
    assert (blob["format"], blob["kind"], blob["dataset"]) == (FORMAT, KIND, "fashion-mnist")
    assert blob["num_classes"] == 10 and blob["classes"] == list(FASHION_MNIST_CLASSES)
    assert (blob["image_size"], blob["channels"], blob["epochs"], blob["seed"]) == (28, 1, 4, 5)
    # without --like: the default preset's schedule (fashion-cpu: linear, T = 1000)
    assert blob["schedule"] == {"name": "linear", "num_train_timesteps": 1000,
                                "zero_terminal_snr": False}
    assert blob["model"]["base_channels"] == 8 and blob["model"]["num_classes"] == 10
    assert blob["accuracy_by_t"] == result.accuracy_by_t
    assert tuple(result.accuracy_by_t) == (0, 100, 250, 500, 750, 999) == evaluation_timesteps(1000)
    assert result.seconds > 0 and result.path == root / "clf.pt"


def test_training_learns_and_noise_hides_the_class(bright):
    acc = bright[0].accuracy_by_t
    assert acc[0] >= 0.95 and acc[100] >= 0.9, acc  # two classes: chance is 0.5
    assert acc[999] < 0.75, acc  # at t = T-1 almost nothing of x0 is left (alpha_bar ~ 4e-5)


def test_the_loaded_file_is_what_was_trained(bright):
    result, data, root = bright
    clf = load_noisy_classifier(root / "clf.pt")
    assert isinstance(clf, NoisyClassifierFile) and isinstance(clf.model, NoisyClassifier)
    assert not clf.model.training and not any(p.requires_grad for p in clf.model.parameters())
    assert (clf.dataset, clf.num_classes) == ("fashion-mnist", 10)
    assert (clf.image_size, clf.channels) == (28, 1)
    assert (clf.schedule, clf.num_train_timesteps, clf.zero_terminal_snr) == ("linear", 1000, False)
    assert clf.accuracy_by_t == result.accuracy_by_t and clf.classes == FASHION_MNIST_CLASSES
    with torch.no_grad():  # it tells a clean bright image from a dark one
        x = torch.cat([torch.full((1, 1, 28, 28), -0.6), torch.full((1, 1, 28, 28), 0.6)])
        assert clf.model(x, torch.tensor([0, 0])).argmax(1).tolist() == [0, 1]


def test_a_classifier_file_from_before_time_silu_keeps_its_function(bright, tmp_path):
    """Files written before the resnet blocks' time SiLU existed load without it."""
    root = bright[2]
    blob = torch.load(root / "clf.pt", weights_only=True)
    assert blob["model"]["time_silu"] is True
    old = {**blob, "model": {k: v for k, v in blob["model"].items() if k != "time_silu"}}
    torch.save(old, tmp_path / "old.pt")
    new, legacy = load_noisy_classifier(root / "clf.pt"), load_noisy_classifier(tmp_path / "old.pt")
    assert legacy.model.config.time_silu is False and new.model.config.time_silu is True
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([100, 700])
    with torch.no_grad():
        assert not torch.allclose(legacy.model(x, t), new.model(x, t))


def test_the_same_seed_trains_the_same_weights(bright, tmp_path):
    _, data, root = bright
    train_noisy_classifier("fashion-mnist", data, tmp_path / "again.pt", **BRIGHT_TRAINING)
    a = torch.load(root / "clf.pt", weights_only=True)["weights"]
    b = torch.load(tmp_path / "again.pt", weights_only=True)["weights"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unlabelled_data_are_refused(tmp_path):
    from PIL import Image

    for i in range(3):  # a folder whose images are all of one class
        (tmp_path / "imgs" / "cats").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (80 * i, 10, 200)).save(tmp_path / "imgs" / "cats" / f"{i}.png")
    with pytest.raises(ValueError, match=r"one class \('cats'\); a classifier learns labels of "
                                         r"at least 2 classes: put the images in one"):
        train_noisy_classifier("folder", tmp_path / "imgs", tmp_path / "c.pt", model=SMALL,
                               progress=False)
    assert not (tmp_path / "c.pt").exists()


def test_a_run_of_another_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="the run was trained on fashion-mnist but the "
                                         "classifier would be trained on mnist"):
        train_noisy_classifier("mnist", None, tmp_path / "c.pt", like=get_preset("tiny"))


# --- compatibility --------------------------------------------------------------------------------


def classifier_file(**changes):
    """A file's worth of metadata that fits the tiny preset (fashion-mnist, 28 px, linear T=100)."""
    fields = dict(model=NoisyClassifier(dataclasses.replace(SMALL, num_classes=10)),
                  path=pathlib.Path("clf.pt"), dataset="fashion-mnist",
                  classes=FASHION_MNIST_CLASSES, image_size=28, channels=1, schedule="linear",
                  num_train_timesteps=100, zero_terminal_snr=False, accuracy_by_t={}, epochs=1,
                  seed=0)
    return NoisyClassifierFile(**{**fields, **changes})


def refusal(clf, config, classes=()):
    """``check_compatible``'s message for this classifier and run, or None when it passes."""
    try:
        check_compatible(clf, config, classes, run="runs/tiny")
    except ValueError as exc:
        return str(exc)
    return None


def test_a_fitting_classifier_passes():
    """A classifier of the run's dataset, classes, schedule and image shape passes whether the
    run's classes are unknown, given as a tuple or a list, or counted by a class-conditional
    model; a file without class names passes on their number alone."""
    tiny = get_preset("tiny")
    conditional = dataclasses.replace(tiny, model=dataclasses.replace(tiny.model, num_classes=10))
    fitting = [(tiny, ()), (tiny, FASHION_MNIST_CLASSES), (tiny, list(FASHION_MNIST_CLASSES)),
               (conditional, ()), (conditional, FASHION_MNIST_CLASSES)]
    for config, classes in fitting:
        assert refusal(classifier_file(), config, classes) is None, (config.model.num_classes, classes)
    assert refusal(classifier_file(classes=()), conditional, FASHION_MNIST_CLASSES) is None


def _section(config, name, **changes):
    section = dataclasses.replace(getattr(config, name), **changes)
    return dataclasses.replace(config, **{name: section})


TINY = get_preset("tiny")


@pytest.mark.parametrize("clf,config,classes,message", [
    (classifier_file(dataset="mnist"), TINY, (),
     "was trained on mnist, the run on fashion-mnist"),
    (classifier_file(), _section(TINY, "model", num_classes=5), (),
     "tells 10 classes apart, the run's data have 5"),
    (classifier_file(), TINY, ("a", "b"), "tells 10 classes apart, the run's data have 2"),
    (classifier_file(), TINY, tuple("abcdefghij"),
     "has classes T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle "
     "boot, the run's data a, b, c"),
    (classifier_file(schedule="cosine"), TINY, (),
     "noised by the cosine schedule with T = 100, the run by the linear schedule with T = 100"),
    (classifier_file(num_train_timesteps=1000), TINY, (),
     "linear schedule with T = 1000, the run by the linear schedule with T = 100;"),
    (classifier_file(zero_terminal_snr=True), TINY, (),
     "T = 100 and zero terminal SNR, the run by the linear schedule with T = 100;"),
    (classifier_file(image_size=32, channels=3), TINY, (),
     "reads 3x32x32 images, the run makes 1x28x28"),
])
def test_an_unfitting_classifier_is_refused(clf, config, classes, message):
    with pytest.raises(ValueError) as info:
        check_compatible(clf, config, classes, run="runs/tiny")
    text = str(info.value)
    assert message in text and "\n" not in text
    assert text.endswith("train one with 'ddpm train-classifier --noisy --like runs/tiny'")


# --- the gradient ---------------------------------------------------------------------------------


def tiny_classifier(dtype=torch.float64):
    config = UNetConfig(image_size=8, base_channels=4, channel_mults=(1, 2), num_res_blocks=1,
                        attention_resolutions=(4,), norm_groups=2, dropout=0.0, num_classes=3)
    return _randomise(NoisyClassifier(config)).to(dtype).eval()


def log_prob(model, x, t, y):
    with torch.no_grad():
        return torch.log_softmax(model(x, t), 1).gather(1, y[:, None]).sum().item()


def test_gradient_matches_finite_differences():
    model = tiny_classifier()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    t, y = torch.tensor([3, 70]), torch.tensor([2, 0])
    grad = classifier_log_prob_grad(model, x, t, y)
    assert grad.shape == x.shape and grad.dtype == torch.float64 and not grad.requires_grad
    assert grad.abs().max() > 1e-3  # not trivially zero
    h = 1e-6
    for _ in range(3):  # directional derivatives along random directions
        v = torch.randn(x.shape, generator=g, dtype=torch.float64)
        numeric = (log_prob(model, x + h * v, t, y) - log_prob(model, x - h * v, t, y)) / (2 * h)
        assert (grad * v).sum().item() == pytest.approx(numeric, rel=1e-6, abs=1e-8)
    for index in [(0, 0, 0, 0), (1, 0, 3, 5), (0, 0, 7, 2)]:  # and single pixels
        e = torch.zeros_like(x)
        e[index] = h
        numeric = (log_prob(model, x + e, t, y) - log_prob(model, x - e, t, y)) / (2 * h)
        assert grad[index].item() == pytest.approx(numeric, rel=1e-6, abs=1e-8)


def test_gradient_under_inference_mode_and_no_grad():
    model = tiny_classifier(torch.float32)
    x = torch.randn(2, 1, 8, 8)
    t, y = torch.tensor([3, 70]), torch.tensor([2, 0])
    plain = classifier_log_prob_grad(model, x, t, y)
    with torch.inference_mode():
        xi, ti, yi = x.clone(), t.clone(), y.clone()  # inference tensors, as the samplers' are
        inside = classifier_log_prob_grad(model, xi, ti, yi)
    with torch.no_grad():
        no_grad = classifier_log_prob_grad(model, x, t.float(), y)  # real-valued steps too
    assert torch.equal(inside, plain) and torch.allclose(no_grad, plain, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # the weights gathered nothing
    half = classifier_log_prob_grad(model, x.to(torch.bfloat16), t, y)
    assert half.dtype == torch.bfloat16 and half.shape == x.shape


# --- loading refusals -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fake_fashion):
    run = tmp_path_factory.mktemp("tinyrun") / "run"
    r = ddpm_in_process("train", "--preset", "tiny", "--data-dir", fake_fashion, "--out", run,
                        "--steps", 1, "--sample-every", 0, "--no-progress")
    assert r.returncode == 0, r.stderr
    return run


def _refusal(path, make="--like RUN --out {path}"):
    """The one-line message of loading ``path``, which must say how to make a classifier."""
    with pytest.raises(ValueError) as info:
        load_noisy_classifier(path)
    text = str(info.value)
    assert "\n" not in text, text
    assert text.startswith(str(path)) or text.startswith(f"noisy classifier {path}"), text
    assert text.endswith(f"make one with 'ddpm train-classifier --noisy "
                         f"{make.format(path=path)}'"), text
    return text


def test_bad_files_are_explained(tmp_path, tiny_run):
    assert "does not exist" in _refusal(tmp_path / "missing.pt")
    assert "is a folder, not a noisy classifier file" in _refusal(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert "it is not a torch file (a zip archive)" in _refusal(tmp_path / "junk.pt")
    checkpoint = next((tiny_run / "checkpoints").glob("ckpt-*.pt"))
    # the checkpoint is what --like takes; its own path is never offered as --out
    assert "is a ddpm training checkpoint (a diffusion model), not a noise-aware classifier" in \
        _refusal(checkpoint, make=f"--like {checkpoint} --out CLASSIFIER.pt")
    other = "--like RUN --out CLASSIFIER.pt"
    weights = shipped_weights("fashion-mnist")
    assert "is the fashion-mnist feature extractor of 'ddpm eval'" in _refusal(weights, other)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    assert "a torch file but not a noisy classifier" in _refusal(tmp_path / "foreign.pt", other)
    torch.save({"kind": KIND, "where": pathlib.PurePosixPath("/")}, tmp_path / "code.pt")
    assert "objects other than tensors and plain data" in _refusal(tmp_path / "code.pt")


def test_other_formats_and_damaged_files_are_explained(bright, tmp_path):
    blob = torch.load(bright[2] / "clf.pt", weights_only=True)
    torch.save({**blob, "format": 2}, tmp_path / "newer.pt")
    assert "of format 2, but this ddpm reads format 1" in _refusal(
        tmp_path / "newer.pt", "--like RUN --out CLASSIFIER.pt")
    wider = {**blob, "model": {**blob["model"], "base_channels": 16}}
    torch.save(wider, tmp_path / "damaged.pt")
    assert "is a damaged noisy classifier" in _refusal(tmp_path / "damaged.pt")


# --- the command line -----------------------------------------------------------------------------


def test_cli_trains_a_noisy_classifier(fake_fashion, tmp_path):
    out = tmp_path / "noisy.pt"
    r = ddpm_in_process("train-classifier", "--noisy", "--dataset", "fashion-mnist", "--data-dir",
                        fake_fashion, "--epochs", 1, "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert out.is_file() and load_noisy_classifier(out).num_train_timesteps == 1000
    assert "test accuracy by noise level" in r.stdout and "t =  999:" in r.stdout
    r = ddpm_in_process("train-classifier", "--noisy", "--data-dir", fake_fashion, "--out", out)
    assert r.returncode == 2 and "exists; add --force" in r.stderr


def test_cli_like_needs_noisy(tiny_run, tmp_path):
    r = ddpm_in_process("train-classifier", "--like", tiny_run, "--out", tmp_path / "c.pt")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "--like names the run" in lines[0] and "add --noisy" in lines[0]
    assert not (tmp_path / "c.pt").exists()
    r = ddpm_in_process("train-classifier", "--dataset", "cifar10", "--out", tmp_path / "c.pt")
    assert r.returncode == 2 and "invalid choice: 'cifar10'" in r.stderr and "--noisy" in r.stderr


def test_cli_like_a_run(tiny_run, tmp_path):
    from ddpm.checkpoint import checkpoint_config, load_run_or_file

    out = tmp_path / "for-tiny.pt"
    r = ddpm_in_process("train-classifier", "--noisy", "--like", tiny_run, "--epochs", 1,
                        "--batch-size", 64, "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    clf = load_noisy_classifier(out)
    path, state = load_run_or_file(tiny_run)
    config = checkpoint_config(state, path)
    assert (clf.schedule, clf.num_train_timesteps) == ("linear", 100)  # the run's, not the default
    assert tuple(clf.accuracy_by_t) == (0, 10, 25, 50, 75, 99)
    assert "T = 100" in r.stdout and "t =   99:" in r.stdout
    check_compatible(clf, config, state["classes"])  # it fits the run it was made for


def test_guided_sampling_in_worker_processes_makes_the_images_of_one(tiny_run, tmp_path):
    """Classifier guidance takes gradients inside sampling's inference mode: in forked worker
    processes too, to the same images (Algorithm 1 for ddpm, Algorithm 2 for ddim)."""
    from ddpm.pipeline import load_pipeline

    out = tmp_path / "clf.pt"
    r = ddpm_in_process("train-classifier", "--noisy", "--like", tiny_run, "--epochs", 1,
                        "--batch-size", 64, "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    pipe = load_pipeline(tiny_run)
    settings = dict(seed=1, batch_size=2, labels=3, classifier=load_noisy_classifier(out),
                    classifier_scale=50.0, num_sample_steps=3)
    for sampler in ("ddpm", "ddim"):
        one = pipe.generate(5, workers=1, sampler=sampler, **settings)
        split = pipe.generate(5, workers=2, sampler=sampler, **settings)
        assert pipe.last_workers == 2
        torch.testing.assert_close(split, one, atol=1e-5, rtol=0)
        unguided = pipe.generate(5, workers=2, sampler=sampler, **{**settings, "classifier_scale": 0})
        assert not torch.allclose(unguided, one, atol=1e-3), "the guidance moved the images"


# --- its output, and damaged files of it ----------------------------------------------------------


def test_train_classifier_never_writes_over_the_run_it_is_like(run_copy):
    before = snapshot(run_copy)
    for like in (run_copy, run_copy / "checkpoints/ckpt-00000002.pt"):
        r = ddpm_in_process("train-classifier", "--noisy", "--like", like, "--epochs", 1,
                            "--out", run_copy / "checkpoints/ckpt-00000002.pt", "--force",
                            "--no-progress")
        assert_refused(r, f"is a file of the run {run_copy.resolve()} that this command reads")
    assert snapshot(run_copy) == before


@pytest.fixture(scope="module")
def damaged_classifiers(world, tmp_path_factory) -> Path:
    """Noise-aware classifiers for the world's run with one piece of metadata damaged each."""
    root = tmp_path_factory.mktemp("classifiers")
    r = ddpm_in_process("train-classifier", "--noisy", "--like", world / "run", "--epochs", 1,
                        "--out", root / "clf.pt", "--no-progress")
    assert r.returncode == 0, r.stderr
    blob = torch.load(root / "clf.pt", weights_only=True)
    torch.save({**blob, "accuracy_by_t": [0.5, 0.4]}, root / "accuracy-list.pt")
    torch.save({**blob, "dataset": "x" * 5000}, root / "long-dataset.pt")
    return root


@pytest.mark.parametrize("name, message, absent", [
    ("accuracy-list.pt", "accuracy-list.pt is a damaged noisy classifier", ()),
    ("long-dataset.pt", "is a damaged noisy classifier (unknown dataset 'xxxx", ("x" * 100,)),
])
def test_sample_with_a_damaged_classifier_is_one_line(world, damaged_classifiers, name, message,
                                                      absent):
    before = snapshot(world)
    r = ddpm_in_process("sample", world / "run", "--classifier", damaged_classifiers / name,
                        "--class", 1, "--n", 2, "--steps", 2, "--out", world / "existing.png")
    assert_refused(r, message, absent)
    assert snapshot(world) == before
