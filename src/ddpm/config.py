"""The run's configuration: frozen dataclasses, one declaration per setting (the presets are in
:mod:`ddpm.presets`).

Every user-settable field is declared once with :func:`ddpm.settings.setting` (its default, flag,
allowed values, help and resume rule); the command line's options, the overrides onto a preset
(:func:`with_overrides`), the resume check (:func:`resume_changes`) and the help text are made
from those declarations, so an option can never be parsed and then ignored. Each section
validates itself (``validate()``); :meth:`RunConfig.validate` adds the rules between sections and
is what the command line and the Python API both call.

A run's resolved config is saved as JSON beside its checkpoints and inside each checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .data.config import DataConfig, resolve_data
from .diffusion import (
    LOSS_WEIGHTINGS,
    LOSSES,
    PRECONDITIONINGS,
    PREDICTION_TYPES,
    TIMESTEP_SAMPLINGS,
    VARIANCES,
)
from .models import UNetConfig
from .samplers import PREDICTORS, SAMPLERS
from .schedules import SCHEDULES, NoiseSchedule, make_schedule, ve_schedule
from .sde import SDES, TRAINING_SDES
from .settings import (
    SEED_MAX,
    SettingError,
    check_fields,
    checked_sections,
    setting,
    settings_of,
)
from .superres import SuperResConfig
from .timesteps import SPACINGS

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine", "linear")
ON_NAN = ("stop", "skip")
X0_TRANSFORMS = ("clip", "dynamic", "none")


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig:
    schedule: str = setting("linear", flag="--schedule", choices=SCHEDULES, help="beta schedule")
    num_train_timesteps: int = setting(1000, flag="--num-timesteps", at_least=2,
                                       help="diffusion steps T")
    loss: str = setting("mse", flag="--loss", choices=LOSSES,
                        help="elementwise loss on the network's prediction")
    prediction_type: str = setting(
        "eps", flag="--prediction-type", choices=PREDICTION_TYPES,
        help="what the network predicts: the noise eps, the image x0, or v (Salimans & Ho 2022)")
    preconditioning: str = setting(
        "none", flag="--preconditioning", choices=PRECONDITIONINGS,
        help="edm: Karras et al. 2022's c_in, c_skip, c_out around the network for data of "
             "standard deviation --sigma-data, its output then read as --prediction-type's")
    loss_weighting: str = setting("uniform", flag="--loss-weighting", choices=LOSS_WEIGHTINGS,
                                  help="uniform, min-snr (Hang et al. 2023) with --min-snr-gamma, "
                                       "or edm (Karras et al. 2022) with --sigma-data")
    min_snr_gamma: float = setting(5.0, flag="--min-snr-gamma", above=0,
                                   help="gamma of min-SNR weighting")
    sigma_data: float = setting(
        0.5, flag="--sigma-data", above=0,
        help="the data's standard deviation in EDM's preconditioning and weighting")
    timestep_sampling: str = setting(
        "uniform", flag="--timestep-sampling", choices=TIMESTEP_SAMPLINGS,
        help="the law of t in training: uniform over the T steps (Ho et al. 2020), log-normal "
             "in the noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) (Karras et al. 2022) "
             "with --log-sigma-mean and --log-sigma-std, or continuous: t uniform on [0, T-1], "
             "every level between the steps too (Song et al. 2021)")
    log_sigma_mean: float = setting(-1.2, flag="--log-sigma-mean",
                                    help="mean of ln(sigma) under log-normal sampling (EDM's P_mean)")
    log_sigma_std: float = setting(1.2, flag="--log-sigma-std", above=0,
                                   help="standard deviation of ln(sigma) under log-normal "
                                        "sampling (EDM's P_std)")
    # Song et al. 2021: DDPM's process is the VP SDE, NCSN's the VE SDE (docs/sde.md)
    sde: str = setting(
        "vp", flag="--sde", choices=TRAINING_SDES,
        help="the forward process: vp, DDPM's (its schedule --schedule), or ve, NCSN's "
             "(Song & Ermon 2019): x0 + sigma eps, sigma geometric from --sigma-min to --sigma-max")
    # Song & Ermon 2020, technique 2: the smallest level below the data's quantisation; 0.01 of
    # their [0, 1] scale. Ours is [-1, 1], where 0.01 is also the linear schedule's first level.
    sigma_min: float = setting(0.01, flag="--sigma-min", above=0,
                               help="the VE process's smallest noise level")
    # Song & Ermon 2020, technique 1: sigma_max as large as the largest distance between two
    # training images, so the noisiest level can reach any image from any other
    sigma_max: float | None = setting(
        None, flag="--sigma-max", above=0,
        help="the VE process's largest noise level (default: the largest distance between two "
             "training images, measured when training starts and written to config.json)")
    # Lin et al. 2024; needs prediction_type v or x0
    zero_terminal_snr: bool = setting(
        False, flag="--zero-terminal-snr",
        help="rescale the schedule so the last step is pure noise (Lin et al. 2024); needs "
             "--prediction-type v or x0")

    def validate(self) -> None:
        """Raise ValueError naming the bad field, its value and what would work."""
        check_fields(self)
        if self.sde != "ve" and self.sigma_max is not None:
            raise SettingError("diffusion.sigma_max", f"{{setting}} {self.sigma_max:g} sets the VE "
                               f"process's largest noise level, and this run is --sde "
                               f"{self.sde}; add --sde ve, or drop --sigma-max")
        if self.sde == "ve":
            if self.schedule != "linear":
                raise SettingError("diffusion.schedule", f"{{setting}} {self.schedule} names a VP "
                                   f"schedule, and --sde ve has its own: geometric noise levels "
                                   f"from --sigma-min to --sigma-max; drop --schedule")
            if self.zero_terminal_snr:
                raise SettingError("diffusion.zero_terminal_snr", "{setting} makes a VP schedule's "
                                   "last step pure noise; the VE process ends at --sigma-max "
                                   "instead: drop --zero-terminal-snr")
            if self.sigma_max is not None and self.sigma_max <= self.sigma_min:
                raise SettingError("diffusion.sigma_max", f"{{setting}} {self.sigma_max:g} must "
                                   f"be above --sigma-min {self.sigma_min:g}")
        if self.zero_terminal_snr and self.prediction_type == "eps":
            raise ValueError(
                "zero terminal SNR makes the last step pure noise, where predicting eps says "
                "nothing about the image; use prediction_type v (or x0) with it"
            )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    batch_size: int = setting(128, flag="--batch-size", at_least=1, group="optimisation",
                              help="images per micro-batch (all processes together)")
    lr: float = setting(2e-4, flag="--lr", above=0, group="optimisation",
                        help="AdamW peak learning rate")
    weight_decay: float = setting(0.0, flag="--weight-decay", at_least=0, group="optimisation",
                                  help="AdamW's decoupled weight decay")
    adam_betas: tuple[float, float] = setting(
        (0.9, 0.999), flag="--adam-betas", at_least=0, below=1, min_items=2, group="optimisation",
        metavar="B1,B2", example="0.9,0.999", help="AdamW's moment decays")
    warmup_steps: int = setting(200, flag="--warmup-steps", at_least=0, group="optimisation",
                                help="linear learning-rate warm-up")
    lr_schedule: str = setting(
        "constant", flag="--lr-schedule", choices=LR_SCHEDULES, group="optimisation",
        help="after warm-up: constant, or a cosine or linear decay to 0 at --steps (or over "
             "--minutes)")
    grad_clip: float = setting(1.0, flag="--grad-clip", above=0, group="optimisation",
                               help="clip the gradient norm to this")
    grad_accum: int = setting(1, flag="--grad-accum", at_least=1, group="optimisation",
                              help="micro-batches per optimiser step")
    ema_decay: float = setting(0.999, flag="--ema-decay", above=0, below=1, group="optimisation",
                               help="EMA decay of the sampling weights")
    # decay min(ema_decay, (1 + n) / (10 + n)), so early EMA tracks the model
    ema_warmup: bool = setting(True, flag="--ema-warmup", group="optimisation",
                               help="EMA decay (1 + n) / (10 + n) while that is below --ema-decay")
    # Karras et al. 2024: power-function EMAs of these lengths (sigma_rel), saved every
    # ema_snapshot_every steps, so that 'ddpm posthoc-ema' can rebuild one of any length later.
    posthoc_ema: tuple[float, ...] = setting(
        (), flag="--posthoc-ema", above=0, at_most=0.2886, group="optimisation", metavar="STD,...",
        example="0.05,0.10",
        help="also keep power-function EMAs of these relative lengths sigma_rel (Karras et al. "
             "2024) and snapshots of them, for 'ddpm posthoc-ema' to rebuild one of any length")
    ema_snapshot_every: int = setting(
        0, flag="--ema-snapshot-every", at_least=0, group="optimisation",
        help="steps between snapshots of the --posthoc-ema averages (0: at each checkpoint)")
    # Class-conditional models: the label is replaced by the null class with this probability,
    # so one network also learns the unconditional model guidance needs (Ho & Salimans 2022,
    # Algorithm 1, p_uncond; they found 0.1 to 0.2 equally good).
    class_dropout: float = setting(0.1, flag="--class-dropout", at_least=0, below=1,
                                   group="class-conditional generation (Ho & Salimans 2022)",
                                   help="probability of training on the null label instead")
    steps: int | None = setting(
        10_000, flag="--steps", at_least=1, resume=True, exclusive="stop", group="stopping",
        help="train until this many optimiser steps in total (with --resume: counted from the "
             "start of the run)")
    minutes: float | None = setting(
        None, flag="--minutes", above=0, resume=True, exclusive="stop", group="stopping",
        help="train for this many minutes of wall-clock time (this invocation)")
    precision: str = setting(
        "auto", flag="--precision", choices=PRECISIONS, group="optimisation",
        help="autocast precision: auto is bf16 on CUDA and on CPUs with bf16 hardware "
             "(avx512_bf16, amx_bf16), fp32 on other CPUs (under 'accelerate launch' its "
             "--mixed_precision); fp16 needs CUDA and uses a gradient scaler")
    seed: int = setting(0, flag="--seed", at_least=0, at_most=SEED_MAX, group="optimisation",
                        help="seed of every random draw of the run")
    log_every: int = setting(50, flag="--log-every", at_least=1, group="outputs",
                             help="steps between metric lines")
    sample_every: int = setting(1000, flag="--sample-every", at_least=0, group="outputs",
                                help="steps between preview grids (0: none)")
    sample_n: int = setting(64, flag="--sample-n", at_least=1, group="outputs",
                            help="images in each preview grid and the final grid")
    sample_steps: int = setting(100, flag="--sample-steps", at_least=1, group="outputs",
                                help="sampling steps of the preview grids")
    fid_every: int = setting(0, flag="--fid-every", at_least=0, group="outputs",
                             help="steps between FID/KID measurements of the EMA model, logged "
                                  "and plotted in curves.png (0: none)")
    fid_n: int = setting(1000, flag="--fid-n", at_least=2, group="outputs",
                         help="images generated for each FID measurement")
    fid_sampler: str = setting("dpm++", flag="--fid-sampler", choices=SAMPLERS, group="outputs",
                               help="sampler of the FID measurement's images")
    fid_steps: int = setting(20, flag="--fid-steps", at_least=1, group="outputs",
                             help="sampling steps of the FID measurement's images")
    checkpoint_every: int = setting(1000, flag="--checkpoint-every", at_least=0, group="outputs",
                                    help="steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = setting(
        3, flag="--keep-checkpoints", at_least=1, group="outputs",
        help="newest checkpoints to keep (with --fid-every, checkpoints/best.pt, the one of the "
             "lowest FID, is kept as well)")
    # A step whose loss (or, without fp16's scaler, gradient) is not finite never reaches the
    # weights; then stop (the default: something is wrong) or skip the update and count it.
    on_nan: str = setting("stop", flag="--on-nan", choices=ON_NAN, group="outputs",
                          help="a step with a non-finite loss never reaches the weights; then "
                               "stop, or skip the update, count it and go on")
    threads: int | None = setting(None, flag="--threads", at_least=1, resume=True,
                                  group="machine", help="CPU threads for torch (per process)")
    channels_last: bool = setting(False, flag="--channels-last", group="machine",
                                  help="NHWC memory layout for the convolutions")
    compile: bool = setting(False, flag="--compile", group="machine",
                            help="torch.compile the training step's network (compiling takes a "
                                 "minute or two first)")
    device: str = setting("auto", flag="--device", resume=True, group="machine", metavar="DEVICE",
                          help="cpu, cuda, cuda:N or auto")
    wandb: bool = setting(False, flag="--wandb", group="outputs",
                          help="also log to Weights & Biases")
    wandb_project: str = setting("ddpm", flag="--wandb-project", group="outputs", metavar="NAME",
                                 help="the Weights & Biases project")

    def validate(self) -> None:
        check_fields(self)
        if self.steps is None and self.minutes is None:
            raise ValueError("train.steps and train.minutes are both unset, so training would "
                             "never stop; give one of them")


# The largest guidance scale, classifier-free (--guidance) and classifier (--classifier-scale).
# The scales used in practice are below ~30 (Ho & Salimans 2022 sweep w up to 4, text-to-image
# models use ~7.5, Dhariwal & Nichol 2021's classifier scales go up to 10); 100 leaves room to
# explore and still gives finite images (tests/test_serve.py samples a tiny model at it).
GUIDANCE_MAX = 100.0


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """How the run's final grid and ``ddpm sample`` draw images by default."""

    sampler: str = setting(
        "ddpm", flag="--sampler", choices=SAMPLERS,
        help="ddpm (ancestral, Ho et al. 2020), ddim (Song et al. 2021), dpm++ "
             "(DPM-Solver++(2M), Lu et al. 2022), euler or heun (Karras et al. 2022), pc "
             "(predictor-corrector), langevin (annealed Langevin dynamics) or ode (the "
             "probability-flow ODE, adaptive RK45) of the score SDEs (Song et al. 2021)")
    num_sample_steps: int = setting(1000, flag="--steps", at_least=1,
                                    help="sampling steps, 1..T")
    # None: the sampler's own default (karras for euler/heun, logsnr for dpm++)
    spacing: str | None = setting(
        None, flag="--spacing", choices=SPACINGS,
        help="how the steps are spread over 0..T-1 (default: karras for euler/heun, logsnr for "
             "dpm++, linspace for ddpm/ddim)")
    # "learned" is the default of a model trained with --learn-variance (with_overrides)
    variance: str = setting(
        "posterior", flag="--variance", choices=VARIANCES,
        help="ddpm only: sigma_t^2 of each step, the posterior beta-tilde_t (the paper's), beta_t, "
             "or learned (models trained with --learn-variance, their default)")
    eta: float = setting(0.0, flag="--eta", at_least=0, at_most=1,
                         help="ddim only: 0 is deterministic, 1 adds DDPM-like noise")
    # Karras et al. 2022, Algorithm 2's S_churn: 0 is the deterministic ODE (their Algorithm 1)
    churn: float = setting(0.0, flag="--churn", at_least=0, at_most=1000,
                           help="euler and heun only: S_churn of Karras et al.'s stochastic "
                                "sampler (noise added before each step); 0 is deterministic")
    # The score-SDE samplers (docs/sde.md). Song et al. 2021 sample with snr 0.16 and one
    # corrector step (their Table 5, VE on CIFAR-10), and solve the ODE at tolerances 1e-5.
    sde: str = setting("vp", flag="--sde-view", choices=SDES, group="score SDEs (Song et al. 2021)",
                       help="pc and ode only: the SDE through which the model is read, vp "
                            "(DDPM's in continuous time), subvp or ve")
    predictor: str = setting("reverse-diffusion", flag="--predictor", choices=PREDICTORS,
                             group="score SDEs (Song et al. 2021)",
                             help="pc only: the predictor step, reverse diffusion (Song et al.'s "
                                  "eq. 47) or Euler-Maruyama")
    snr: float = setting(0.16, flag="--snr", above=0, group="score SDEs (Song et al. 2021)",
                         help="pc only: the signal-to-noise ratio that sets each Langevin "
                              "corrector step")
    corrector_steps: int = setting(1, flag="--corrector-steps", at_least=0,
                                   group="score SDEs (Song et al. 2021)",
                                   help="pc only: Langevin corrector steps per noise level (0: "
                                        "the predictor alone)")
    langevin_steps: int = setting(5, flag="--langevin-steps", at_least=1,
                                  group="score SDEs (Song et al. 2021)",
                                  help="langevin only: Langevin steps per noise level, the step "
                                       "size by Song & Ermon 2020's rule")
    ode_rtol: float = setting(1e-5, flag="--ode-rtol", above=0, below=1,
                              group="score SDEs (Song et al. 2021)",
                              help="ode only: the RK45 solver's relative tolerance")
    ode_atol: float = setting(1e-5, flag="--ode-atol", above=0, below=1,
                              group="score SDEs (Song et al. 2021)",
                              help="ode only: the RK45 solver's absolute tolerance")
    x0_transform: str = setting(
        "clip", flag="--x0", choices=X0_TRANSFORMS,
        help="what to do with each predicted x0: clip to [-1, 1], dynamic thresholding "
             "(Saharia et al. 2022) or none")
    # Classifier-free guidance scale w of a class-conditional model (Ho & Salimans 2022, eq. 6):
    # 0 samples the conditional model as trained; larger w trades diversity for class fidelity.
    # At most GUIDANCE_MAX: a scale of 1e300 made eps = (1 + w) eps_c - w eps_u overflow, and
    # every image came out black.
    guidance: float = setting(
        0.0, flag="--guidance", at_least=0, at_most=GUIDANCE_MAX,
        group="class-conditional generation (Ho & Salimans 2022)",
        help="classifier-free guidance scale w: 0 is the conditional model, larger w gives more "
             "typical images of the class")

    def validate(self, *, num_train_timesteps: int, num_classes: int,
                 learn_variance: bool = False, latent: bool = False) -> None:
        """The section's own rules and those against the model it samples: at most T steps,
        guidance only for a class-conditional model, a learned variance only from a model that
        learned one, predicted latents never clipped as if they were images."""
        check_fields(self)
        if latent and self.x0_transform != "none":
            raise SettingError("sample.x0_transform", f"{{setting}} {self.x0_transform} would "
                               f"bound the predicted x0 as images are bounded, and this model's "
                               f"x0 are an autoencoder's latents; use none")
        if self.variance == "learned" and not learn_variance:
            raise SettingError("sample.variance", "{setting} learned needs a model trained with "
                               "--learn-variance, and this one has fixed variances; use "
                               "posterior or beta")
        T = num_train_timesteps
        if self.num_sample_steps > T:
            raise SettingError("sample.num_sample_steps", f"{{setting}} {self.num_sample_steps} "
                               f"is more than the model's {T} training timesteps; use 1..{T}")
        if self.guidance and not num_classes:
            raise SettingError("sample.guidance", f"{{setting}} {self.guidance:g} needs a "
                               f"class-conditional model, and this one has no classes (add "
                               f"--conditional to train one)")


