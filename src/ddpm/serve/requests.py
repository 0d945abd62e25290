"""A generate request of the web page, checked: the JSON body read strictly, every field against
the model and the server's :class:`Limits`, with a message that names the field, the value and
what to give instead."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import settings
from ..config import SampleConfig
from ..pipeline import Pipeline
from ..runtime import resolve_precision
from ..samplers import SAMPLERS
from ..settings import SEED_MAX, SettingError, settings_of

MAX_IMAGES = 128  # one batch, the one 'ddpm sample' draws (batch size 128): the same images
# The JSON fields of a generate request; the page's form has one input for each.
FIELDS = ("n", "steps", "seed", "sampler", "class", "guidance", "x0")
SHOWN_CHARS = 40  # a value echoed in a message is cut to this: never a 301-digit number in full
# The guidance scales a request may ask for: the range SampleConfig declares ('ddpm sample's).
GUIDANCE_RULE = next(d for f, d in settings_of(SampleConfig) if f.name == "guidance")


class RequestError(ValueError):
    """A request this server will not run: the message for the page, and the HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may ask for and how much the server holds (the flags of 'ddpm serve')."""

    max_images: int = 64
    max_steps: int | None = None  # None: the model's T (and never more than T)
    max_queue: int = 16  # requests waiting behind the running one; more are refused (503)
    # Finished grids and GIFs kept for download, newest first, at most this many bytes in all
    # (and 16 generations): the server's memory does not grow with the requests it has served.
    keep_bytes: int = 64 * 2**20
    keep_jobs: int = 16

    def check(self, num_train_timesteps: int) -> None:
        """ValueError naming the flag, for limits the model or the server cannot honour."""
        assert self.max_steps is not None  # WebServer sets None to T first
        if not 1 <= self.max_images <= MAX_IMAGES:
            raise ValueError(f"--max-images {self.max_images}: give 1..{MAX_IMAGES} (one batch, "
                             f"the one grid a page shows)")
        if not 1 <= self.max_steps <= num_train_timesteps:
            raise ValueError(f"--max-steps {self.max_steps}: give 1..{num_train_timesteps}, the "
                             f"model's training timesteps T")
        if self.max_queue < 0:
            raise ValueError(f"--max-queue {self.max_queue}: give 0 or more")


@dataclass(frozen=True)
class GenerateRequest:
    """One checked request: what ``Pipeline.generate`` is asked for."""

    n: int
    steps: int
    seed: int
    sampler: str
    label: int | None  # None: every class in turn (a conditional model), or no class
    guidance: float
    x0: bool  # send the predicted x0 beside each x_t (and put it in the GIF)

    def settings(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "num_sample_steps": self.steps,
                "guidance": self.guidance}


# --- checking a request --------------------------------------------------------------------------


def shown(value: Any) -> str:
    """``value`` of a request as a message quotes it (``settings.shown``, spelled as JSON); a
    list or an object is only named."""
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "a list"
    return settings.shown(value, SHOWN_CHARS, "json")


def _whole(name: str, value: Any, low: int, high: int, why: str = "") -> int:
    """A whole number in low..high from a JSON number, or RequestError. A string is refused, as
    a boolean or a fraction is: the API takes numbers as numbers (the page sends them so)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not value.is_integer()):
        hint = ", a string: send the number without quotes" if isinstance(value, str) else ""
        raise RequestError(f"{name} must be a whole number, got {shown(value)}{hint}")
    if not low <= value <= high:
        raise RequestError(f"{name} must be from {low} to {high}{why}, got {shown(value)}")
    return int(value)


def parse_body(raw: bytes) -> Any:
    """The body of ``POST /api/generate`` as strict JSON (no NaN or Infinity), or RequestError.
    An empty body is refused as null is: the defaults are asked for with ``{}``."""
    if not raw.strip():
        raise RequestError(_not_an_object("an empty body"))

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=no_constant)
    except UnicodeDecodeError:
        raise RequestError("the request body is not UTF-8 text; send a JSON object such as "
                           '{"steps": 20}') from None
    except RecursionError:  # the parser's own limit on nesting (about 1000 deep)
        raise RequestError("the request body is nested too deeply; send one flat JSON object "
                           'such as {"steps": 20}') from None
    except ValueError as exc:
        raise RequestError(f"the request body is not JSON ({exc}); send an object with some of "
                           f"the fields {', '.join(FIELDS)}") from None


def _not_an_object(what: str) -> str:
    return (f"the request must be a JSON object of some of the fields {', '.join(FIELDS)}, e.g. "
            f"{{}} for the defaults; got {what}")


