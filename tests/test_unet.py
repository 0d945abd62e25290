"""models/: the U-Net and its blocks (residual, attention, the timestep embedding)."""

import pytest
import torch

from ddpm.models import UNet, UNetConfig, count_parameters
from ddpm.models.unet import AttentionBlock, ResBlock, timestep_embedding


def _randomise(model):
    """The U-Net zero-initialises its output layers (it starts as a constant); give every weight
    a random value so that the tests see how inputs flow through it."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1, 0.1)  # norms keep their scale, or deep paths fade to nothing
            else:
                p.normal_(0, 0.1)
    return model


def sides_seen(model, kind, x, t):
    """The side of the feature map each ``kind`` module of ``model`` read, in the order they ran
    during one forward pass."""
    sides = []
    hooks = [m.register_forward_hook(lambda module, inputs, output: sides.append(inputs[0].shape[-1]))
             for m in model.modules() if isinstance(m, kind)]
    with torch.no_grad():
        model(x, t)
    for hook in hooks:
        hook.remove()
    return sides


@pytest.mark.parametrize("block", ["resnet", "convnext"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32, 64])
def test_output_has_the_input_shape_starts_at_zero_and_attends_where_asked(size, channels, block):
    """The output convolution is zero-initialised, so a new model predicts exactly zero for any
    input; attention runs at the configured side (once down, twice up: one block more there)
    and in the middle block, at the smallest side."""
    config = UNetConfig(in_channels=channels, image_size=size, base_channels=8,
                        channel_mults=(1, 2, 2), num_res_blocks=1,
                        attention_resolutions=(size // 2,), norm_groups=4, block=block)
    model = UNet(config).eval()
    x, t = torch.randn(2, channels, size, size), torch.tensor([0, 999])
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(x))
    assert sides_seen(model, AttentionBlock, x, t) == [size // 2, size // 4, size // 2, size // 2]


def test_128_pixels_four_levels():
    """Four levels halve 128 px to 16 px: one residual block per level down, the middle's two
    at 16 px, two per level up; attention at 16 px only (down, middle, twice up)."""
    config = UNetConfig(in_channels=3, image_size=128, base_channels=8, channel_mults=(1, 1, 2, 2),
                        num_res_blocks=1, attention_resolutions=(16,), norm_groups=4)
    model = UNet(config).eval()
    x, t = torch.randn(1, 3, 128, 128), torch.tensor([5])
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(x))
    assert sides_seen(model, ResBlock, x, t) == [128, 64, 32, 16, 16, 16,
                                                16, 16, 32, 32, 64, 64, 128, 128]
    assert sides_seen(model, AttentionBlock, x, t) == [16, 16, 16, 16]


@pytest.mark.parametrize("block", ["resnet", "convnext"])
def test_time_changes_the_output(block):
    model = _randomise(UNet(UNetConfig(base_channels=8, norm_groups=4, num_res_blocks=1,
                                       block=block))).eval()
    x = torch.randn(1, 1, 28, 28).expand(2, 1, 28, 28)
    out = model(x, torch.tensor([10, 900]))
    assert (out[0] - out[1]).abs().mean() > 1e-3


def test_attention_and_width_change_the_model():
    small = UNet(UNetConfig(base_channels=8, attention_resolutions=(), norm_groups=4))
    wide = UNet(UNetConfig(base_channels=16, attention_resolutions=(), norm_groups=4))
    attn = UNet(UNetConfig(base_channels=8, attention_resolutions=(14, 7), norm_groups=4))
    assert count_parameters(wide) > 3 * count_parameters(small)
    assert count_parameters(attn) > count_parameters(small)
    assert sum(type(m).__name__ == "AttentionBlock" for m in attn.modules()) > sum(
        type(m).__name__ == "AttentionBlock" for m in small.modules())


@pytest.mark.parametrize("block", ["resnet", "convnext"])
def test_each_image_is_denoised_on_its_own(block):
    """GroupNorm normalises per image, so one image's output does not depend on its batch."""
    model = _randomise(UNet(UNetConfig(base_channels=8, norm_groups=4, num_res_blocks=1,
                                       block=block))).eval()
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([1, 50, 999])
    assert torch.allclose(model(x, t)[1:2], model(x[1:2], t[1:2]), atol=1e-5)


