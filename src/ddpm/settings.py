"""How a setting is declared: once, beside its field, with everything the rest of ddpm needs.

A setting is one field of a frozen config dataclass, declared with :func:`setting`::

    lr: float = setting(2e-4, flag="--lr", above=0, help="AdamW peak learning rate")

The declaration holds the default, the command-line flag, the allowed values (a range or a list
of choices), the help text and whether ``ddpm train --resume`` may change it. From it come the
command line's options (``cli/options.py``), the check of values given in Python or in a
``--config`` file (:func:`check_fields`), the overrides onto a preset and the resume check
(``config.py``). Adding a setting means adding one field.

This module knows no setting in particular and imports nothing of ddpm, so both ``config.py``
and ``models/unet.py`` can use it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


class SettingError(ValueError):
    """A setting whose value breaks a rule between settings. The message names the setting by
    its config key; the command line names it by the flag the user typed (:meth:`for_flag`)."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message  # message: '{setting}' where the name goes
        super().__init__(message.format(setting=key))

    def for_flag(self, flag: str) -> str:
        return self.message.format(setting=flag)


@dataclass(frozen=True)
class Setting:
    """What :func:`setting` records in a field's metadata."""

    flag: str | None  # None: not a command-line option (derived from other settings)
    help: str
    choices: tuple | None = None
    at_least: float | None = None  # value >= at_least
    above: float | None = None  # value > above
    below: float | None = None  # value < below
    at_most: float | None = None  # value <= at_most
    resume: bool = False  # may 'ddpm train --resume' change it?
    group: str | None = None  # help section (default: the config section's)
    metavar: str | None = None
    exclusive: str | None = None  # settings of one group exclude each other (--steps, --minutes)
    min_items: int = 0  # tuples: the fewest items
    example: str | None = None  # tuples: a value as typed, for messages (e.g. "1,2,2")

    def condition(self) -> str | None:
        """The allowed range in words, e.g. 'at least 1' or 'in [0, 1)'; None if any value."""
        low = self.at_least if self.at_least is not None else self.above
        high = self.below if self.below is not None else self.at_most
        if low is not None and high is not None:
            left = "[" if self.at_least is not None else "("
            right = ")" if self.below is not None else "]"
            return f"in {left}{number_text(low)}, {number_text(high)}{right}"
        if self.at_least is not None:
            return f"at least {number_text(self.at_least)}"
        if self.above is not None:
            return "positive" if self.above == 0 else f"more than {number_text(self.above)}"
        if high is not None:
            return f"below {number_text(high)}" if self.below is not None else f"at most {number_text(high)}"
        return None

    def admits(self, value: float) -> bool:
        """Within the range; a float must also be finite (no setting means anything by inf or
        nan: an infinite time budget or guidance scale is a typo, not a wish)."""
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return ((self.at_least is None or value >= self.at_least)
                and (self.above is None or value > self.above)
                and (self.below is None or value < self.below)
                and (self.at_most is None or value <= self.at_most))


def setting(default: Any = dataclasses.MISSING, *, flag: str | None, help: str,
            default_factory: Any = dataclasses.MISSING, **rules: Any) -> Any:
    """A dataclass field declared as a setting (see the module docstring; ``rules`` are the
    fields of :class:`Setting`)."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"setting": Setting(flag=flag, help=help, **rules)})


def declaration(f: dataclasses.Field) -> Setting | None:
    return f.metadata.get("setting")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each field of the dataclass ``cls``."""
    return typing.get_type_hints(cls)


