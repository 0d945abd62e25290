"""Power-function EMA and its post-hoc reconstruction (Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", sec. 3 and appendix C), written from the
paper's equations.

A power-function EMA with exponent gamma averages the weights theta_1 .. theta_t of the steps
so far with weights growing as tau^gamma: at each step theta_hat <- beta theta_hat + (1 - beta)
theta with beta = (1 - 1/n)^(gamma + 1), n the number of updates (their eq. 3, with steps for
time). Unrolled, the product of the betas telescopes, so the average at step t is exactly

    theta_hat_t = sum_tau w_tau theta_tau,   w_tau = (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1)

(:func:`power_weights`), weights that sum to 1. Its length is said by sigma_rel, the standard
deviation of the profile tau^gamma on [0, t] relative to t: sigma_rel^2 = (gamma + 1) /
((gamma + 2)^2 (gamma + 3)) (their eq. 4; :func:`std_from_gamma`, :func:`gamma_from_std`).

Training keeps a few such averages (``--posthoc-ema 0.05,0.10``) and saves them every
``--ema-snapshot-every`` steps. Any other average, of any sigma_rel at any step, is then a
least-squares combination of the snapshots: the coefficients x solve (W W^T) x = W w_target,
where the rows of W are the snapshots' weight vectors over the training steps and w_target is
the wanted profile's (their appendix C.3, here with the exact discrete weights above rather than
the continuous profiles). Nothing is retrained; ``ddpm posthoc-ema`` scores each candidate
length with FID and keeps the best.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, atomic_save, read_torch_file
from .settings import cut
from .step import EMA

SNAPSHOT_DIR = "ema"
_SNAPSHOT = re.compile(r"^snapshot-(\d+)\.pt$")
# sigma_rel at gamma = 0 (the plain average): sqrt(1 / 12). Longer profiles need gamma < 0,
# where sigma_rel is no longer monotone in gamma, so this is the longest one offered.
MAX_STD = math.sqrt(1 / 12)


def std_from_gamma(gamma: float) -> float:
    """sigma_rel of the power profile tau^gamma (Karras et al. 2024, eq. 4)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_from_std(std: float) -> float:
    """The exponent gamma >= 0 whose profile has relative standard deviation ``std`` in
    (0, sqrt(1/12)]: the inverse of :func:`std_from_gamma`, which falls with gamma there, found
    by bisection."""
    if not 0 < std <= MAX_STD:
        raise ValueError(f"a power EMA's relative standard deviation must be in (0, "
                         f"{MAX_STD:.4f}]; got {std}")
    lo, hi = 0.0, 1.0
    while std_from_gamma(hi) > std:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if std_from_gamma(mid) > std else (lo, mid)
    return (lo + hi) / 2


def power_weights(gamma: float, step: int, length: int) -> torch.Tensor:
    """The weight of each step's weights theta_1 .. theta_length in the power EMA of exponent
    ``gamma`` at ``step`` (zero after it), float64 ``[length]``: (tau^(g+1) - (tau-1)^(g+1)) /
    step^(g+1), computed as differences of (tau/step)^(g+1) so that no power overflows."""
    tau = torch.arange(1, length + 1, dtype=torch.float64)
    k = gamma + 1
    w = (tau / step) ** k - ((tau - 1) / step) ** k
    return torch.where(tau <= step, w, torch.zeros_like(w))


def solve_posthoc(snapshots: Sequence[tuple[float, int]],
                  target: tuple[float, int]) -> tuple[torch.Tensor, float]:
    """Coefficients ``[S]`` float64 that combine snapshots, given as (gamma, step), into the
    power EMA ``target`` = (gamma, step) in the least-squares sense over the steps' weights, and
    the relative error of the combined weights, ||W^T x - w|| / ||w||."""
    length = max([s for _, s in snapshots] + [target[1]])
    W = torch.stack([power_weights(g, s, length) for g, s in snapshots])  # [S, length]
    w = power_weights(*target, length)  # [length]
    x = torch.linalg.lstsq(W.T, w.unsqueeze(1), driver="gelsd").solution.squeeze(1)  # [S]
    error = float(torch.linalg.vector_norm(W.T @ x - w) / torch.linalg.vector_norm(w))
    return x, error


class PowerEMA(EMA):
    """A power-function EMA of a model's weights (:class:`EMA` with beta = (1 - 1/n)^(gamma+1),
    n counting this update), named by its relative standard deviation ``std``."""

    def __init__(self, model: nn.Module, std: float):
        super().__init__(model, decay=0.0, warmup=False)
        self.std, self.gamma = std, gamma_from_std(std)

    def current_decay(self) -> torch.Tensor:
        n = self._updates.double() + 1
        return (1 - 1 / n) ** (self.gamma + 1)

    def profile(self) -> dict:
        """The average as a checkpoint and a snapshot both hold it."""
        return {"std": self.std, "gamma": self.gamma, "num_updates": self.num_updates,
                "weights": self.model.state_dict()}

    def load_profile(self, profile: dict) -> None:
        self.model.load_state_dict(profile["weights"])
        self.load_state_dict(profile)


