"""Load a trained model from a checkpoint and generate images with it, in batches.

This is the small Python API behind ``ddpm sample``::

    from ddpm.pipeline import load_pipeline
    pipe = load_pipeline("runs/demo")          # a run directory or a .pt checkpoint
    images = pipe.generate(16, seed=0)         # [16, 1, 28, 28] in [-1, 1], the run's sampler
    fast = pipe.generate(16, sampler="dpm++", num_sample_steps=20)
    many = pipe.generate(1000, workers="auto")  # on a CPU: batches in one process per core
    shoes = pipe.generate(8, labels=7, guidance=3.0)  # a class-conditional run: class 7, w = 3
    guided = pipe.generate(8, labels=7, classifier=load_noisy_classifier("clf.pt"),
                           classifier_scale=3.0)   # classifier guidance, any run
    nll = pipe.bits_per_dim(test_images)       # the variational bound, bits per dimension
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .autoencoder import LoadedAutoencoder
from .autoprecision import choose
from .checkpoint import checkpoint_config, load_run_or_file, load_weights
from .config import RunConfig, SampleConfig, build_schedule
from .data import to_model_range, to_uint8
from .data.registry import default_cache_dir
from .diffusers_io import is_diffusers_folder, load_diffusers
from .diffusion import p_mean_log_variance, precondition, prior_bpd, q_sample, vlb_term
from .guidance import classifier_free_guidance, classifier_guidance, classifier_log_prob_grad
from .latent import decode, load_decoder
from .models import UNet
from .noisy_classifier import NoisyClassifierFile, check_compatible
from .parallel import resolve_workers, run_batches
from .runtime import (
    PrecisionProbe,
    autocast,
    precision_and_reason,
    resolve_device,
    torch_state_kept,
    warn_compile_failed,
)
from .samplers import (
    GuidanceGrad,
    StepCallback,
    X0Transform,
    clip_x0,
    dynamic_threshold,
    initial_noise,
    sampler_spec,
    score_function,
)
from .schedules import NoiseSchedule
from .sde import bits_per_dim, dequantize, draw_probes, make_sde, probability_flow_log_prob
from .superres import Conditioning, projecting, sampling_conditioning
from .timesteps import make_timesteps


@dataclass
class Pipeline:
    """A trained denoiser (the EMA weights by default) with its schedule and config."""

    model: nn.Module  # a UNet, or diffusers' UNet2DModel wrapped (diffusers_io.load_diffusers)
    schedule: NoiseSchedule
    config: RunConfig
    step: int
    device: torch.device
    precision: str = "fp32"  # fp32 | bf16 | fp16, resolved (auto is chosen when loaded)
    classes: tuple[str, ...] = ()  # the training data's class names, label i = classes[i]
    compiled: Any = None  # torch.compile(model), when asked for and compiling works
    compile_proven: bool = False  # a call through ``compiled`` has succeeded
    precision_why: str = "as asked"  # how the precision was chosen, for summary lines
    decoder: LoadedAutoencoder | None = None  # a latent run's autoencoder (latent.load_decoder)
    # network evaluations per image that the last generate() spent: what an adaptive sampler
    # (ode) reports, known only afterwards
    last_evaluations: float = 0.0
    last_workers: int = 1  # the processes that sampled the last generate()'s batches

    def sampling_precision(self, sampler: str) -> str:
        """The precision ``generate`` computes in with ``sampler``: the pipeline's, but fp32 for
        an adaptive ODE solver, whose error control cannot work through bf16's rounding (the
        step size shrinks until the rounding, not the tolerance, decides it)."""
        return "fp32" if sampler_spec(sampler).adaptive else self.precision

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional model; 0 for an unconditional one."""
        return self.config.model.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images it makes: the network's input, or a latent run's decoded
        latents (the data's size)."""
        mc, data = self.config.model, self.config.data
        if self.decoder is None or data.channels is None or data.image_size is None:
            return mc.in_channels, mc.image_size, mc.image_size
        return data.channels, data.image_size, data.image_size

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images from what the network models: a latent run's latents through its decoder
        (:func:`latent.decode`), the images themselves otherwise."""
        if self.decoder is None:
            return x
        with autocast(self.device, self.precision):
            return decode(self.decoder, x)

    def class_labels(self, n: int, labels: torch.Tensor | Sequence[int] | int | None,
                     classifier: NoisyClassifierFile | None = None) -> torch.Tensor | None:
        """The label of each of ``n`` images: ``labels`` as given (one int for all), or for a
        conditional model (or a guiding classifier) without them every class in turn (0, 1, ...,
        K-1, 0, ...); None for an unconditional model. Raises ValueError for labels this model
        (or the classifier) cannot take."""
        k = self.num_classes or (classifier.num_classes if classifier is not None else 0)
        if k == 0:
            if labels is not None:
                raise ValueError("this model was trained without class labels, so it cannot draw "
                                 "a chosen class; drop --class, guide it with --classifier, or "
                                 "train one with --conditional")
            return None
        if labels is None:
            return torch.arange(n) % k
        y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        y = y.expand(n).clone() if y.numel() == 1 else y
        if y.numel() != n:
            raise ValueError(f"got {y.numel()} labels for {n} images; give one label or one per image")
        bad = y[(y < 0) | (y >= k)]
        if bad.numel():
            raise ValueError(f"class {int(bad[0])} is out of range: this model knows classes "
                             f"0..{k - 1}{_names_hint(self.classes)}")
        return y

    def sample_config(self, **settings: Any) -> SampleConfig:
        """The run's :class:`SampleConfig` with ``settings`` over it, checked against this model
        (steps within its T, guidance only when it has classes): ValueError otherwise."""
        sc = replace(self.config.sample, **settings)
        sc.validate(num_train_timesteps=self.schedule.num_train_timesteps,
                    num_classes=self.num_classes, learn_variance=self.config.model.learn_variance,
                    latent=self.decoder is not None)
        return sc

    def evaluations_per_image(self, **settings: Any) -> int:
        """Network evaluations that :meth:`generate` spends on one image with ``settings``."""
        sc = self.sample_config(**settings)
        spec = sampler_spec(sc.sampler)
        steps = len(make_timesteps(self.schedule.num_train_timesteps, sc.num_sample_steps,
                                   sc.spacing or spec.default_spacing, schedule=self.schedule))
        evaluations = spec.evaluations(steps, {name: getattr(sc, name) for name in spec.options})
        # classifier-free guidance: conditional and unconditional, as one batch
        return 2 * evaluations if self.num_classes and sc.guidance > 0 else evaluations

    @property
    def low_res(self) -> int | None:
        """The side of the images a super-resolution model takes (None for any other)."""
        return self.config.superres.low

    @torch.inference_mode()
    def probe_input(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """A batch of noise at the middle timestep, as a timing of the network takes it (with a
        super-resolution model's conditioning, a noise image too): the same values every call,
        drawn without touching torch's global generator."""
        mc = self.config.model
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch_size, mc.in_channels, mc.image_size, mc.image_size, generator=generator)
        t = torch.full((batch_size,), self.schedule.num_train_timesteps // 2)
        cond: dict[str, torch.Tensor] = {}
        if self.low_res is not None:
            low = torch.randn(batch_size, mc.in_channels, self.low_res, self.low_res, generator=generator)
            cond = self._conditioning(low.to(self.device), generator)._asdict()
        return x.to(self.device), t.to(self.device), cond

    def conditioned(self, *, aug_level: float | None = None, blur_sigma: float | None = None,
                    project: bool | None = None) -> Pipeline:
        """This super-resolution pipeline with other sampling settings of its conditioning
        (None keeps the run's), checked."""
        sr = self.config.superres
        given: dict[str, Any] = {k: v for k, v in (("aug_level", aug_level), ("blur_sigma", blur_sigma),
                                   ("project", project)) if v is not None}
        if not given:
            return self
        superres = replace(sr, **given)
        superres.validate()
        return replace(self, config=replace(self.config, superres=superres))

    def _conditioning(self, low: torch.Tensor, generator: torch.Generator) -> Conditioning:
        return sampling_conditioning(self.config.superres, self.schedule.to(self.device), low,
                                     self.config.model.image_size, generator)

    def seconds_per_evaluation(self, *, batch_size: int = 128, repeats: int = 2) -> float:
        """Seconds one network evaluation takes per image at ``batch_size``, the fastest of
        ``repeats`` after one untimed (a forecast's figure: it costs a few evaluations)."""
        x, t, cond = self.probe_input(batch_size)
        best = math.inf
        for i in range(repeats + 1):
            begin = time.perf_counter()
            with autocast(self.device, self.precision):
                self._predict(x, t, None, **cond).float().cpu()  # .cpu() waits for a GPU
            best = best if i == 0 else min(best, time.perf_counter() - begin)
        return best / batch_size

    @torch.inference_mode()
    def generate(
        self,
        n: int,
        *,
        seed: int = 0,
        batch_size: int = 128,
        labels: torch.Tensor | Sequence[int] | int | None = None,
        callback: StepCallback | None = None,
        progress: bool = False,
        classifier: NoisyClassifierFile | None = None,
        classifier_scale: float = 1.0,
        low_res: torch.Tensor | None = None,
        workers: int | str = 1,
        **settings: Any,
    ) -> torch.Tensor:
        """Generate ``n`` images ``[n, C, H, W]`` in [-1, 1] (a latent run's decoded; its
        ``callback`` sees the decoded x_t and x0 predictions too).

        ``settings`` override the run's :class:`SampleConfig` (``sampler``, ``num_sample_steps``,
        ``spacing``, ``eta``, ``churn``, ``variance``, ``x0_transform``, ``guidance``). The same
        ``seed`` and ``batch_size`` give the same images: batch k draws all its noise from its
        own generator, seeded with :func:`batch_seed` ``(seed, k)``. On a CPU, ``workers``
        processes (``auto``: one per core; ``parallel.resolve_workers``) sample the batches side
        by side, each with its share of the threads, and the images are the same. A
        class-conditional model draws class ``labels`` (see :meth:`class_labels`) with
        classifier-free guidance of scale ``guidance``. A noise-aware ``classifier``
        (``noisy_classifier.load_noisy_classifier``) guides any model towards ``labels`` with
        scale ``classifier_scale`` (Dhariwal & Nichol 2021: Algorithm 1 for the ddpm sampler,
        Algorithm 2 for the others); scale 0 is unguided sampling. A super-resolution model
        super-resolves ``low_res`` ``[n, C, LOW, LOW]`` (in [-1, 1]), with the run's
        conditioning augmentation at its sampling level (and, when the run's
        ``superres.project`` is on, every predicted x0 projected onto it).
        """
        sc = self.sample_config(**settings)
        low_res = self._check_low_res(n, low_res)
        if classifier is not None:
            check_compatible(classifier, self.config, self.classes)
            if not classifier_scale >= 0 or not math.isfinite(classifier_scale):
                raise ValueError(f"the classifier scale must be a finite number >= 0, got "
                                 f"{classifier_scale}")
        labels = self.class_labels(n, labels, classifier)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        batches = math.ceil(n / batch_size)
        processes = resolve_workers(workers, batches, self.device, compiled=self.compiled is not None)
        if callback is not None and processes > 1:
            raise ValueError(f"a step callback runs in this process; sample with one worker, not "
                             f"{processes}")
        spec = sampler_spec(sc.sampler)
        sampler = spec.function
        timesteps = make_timesteps(self.schedule.num_train_timesteps, sc.num_sample_steps,
                                   sc.spacing or spec.default_spacing, schedule=self.schedule)
        options = {name: getattr(sc, name) for name in spec.options}
        x0_transform = X0_TRANSFORMS[sc.x0_transform]
        mc = self.config.model
        precision = self.sampling_precision(sc.sampler)
        if callback is not None and self.decoder is not None:
            callback = self._decoding(callback)
        self.model.eval()

        def batch(k: int, progress: Callable[[int], None]) -> torch.Tensor:
            """Batch ``k``'s images: ``progress(m)`` after every m images x network evaluations."""
            start = k * batch_size
            b = min(batch_size, n - start)
            generator = torch.Generator("cpu").manual_seed(batch_seed(seed, k))
            cond: dict[str, torch.Tensor] = {}  # a super-resolution batch's conditioning

            def network(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
                # (classifier-free guidance evaluates [x_t, x_t] as one batch: the conditioning too)
                given = {key: torch.cat([v] * (len(x_t) // len(v))) for key, v in cond.items()}
                with autocast(self.device, precision):
                    prediction = self._predict(x_t, t, y, **given)
                progress(x_t.shape[0])
                return prediction.float()

            batch_transform: X0Transform | None = x0_transform
            if low_res is not None:  # its noise drawn before x_T's, from the same generator
                part = low_res[start : start + b].to(self.device, torch.float32)
                cond = self._conditioning(part, generator)._asdict()
                if self.config.superres.project:
                    batch_transform = projecting(part, x0_transform)
            x_T = initial_noise((b, mc.in_channels, mc.image_size, mc.image_size), generator, self.device)
            y = None if labels is None else labels[start : start + b]  # [b]
            denoiser: Callable[..., torch.Tensor] = network
            if self.num_classes:
                assert y is not None  # class_labels() labels every image of a conditional model
                denoiser = classifier_free_guidance(network, y, self.config.model.num_classes, sc.guidance)
            batch_options = dict(options)
            if classifier is not None and classifier_scale > 0:
                assert y is not None  # and every image that a classifier guides
                grad = _guidance_grad(classifier, y, classifier_scale)
                if sc.sampler == "ddpm":  # Algorithm 1: the mean moves by s Sigma grad
                    batch_options["guidance_grad"] = grad
                else:  # Algorithm 2: eps moves by -sqrt(1 - alpha_bar) s grad
                    denoiser = classifier_guidance(denoiser, self.schedule, grad,
                                                   self.config.diffusion.prediction_type)
            x_0 = sampler(denoiser, self.schedule, x_T, timesteps,
                          prediction_type=self.config.diffusion.prediction_type,
                          x0_transform=batch_transform, generator=generator, callback=callback,
                          **batch_options)
            return self.decode(x_0).cpu()

        evaluations = 0  # images x network calls, as every batch reports them
        bar = tqdm(total=n * self.evaluations_per_image(**settings), unit="img-eval",
                   unit_scale=True, disable=not progress,
                   desc=f"sampling ({sc.sampler}, {sc.num_sample_steps} steps"
                        f"{f', {processes} processes' if processes > 1 else ''})")

        def counted(m: int) -> None:
            nonlocal evaluations
            evaluations += m
            bar.update(m)

        try:
            images = run_batches(batch, batches, processes, counted)
        finally:
            bar.close()
        self.last_evaluations = evaluations / max(n, 1)
        self.last_workers = processes
        return torch.cat(images) if images else torch.empty(0, *self.image_shape)

    def _check_low_res(self, n: int, low_res: torch.Tensor | None) -> torch.Tensor | None:
        """``low_res`` checked against what this model takes: ValueError otherwise."""
        low, (c, _, _) = self.low_res, self.image_shape
        if low is None:
            if low_res is not None:
                raise ValueError("this model generates images from noise alone; low-res inputs "
                                 "are for a super-resolution run (ddpm train --super-res LOW)")
            return None
        if low_res is None:
            raise ValueError(f"this is a super-resolution model: it takes {n} low-res images of "
                             f"{c}x{low}x{low} to super-resolve (ddpm upscale, or ddpm sample BASE "
                             f"--then this run)")
        if tuple(low_res.shape) != (n, c, low, low):
            raise ValueError(f"this model super-resolves {c}x{low}x{low} images, and got "
                             f"{'x'.join(map(str, low_res.shape[1:]))} ({low_res.shape[0]} of "
                             f"them for {n} images)")
        return low_res

    def _decoding(self, callback: StepCallback) -> StepCallback:
        def decoded(i: int, t: float, x_t: torch.Tensor, x0_pred: torch.Tensor) -> None:
            callback(i, t, self.decode(x_t), self.decode(x0_pred))
        return decoded

    @torch.inference_mode()
    def bits_per_dim(
        self,
        images: torch.Tensor,
        *,
        timesteps: int | None = None,
        seed: int = 0,
        batch_size: int = 128,
        progress: bool = False,
        **settings: Any,
    ) -> dict[str, float]:
        """The variational bound on -log p(x0) (Ho et al. 2020, eq. 5) of uint8 ``images``
        ``[N, C, H, W]``, in bits per dimension, averaged over them, with its standard error.

        Per image: the prior term L_T and the decoder L_0 (eq. 13) exactly, and the T - 1 terms
        L_1 .. L_{T-1} all (``timesteps`` None or T - 1), or estimated without bias from
        ``timesteps`` of them: one step drawn uniformly from each of that many strata of 1..T-1,
        its term weighted by the stratum's size. The standard error is over images (so it
        includes the draw of steps). The variances are the sampler's: ``sample.variance`` of the
        run (posterior, beta or learned) and its ``x0_transform`` applied to each predicted x0,
        or those given in ``settings``. A class-conditional model is scored unconditionally (the
        null class).
        """
        if self.decoder is not None:
            raise ValueError("this run diffuses in an autoencoder's latents, so its bound would be "
                             "on the latents, not on the images' bits; score it by FID/KID instead")
        sc = self.sample_config(**settings)
        T = self.schedule.num_train_timesteps
        k = T - 1 if timesteps is None else timesteps
        if not 1 <= k <= T - 1:
            raise ValueError(f"the bound has {T - 1} terms between its ends to estimate from; "
                             f"give between 1 and {T - 1} timesteps, got {k}")
        edges = torch.tensor([1 + (j * (T - 1)) // k for j in range(k + 1)])  # strata of 1..T-1
        sizes = (edges[1:] - edges[:-1]).double()  # [K], each >= 1
        generator = torch.Generator("cpu").manual_seed(seed)
        mc, dc = self.config.model, self.config.diffusion
        x0_transform = X0_TRANSFORMS[sc.x0_transform]
        totals, parts = [], {"prior_bpd": 0.0, "decoder_bpd": 0.0, "diffusion_bpd": 0.0}
        bar = tqdm(total=len(images) * (k + 1), unit="img-eval", unit_scale=True,
                   disable=not progress, desc=f"bits/dim ({k + 1} network evaluations an image)")
        self.model.eval()

        def term(x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            """L at steps t ``[B]`` for images x0, from one draw of x_t ~ q(x_t | x0)."""
            eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
            x_t = q_sample(self.schedule, x0, t, eps)  # float64
            with autocast(self.device, self.precision):
                output = self._predict(x_t.to(self.device, torch.float32), t.to(self.device), None)
            mean, log_var = p_mean_log_variance(
                self.schedule, output.double().cpu(), x_t, t, prediction_type=dc.prediction_type,
                variance=sc.variance, learned=mc.learn_variance, x0_transform=x0_transform)
            bar.update(len(x0))
            return vlb_term(self.schedule, x0, x_t, t, mean, log_var)

        for batch in images.split(batch_size):
            x0 = to_model_range(batch).double()  # [B, C, H, W], the bound in float64
            b = len(x0)
            prior = prior_bpd(self.schedule, x0)
            decoder = term(x0, torch.zeros(b, dtype=torch.long))
            diffusion = torch.zeros(b, dtype=torch.float64)
            for j in range(k):
                offset = (torch.rand(b, generator=generator, dtype=torch.float64) * sizes[j]).long()
                diffusion += sizes[j] * term(x0, edges[j] + offset)
            totals.append(prior + decoder + diffusion)
            for name, value in (("prior_bpd", prior), ("decoder_bpd", decoder),
                                ("diffusion_bpd", diffusion)):
                parts[name] += float(value.sum())
        bar.close()
        scores = _mean_and_se(torch.cat(totals))
        return {**scores, "timesteps": k,
                **{name: value / scores["n"] for name, value in parts.items()}}

    def ode_bits_per_dim(self, images: torch.Tensor, *, sde: str = "vp", probes: int = 1,
                         probe: str = "rademacher", rtol: float = 1e-5, atol: float = 1e-5,
                         seed: int = 0, batch_size: int = 128, progress: bool = False
                         ) -> dict[str, Any]:
        """The exact negative log-likelihood of uint8 ``images`` ``[N, C, H, W]`` under the
        model's probability-flow ODE (Song et al. 2021, sec. 4.3 and appendix D.2) read through
        the SDE ``sde``, in bits per dimension, averaged over them, with its standard error over
        images, and the network evaluations an image took.

        The images are dequantised uniformly, (k + u) / 256, and the ODE is solved by RK45 at
        ``rtol`` / ``atol`` from the model's least noise level (its step 0) to t = 1, with the
        divergence estimated by Hutchinson-Skilling from ``probes`` probes of kind ``probe``
        (fixed along each image's path); bits/dim = -log p / (D ln 2) + 7 (:func:`sde.bits_per_dim`).
        In fp32 whatever the pipeline's precision (see :meth:`sampling_precision`); a
        class-conditional model is scored unconditionally (the null class), as by
        :meth:`bits_per_dim`."""
        if self.decoder is not None:
            raise ValueError("this run diffuses in an autoencoder's latents, so its likelihood "
                             "would be of the latents, not of the images' bits; score it by "
                             "FID/KID instead")
        if probes < 1:
            raise ValueError(f"Hutchinson's estimate needs at least 1 probe, got {probes}")
        view = make_sde(sde, self.schedule)
        t_start = view.time_at_sigma(self.schedule.sigma_scalar(0))
        generator = torch.Generator("cpu").manual_seed(seed)
        dc = self.config.diffusion

        def denoiser(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self._predict(x_t, t.to(self.device), None).float()

        score = score_function(denoiser, self.schedule, view, prediction_type=dc.prediction_type)
        bar = tqdm(total=len(images), unit="img", disable=not progress,
                   desc=f"bits/dim (probability-flow ODE of the {sde} SDE)")
        self.model.eval()
        values, evaluations = [], 0
        for batch in images.split(batch_size):
            x = dequantize(batch, generator).to(self.device)
            v = draw_probes((probes, *x.shape), probe, generator, self.device)
            result = probability_flow_log_prob(score, view, x, t_start=t_start, probes=v,
                                               rtol=rtol, atol=atol)
            values.append(bits_per_dim(result.log_prob.cpu(), x[0].numel()))
            evaluations += result.evaluations * len(batch)
            bar.update(len(batch))
        bar.close()
        scores = _mean_and_se(torch.cat(values))
        return {**scores, "evaluations_per_image": evaluations / scores["n"], "sde": sde, "probes": probes,
                "probe": probe, "rtol": rtol, "atol": atol}

    def compile(self) -> Pipeline:
        """Sample through ``torch.compile(model)``; if compiling fails at the first call, the
        uncompiled network goes on, with a one-line warning."""
        self.compiled, self.compile_proven = torch.compile(self.model), False
        return self

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                 **cond: torch.Tensor) -> torch.Tensor:
        """The run's prediction (``diffusion.prediction_type``) at x_t: the network's output,
        through the run's preconditioning (``cond``: a super-resolution model's conditioning)."""
        dc = self.config.diffusion
        return precondition(self._forward, self.schedule, dc.preconditioning,
                            sigma_data=dc.sigma_data, prediction_type=dc.prediction_type)(x_t, t, y, **cond)

    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                 **cond: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            return self.model(x_t, t, y, **cond)
        if self.compile_proven:  # a later failure is not compiling's: it is raised
            return self.compiled(x_t, t, y, **cond)
        try:
            prediction = self.compiled(x_t, t, y, **cond)
        except Exception as exc:  # a failure to compile: the first call compiles
            warn_compile_failed(exc, "sampling")
            self.compiled = None
            return self.model(x_t, t, y, **cond)
        self.compile_proven = True
        return prediction

    @torch.inference_mode()
    def trace(
        self, n: int, *, seed: int = 0, labels: torch.Tensor | Sequence[int] | int | None = None,
        progress: bool = False, **settings: Any
    ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """The whole reverse process of ``n`` images, as ``generate(n, seed=seed, batch_size=n,
        labels=labels, **settings)`` walks it: ``states`` uint8 ``[S + 1, n, C, H, W]`` holds x_T, the x_t the
        network sees at each of the S steps, and last the output; ``x0_preds`` (same shape) the
        predicted x0 at each step, and last the output again; ``timesteps`` the S steps."""
        states, x0_preds, timesteps = [], [], []

        def record(i: int, t: float, x_t: torch.Tensor, x0_pred: torch.Tensor) -> None:
            states.append(to_uint8(x_t.cpu()))
            x0_preds.append(to_uint8(x0_pred.cpu()))
            timesteps.append(float(t))

        final = to_uint8(self.generate(n, seed=seed, batch_size=n, labels=labels, callback=record,
                                       progress=progress, **settings))
        return torch.stack(states + [final]), torch.stack(x0_preds + [final]), timesteps


def batch_seed(seed: int, index: int) -> int:
    """The seed of batch ``index`` of ``Pipeline.generate(seed=seed)``: ``seed`` itself for the
    first batch, so that up to one batch of images is what it always was; for the others 63
    bits of SHA-256 of both, so that every batch draws its own noise in whatever process
    computes it, and neighbouring seeds share no batch (``seed + index`` would give batch 1 of
    seed 0 the noise of batch 0 of seed 1)."""
    if index == 0:
        return seed
    digest = hashlib.sha256(f"ddpm batch {index} of seed {seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _guidance_grad(classifier: NoisyClassifierFile, labels: torch.Tensor, scale: float) -> GuidanceGrad:
    """s grad_x log p_phi(y | x_t, t) for one batch of ``labels`` (samplers.GuidanceGrad)."""

    def grad(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return scale * classifier_log_prob_grad(classifier.model, x_t, t, labels.to(x_t.device))

    return grad


def _names_hint(classes: Sequence[str]) -> str:
    if not classes:
        return ""
    shown = ", ".join(f"{i} {name}" for i, name in enumerate(classes[:12]))
    return f" ({shown}{', ...' if len(classes) > 12 else ''})"


# What each x0_transform setting does to every predicted x0 (config.X0_TRANSFORMS names them).
X0_TRANSFORMS = {"clip": clip_x0, "dynamic": dynamic_threshold, "none": None}


def load_pipeline(
    run_or_checkpoint: str | os.PathLike,
    *,
    device: str = "auto",
    use_ema: bool = True,
    precision: str = "fp32",
    compile: bool = False,
) -> Pipeline:
    """Load the newest checkpoint of a run directory, the given checkpoint file, or a diffusers
    folder (``DDPMPipeline.save_pretrained``'s, or ``UNet2DModel.save_pretrained``'s with its
    scheduler's config: ``diffusers_io.load_diffusers``); sample in ``precision`` (autocast:
    fp32, bf16, fp16 on CUDA, or auto) and, with ``compile``, through ``torch.compile``."""
    dev = resolve_device(device)
    precision_and_reason(precision, dev)  # an unknown name, or fp16 on a CPU, said now
    if is_diffusers_folder(run_or_checkpoint):
        model, schedule, config, step, classes = load_diffusers(run_or_checkpoint, dev)
        pipe = Pipeline(model, schedule, config, step, dev, classes=classes)
    else:
        path, state = load_run_or_file(run_or_checkpoint)
        config = checkpoint_config(state, path)
        decoder = load_decoder(config, dev)
        model = UNet(config.model)
        load_weights(model, state, path, ema=use_ema)
        model.to(dev).eval().requires_grad_(False)
        pipe = Pipeline(model, build_schedule(config), config, int(state["step"]), dev,
                        classes=tuple(state.get("classes", ())), decoder=decoder)
    pipe.precision, pipe.precision_why = precision_and_reason(precision, dev, sampling_probe(pipe))
    return pipe.compile() if compile else pipe


#: The batch of auto's sampling measurement: 'ddpm sample' and 'eval' sample 128 at a time, the
#: web page a few; 64 lies between, and the choice was the same at 64 and 128 where measured.
PROBE_BATCH = 64


def sampling_probe(pipe: Pipeline) -> PrecisionProbe:
    """``--precision auto``'s measurement of ``pipe``'s sampling step (``autoprecision``): one
    network evaluation of :data:`PROBE_BATCH` images, uncompiled, in fp32 and in bf16; once per
    machine and model shape, then read from the cache folder."""
    shape = {"model": pipe.config.to_dict()["model"], "network": type(pipe.model).__name__,
             "batch": PROBE_BATCH}

    def make_step(precision: str) -> Callable[[], torch.Tensor]:
        x, t, cond = pipe.probe_input(PROBE_BATCH)

        @torch.inference_mode()
        def step() -> torch.Tensor:
            with autocast(pipe.device, precision):
                return pipe.model(x, t, None, **cond)
        return step

    def probe() -> tuple[str, str]:
        with torch_state_kept():
            found = choose("sample", shape, make_step, cache_dir=default_cache_dir())
        return found.precision, found.why()

    return probe


def _mean_and_se(bits: torch.Tensor) -> dict[str, Any]:
    """Bits/dim of each image ``[N]`` as the report of :meth:`Pipeline.bits_per_dim` and
    :meth:`Pipeline.ode_bits_per_dim` gives them: their mean, its standard error over images
    (nan for one image) and N."""
    n = len(bits)
    se = float(bits.std() / math.sqrt(n)) if n > 1 else float("nan")
    return {"bits_per_dim": float(bits.mean()), "bits_per_dim_se": se, "n": n}