def parse_request(body: Any, pipe: Pipeline, limits: Limits) -> GenerateRequest:
    """The JSON body of ``POST /api/generate`` as a request this model can run within the limits;
    RequestError with a message that names the field, the value and what to give otherwise."""
    if not isinstance(body, dict):
        raise RequestError(_not_an_object(shown(body)))
    if unknown := sorted(set(body) - set(FIELDS)):
        raise RequestError(f"unknown field {shown(unknown[0])}; the fields are "
                           f"{', '.join(FIELDS)}")
    run = pipe.config.sample
    T = pipe.schedule.num_train_timesteps
    assert limits.max_steps is not None  # WebServer sets None to T
    n = _whole("n (the number of images)", body.get("n", min(16, limits.max_images)), 1,
               limits.max_images, " (this server's --max-images)")
    steps_why = (" (the model's training timesteps T)" if limits.max_steps == T
                 else " (this server's --max-steps)")
    steps = _whole("steps", body.get("steps", min(run.num_sample_steps, limits.max_steps)), 1,
                   limits.max_steps, steps_why)
    seed = _whole("seed", body.get("seed", 0), 0, SEED_MAX)
    sampler = body.get("sampler", run.sampler)
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise RequestError(f"unknown sampler {shown(sampler)}; choose one of "
                           f"{', '.join(SAMPLERS)}")
    label = _class_label(body.get("class"), pipe)
    guidance = body.get("guidance", run.guidance if pipe.num_classes else 0.0)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or \
            not GUIDANCE_RULE.admits(guidance):
        raise RequestError(f"guidance must be a number {GUIDANCE_RULE.condition()}, got "
                           f"{shown(guidance)}")
    x0 = body.get("x0", False)
    if not isinstance(x0, bool):
        raise RequestError(f"x0 must be true or false, got {shown(x0)}")
    request = GenerateRequest(n, steps, seed, sampler, label, float(guidance), x0)
    # The rules between settings and against the model (guidance only with classes, ...), by
    # the checks the CLI uses, named by this API's fields.
    try:
        pipe.sample_config(**request.settings())
    except SettingError as exc:
        names = {"sample.sampler": "sampler", "sample.num_sample_steps": "steps",
                 "sample.guidance": "guidance"}
        raise RequestError(exc.for_flag(names.get(exc.key, f"the run's {exc.key}"))) from None
    return request


def _class_label(value: Any, pipe: Pipeline) -> int | None:
    """The ``class`` field: empty for every class in turn, an index (a number), or a name."""
    if value is None or value == "":
        return None
    k = pipe.num_classes
    if not k:
        raise RequestError(f"class {shown(value)}: this model was trained without classes; "
                           f"leave class empty")
    if isinstance(value, str):
        names = [c.lower() for c in pipe.classes]
        if value.lower() in names:
            return names.index(value.lower())
        known = f" or a name ({', '.join(pipe.classes)})" if pipe.classes else ""
        raise RequestError(f"class {shown(value)} is not a class of this model; give an index "
                           f"0..{k - 1} as a number{known}, or leave it empty for every class "
                           f"in turn")
    return _whole("class", value, 0, k - 1, " (this model's classes)")


def run_name(source: str) -> str:
    """What the page calls the model: the last component of its path (the run's folder, the
    checkpoint's file), never the absolute path, which tells a visitor about this machine."""
    return Path(source).resolve().name or "the model"


def model_info(pipe: Pipeline, source: str, limits: Limits,
               stages: Sequence[Pipeline] = ()) -> dict[str, Any]:
    """What ``GET /api/model`` says: the page builds its form from it (the base model's
    settings; a cascade's images are its last stage's size)."""
    run = pipe.config.sample
    k = pipe.num_classes
    assert limits.max_steps is not None  # WebServer sets None to T
    c, size, _ = (stages[-1] if stages else pipe).image_shape
    return {
        "source": run_name(source), "step": pipe.step, "image_size": size, "channels": c,
        "stages": len(stages), "num_train_timesteps": pipe.schedule.num_train_timesteps,
        "conditional": bool(k),
        "classes": [pipe.classes[i] if i < len(pipe.classes) else str(i) for i in range(k)],
        "samplers": list(SAMPLERS), "device": str(pipe.device),
        "precision": resolve_precision(pipe.precision, pipe.device),
        "defaults": {"n": min(16, limits.max_images), "seed": 0, "sampler": run.sampler,
                     "steps": min(run.num_sample_steps, limits.max_steps),
                     "guidance": run.guidance if k else 0.0, "x0": False},
        "limits": {"max_images": limits.max_images, "max_steps": limits.max_steps,
                   "max_queue": limits.max_queue},
    }
