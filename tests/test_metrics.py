"""metrics.py: FID, KID and precision/recall against closed forms, the extractors' pipelines on real data,
the missing-weights message and the reference-statistics cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from ddpm.data import load_dataset
from ddpm.metrics import (
    INCEPTION_FILE,
    FeatureExtractor,
    WeightsNotFoundError,
    classifier_extractor,
    feature_statistics,
    frechet_distance,
    inception_extractor,
    kernel_distance,
    precision_recall,
    reference_statistics,
)

from conftest import ddpm_in_process

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_frechet_distance_equals_the_closed_form_for_commuting_covariances():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute, so
    # FID = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    d = 6
    rng = np.random.default_rng(0)
    q = _rotation(d, 1)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_general_covariances_and_symmetry():
    # Non-commuting covariances: Tr((S1^1/2 S2 S1^1/2)^1/2) computed independently, by eigh.
    d = 5
    rng = np.random.default_rng(3)
    m1, m2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(d), m2 @ m2.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    r1 = _sqrtm_psd(s1)
    expected = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                - 2 * np.trace(_sqrtm_psd(r1 @ s2 @ r1)))
    forward, backward = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert forward == pytest.approx(expected, rel=1e-8)
    assert forward == pytest.approx(backward, rel=1e-10)


def test_fid_of_gaussian_samples_converges_to_the_closed_form():
    d, n = 4, 200_000
    g = torch.Generator().manual_seed(0)
    scale1, scale2 = torch.tensor([1.0, 2.0, 0.5, 1.5]), torch.tensor([1.5, 1.0, 1.0, 0.5])
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale1
    y = torch.randn(n, d, generator=g, dtype=torch.float64) * scale2 + 0.3
    expected = d * 0.3**2 + float(((scale1 - scale2) ** 2).sum())
    fid = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    assert fid == pytest.approx(expected, rel=0.02)


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Binkowski et al. 2018, eq. 4, with k(a, b) = (a.b / d + 1)^3, written out directly."""
    d, m = x.shape[1], len(x)
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean())


def test_kid_is_the_unbiased_mmd_estimate_and_symmetric():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 8, generator=g, dtype=torch.float64)
    y = torch.randn(60, 8, generator=g, dtype=torch.float64) + 0.4
    # One subset holding every sample: the estimator itself, no subsampling.
    kid, _ = kernel_distance(x, y, subsets=1, subset_size=60)
    assert kid == pytest.approx(_unbiased_mmd2(x.numpy(), y.numpy()), rel=1e-9)
    assert kernel_distance(y, x, subsets=1, subset_size=60)[0] == pytest.approx(kid, rel=1e-9)


def test_kid_of_two_samples_of_one_distribution_averages_near_zero():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2000, 16, generator=g), torch.randn(2000, 16, generator=g)
    same, same_std = kernel_distance(x, y, subsets=50, subset_size=500)
    shifted, _ = kernel_distance(x, y + 0.5, subsets=50, subset_size=500)
    assert abs(same) < 3 * same_std / np.sqrt(50) + 1e-4  # unbiased: zero within its noise
    assert shifted > 20 * max(abs(same), same_std)


def test_precision_recall_on_identical_and_disjoint_sets():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 8, generator=g)
    assert precision_recall(x, x.clone()) == (1.0, 1.0)
    assert precision_recall(x + 100.0, x) == (0.0, 0.0)
    # Generated samples all from one of the real data's two modes: precise, but no real sample
    # of the other mode is covered, so recall is at most one half.
    real = torch.cat([torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g) + 20])
    precision, recall = precision_recall(torch.randn(600, 8, generator=g), real)
    assert precision > 0.8 and recall <= 0.5


def _degraded(images: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "real": images,
        "light blur": gaussian_blur(images, kernel_size=5, sigma=1.0),
        "heavy blur": gaussian_blur(images, kernel_size=9, sigma=2.5),
        "noise": torch.randint(0, 256, images.shape, generator=g, dtype=torch.uint8),
    }


def _scores(extractor: FeatureExtractor, reference: torch.Tensor, candidates: torch.Tensor):
    ref = extractor(reference)
    mu_r, s_r = feature_statistics(ref)
    fids, kids = {}, {}
    for name, images in _degraded(candidates, seed=0).items():
        f = extractor(images)
        fids[name] = frechet_distance(*feature_statistics(f), mu_r, s_r)
        kids[name] = kernel_distance(f, ref, subsets=20)[0]
    return fids, kids


def _in_order(scores: dict[str, float], order: list[str]) -> bool:
    return all(scores[a] < scores[b] for a, b in zip(order, order[1:], strict=False))


def _real_fashion() -> tuple[torch.Tensor, torch.Tensor]:
    if not FASHION.is_dir():
        pytest.fail(f"{FASHION} is missing: install Debian's dataset-fashion-mnist (scripts/setup.sh does)")
    test = load_dataset("fashion-mnist", FASHION, "test").images
    train = load_dataset("fashion-mnist", FASHION, "train").images
    return test, train


def test_offline_extractor_ranks_real_over_blur_over_noise():
    test, train = _real_fashion()
    fids, kids = _scores(classifier_extractor("fashion-mnist"), test[:2000], train[:1000])
    order = ["real", "light blur", "heavy blur", "noise"]
    assert _in_order(fids, order), fids
    assert _in_order(kids, order), kids


