"""Frozen, keyword-only dataclass configs and the named presets.

Strings from the command line are parsed in ``cli.py`` only; everything here is already typed.
A run's resolved config is saved as JSON beside its checkpoints and inside each checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .models import UNetConfig


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig:
    schedule: str = "linear"
    num_train_timesteps: int = 1000
    loss: str = "mse"
    prediction_type: str = "eps"  # eps | x0 | v
    loss_weighting: str = "uniform"  # uniform | min-snr
    min_snr_gamma: float = 5.0
    zero_terminal_snr: bool = False  # Lin et al. 2024; needs prediction_type v or x0

    def validate(self) -> None:
        """Raise ValueError naming the bad field, its value and what would work."""
        from .diffusion import LOSS_WEIGHTINGS, LOSSES, PREDICTION_TYPES
        from .schedules import SCHEDULES

        for field_name, value, choices in (
            ("schedule", self.schedule, SCHEDULES), ("loss", self.loss, LOSSES),
            ("prediction_type", self.prediction_type, PREDICTION_TYPES),
            ("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS),
        ):
            if value not in choices:
                raise ValueError(f"unknown {field_name} {value!r}; choose one of {', '.join(choices)}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}")
        if self.zero_terminal_snr and self.prediction_type == "eps":
            raise ValueError(
                "zero terminal SNR makes the last step pure noise, where predicting eps says "
                "nothing about the image; use prediction_type v (or x0) with it"
            )


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """What to train on; ``data.resolve`` validates it and fills in the Nones."""

    dataset: str = "fashion-mnist"
    data_dir: str | None = None  # None: data.default_data_dir(dataset)
    split: str = "train"  # train | test | all (every labelled image of the dataset)
    image_size: int | None = None  # None: the dataset's own (64 for flowers and folders)
    channels: int | None = None  # None: the dataset's own (1 MNIST/Fashion-MNIST, else 3)
    crop: str = "center"  # center | resize (squash) | random (stored at 9/8 size, cropped per batch)
    hflip: bool | None = None  # random horizontal flips; None: the dataset's own (data.resolve)
    folder_labels: bool = False  # folder: class labels from first-level subfolder names
    download: bool = False
    cache_dir: str | None = None  # decoded image files; None: $DDPM_CACHE_DIR or ~/.cache/ddpm
    max_memory_gb: float = 4.0  # image files whose decoded split exceeds this stream from disk
    workers: int = 2  # DataLoader processes decoding image files
    strict: bool = False  # an image file PIL cannot decode: an error instead of a skip


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 200
    lr_schedule: str = "constant"  # constant | cosine (decays to 0 at ``steps``; needs steps)
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)), so early EMA tracks the model
    # Class-conditional models: the label is replaced by the null class with this probability,
    # so one network also learns the unconditional model guidance needs (Ho & Salimans 2022,
    # Algorithm 1, p_uncond; they found 0.1 to 0.2 equally good).
    class_dropout: float = 0.1
    steps: int | None = 10_000
    minutes: float | None = None
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    seed: int = 0
    log_every: int = 50
    sample_every: int = 1000
    sample_n: int = 64
    sample_steps: int = 100  # network evaluations for the in-training preview grids
    fid_every: int = 0  # steps between FID/KID measurements of the EMA model (0: none)
    fid_n: int = 1000  # images generated for each
    fid_sampler: str = "dpm++"
    fid_steps: int = 20
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3  # the newest ones; with fid_every, checkpoints/best.pt as well
    # A step whose loss (or, without fp16's scaler, gradient) is not finite never reaches the
    # weights; then stop (the default: something is wrong) or skip the update and count it.
    on_nan: str = "stop"  # stop | skip
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    channels_last: bool = False  # NHWC tensors for the convolutions
    compile: bool = False  # torch.compile the training forward and backward
    device: str = "auto"
    wandb: bool = False
    wandb_project: str = "ddpm"


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """How the run's final grid and ``ddpm sample`` draw images by default."""

    sampler: str = "ddpm"  # ddpm | ddim | dpm++ | euler | heun
    num_sample_steps: int = 1000
    spacing: str | None = None  # None: the sampler's own default (karras for euler/heun)
    variance: str = "posterior"  # ddpm: the paper's sigma_t^2 = beta-tilde_t; or "beta"
    eta: float = 0.0  # ddim: 0 deterministic ... 1 DDPM-like
    x0_transform: str = "clip"  # clip | dynamic | none: applied to every predicted x0
    # Classifier-free guidance scale w of a class-conditional model (Ho & Salimans 2022, eq. 6):
    # 0 samples the conditional model as trained; larger w trades diversity for class fidelity.
    guidance: float = 0.0


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "RunConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise, so a foreign config is caught early."""

        def build(cls, values: dict[str, Any]):
            names = {f.name: f for f in dataclasses.fields(cls)}
            unknown = set(values) - set(names)
            if unknown:
                raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
            kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
            return cls(**kwargs)

        return RunConfig(
            model=build(UNetConfig, d.get("model", {})),
            diffusion=build(DiffusionConfig, d.get("diffusion", {})),
            data=build(DataConfig, d.get("data", {})),
            train=build(TrainConfig, d.get("train", {})),
            sample=build(SampleConfig, d.get("sample", {})),
        )


def _fashion_cpu() -> RunConfig:
    # Chosen by measurement on a 2-core CPU for a ~10 minute budget (BENCHMARKS.md): width 24
    # beat 16 and 32 at equal time; batch 64 trains faster per image than 128 and, with a cosine
    # decay from 2e-3, reached the lowest held-out loss. v-prediction with min-SNR-5 weighting
    # (and no flips, data.resolve) lowered FID at equal steps from 22.1 to 13.3, where eps with
    # uniform weights had won on held-out loss alone. 1,400 steps take ~9.6 min at 155 img/s.
    return RunConfig(
        model=UNetConfig(
            in_channels=1,
            image_size=28,
            base_channels=24,
            channel_mults=(1, 2, 2),
            num_res_blocks=1,
            attention_resolutions=(7,),
            dropout=0.0,
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
        sample=SampleConfig(sampler="ddpm", num_sample_steps=100),
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


PRESETS = {
    "fashion-cpu": _fashion_cpu,
    "tiny": _tiny,
}
DEFAULT_PRESET = "fashion-cpu"


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
