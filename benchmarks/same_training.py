"""Does a change of code leave training bit for bit the same? Train a short run with the code
of a reference commit and with the working tree, then compare every tensor of the two final
checkpoints (weights, EMA, optimiser state, data stream and generator states) with
``torch.equal``, the two ``config.json`` files, and the FID and KID each run measured while it
trained (metrics.jsonl), which are printed.

    python benchmarks/same_training.py --ref 72245b4
    python benchmarks/same_training.py --ref 72245b4 --args "--preset tiny --steps 30 --conditional"
    python benchmarks/same_training.py --ref 72245b4 --args "--precision fp32"   # the README demo

The reference commit is checked out in a temporary git worktree and run from its own ``src/``
(``PYTHONPATH``), with this environment's torch. Exit status 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def train(src: Path, out: Path, args: str) -> Path:
    """``ddpm train ARGS --out OUT`` with the package in ``src``; the newest checkpoint."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, "-c", "from ddpm.cli import main; main()", "train",
               *shlex.split(args), "--out", str(out), "--no-progress"]
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]


def scores(run: Path) -> list[dict[str, float]]:
    """The FID measurements a run logged while it trained: step, FID and KID of each."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: line[k] for k in ("step", "fid", "kid")} for line in lines if "fid" in line]


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two checkpoint values differ: tensors by ``torch.equal``, the rest by ``==``."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = [f"{where}/{k}: only in one" for k in sorted(set(a) ^ set(b), key=str)]
        for k in sorted(set(a) & set(b), key=str):
            found += differences(a[k], b[k], f"{where}/{k}")
        return found
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: {len(a)} against {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [] if a.dtype == b.dtype and torch.equal(a, b) else [f"{where}: tensors differ"]
    if where.endswith("elapsed_s"):  # wall time, the one value no run repeats
        return []
    return [] if a == b else [f"{where}: {a!r} against {b!r}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", required=True, help="the reference commit")
    parser.add_argument("--args", default="--preset tiny --steps 30 --precision fp32",
                        help="'ddpm train' options, quoted (default: %(default)s)")
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "ref"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), a.ref],
                       check=True, capture_output=True)
        try:
            ref_ckpt = train(base / "src", Path(tmp) / "run-ref", a.args)
            new_ckpt = train(ROOT / "src", Path(tmp) / "run-new", a.args)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                           check=True)
        found = differences(torch.load(ref_ckpt, map_location="cpu", weights_only=False),
                            torch.load(new_ckpt, map_location="cpu", weights_only=False))
        configs = [json.loads((p.parent.parent / "config.json").read_text())
                   for p in (ref_ckpt, new_ckpt)]
        if configs[0] != configs[1]:
            found.append("config.json differs")
        fids = {"ref": scores(ref_ckpt.parent.parent), "new": scores(new_ckpt.parent.parent)}
        if fids["ref"] != fids["new"]:
            found.append("the FIDs measured while training differ")
    print(json.dumps({"ref": a.ref, "args": a.args, "identical": not found,
                      "differences": found[:20], "fids": fids}))
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
