"""Reading a diffusers folder's files before anything is built: each refusal names the file
(relative to the folder), the value and what ddpm can take instead."""

from __future__ import annotations

import inspect
import json
import math
import os
import stat
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .. import settings
from ..checkpoint import CHECKPOINT_DIR
from .common import RUN_CONFIG_FILE, WEIGHTS, ExportError

# What a diffusers folder may ask for, checked before anything is built or allocated: far above
# any published model, and low enough that a typo or a hostile file cannot make ddpm allocate
# gigabytes or loop for hours.
MAX_TIMESTEPS = 100_000  # published schedules have 1,000 steps (improved DDPM's 4,000)
MAX_SAMPLE_SIZE = 4096  # published UNet2DModels make images of 32 to 1024 pixels
MAX_LAYERS_PER_BLOCK = 32  # published ones have 1 to 3
MAX_JSON_BYTES = 16 << 20  # a scheduler config with MAX_TIMESTEPS trained_betas is ~2.5 MB
MAX_SAFETENSORS_HEADER = 100_000_000  # safetensors' own limit on its JSON header
# Names that only a diffusers folder holds: a folder (not a ddpm run) with any of them is taken
# for one, and load_diffusers says what it lacks.
_DIFFUSERS_PARTS = ("model_index.json", "unet", "scheduler", "scheduler_config.json",
                    f"{WEIGHTS}.safetensors", f"{WEIGHTS}.bin")


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """A folder meant as a diffusers model: ``DDPMPipeline.save_pretrained``'s (model_index.json),
    ``UNet2DModel.save_pretrained``'s (config.json naming UNet2DModel, its weights), or one with
    their parts that is not a ddpm run (no checkpoints/), whose lack :func:`load_diffusers` says."""
    p = Path(path)
    if not p.is_dir() or (p / CHECKPOINT_DIR).is_dir():
        return False
    if any(os.path.lexists(p / name) for name in _DIFFUSERS_PARTS):
        return True
    try:
        return read_json(p, "config.json").get("_class_name") == "UNet2DModel"
    except ExportError:
        return False


def diffusers_betas(sc: dict[str, Any]) -> torch.Tensor:
    """The betas ``[T]`` float64 that a diffusers scheduler config defines (the formulas of
    diffusers' DDPM/DDIM schedulers, in float64), before any zero-terminal-SNR rescaling."""
    T = int(sc.get("num_train_timesteps", 1000))
    start, end = float(sc.get("beta_start", 1e-4)), float(sc.get("beta_end", 0.02))
    if sc.get("trained_betas") is not None:
        betas = torch.tensor(sc["trained_betas"], dtype=torch.float64)
        if betas.shape != (T,):
            raise ExportError(f"its trained_betas has {betas.numel()} values for "
                              f"num_train_timesteps {T}")
        return betas
    kind = sc.get("beta_schedule", "linear")
    if kind == "linear":
        return torch.linspace(start, end, T, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":
        def f(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)],
                            dtype=torch.float64)
    if kind == "sigmoid":  # GeoDiff's: sigmoid over [-6, 6] scaled into [beta_start, beta_end]
        return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (end - start) + start
    raise ExportError(f"its scheduler's beta_schedule {json_shown(kind)} is none ddpm can represent "
                      f"(linear, scaled_linear, squaredcos_cap_v2, sigmoid, or trained_betas)")


# --- reading the folder's files: each refusal names the file (relative to the folder) -------


def json_shown(value: Any, limit: int = 40) -> str:
    """``value`` as its JSON file spells it (null, NaN, [1, 2]; a string quoted as Python
    quotes it, as the names in these messages are), cut (``settings.shown``)."""
    return settings.shown(value, limit, "python" if isinstance(value, str) else "json")


def regular_file(path: Path, shown: str) -> int:
    """The size of ``path``, a regular file or a link to one (the hub's cache links its files),
    else an ExportError: a device such as /dev/zero, or a pipe, would be read forever."""
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise ExportError(f"{shown} is a link to {os.readlink(path)}, which does not "
                              f"exist") from None
        raise ExportError(f"{shown} is missing") from None
    except OSError as exc:
        raise ExportError(f"cannot read {shown}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ExportError(f"{shown} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise ExportError(f"{shown} is not a regular file but a device or a pipe"
                          + (f" ({os.readlink(path)})" if path.is_symlink() else ""))
    return st.st_size


def read_json(folder: Path, name: str | Path, *,
               advice: str = "save the model again with save_pretrained") -> dict[str, Any]:
    """The JSON object in ``folder/name``, or an ExportError naming ``name``, what is wrong and
    ending with ``advice``."""
    shown = Path(name).as_posix()
    size = regular_file(folder / name, shown)
    if size > MAX_JSON_BYTES:
        raise ExportError(f"{shown} is {size / 2**20:.0f} MB, more than a config can be "
                          f"({MAX_JSON_BYTES >> 20} MB); it is not a diffusers config")
    try:
        value = json.loads((folder / name).read_bytes())
    except OSError as exc:
        raise ExportError(f"cannot read {shown}: {exc.strerror}") from None
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested beyond reason
        raise ExportError(f"{shown} is not JSON ({str(exc).splitlines()[0][:100]}); "
                          f"{advice}") from None
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "true or false", type(None): "null"}
        raise ExportError(f"{shown} holds {kind.get(type(value), 'a number')} where its settings "
                          f"belong, a JSON object {{\"key\": value, ...}}; {advice}")
    return value