def unwrap_optional(kind: Any) -> tuple[Any, bool]:
    """``int | None`` -> (int, True); ``int`` -> (int, False)."""
    args = typing.get_args(kind)
    if (typing.get_origin(kind) in (typing.Union, types.UnionType)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return kind, False


def item_type(kind: Any) -> type | None:
    """The item type of a ``tuple[int, ...]`` or ``tuple[float, float]`` annotation, else None."""
    if typing.get_origin(kind) is tuple:
        return typing.get_args(kind)[0]
    return None


def tuple_length(kind: Any) -> int | None:
    """The fixed length of a ``tuple[float, float]`` annotation; None for ``tuple[int, ...]``."""
    args = typing.get_args(kind)
    return None if Ellipsis in args else len(args)


def coerce(cls: type, name: str, value: Any, *, key: str) -> Any:
    """``value`` (as JSON or Python gives it) as the type of field ``name`` of ``cls``: lists
    become tuples and whole numbers become floats where a float is declared. Raises ValueError
    naming ``key`` when the type is wrong, so a typo in a config file is one clear line."""
    kind, optional = unwrap_optional(field_types(cls)[name])
    if value is None:
        if optional:
            return None
        raise ValueError(f"{key} cannot be null; give a {_type_name(kind)}")
    item = item_type(kind)
    if item is not None:
        length = tuple_length(kind)
        if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
            count = f"{length} " if length is not None else ""
            raise ValueError(f"{key} must be a list of {count}{_type_name(item)}s, got "
                             f"{shown(value)}")
        return tuple(_scalar(item, v, key) for v in value)
    return _scalar(kind, value, key)


def _scalar(kind: type, value: Any, key: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # past float's range: no setting means anything by it
            raise ValueError(f"{key} must be a finite number, got {shown(value)}") from None
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ValueError(f"{key} must be a {_type_name(kind)}, got {shown(value)}")
    return value


def _type_name(kind: type) -> str:
    return {int: "whole number", float: "number", str: "string", bool: "true or false"}.get(
        kind, getattr(kind, "__name__", str(kind)))


def check_fields(config: Any, prefix: str = "") -> None:
    """Raise ValueError for the first declared setting of ``config`` outside its declared
    choices or range: ``unknown schedule 'x'; choose one of ...``, ``lr must be positive, got
    0``. Each section's ``validate()`` calls this first, then checks the rules between fields.
    ``prefix`` goes before each field's name in messages (``"train."``)."""
    for f in dataclasses.fields(config):
        decl = declaration(f)
        value = getattr(config, f.name)
        if decl is None or value is None:
            continue
        values = value if isinstance(value, tuple) else (value,)
        name = prefix + f.name
        if isinstance(value, tuple) and len(value) < decl.min_items:
            raise ValueError(f"{name} needs at least {decl.min_items} value(s), got {shown(value)}")
        for v in values:
            if decl.choices is not None and v not in decl.choices:
                raise ValueError(f"unknown {name} {shown(v)}; choose one of "
                                 f"{', '.join(map(str, decl.choices))}")
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not decl.admits(v):
                what = decl.condition()
                if isinstance(v, float) and not math.isfinite(v):
                    what = f"finite and {what}" if what else "finite"
                raise ValueError(f"{name} must be {what}, got {shown(v)}")


def checked_values(section: str, cls: type, values: Any) -> dict[str, Any]:
    """``values`` (``{field: value}`` of a config file or the command line) for the fields of
    the config section ``cls``, named ``section`` in messages: unknown names and wrong types are
    a ValueError naming them."""
    if not isinstance(values, dict):  # null or [] too: a section that sets nothing is {}
        got = "null" if values is None else shown(values)
        raise ValueError(f"config section {section!r} must be an object of settings such as "
                         f"{{\"{dataclasses.fields(cls)[0].name}\": ...}}, got {got}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in known]
    if unknown:
        raise ValueError(f"unknown setting {section}.{cut(str(unknown[0]))}; the {section} "
                         f"settings are {names(known)}")
    return {k: coerce(cls, k, v, key=f"{section}.{k}") for k, v in values.items()}


def checked_sections(sections: dict[str, type], overrides: Any, *,
                     run: str = "") -> dict[str, dict[str, Any]]:
    """``{section: {field: value}}`` overrides (a config file's, the command line's) checked
    against the config ``sections``: each section's values by :func:`checked_values`, every
    section present (empty when not given). An unknown section is a ValueError naming the
    sections of the ``run`` ("an autoencoder run"; by default a diffusion run's, unnamed)."""
    of = f" of {run}" if run else ""
    if not isinstance(overrides, dict):
        raise ValueError(f"a config is an object of sections ({names(sections)}), got "
                         f"{cut(shown(overrides))}")
    unknown = sorted(set(overrides) - set(sections), key=str)
    if unknown:
        raise ValueError(f"unknown config section(s) {cut(', '.join(map(shown, unknown)), 80)}; "
                         f"the sections{of} are {names(sections)}")
    return {name: checked_values(name, cls, overrides.get(name, {})) for name, cls in sections.items()}


def settings_of(cls: type) -> list[tuple[dataclasses.Field, Setting]]:
    """The declared settings of the dataclass ``cls``, in field order."""
    return [(f, d) for f in dataclasses.fields(cls) if (d := declaration(f)) is not None]


def names(choices: Iterable[Any]) -> str:
    return ", ".join(map(str, choices))


def cut(text: str, limit: int = 40, unit: str = "characters", size: int | None = None) -> str:
    """``text`` as a message quotes it: at most ``limit`` characters, the rest said by the
    value's ``size`` in ``unit`` (``len(text)`` unless given), so that a pasted file, a key of
    10,000 characters or a 301-digit number is never echoed back whole."""
    if len(text) <= limit:
        return text
    return f"{text[:max(limit - 16, 8)]}... ({len(text) if size is None else size:,} {unit})"


def shown(value: Any, limit: int = 40, spelling: str = "python") -> str:
    """``value`` as a message quotes it, cut by :func:`cut`: spelled as Python writes it
    (``"python"``: None, 'text') or, for a value read from JSON, as JSON does (``"json"``:
    null, NaN, "text"), so that the user sees what they wrote."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        text = repr(value)
    except ValueError:  # a whole number past Python's 4,300 printable digits
        return f"a whole number of about {int(value.bit_length() * math.log10(2)) + 1:,} digits"
    if spelling == "json":
        with contextlib.suppress(TypeError, ValueError):  # not a JSON value: Python's spelling
            text = json.dumps(value)
    return cut(text, limit, "digits" if number else "characters",
               len(value) if isinstance(value, str) else None)


def number_text(x: float) -> str:
    """A bound as a person reads it: whole numbers in full (a seed's 2^63 - 2 too), others short."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e19 else f"{x:g}"


# The seeds ddpm takes: torch's generators take 64-bit seeds, and a run also seeds with seed + 1.
SEED_MAX = 2**63 - 2
