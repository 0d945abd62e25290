"""Argument types, and the command-line options made from the settings' declarations.

:func:`add_settings` turns declared settings (``ddpm.settings``) into argparse options: the flag,
the parser of its text with the declared range or choices, the help with the default. Each one
stores under ``SECTION.FIELD``, so :func:`given_settings` returns exactly the settings the user
typed, as ``{section: {field: value}}``: the overrides ``config.with_overrides`` applies. No
option is written by hand for a setting, so none can be parsed and then ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ..autoencoder import SECTIONS as AUTOENCODER_SECTIONS
from ..checkpoint import best_checkpoint_path, list_checkpoints, run_of, unwritable
from ..config import PRECISIONS, SECTIONS
from ..posthoc import list_snapshots
from ..rundir import CONFIG_FILE, METRICS_FILE
from ..settings import (
    SEED_MAX,
    Setting,
    cut,
    field_types,
    item_type,
    number_text,
    settings_of,
    shown,
    tuple_length,
    unwrap_optional,
)

EXIT_USAGE = 2
SECTION_TITLES = {"model": "model (the U-Net)", "diffusion": "diffusion", "data": "data",
                  "train": "training", "sample": "sampling",
                  "latent": "latent diffusion (Rombach et al. 2021)",
                  "superres": "super-resolution, a cascade's later stage (Ho et al. 2021)"}


class UsageError(Exception):
    """A mistake in what the user asked for; printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument gives one line (what was wrong, where to look), exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Help that ends with an option's default, except when there is none to show (None) or the
    help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# --- argument types -----------------------------------------------------------------------------


def number(kind: type = int, rule: Setting | None = None, **bounds: float) -> Callable[[str], Any]:
    """An argparse type: a whole number (``kind=int``) or a number, within ``rule``'s range (or
    ``bounds``: at_least, above, below, at_most), with a message naming the bad value."""
    limits: dict[str, Any] = bounds  # (Setting's keywords are of several types)
    rule = rule or Setting(flag=None, help="", **limits)

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            digits = text.strip().lstrip("+-")
            if digits.isdigit():  # more digits than Python converts (4,300)
                raise argparse.ArgumentTypeError(
                    f"expected a number {_symbolic(rule)}".rstrip()
                    + f", got a whole number of {len(digits):,} digits") from None
            noun = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {noun}, got {shown(text)}") from None
        if not rule.admits(value):
            finite = "finite " if kind is float and not math.isfinite(value) else ""
            raise argparse.ArgumentTypeError(
                f"expected a {finite}number {_symbolic(rule)}".rstrip() + f", got {cut(text)}")
        return value

    return parse


def _symbolic(rule: Setting) -> str:
    """The range as the command line says it: '>= 1', '> 0', 'in [0, 1)'."""
    low = rule.at_least if rule.at_least is not None else rule.above
    high = rule.below if rule.below is not None else rule.at_most
    if low is not None and high is not None:
        return rule.condition() or ""
    if low is not None:
        return f">= {number_text(low)}" if rule.at_least is not None else f"> {number_text(low)}"
    if high is not None:
        return f"< {number_text(high)}" if rule.below is not None else f"<= {number_text(high)}"
    return ""


def seed(text: str) -> int:
    """An argparse type: a seed, 0 .. 2^63 - 2 (torch's generators take 64 bits)."""
    return number(int, at_least=0, at_most=SEED_MAX)(text)


def number_list(kind: type = int, rule: Setting | None = None,
                length: int | None = None) -> Callable[[str], tuple]:
    """An argparse type: comma-separated numbers such as ``1,2,2`` (``''``: none, when the
    setting allows no items), each within ``rule``'s range; exactly ``length`` of them when
    given."""
    rule = rule or Setting(flag=None, help="")
    item = number(kind, rule)
    example = rule.example or ("1,2,2" if kind is int else "0.9,0.999")

    def parse(text: str) -> tuple:
        items = [i.strip() for i in text.split(",") if i.strip()]
        try:
            values = tuple(item(i) for i in items)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{exc} in {text!r} (comma-separated, e.g. "
                                             f"{example})") from None
        if len(values) < max(rule.min_items, 0) or (length is not None and len(values) != length):
            count = length if length is not None else rule.min_items
            at_least = "" if length is not None else "at least "
            raise argparse.ArgumentTypeError(
                f"expected {at_least}{count} comma-separated value{'s' * (count != 1)} such as "
                f"{example}, got {text!r}")
        return values

    return parse


def positive_int(text: str) -> int:
    return number(int, at_least=1)(text)


def name_list(valid: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: comma-separated names, each one of ``valid``."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        unknown = [n for n in names if n not in valid]
        if not names or unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(repr, unknown)) or 'empty list'}; choose from {', '.join(valid)}")
        return names

    return parse


def whole_list(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated whole numbers >= 0 such as 0,10,50."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or not all(i.isdigit() for i in items):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated whole numbers such as 0,10,50, got {text!r}")
    return tuple(int(i) for i in items)


# --- options from declarations ------------------------------------------------------------------


def setting_flags() -> dict[str, str]:
    """``{"section.field": flag}`` for every declared setting with a flag, of a diffusion run and
    of an autoencoder run (a key both have, such as model.base_channels, has one flag)."""
    return {f"{section}.{f.name}": d.flag
            for sections in (AUTOENCODER_SECTIONS, SECTIONS) for section, cls in sections.items()
            for f, d in settings_of(cls) if d.flag}