def _random_inception_weights(path: Path, monkeypatch) -> Path:
    """Weights of the right architecture, randomly initialised: no download needed."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with monkeypatch.context() as m:
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3", ["2048"])
    torch.manual_seed(0)
    # He init keeps activations alive through ~50 random layers; with torch's default init the
    # 2048 features come out all zero and every FID is 0 (measured), which would test nothing.
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


def test_inception_plumbing_with_random_weights_ranks_real_over_blur_and_noise(tmp_path, monkeypatch):
    # A plumbing test: the real Inception weights are a 91 MB download, so this runs the same
    # code path (weights file -> torch-fidelity's network -> grey-to-RGB -> 299 px -> 2048
    # features) with random weights. It checks the wiring, not FID values. Random features
    # weigh intensity statistics rather than structure: uniform noise (FID ~4.8 here) lands
    # between light (~2.6) and heavy blur (~7.1), so noise is only required to be worse than real
    # (~0.37). 16 reference and 8 candidate images keep those gaps sevenfold or more (32 and 16
    # gave much the same: 0.24, 2.5, 6.8, 4.9).
    weights = _random_inception_weights(tmp_path / "random-inception.pth", monkeypatch)
    extractor = inception_extractor(weights)
    assert extractor.dim == 2048
    test, train = _real_fashion()
    fids, kids = _scores(extractor, test[:16], train[:8])
    for scores in (fids, kids):
        assert _in_order(scores, ["real", "light blur", "heavy blur"]), scores
        assert _in_order(scores, ["real", "noise"]), scores


def test_missing_inception_weights_message_names_the_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(WeightsNotFoundError) as info:
        inception_extractor()
    message = str(info.value)
    assert INCEPTION_FILE in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "--inception-weights" in message
    with pytest.raises(WeightsNotFoundError, match="no such file"):
        inception_extractor(tmp_path / "nowhere.pth")


def test_inception_weights_that_run_code_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(ValueError, match="not a plain weights file"):
        inception_extractor(path)
    assert not (tmp_path / "pwned").exists()


class _Counting:
    """Wraps an extractor and counts the images it is asked for."""

    def __init__(self, inner: FeatureExtractor, name: str | None = None, fingerprint: str | None = None):
        self.inner, self.calls = inner, 0
        self.name = name or inner.name
        self.fingerprint = fingerprint or inner.fingerprint

    def __call__(self, images, **kwargs):
        self.calls += 1
        return self.inner(images)


def test_reference_statistics_are_cached_and_invalidated(tmp_path, fake_fashion):
    from conftest import write_idx

    base = classifier_extractor("fashion-mnist")
    ext = _Counting(base)
    train = load_dataset("fashion-mnist", fake_fashion, "train")
    first = reference_statistics(train, "train", ext, cache_dir=tmp_path)
    second = reference_statistics(train, "train", ext, cache_dir=tmp_path)
    assert ext.calls == 1 and second.path == first.path
    np.testing.assert_allclose(second.sigma, first.sigma)
    assert torch.equal(second.features, first.features)

    # Another split, another extractor (new weights): recomputed, each under its own key.
    test = load_dataset("fashion-mnist", fake_fashion, "test")
    reference_statistics(test, "test", ext, cache_dir=tmp_path)
    assert ext.calls == 2
    retrained = _Counting(base, fingerprint="0123456789abcdef")
    reference_statistics(train, "train", retrained, cache_dir=tmp_path)
    assert retrained.calls == 1
    other = _Counting(base, name="inception-v3")
    reference_statistics(train, "train", other, cache_dir=tmp_path)
    assert other.calls == 1

    # The dataset's files change: recomputed, and the stale entry is removed.
    folder = tmp_path / "changed"
    folder.mkdir()
    for f in fake_fashion.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    changed = train.images.clone()
    changed[0, 0, 0, 0] ^= 1
    write_idx(folder / "train-images-idx3-ubyte", changed[:, 0].numpy())
    changed_train = load_dataset("fashion-mnist", folder, "train")
    third = reference_statistics(changed_train, "train", ext, cache_dir=tmp_path)
    assert ext.calls == 3 and third.path != first.path
    assert not first.path.exists()


def test_corrupt_cache_file_is_recomputed(tmp_path, fake_fashion):
    ext = _Counting(classifier_extractor("fashion-mnist"))
    train = load_dataset("fashion-mnist", fake_fashion, "train")
    ref = reference_statistics(train, "train", ext, cache_dir=tmp_path)
    ref.path.write_bytes(b"not a cache file")
    again = reference_statistics(train, "train", ext, cache_dir=tmp_path)
    assert ext.calls == 2 and torch.equal(again.features, ref.features)


# --- found only at the end of ddpm eval: a cache that is a file, images unlike the data -----------


def test_a_cache_folder_that_is_a_file_is_said_first_and_the_scores_are_kept(world, tmp_path):
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("not a folder")
    r = ddpm_in_process("eval", world / "run", "--n", 128, "--steps", 2, "--sampler", "ddim",
                        "--json", "--no-progress", "--cache-dir", blocker)
    assert r.returncode == 0, r.stderr
    assert "warning: cannot cache reference statistics in" in r.stderr and "is a file" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["n"] == 128
    assert blocker.read_text() == "not a folder"


def test_images_unlike_the_dataset_are_scored_with_a_warning(tmp_path, fake_fashion):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "rgb.npz", arr_0=rng.integers(0, 256, (128, 40, 40, 3), dtype=np.uint8))
    r = ddpm_in_process("eval", "--images", tmp_path / "rgb.npz", "--dataset", "fashion-mnist",
                        "--data-dir", fake_fashion, "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "warning: the images are 3x40x40 but the fashion-mnist train images are 1x28x28" in r.stderr
