"""``ddpm bench``: FLOP counts against closed forms, and the report's arithmetic."""

import json

import pytest
import torch
from torch import nn

from ddpm.bench import count_gflops
from ddpm.cli import main
from ddpm.models import UNet, UNetConfig


def test_flops_of_a_linear_layer_and_a_convolution():
    linear = nn.Linear(64, 32)
    assert count_gflops(lambda: linear(torch.randn(10, 64))) * 1e9 == 2 * 10 * 64 * 32
    conv = nn.Conv2d(3, 8, 3, padding=1)
    # one multiply-add per output value and kernel tap: 2 * B * C_out * H * W * C_in * k * k
    assert count_gflops(lambda: conv(torch.randn(2, 3, 16, 16))) * 1e9 == 2 * 2 * 8 * 16 * 16 * 3 * 9


@pytest.mark.parametrize("block, patch", [("resnet", 1), ("convnext", 1), ("resnet", 2)])
def test_unet_flops_equal_the_sum_over_its_layers(block, patch):
    """The counter's total for the U-Net equals the closed forms summed layer by layer."""
    model = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                            attention_resolutions=(14 // patch,), norm_groups=4, block=block,
                            patch_size=patch)).eval()
    expected = 0

    def conv_hook(m, inputs, out):
        nonlocal expected
        expected += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m, inputs, out):
        nonlocal expected
        expected += 2 * out.numel() * m.in_features

    def attention_hook(m, inputs, out):
        nonlocal expected
        b, c, h, w = inputs[0].shape
        expected += 2 * 2 * b * (h * w) ** 2 * c  # Q K^T and (softmax) V, over all heads

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, nn.Linear):
            m.register_forward_hook(linear_hook)
        elif type(m).__name__ == "AttentionBlock":
            m.register_forward_hook(attention_hook)
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([1, 2, 3])
    counted = count_gflops(lambda: model(x, t)) * 1e9
    assert expected > 0 and counted == expected


def test_peak_matmul_is_the_best_rate_and_stops_growing_when_slow(monkeypatch):
    """The peak is 2 n^3 FLOPs per product times the products per second, the best over the
    sizes tried; sizes stop growing once one product takes a tenth of the time budget."""
    from ddpm import bench

    per_product = {512: 0.001, 1024: 0.004, 2048: 0.5, 4096: 9.0}  # seconds per n x n product
    tried = []

    def timed(step, seconds, warmup, sync):  # the sizes come in the order given below
        n = (512, 1024, 2048, 4096)[len(tried)]
        tried.append(n)
        return 10, 10 * per_product[n]  # 10 products

    monkeypatch.setattr(bench, "_timed", timed)
    peak = bench.peak_matmul_gflops(torch.float32, torch.device("cpu"), seconds=2.0,
                                    sizes=(512, 1024, 2048, 4096))
    # 2048 takes 0.5 s > 2.0 / 10, so 4096 is never tried
    assert tried == [512, 1024, 2048]
    assert peak == pytest.approx(max(2 * n**3 / per_product[n] / 1e9 for n in (512, 1024, 2048)))


def test_bench_json_holds_the_figures_and_they_add_up(capsys):
    assert main(["bench", "--preset", "tiny", "--seconds", "0.5", "--sample-batch-size", "8",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("params", "train_images_per_s", "forward_gflops_per_image", "peak_gflops_fp32",
                "peak_gflops_bf16", "utilisation", "sample_images_per_s"):
        assert r[key] > 0, key
    assert r["params"] == sum(p.numel() for p in UNet(UNetConfig(
        in_channels=1, image_size=28, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
        attention_resolutions=(), dropout=0.0, norm_groups=4)).parameters())
    # backward costs about twice the forward: a training image is ~3 forward passes
    assert 2.5 < r["train_gflops_per_image"] / r["forward_gflops_per_image"] < 3.5
    assert r["achieved_gflops"] == pytest.approx(r["train_gflops_per_image"] * r["train_images_per_s"])
    assert r["utilisation"] == pytest.approx(
        r["achieved_gflops"] / max(r["peak_gflops_fp32"], r["peak_gflops_bf16"]))


def test_bench_table_and_a_bad_option(capsys):
    assert main(["bench", "--preset", "tiny", "--seconds", "0.3", "--sample-batch-size", "4",
                 "--arch", "convnext"]) == 0
    out = capsys.readouterr().out
    assert "images/s" in out and "utilisation" in out and "of the faster peak" in out
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--seconds", "-1"])
    assert exc.value.code == 2
    assert "expected a number > 0, got -1" in capsys.readouterr().err


def test_speed_options_reach_the_training_step():
    """--compile wraps what the step calls (the plain network is still what is saved and
    averaged), --channels-last stores the convolutions NHWC, and AdamW is the fused kernel;
    bench builds all of it with train's own set-up."""
    from ddpm import get_preset, with_overrides
    from ddpm.bench import _synthetic_data
    from ddpm.runtime import make_accelerator
    from ddpm.train import build_training

    config = with_overrides(get_preset("tiny"), {"train": {"compile": True, "channels_last": True}})
    cpu = torch.device("cpu")
    run = build_training(config, make_accelerator(cpu), cpu, lambda: _synthetic_data(config, 64))
    assert isinstance(run.model, torch._dynamo.eval_frame.OptimizedModule)
    assert run.model._orig_mod is run.net
    assert run.net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert run.optimizer.param_groups[0]["fused"] is True
    plain = build_training(get_preset("tiny"), make_accelerator(cpu), cpu,
                           lambda: _synthetic_data(config, 64))
    assert plain.model is plain.net and plain.net.conv_in.weight.is_contiguous()
