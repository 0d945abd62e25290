"""The presets: named, complete run configurations chosen by measurement (BENCHMARKS.md), and the
formulations, named sets of settings laid over any preset (``ddpm train --formulation``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from .autoencoder import DEFAULT_TRAIN, AutoencoderLossConfig, AutoencoderRunConfig
from .config import DataConfig, DiffusionConfig, RunConfig, SampleConfig, TrainConfig
from .models import UNetConfig
from .models.autoencoder import AutoencoderConfig


def _fashion_cpu() -> RunConfig:
    # Chosen by measurement on a 2-core CPU (BENCHMARKS.md). The recipe: batch 64 trains faster
    # per image than 128 and, with a cosine decay from 2e-3, reached the lowest held-out loss;
    # v-prediction with min-SNR-5 weighting (and no flips, data.resolve) lowered FID at equal
    # steps from 22.1 to 13.3, where eps with uniform weights had won on held-out loss alone.
    # The shape (BENCHMARKS.md, "EDM's preconditioning and the model's shape at 15
    # minutes" and "Cheaper still: 16 / 32 / 48"): at this budget steps beat width. A first
    # level cheaper than the others and attention only in the middle block (16 / 48 / 48)
    # trained 1.4x the steps of the earlier 24 / 48 / 48 with attention at 7 px in 15 bf16
    # minutes and lowered FID from 3.54 to 3.06 and 3.34 (two training runs, means of three
    # sampling seeds; the old shape's three runs 3.54-3.74); 32 channels at 14 px instead of 48
    # (16 / 32 / 48) trained 1.37x the steps again and gave 2.95 and 3.13 on the same two seeds.
    # Wider (32 / 64 / 64), deeper (two blocks per level on 16 / 48 / 48: 3.42) and a linear
    # instead of a cosine decay (3.23) did not help.
    # Its precision is train.precision's default, auto: bf16 on a CPU with bf16 hardware, which
    # trained 1.4x the steps of fp32 in 15 minutes there and reached FID 4.63 against 5.09
    # (BENCHMARKS.md, "bf16 on a CPU that has it"); fp32 elsewhere.
    return RunConfig(
        model=UNetConfig(
            in_channels=1,
            image_size=28,
            base_channels=16,
            channel_mults=(1, 2, 3),
            num_res_blocks=1,
            attention_resolutions=(),
            dropout=0.0,
            # 8 groups divide every width (16, 32, 48, 64, 96): one count for all, which
            # diffusers' UNet2DModel needs to hold the model ('ddpm export')
            norm_groups=8,
        ),
        diffusion=DiffusionConfig(schedule="linear", num_train_timesteps=1000, prediction_type="v",
                                  loss_weighting="min-snr", min_snr_gamma=5.0),
        train=TrainConfig(
            batch_size=64,
            lr=2e-3,
            lr_schedule="cosine",
            warmup_steps=100,
            ema_decay=0.995,
            steps=1400,
            minutes=None,
            sample_every=175,  # 8 preview grids (~8 s each) make the run's progress.gif
            sample_steps=50,
            checkpoint_every=350,
            # FID/KID of 1,000 DPM-Solver++ samples (20 steps) on the offline features: ~40 s
            # each, so the demo's curves.png shows the model improving next to the floor.
            fid_every=350,
            fid_n=1000,
        ),
        # Trailing steps (Lin et al. 2024: T-1, T-1-T/n, ..., the last jump from t = T/n - 1 to
        # the data): with DPM-Solver++ at 20 steps they lowered FID on every model of this
        # preset measured (the 15-minute run 4.26 -> 3.67, mean of 3 seeds; the demo 8.57 ->
        # 7.61) against the sampler's own logsnr spacing, which spends its steps at low noise,
        # where min-SNR-5 trains the model least; ancestral sampling is unchanged by them (6.84
        # and 7.01 at 100 steps). BENCHMARKS.md, "Sampling steps".
        sample=SampleConfig(sampler="ddpm", num_sample_steps=100, spacing="trailing"),
    )


def _tiny() -> RunConfig:
    # Seconds per run: for smoke tests and trying the CLI, not for pretty pictures.
    return RunConfig(
        model=UNetConfig(
            in_channels=1,
            image_size=28,
            base_channels=8,
            channel_mults=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(),
            dropout=0.0,
            norm_groups=4,
        ),
        diffusion=DiffusionConfig(schedule="linear", num_train_timesteps=100),
        train=TrainConfig(
            batch_size=16,
            lr=1e-3,
            warmup_steps=0,
            ema_decay=0.9,
            steps=20,
            log_every=5,
            sample_every=10,
            sample_n=4,
            sample_steps=10,
            checkpoint_every=10,
        ),
        sample=SampleConfig(num_sample_steps=20),
    )


def _fashion_gpu() -> RunConfig:
    # The GPU counterpart of fashion-cpu, for about 5 minutes of one GPU: fashion-cpu's recipe (v
    # prediction, min-SNR-5, cosine decay, no flips), which won on FID there, with a wider and
    # deeper U-Net and a batch large enough to keep a GPU busy (fashion-cpu's batch of 64 used an
    # eighth of an H200). Not yet chosen by measurement on a GPU: BENCHMARKS.md says so.
    return RunConfig(
        model=UNetConfig(in_channels=1, image_size=28, base_channels=64, channel_mults=(1, 2, 2),
                         num_res_blocks=2, attention_resolutions=(7,), dropout=0.0),
        diffusion=DiffusionConfig(schedule="linear", num_train_timesteps=1000, prediction_type="v",
                                  loss_weighting="min-snr", min_snr_gamma=5.0),
        train=TrainConfig(batch_size=256, lr=1e-3, lr_schedule="cosine", warmup_steps=200,
                          ema_decay=0.999, steps=None, minutes=5.0, log_every=100,
                          sample_every=1000, sample_steps=50, checkpoint_every=2000,
                          fid_every=0),
        sample=SampleConfig(sampler="dpm++", num_sample_steps=20),
    )


def _cifar10_ddpm() -> RunConfig:
    # Ho et al. 2020, section 4 and appendix B: the 35.7M-parameter CIFAR-10 U-Net (128 channels,
    # multipliers 1,2,2,2, two residual blocks per level, attention at 16 px, dropout 0.1), T =
    # 1000 with the linear schedule, eps prediction with L_simple, batch 128, lr 2e-4 after 5,000
    # warm-up steps, EMA 0.9999, random flips, 800k steps. (They used Adam; AdamW with no weight
    # decay is the same update.) FID needs Inception-v3 weights and 2,048+ images: --fid-every.
    return RunConfig(
        model=UNetConfig(in_channels=3, image_size=32, base_channels=128, channel_mults=(1, 2, 2, 2),
                         num_res_blocks=2, attention_resolutions=(16,), dropout=0.1),
        diffusion=DiffusionConfig(schedule="linear", num_train_timesteps=1000),
        data=DataConfig(dataset="cifar10", hflip=True),
        train=TrainConfig(batch_size=128, lr=2e-4, warmup_steps=5000, ema_decay=0.9999,
                          ema_warmup=False, steps=800_000, log_every=100, sample_every=10_000,
                          checkpoint_every=10_000, fid_every=0),
        sample=SampleConfig(sampler="ddpm", num_sample_steps=1000),
    )


def _flowers64() -> RunConfig:
    # 64 px colour images: Flowers-102 (all 8,189 photos), or any folder with --dataset folder
    # --data-dir DIR. A U-Net of Ho et al.'s shape for 64 px (multipliers 1,2,2,4, attention at
    # 16 px), 17M parameters, with fashion-cpu's v prediction and min-SNR weights. A GPU's work.
    return RunConfig(
        model=UNetConfig(in_channels=3, image_size=64, base_channels=64, channel_mults=(1, 2, 2, 4),
                         num_res_blocks=2, attention_resolutions=(16,), dropout=0.1),
        diffusion=DiffusionConfig(schedule="linear", num_train_timesteps=1000, prediction_type="v",
                                  loss_weighting="min-snr", min_snr_gamma=5.0),
        data=DataConfig(dataset="flowers102", split="all", image_size=64),
        train=TrainConfig(batch_size=64, lr=2e-4, warmup_steps=1000, ema_decay=0.9995,
                          steps=100_000, log_every=100, sample_every=2500, checkpoint_every=2500,
                          fid_every=0),
        sample=SampleConfig(sampler="dpm++", num_sample_steps=20),
    )


# --- latent diffusion: an autoencoder preset (ddpm train-autoencoder --preset) and the diffusion
# preset that trains in its latents (ddpm train --preset ... --autoencoder AE_RUN) ---------------


def _fashion64_ae() -> AutoencoderRunConfig:
    # Fashion-MNIST at 64 px to 4 x 16 x 16 latents (F = 4, C = 4) in 10 CPU minutes.
    # BENCHMARKS.md, "Latent against pixel diffusion at 64 px": width 16 trained 569 steps in
    # 10 minutes and reconstructed the test split at PSNR 31.62 dB, rFID 0.213, where the default
    # width 32 trained 197 steps for 26.29 dB, rFID 1.236: at this budget steps beat width.
    return AutoencoderRunConfig(
        model=AutoencoderConfig(in_channels=1, image_size=64, downsample=4, latent_channels=4,
                                base_channels=16),
        data=DataConfig(dataset="fashion-mnist", image_size=64),
        train=dataclasses.replace(DEFAULT_TRAIN, steps=None, minutes=10.0))


def _fashion64_latent() -> RunConfig:
    # Fashion-MNIST at 64 px, diffused in the 4 x 16 x 16 latents of a fashion64-ae autoencoder:
    # fashion-cpu's recipe and U-Net (16 / 32 / 48 channels at 16 / 8 / 4 px of the latents).
    # BENCHMARKS.md, "Latent against pixel diffusion at 64 px": against the same recipe on the
    # 64 px images, at equal training minutes on a 2-core CPU, it trained ~10x the images per
    # second, reached FID 4.17 in 15 minutes where the pixel U-Net reached 15.42, and sampled
    # 1,000 images (decoded) 6.7x faster; on the fashion64-ae autoencoder, in 60 minutes each,
    # it reached FID 1.79 against 5.55 and passed the pixel U-Net's 60-minute FID in ~2 minutes.
    # 5,000 steps is that 15-minute run's length (5,158 steps, FID 4.43 at 4,550); previews,
    # FIDs and checkpoints every 1,000 steps keep their cost (~25 s an FID) a small share of the
    # run.
    fashion = _fashion_cpu()
    return dataclasses.replace(
        fashion,
        model=dataclasses.replace(fashion.model, in_channels=4, image_size=16),
        data=DataConfig(dataset="fashion-mnist", image_size=64),
        train=dataclasses.replace(fashion.train, steps=5000, sample_every=625,
                                  checkpoint_every=1000, fid_every=1000))


def _flowers64_ae() -> AutoencoderRunConfig:
    # Rombach et al.'s KL-f4 shape (appendix G: width 128, multipliers 1 / 2 / 4, two residual
    # blocks per level, the patch discriminator at weight 0.5) at half the width, for 64 px colour
    # images on a GPU. Not measured: no GPU has trained it (BENCHMARKS.md says so).
    return AutoencoderRunConfig(
        model=AutoencoderConfig(in_channels=3, image_size=64, downsample=4, latent_channels=4,
                                base_channels=64, num_res_blocks=2),
        loss=AutoencoderLossConfig(disc_weight=0.5, disc_start=5000),
        data=DataConfig(dataset="flowers102", split="all", image_size=64),
        train=dataclasses.replace(DEFAULT_TRAIN, batch_size=32, lr=2e-4, steps=20_000,
                                  sample_every=1000, checkpoint_every=1000))


def _flowers64_latent() -> RunConfig:
    # flowers64 in the 4 x 16 x 16 latents of a flowers64-ae autoencoder: Rombach et al.'s LDM-4
    # U-Net shape scaled to 16 px latents (width 128, multipliers 1 / 2 / 2, attention at 8 and 4
    # px), with flowers64's v prediction, min-SNR weights and schedule, at twice its batch. Not
    # measured: no GPU has trained it (BENCHMARKS.md says so).
    flowers = _flowers64()
    return dataclasses.replace(
        flowers,
        model=UNetConfig(in_channels=4, image_size=16, base_channels=128, channel_mults=(1, 2, 2),
                         num_res_blocks=2, attention_resolutions=(8, 4), dropout=0.1),
        train=dataclasses.replace(flowers.train, batch_size=128))


PRESETS = {
    "fashion-cpu": _fashion_cpu,
    "fashion-gpu": _fashion_gpu,
    "cifar10-ddpm": _cifar10_ddpm,
    "flowers64": _flowers64,
    "fashion64-latent": _fashion64_latent,
    "flowers64-latent": _flowers64_latent,
    "tiny": _tiny,
}
# The autoencoder presets ('ddpm train-autoencoder --preset'), and for each latent diffusion
# preset the autoencoder preset whose latents it models (its --autoencoder is a run of that one).
AUTOENCODER_PRESETS = {"fashion64-ae": _fashion64_ae, "flowers64-ae": _flowers64_ae}
LATENT_PRESETS = {"fashion64-latent": "fashion64-ae", "flowers64-latent": "flowers64-ae"}
DEFAULT_PRESET = "fashion-cpu"  # on a CPU; on CUDA, DEFAULT_GPU_PRESET
DEFAULT_GPU_PRESET = "fashion-gpu"

# Formulations: named sets of settings laid over any preset ('ddpm train --formulation NAME',
# under --config and the options given). Each piece stays its own setting, recorded in the
# run's config.json as such. EDM (Karras et al. 2022): Table 1's preconditioning (sec. 5),
# log-normal noise levels and lambda(sigma) weights (sec. 5, "Loss weighting and sampling"),
# and the 2nd-order Heun sampler over their rho = 7 spacing at 18 steps, 35 evaluations (sec.
# 3, Algorithm 1). sigma_data stays the run's (--sigma-data: 0.5 is theirs for images in
# [-1, 1]).
FORMULATIONS: dict[str, dict[str, dict[str, Any]]] = {
    "edm": {
        "diffusion": {"preconditioning": "edm", "timestep_sampling": "log-normal",
                      "loss_weighting": "edm"},
        "sample": {"sampler": "heun", "num_sample_steps": 18, "spacing": "karras"},
    },
}


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def get_autoencoder_preset(name: str) -> AutoencoderRunConfig:
    if name not in AUTOENCODER_PRESETS:
        raise ValueError(f"unknown autoencoder preset {name!r}; choose one of "
                         f"{', '.join(sorted(AUTOENCODER_PRESETS))}")
    return AUTOENCODER_PRESETS[name]()
