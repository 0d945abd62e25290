import pytest
import torch

from ddpm.models import UNet, UNetConfig, count_parameters
from ddpm.models.unet import timestep_embedding


def _randomise(model):
    """The U-Net zero-initialises its output layers (it starts as a constant); give every weight
    a random value so that the tests see how inputs flow through it."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32, 64])
def test_output_shape_equals_input_shape(size, channels):
    config = UNetConfig(in_channels=channels, image_size=size, base_channels=8,
                        channel_mults=(1, 2, 2), num_res_blocks=1,
                        attention_resolutions=(size // 2,), norm_groups=4)
    model = UNet(config).eval()
    x = torch.randn(2, channels, size, size)
    assert model(x, torch.tensor([0, 999])).shape == x.shape


def test_128_pixels_four_levels():
    config = UNetConfig(in_channels=3, image_size=128, base_channels=8, channel_mults=(1, 1, 2, 2),
                        num_res_blocks=1, attention_resolutions=(16,), norm_groups=4)
    x = torch.randn(1, 3, 128, 128)
    assert UNet(config).eval()(x, torch.tensor([5])).shape == x.shape


def test_time_changes_the_output():
    model = _randomise(UNet(UNetConfig(base_channels=8, norm_groups=4, num_res_blocks=1))).eval()
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
    ],
)
def test_bad_shapes_are_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet(UNetConfig(**kwargs))