def test_patches_fold_pixels_into_channels():
    """patch_size 2: the first layer sees each 2x2 patch as one position of 4 channels, so one
    pixel reaches conv_in's output only within the 3x3 neighbourhood of its patch; and the last
    layer's channels unfold to the same pixels they were folded from, so the output keeps the
    input's shape and pixel order."""
    config = UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                        attention_resolutions=(7,), norm_groups=4, patch_size=2)
    model = _randomise(UNet(config)).eval()
    assert model.conv_in.in_channels == 4 and model.conv_out.out_channels == 4
    x, t = torch.randn(1, 1, 28, 28), torch.tensor([3])
    seen = {}
    model.conv_in.register_forward_hook(
        lambda module, inputs, output: seen.update(patches=inputs[0], features=output))
    out = model(x, t).detach()
    patches, features = seen["patches"], seen["features"]  # [1, 4, 14, 14], [1, 8, 14, 14]
    assert out.shape == x.shape and patches.shape == (1, 4, 14, 14)

    def nudge(r, c):
        """Add 1 to pixel (r, c): the (channel, i, j) of conv_in's input that changed, and the
        [14, 14] mask of conv_in's output positions that changed."""
        nudged = x.clone()
        nudged[0, 0, r, c] += 1.0
        model(nudged, t)
        changed = [tuple(p[1:]) for p in (seen["patches"] != patches).nonzero().tolist()]
        return changed, (seen["features"] != features).any(dim=1)[0]

    def unfold(channel, i, j):
        """The output pixels [b, c, row, col] that move when conv_out's output gets 1 added at
        (channel, i, j)."""
        def add_one(module, inputs, output):
            output = output.clone()
            output[0, channel, i, j] += 1.0
            return output

        hook = model.conv_out.register_forward_hook(add_one)
        moved = (model(x, t) != out).nonzero().tolist()
        hook.remove()
        return moved

    with torch.no_grad():
        for r, c in [(0, 0), (0, 1), (1, 0), (1, 1), (6, 9), (13, 14), (27, 26), (27, 27)]:
            changed, reached = nudge(r, c)
            assert len(changed) == 1 and changed[0][1:] == (r // 2, c // 2), (r, c, changed)
            expected = torch.zeros(14, 14, dtype=torch.bool)  # the patch's 3x3 neighbourhood
            expected[max(r // 2 - 1, 0):r // 2 + 2, max(c // 2 - 1, 0):c // 2 + 2] = True
            assert torch.equal(reached, expected), (r, c)
            assert unfold(*changed[0]) == [[0, 0, r, c]], (r, c)
        # the four pixels of one patch fill its four channels at one position
        folded = sorted(nudge(r, c)[0] for r, c in [(4, 6), (4, 7), (5, 6), (5, 7)])
        assert folded == [[(k, 2, 3)] for k in range(4)]


def test_convnext_blocks_replace_the_residual_blocks():
    config = UNetConfig(base_channels=8, norm_groups=4, num_res_blocks=1, block="convnext")
    kinds = {type(m).__name__ for m in UNet(config).modules()}
    assert "ConvNeXtBlock" in kinds and "ResBlock" not in kinds
    depthwise = [m for m in UNet(config).modules() if isinstance(m, torch.nn.Conv2d)
                 and m.kernel_size == (7, 7)]
    assert depthwise and all(m.groups == m.in_channels for m in depthwise)


def test_sinusoidal_embedding():
    emb = timestep_embedding(torch.tensor([0, 1, 500]), 16)
    assert emb.shape == (3, 16)
    assert torch.allclose(emb[0, :8], torch.zeros(8)) and torch.allclose(emb[0, 8:], torch.ones(8))
    assert not torch.allclose(emb[1], emb[2])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=30), "image size 30 cannot be halved 2 times"),
        (dict(attention_resolutions=(5,)), r"attention resolutions \[5\] match no level"),
        (dict(num_res_blocks=0), "num_res_blocks must be at least 1"),
        (dict(block="transformer"), "unknown block 'transformer'; choose one of resnet, convnext"),
        (dict(patch_size=3), "patch size 3 must be at least 1 and divide the image size 28"),
        (dict(patch_size=2), "cannot be halved 2 times .* after patches of 2: use a size divisible by 8"),
    ],
)
def test_bad_shapes_are_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet(UNetConfig(**kwargs))