LATENT_POSTERIORS = ("sample", "mean")


@dataclass(frozen=True, kw_only=True)
class LatentConfig:
    """Latent diffusion (Rombach et al. 2021): the U-Net models the scaled latents of an
    autoencoder run instead of pixels. The fields without a flag are read from the autoencoder
    when the run starts (``latent.resolve_latent``), so that the run names exactly what it used."""

    autoencoder: str | None = setting(
        None, flag="--autoencoder", metavar="AE_RUN",
        help="diffuse in the latent space of this autoencoder (a run or checkpoint of 'ddpm "
             "train-autoencoder'); docs/latent.md")
    posterior: str = setting(
        "sample", flag="--latent-posterior", choices=LATENT_POSTERIORS,
        help="each training latent: a fresh draw from the encoder's Gaussian, or its mean")
    sha256: str | None = setting(None, flag=None, help="the autoencoder's weights and scale, hashed")
    channels: int | None = setting(None, flag=None, at_least=1, help="the latents' channels")
    downsample: int | None = setting(None, flag=None, at_least=1,
                                     help="F: the latents are image_size / F a side")

    def validate(self) -> None:
        check_fields(self)
        if not self.autoencoder and self.posterior != "sample":
            raise SettingError("latent.posterior", f"{{setting}} {self.posterior} is a setting of "
                               f"latent diffusion; add --autoencoder AE_RUN, or drop it")