def _is_int(value: Any, low: int, high: int | float = math.inf) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_beta(value: Any) -> bool:
    """A number a beta can be: finite, in (0, 1)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and 0 < value < 1)


def _setting(config: dict[str, Any], shown: str, key: str, default: Any,
             ok: Callable[[Any], bool], expected: str) -> Any:
    """``config[key]`` (``default`` where absent), or an ExportError naming the file ``shown``,
    the key, its value and the ``expected`` one."""
    value = config.get(key, default)
    if not ok(value):
        raise ExportError(f"{shown}: {key} is {json_shown(value)}; expected {expected}")
    return value


def folder_parts(folder: Path) -> tuple[Path, Path, str | None]:
    """(the UNet2DModel's folder, its scheduler config file, the scheduler class the pipeline
    names or None) of a diffusers folder, relative to it."""
    if os.path.lexists(folder / "model_index.json"):
        index = read_json(folder, "model_index.json")
        unet, sched = index.get("unet"), index.get("scheduler")
        if not (isinstance(unet, list) and unet[-1:] == ["UNet2DModel"]):
            raise ExportError(f"model_index.json names unet {json_shown(unet)}; ddpm samples "
                              f"pipelines whose unet is a UNet2DModel (DDPMPipeline, DDIMPipeline)")
        if not sched:
            raise ExportError("model_index.json names no scheduler; its noise schedule is needed "
                              "to sample")
        if not (isinstance(sched, list) and len(sched) == 2 and isinstance(sched[1], str)):
            raise ExportError(f"model_index.json names scheduler {json_shown(sched)}; expected "
                              f"[library, class] such as [\"diffusers\", \"DDPMScheduler\"]")
        return Path("unet"), Path("scheduler", "scheduler_config.json"), sched[1]
    if os.path.lexists(folder / "config.json") and not (folder / "unet").is_dir():
        read_json(folder, "config.json")  # a UNet2DModel's, or a file to name
        if not (folder / "scheduler_config.json").is_file():
            raise ExportError("it holds a UNet2DModel but no scheduler_config.json; save its "
                              "scheduler there too (scheduler.save_pretrained(folder)), or give "
                              "the whole pipeline's folder")
        return Path("."), Path("scheduler_config.json"), None
    raise ExportError("it is neither a ddpm run (no checkpoints/ckpt-STEP.pt) nor a diffusers "
                      "pipeline folder (model_index.json is missing); give a run directory of "
                      "'ddpm train', a .pt checkpoint, or a folder as DDPMPipeline.save_pretrained "
                      "writes it: model_index.json, unet/ and scheduler/")


def unet_settings(diffusers: ModuleType, uc: dict[str, Any], shown: str) -> dict[str, Any]:
    """The settings UNet2DModel is built with: its defaults under the keys of ``uc`` it takes
    (others are ignored, as diffusers ignores them); an ExportError, naming the key and its
    value, for a model ddpm cannot sample or one that would be enormous to build."""
    params = inspect.signature(diffusers.UNet2DModel.__init__).parameters
    c = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    c.update((k, v) for k, v in uc.items() if k in c)
    name = uc.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ExportError(f"{shown} is a {json_shown(name)}; ddpm samples UNet2DModel")
    if c["time_embedding_type"] != "positional":
        raise ExportError(f"its UNet2DModel embeds time as {json_shown(c['time_embedding_type'])} "
                          f"(a score model of noise levels); ddpm samples DDPM models, whose "
                          f"time embedding is 'positional'")
    C = _setting(c, shown, "in_channels", None, lambda v: _is_int(v, 1, 3) and v != 2,
                 "1 or 3 (grey or RGB images)")
    _setting(c, shown, "out_channels", None, lambda v: _is_int(v, 1, 2 * C),
             f"{C} (or {2 * C} with a learned variance)")
    size = _setting(c, shown, "sample_size", None, lambda v: _is_int(v, 1, MAX_SAMPLE_SIZE) or (
        isinstance(v, list) and len(v) == 2 and v[0] == v[1] and _is_int(v[0], 1, MAX_SAMPLE_SIZE)),
        f"the side of its square images, 1 to {MAX_SAMPLE_SIZE} pixels")
    levels = MAX_SAMPLE_SIZE.bit_length()  # each level but the last halves the image
    widths = _setting(c, shown, "block_out_channels", None, lambda v: isinstance(v, (list, tuple))
                      and 1 <= len(v) <= levels and all(_is_int(w, 1) for w in v),
                      f"a list of 1 to {levels} channel counts, each a positive integer")
    for key in ("down_block_types", "up_block_types"):
        _setting(c, shown, key, None, lambda v: isinstance(v, (list, tuple)) and len(v) == len(
            widths) and all(isinstance(b, str) for b in v),
            f"a list of {len(widths)} block names, one per block_out_channels")
    _setting(c, shown, "layers_per_block", None, lambda v: _is_int(v, 1, MAX_LAYERS_PER_BLOCK),
             f"an integer from 1 to {MAX_LAYERS_PER_BLOCK}")
    _setting(c, shown, "norm_num_groups", None, lambda v: _is_int(v, 1), "a positive integer")
    for key in ("attention_head_dim", "num_class_embeds"):
        _setting(c, shown, key, None, lambda v: v is None or _is_int(v, 1),
                 "null or a positive integer")
    side, halvings = size[0] if isinstance(size, list) else size, len(widths) - 1
    if side % 2**halvings:
        raise ExportError(f"{shown}: sample_size {side} is not a multiple of {2**halvings}, as "
                          f"the {halvings} downsamplings between its {len(widths)} levels "
                          f"(block_out_channels) need; the model cannot make images of that size")
    return c


def check_scheduler(diffusers: ModuleType, sc: dict[str, Any], shown: str, named: str | None) -> None:
    """An ExportError, naming the key and its value, for a scheduler config that defines no
    DDPM noise schedule or one ddpm cannot sample; ``named`` is the class model_index.json
    gives it (diffusers loads that one)."""
    name = named or sc.get("_class_name", "DDPMScheduler")
    try:
        cls = getattr(diffusers, name) if isinstance(name, str) and name.isidentifier() else None
    except Exception:  # diffusers' lazy import fails variously for a class of another framework
        cls = None
    if not isinstance(cls, type):
        raise ExportError(f"its scheduler {json_shown(name)} is none that diffusers "
                          f"{diffusers.__version__} has")
    # (cls is a class here, so __init__ is its own; mypy guards against reading an instance's)
    if "beta_schedule" not in inspect.signature(cls.__init__).parameters:  # type: ignore[misc]
        raise ExportError(f"its scheduler {name} has no beta schedule; ddpm samples models "
                          f"trained on one (DDPMScheduler, DDIMScheduler, ...)")
    T = _setting(sc, shown, "num_train_timesteps", 1000, lambda v: _is_int(v, 2, MAX_TIMESTEPS),
                 f"an integer from 2 to {MAX_TIMESTEPS:,}")
    kind = _setting(sc, shown, "beta_schedule", "linear", lambda v: isinstance(v, str),
                    "the name of a schedule, such as \"linear\"")
    trained = sc.get("trained_betas")
    if trained is not None:
        if not isinstance(trained, list) or len(trained) != T:
            raise ExportError(f"{shown}: trained_betas has "
                              f"{len(trained) if isinstance(trained, list) else json_shown(trained)} "
                              f"values; expected a list of num_train_timesteps = {T}")
        for i, beta in enumerate(trained):
            if not _is_beta(beta):
                raise ExportError(f"{shown}: trained_betas[{i}] is {json_shown(beta)}; expected a "
                                  f"finite number in (0, 1)")
    elif kind in ("linear", "scaled_linear", "sigmoid"):  # the schedules made of the two
        for key, default in (("beta_start", 1e-4), ("beta_end", 0.02)):
            _setting(sc, shown, key, default, _is_beta, "a finite number in (0, 1)")
    for key in ("prediction_type", "variance_type"):
        _setting(sc, shown, key, None, lambda v: v is None or isinstance(v, str),
                 "a name, such as \"epsilon\" or \"fixed_small\"")
    for key in ("clip_sample", "thresholding", "rescale_betas_zero_snr"):
        _setting(sc, shown, key, False, lambda v: isinstance(v, bool), "true or false")


def saved_run(folder: Path) -> dict[str, Any]:
    """What 'ddpm export' wrote beside diffusers' files (ddpm.json), checked; {} without one."""
    if not os.path.lexists(folder / RUN_CONFIG_FILE):
        return {}
    saved = read_json(folder, RUN_CONFIG_FILE, advice="delete it to sample by the diffusers "
                                                    "configs alone")
    _setting(saved, RUN_CONFIG_FILE, "config", None, lambda v: v is None or isinstance(v, dict),
             "the run's config, a JSON object")
    _setting(saved, RUN_CONFIG_FILE, "step", 0, lambda v: _is_int(v, 0), "an integer >= 0")
    _setting(saved, RUN_CONFIG_FILE, "classes", [], lambda v: isinstance(v, list) and all(
        isinstance(name, str) for name in v), "a list of class names")
    return saved