def add_settings(parser: argparse.ArgumentParser, section: str, *,
                 only: Iterable[str] | None = None,
                 default_note: Callable[[str, Any], str | None] = lambda key, value: None,
                 groups: dict[str, argparse._ArgumentGroup] | None = None,
                 sections: dict[str, type] = SECTIONS,
                 titles: dict[str, str] = SECTION_TITLES) -> None:
    """An option for each declared setting of ``section`` (or of its fields named in ``only``)
    that has a flag; ``sections`` and their help ``titles`` are a diffusion run's by default.
    ``default_note(key, default)`` says what applies when it is not given (e.g. the preset's
    value); ``groups`` collects the help sections across calls."""
    cls = sections[section]
    wanted = set(only) if only is not None else None
    groups = groups if groups is not None else {}
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f, decl in settings_of(cls):
        if decl.flag is None or (wanted is not None and f.name not in wanted):
            continue
        title = decl.group or titles[section]
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        target = groups[title]
        if decl.exclusive:
            if decl.exclusive not in exclusive:
                exclusive[decl.exclusive] = target.add_mutually_exclusive_group()
            target = exclusive[decl.exclusive]
        key = f"{section}.{f.name}"
        note = default_note(key, _default(f))
        help_text = decl.help + (f" ({note})" if note and "default" not in decl.help else "")
        target.add_argument(decl.flag, dest=key, default=None, help=help_text,
                            **_parsing(cls, f.name, decl))


class Switch(argparse.BooleanOptionalAction):
    """``--flag`` / ``--no-flag``; giving both is an error, not "the last one wins"."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        assert option_string is not None  # argparse names the flag it matched
        value = not option_string.startswith("--no-")
        if getattr(namespace, self.dest) not in (None, value):
            raise argparse.ArgumentError(self, f"give {self.option_strings[0]} or "
                                               f"{self.option_strings[1]}, not both")
        setattr(namespace, self.dest, value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[operator]  # not MISSING where default is


def _parsing(cls: type, name: str, decl: Setting) -> dict[str, Any]:
    """argparse's type/choices/action/metavar for the field ``name`` of ``cls``."""
    kind, _ = unwrap_optional(field_types(cls)[name])
    if kind is bool:
        return {"action": Switch}
    item = item_type(kind)
    if item is not None:
        return {"type": number_list(item, decl, tuple_length(kind)),
                "metavar": decl.metavar or "N,N,..."}
    if decl.choices is not None:
        return {"type": kind, "choices": decl.choices}
    options = {"metavar": decl.metavar or {int: "N", float: "X"}.get(kind, "TEXT")}
    if kind in (int, float):
        return {**options, "type": number(kind, decl)}
    return {**options, "type": kind}


def given_settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The settings typed on the command line: ``{section: {field: value}}``."""
    given: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            given.setdefault(section, {})[name] = value
    return given


def describe(value: Any) -> str:
    """A setting's value as it would be typed: 1,2,2 for a tuple, 0.002 for a float."""
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "''"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


# --- outputs ------------------------------------------------------------------------------------


def check_out(path: str, suffixes: Sequence[str], option: str = "--out") -> Path:
    """Refuse, before any work and creating nothing, an output whose suffix is not one of
    ``suffixes`` or whose folder cannot be written (the writers make the folder, so that a
    command refused later leaves none behind)."""
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name ending in {suffixes[0]}")
    if out.suffix.lower() not in suffixes:
        raise UsageError(f"{option} {path}: the file must end in {', '.join(suffixes)}")
    _check_folder_of(out, option)
    return out


def check_out_file(path: str, *, force: bool, reads: str | os.PathLike | None = None,
                   option: str = "--out") -> Path:
    """Refuse, before any work and creating nothing, an output file that is empty, a folder, in a
    folder that cannot be written, there already without ``force``, or one of the files of the
    run (or checkpoint) the command ``reads``, which ``force`` would overwrite with another
    kind of file."""
    if not path.strip():
        raise UsageError(f"{option} is empty; give the file to write, e.g. {option} out.pt")
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name such as "
                         f"{Path(path) / 'out.pt'}")
    if reads is not None and out.resolve() in _files_of(reads):
        run = run_of(reads)
        what = f"a file of the run {run}" if run.is_dir() else "the checkpoint"
        raise UsageError(f"{option} {path} is {what} that this command reads, which is kept; "
                         f"choose another file name")
    if out.exists() and not force:
        raise UsageError(f"{out} exists; add --force to replace it or choose another {option}")
    _check_folder_of(out, option)
    return out


def _files_of(run_or_file: str | os.PathLike) -> set[Path]:
    """The files training wrote in the run of ``run_or_file`` (or that checkpoint file), resolved."""
    run = run_of(run_or_file)
    if not run.is_dir():
        return {run}
    files = [*list_checkpoints(run), best_checkpoint_path(run), run / CONFIG_FILE,
             run / METRICS_FILE, *(p for _, p in list_snapshots(run))]
    return {p.resolve() for p in files}


def _check_folder_of(out: Path, option: str) -> None:
    """Refuse an output file ``out`` whose folder is a file or cannot be written."""
    if out.parent.exists() and not out.parent.is_dir():
        raise UsageError(f"{option} {out}: cannot write in {out.parent}, which is a file; "
                         f"choose a folder")
    if (reason := unwritable(out.parent)) is not None:
        raise UsageError(f"{option} {out}: cannot write in {out.parent}: {reason}; "
                         f"choose a writable folder")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Options of every command that loads a trained model."""
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast of the network while sampling: auto (the default: bf16 on CUDA, "
                        "and on a CPU with bf16 hardware where a short measurement, cached, finds "
                        "it faster; fp32 otherwise), fp32, bf16, fp16 (CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (minutes to compile; falls back to uncompiled "
                        "with a warning if compiling fails)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
