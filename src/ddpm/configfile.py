"""Reading a ``--config`` file: a saved ``config.json``, a hand-written partial one or a dry run's
output, as the overrides it holds, every setting checked and any other file refused in one line
that names it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import SECTIONS, RunConfig, with_overrides
from .settings import check_fields, names, shown

# A config file is a few KB of JSON; a larger file is some other file given by mistake (a
# checkpoint, a dataset), read no further than this.
MAX_CONFIG_BYTES = 1 << 20
# More digits than any setting's value has (a seed has 19): a typo or a pasted blob, refused
# while the file is parsed, before Python's own limit on printing such numbers gets in the way.
MAX_CONFIG_DIGITS = 100
EXAMPLE_CONFIG = '{"train": {"lr": 0.001}}'


def load_config_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """The overrides a ``--config`` file holds: a saved ``config.json``, a hand-written partial
    one (``{"train": {"lr": 1e-3}}``), or the output of ``ddpm train --dry-run``. Anything else
    (a folder, an empty or huge file, not JSON, a key given twice, no object of sections, a
    setting's wrong name, type or range) is a ValueError naming the file."""
    path = Path(path)
    where = f"--config {path}"
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except IsADirectoryError:
        raise ValueError(f"{where} is a folder; give a JSON file such as a run's config.json "
                         f"or {EXAMPLE_CONFIG}") from None
    except OSError as exc:
        raise ValueError(f"cannot read {where}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"{where} is more than {MAX_CONFIG_BYTES >> 20} MiB, and a config file is "
                         f"a few KB of JSON; give a run's config.json or a file such as "
                         f"{EXAMPLE_CONFIG}")
    if not raw.strip():
        raise ValueError(f"{where} is empty; write the settings to change, e.g. {EXAMPLE_CONFIG}")
    try:
        text = raw.decode("utf-8-sig")  # the byte-order mark some editors write is no mistake
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where} is not JSON text (byte {exc.start} is not UTF-8); a config "
                         f"file is JSON such as a run's config.json, not a checkpoint") from None
    try:
        values = json.loads(text, object_pairs_hook=_unique_keys, parse_int=_whole_number)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not JSON ({exc.msg} at line {exc.lineno}, column "
                         f"{exc.colno})") from None
    except RecursionError:
        raise ValueError(f"{where} nests lists or objects too deep to read; a config holds "
                         f"sections of settings, e.g. {EXAMPLE_CONFIG}") from None
    except ValueError as exc:  # from the two hooks
        raise ValueError(f"{where}: {exc}") from None
    if isinstance(values, dict) and set(values) == {"config", "parameters"}:
        values = values["config"]  # a dry run's output, as printed
    if not isinstance(values, dict):
        raise ValueError(f"{where} must hold an object of sections ({names(SECTIONS)}), e.g. "
                         f"{EXAMPLE_CONFIG}")
    try:  # names, types and ranges, said with the file's name
        config = with_overrides(RunConfig(), values, resolve=False)
        for section in SECTIONS:
            check_fields(getattr(config, section), prefix=f"{section}.")
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return values


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: JSON would keep the last of two, and drop the
    other setting without a word."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"{shown(key)} is given twice in one object; give each key once")
        seen.add(key)
    return dict(pairs)


def _whole_number(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_CONFIG_DIGITS:
        raise ValueError(f"a whole number of {len(digits.lstrip('-')):,} digits, more than any "
                         f"setting takes")
    return int(digits)