def rebuilt_checkpoint(state: dict[str, Any], weights: dict[str, torch.Tensor], std: float,
                       step: int, fid: float) -> dict[str, Any]:
    """The checkpoint ``state`` with its EMA weights replaced by a post-hoc reconstruction of
    length ``std`` at ``step``, recorded under ``ema_rebuilt`` (with its FID, NaN unscored).
    Its power EMAs stay under ``posthoc_ema`` as training wrote them (a list of profiles,
    ``TrainState``), so every reader finds that key in one shape."""
    return {**state, "ema": weights, "ema_rebuilt": {"std": std, "step": step, "fid": fid}}


def snapshot_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"snapshot-{step:08d}.pt"


def save_snapshot(averages: Sequence[PowerEMA], run_dir: str | os.PathLike, step: int) -> Path:
    """Write the power EMAs of ``step`` to ``RUN/ema/snapshot-STEP.pt``, atomically."""
    path = snapshot_path(run_dir, step)
    atomic_save({"step": step, "profiles": [a.profile() for a in averages]}, path)
    return path


def list_snapshots(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The run's snapshots as (step, path), oldest first."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _SNAPSHOT.match(p.name)))


def _is_profile(profile: object) -> bool:
    """Has ``profile`` the layout of :meth:`PowerEMA.profile`?"""
    return (isinstance(profile, dict) and isinstance(profile.get("gamma"), float)
            and isinstance(profile.get("num_updates"), int)
            and isinstance(profile.get("weights"), dict)
            and all(isinstance(v, torch.Tensor) for v in profile["weights"].values()))


def _read_snapshot(path: Path) -> dict:
    """A snapshot :func:`save_snapshot` wrote, or a CheckpointError saying the file is not one."""
    snapshot = read_torch_file(path, "ddpm EMA snapshot")
    profiles = snapshot.get("profiles") if isinstance(snapshot, dict) else None
    if not (isinstance(profiles, list) and profiles and all(map(_is_profile, profiles))):
        raise CheckpointError(f"{path} is a torch file but not an EMA snapshot of 'ddpm train "
                              f"--posthoc-ema' (no averages in it); move it out of {path.parent}")
    return snapshot


def reconstruct(run_dir: str | os.PathLike, stds: Sequence[float], step: int | None = None
                ) -> tuple[int, int, list[tuple[dict[str, torch.Tensor], float]]]:
    """The weights of the power EMA of each relative length in ``stds`` at ``step`` (default:
    the last snapshot's), combined from the run's snapshots up to that step (each file read
    once), with the relative error of each combination's profile (:func:`solve_posthoc`); and
    the step and the number of snapshots used."""
    found = list_snapshots(run_dir)
    if not found:
        raise CheckpointError(
            f"{run_dir} holds no EMA snapshots ({SNAPSHOT_DIR}/snapshot-STEP.pt); train with "
            f"--posthoc-ema STD,STD (e.g. 0.05,0.10) to keep them")
    first, last = found[0][0], found[-1][0]
    step = last if step is None else step
    if not first <= step <= last:
        raise ValueError(f"step {cut(str(step))} is outside the run's snapshots (steps {first} "
                         f"to {last}); choose a step between them")
    steps = [s for s, _ in found]
    if step not in steps:
        # The weights trained after the last snapshot before it are in no snapshot, so no
        # combination of them is that step's average (Karras et al. 2024 rebuild at a snapshot).
        named = steps if len(steps) <= 10 else [max(s for s in steps if s < step),
                                                 min(s for s in steps if s > step)]
        which = "" if len(steps) <= 10 else f"the nearest of its {len(steps)}, "
        raise ValueError(f"step {step} has no EMA snapshot, and an average is rebuilt at a step "
                         f"that has one; choose {which}one of steps "
                         f"{', '.join(map(str, named))}")
    snapshots = [_read_snapshot(p) for s, p in found if s <= step]
    profiles = [p for s in snapshots for p in s["profiles"]]
    shapes = {name: value.shape for name, value in profiles[-1]["weights"].items()}
    for (_, path), snapshot in zip(found, snapshots, strict=False):
        if any({n: v.shape for n, v in p["weights"].items()} != shapes
               for p in snapshot["profiles"]):
            raise CheckpointError(f"{path.name} and {found[len(snapshots) - 1][1].name} hold "
                                  f"averages of different models; keep only this run's snapshots "
                                  f"in {path.parent}")
    bases = [(float(p["gamma"]), int(p["num_updates"])) for p in profiles]
    reference = profiles[-1]["weights"]
    rebuilt = []
    for std in stds:
        coefficients, error = solve_posthoc(bases, (gamma_from_std(std), step))
        combined = {name: sum(x * p["weights"][name].double()
                              for x, p in zip(coefficients.tolist(), profiles, strict=True)).to(value.dtype)
                    if value.is_floating_point() else value  # integer buffers: the newest's
                    for name, value in reference.items()}
        rebuilt.append((combined, error))
    return step, len(snapshots), rebuilt