SECTIONS = {"model": UNetConfig, "diffusion": DiffusionConfig, "data": DataConfig,
            "train": TrainConfig, "sample": SampleConfig, "latent": LatentConfig,
            "superres": SuperResConfig}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    superres: SuperResConfig = field(default_factory=SuperResConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict`. Missing keys keep their defaults; an unknown key or a
        value of the wrong type raises ValueError naming it (and the valid names).

        A saved model section without ``time_silu`` was written before that setting existed,
        by a U-Net without the SiLU: it is read as ``time_silu=False``, so the weights keep
        computing what they were trained to."""
        if isinstance(d, dict) and isinstance(d.get("model"), dict) and "time_silu" not in d["model"]:
            d = {**d, "model": {**d["model"], "time_silu": False}}
        return with_overrides(RunConfig(), d, resolve=False)

    def validate(self, *, num_processes: int = 1) -> None:
        """Every section's rules, then those between sections: the model takes the data's
        images, sampling steps fit T, guidance needs classes, the batch splits between
        processes. Raises ValueError (SettingError where one setting is to blame)."""
        self.model.validate()
        self.diffusion.validate()
        self.data.validate()
        self.train.validate()
        self.latent.validate()
        self.superres.validate(image_size=self.data.image_size)
        model, data, tc = self.model, self.data, self.train
        c, s, _ = self.network_input()
        if c is not None and s is not None and (model.in_channels, model.image_size) != (c, s):
            what = "latents" if self.latent.autoencoder else "images"
            raise ValueError(
                f"the data are {c}x{s}x{s} {what} but the model takes "
                f"{model.in_channels}x{model.image_size}x{model.image_size}; give the same "
                f"--channels and --image-size to both")
        if self.superres.low and self.latent.autoencoder:
            raise SettingError("superres.low", "{setting} trains a super-resolution model on "
                               "images; a cascade's latent stage is its base model: drop "
                               "--autoencoder here, or --super-res")
        if self.latent.autoencoder and data.crop == "random":
            raise SettingError("data.crop", "{setting} random cannot be used with --autoencoder: "
                               "the latents are encoded once, from fixed images; use center or "
                               "resize")
        if model.learn_variance and self.diffusion.timestep_sampling != "uniform":
            raise SettingError(
                "diffusion.timestep_sampling",
                f"learned variances are trained by the bound over all t, estimated from t drawn "
                f"uniformly; {{setting}} {self.diffusion.timestep_sampling} would bias it: use "
                f"uniform with --learn-variance")
        T = self.diffusion.num_train_timesteps
        self.sample.validate(num_train_timesteps=T, num_classes=model.num_classes,
                             learn_variance=model.learn_variance, latent=bool(self.latent.autoencoder))
        for key, steps in (("train.sample_steps", tc.sample_steps), ("train.fid_steps", tc.fid_steps)):
            if steps > T:  # checked now, not at the first preview grid mid-run
                raise SettingError(key, f"{{setting}} is {steps} but must be between 1 and T = {T}")
        if tc.batch_size % num_processes:
            raise SettingError(
                "train.batch_size", f"batch size {tc.batch_size} is the whole batch of all "
                f"{num_processes} processes and must split evenly between them; use a multiple "
                f"of {num_processes}")


    def network_input(self) -> tuple[int | None, int | None, int | None]:
        """(channels, side, side) of what the U-Net models: the data's images, or with an
        autoencoder its latents (None until resolved)."""
        data, latent = self.data, self.latent
        if not latent.autoencoder:
            return data.channels, data.image_size, data.image_size
        if latent.channels is None or latent.downsample is None or data.image_size is None:
            return None, None, None
        side = data.image_size // latent.downsample
        return latent.channels, side, side


def build_schedule(config: RunConfig) -> NoiseSchedule:
    """The frozen noise schedule the run's diffusion settings describe."""
    d = config.diffusion
    if d.sde == "ve":
        if d.sigma_max is None:
            raise ValueError("the VE process's sigma_max is not known yet: training measures it "
                             "from the data (train.resolve_sigma_max), or give --sigma-max")
        return ve_schedule(d.num_train_timesteps, d.sigma_min, d.sigma_max)
    return make_schedule(d.schedule, d.num_train_timesteps, zero_terminal_snr=d.zero_terminal_snr)


# --- building a config: overrides, derived settings, resume -------------------------------------


def with_overrides(base: RunConfig, overrides: dict[str, dict[str, Any]], *,
                   resolve: bool = True) -> RunConfig:
    """``base`` with ``overrides`` (``{section: {field: value}}``, as a config file or the
    command line gives them) applied, checked field by field for names and types.

    With ``resolve`` (what the command line does on a preset) the settings that follow others
    are worked out in order, so what the user gave always wins over what a preset implied:
    the data section first, then the preset's U-Net is fitted to the data (:func:`fit_model`),
    then the model's own overrides; a new dataset without a data_dir takes that dataset's
    folder; the preset's sampling steps shrink to a smaller T."""
    checked = checked_sections(SECTIONS, overrides)
    replace = dataclasses.replace
    data = replace(base.data, **checked["data"])
    model = base.model
    if resolve:
        if "dataset" in checked["data"] and "data_dir" not in checked["data"]:
            data = replace(data, data_dir=None)
        data = resolve_data(data)
        assert data.image_size is not None and data.channels is not None  # resolve_data's
        model = fit_model(model, data.channels, data.image_size)
    model = replace(model, **checked["model"])
    diffusion = replace(base.diffusion, **checked["diffusion"])
    train, sample = base.train, base.sample
    if resolve:
        # A preset's sampling steps suit its own T; with a smaller T, use all of them.
        T = diffusion.num_train_timesteps
        sample = replace(sample, num_sample_steps=min(sample.num_sample_steps, T))
        if model.learn_variance and not base.model.learn_variance:
            sample = replace(sample, variance="learned")  # what the model learned, unless given
        if diffusion.sde != base.diffusion.sde:
            sample = replace(sample, sde=diffusion.sde)  # read through its own SDE, unless given
        train = replace(train, sample_steps=min(train.sample_steps, T),
                        fid_steps=min(train.fid_steps, T))
    train = replace(train, **one_stopping_rule(checked["train"]))
    sample = replace(sample, **checked["sample"])
    latent = replace(base.latent, **checked["latent"])
    superres = replace(base.superres, **checked["superres"])
    config = RunConfig(model=model, diffusion=diffusion, data=data, train=train, sample=sample,
                       latent=latent, superres=superres)
    return with_conditioning(config) if resolve else config


def one_stopping_rule(train: dict[str, Any]) -> dict[str, Any]:
    """Train settings given over a config: giving steps (or minutes) clears the other."""
    for name, other in (("steps", "minutes"), ("minutes", "steps")):
        if train.get(name) is not None:
            train = {other: None, **train}
    return train


def fit_model(model: UNetConfig, channels: int, size: int) -> UNetConfig:
    """The U-Net reshaped for inputs of ``channels`` x ``size`` x ``size`` (the resolved data's
    images, or their latents), with attention kept at the same levels (a 28 px preset's 7 px is
    8 px of 32 px images)."""
    if model.image_size == size:
        return dataclasses.replace(model, in_channels=channels)
    new_sizes = dataclasses.replace(model, image_size=size).level_sizes()
    levels = zip(model.level_sizes(), new_sizes, strict=True)
    attention = tuple(new for old, new in levels if old in model.attention_resolutions)
    return dataclasses.replace(model, in_channels=channels, image_size=size,
                               attention_resolutions=attention)


def resolve(config: RunConfig) -> RunConfig:
    """``config`` with the data's defaults filled in (:func:`resolve_data`) and the U-Net
    fitted to what it models (:meth:`RunConfig.network_input`: the images, or latents already
    read from the autoencoder; ``latent.resolve_latent`` reads them): what ``train`` runs, and
    what a run's config.json records."""
    config = dataclasses.replace(config, data=resolve_data(config.data))
    channels, size, _ = config.network_input()
    if channels is None or size is None:
        return config
    return with_conditioning(dataclasses.replace(config, model=fit_model(config.model, channels, size)))


def with_conditioning(config: RunConfig) -> RunConfig:
    """A super-resolution run's U-Net takes the upsampled low-res image as extra channels, and
    its noise level as a second embedding; any other U-Net neither."""
    sr = config.superres.low is not None
    cond_channels = (config.data.channels or config.model.in_channels) if sr else 0
    return dataclasses.replace(config, model=dataclasses.replace(
        config.model, cond_channels=cond_channels, level_embedding=sr))


def resumable_keys() -> set[str]:
    """The settings ``--resume`` may change (``section.field``), as their declarations say."""
    return {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f, d in settings_of(cls) if d.resume}


def differences(a: RunConfig, b: RunConfig, *, resumable: bool = True) -> list[tuple[str, Any, Any]]:
    """``[(key, a's value, b's value)]`` of the settings that differ (without those ``--resume``
    may change, unless ``resumable``)."""
    skip = set() if resumable else resumable_keys()
    b_values = b.to_dict()
    return [(f"{s}.{k}", v, b_values[s][k]) for s, values in a.to_dict().items()
            for k, v in values.items() if v != b_values[s][k] and f"{s}.{k}" not in skip]


def resume_changes(saved: RunConfig, overrides: dict[str, dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    """The settings in ``overrides`` that would change the saved run although their declaration
    says ``--resume`` may not change them: ``[(key, saved value, new value)]``."""
    return differences(saved, resumed(saved, overrides), resumable=False)


def resumed(saved: RunConfig, overrides: dict[str, dict[str, Any]]) -> RunConfig:
    """The saved config with the overrides ``--resume`` allows (stopping rule, machine)."""
    return with_overrides(saved, overrides, resolve=False)
