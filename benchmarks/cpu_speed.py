"""What each CPU speed option does to the default preset's training step and sampling evaluation.

    python benchmarks/cpu_speed.py [--seconds 15] [--repeats 2] [--only default,bf16]

Every variant is one ``ddpm bench --json`` in a fresh process (the numbers are what the command
gives), run ``--repeats`` times with the variants interleaved, so a slow minute on a shared
machine does not land on one variant alone; the table shows medians and the ratio to the
default. Variants that are not options of ``ddpm`` (the optimiser's implementation, attention
without PyTorch's fused kernel) are made by patching one function before ``ddpm bench`` runs.
The last table times the data path alone: our whole-batch stream against the per-sample
transforms of a torchvision-style DataLoader.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

# name -> (ddpm bench options, Python run before it: a patch, or "")
VARIANTS = {
    "default": ([], ""),
    "bf16": (["--precision", "bf16"], ""),
    "channels-last": (["--channels-last"], ""),
    "compile": (["--compile"], ""),
    "compile+channels-last": (["--compile", "--channels-last"], ""),
    "threads-1": (["--threads", "1"], ""),
    "adamw-for-loop": ([], "import torch; A = torch.optim.AdamW\n"
                           "torch.optim.AdamW = lambda *a, fused=None, **k: A(*a, foreach=False, **k)"),
    "adamw-foreach": ([], "import torch; A = torch.optim.AdamW\n"
                          "torch.optim.AdamW = lambda *a, fused=None, **k: A(*a, foreach=True, **k)"),
    "attention-math": ([], "import torch, ddpm.models.unet as u\n"
                           "def attention(q, k, v):\n"
                           "    w = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5\n"
                           "    return w.softmax(-1) @ v\n"
                           "u.F = type('F', (), {**vars(u.F), 'scaled_dot_product_attention': "
                           "staticmethod(attention)})"),
}


def run_variant(name: str, seconds: float) -> dict:
    options, patch = VARIANTS[name]
    code = (f"{patch}\nimport sys\nfrom ddpm.cli import main\n"
            f"sys.exit(main(['bench', '--json', '--seconds', '{seconds}', *{options!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def data_path(batches: int = 200) -> list[tuple[str, float]]:
    """Milliseconds per batch of 64 for the whole-batch stream and a per-sample DataLoader."""
    import torch
    from torch.utils.data import DataLoader, Dataset
    from torchvision.transforms import v2

    from ddpm.data import BatchStream, load_dataset

    data = load_dataset("fashion-mnist", "/usr/share/datasets/fashion-mnist", "train")
    stream = BatchStream(data, 64, hflip=True, generator=torch.Generator().manual_seed(0))
    begin = time.perf_counter()
    for _ in range(batches):
        stream.next()
    ours = (time.perf_counter() - begin) / batches * 1e3

    class PerSample(Dataset):
        transform = v2.Compose([v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                                v2.Normalize([0.5], [0.5])])

        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return self.transform(data.images[i])

    loader = iter(DataLoader(PerSample(), batch_size=64, shuffle=True, num_workers=0))
    begin = time.perf_counter()
    for _ in range(batches):
        next(loader)
    theirs = (time.perf_counter() - begin) / batches * 1e3
    return [("whole-batch stream (ours)", ours), ("per-sample transforms, DataLoader", theirs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants")
    args = ap.parse_args()
    names = ["default"] + [n for n in args.only.split(",") if n != "default"]
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names:
            print(f"[{r + 1}/{args.repeats}] {name}", file=sys.stderr, flush=True)
            results[name].append(run_variant(name, args.seconds))

    def median(name: str, key: str) -> float:
        return statistics.median(x[key] for x in results[name])

    base_train = median("default", "train_images_per_s")
    base_sample = median("default", "sample_images_per_s")
    first = results["default"][0]
    print(f"{first['cpu']}, {first['threads']} threads, torch {first['torch']}, "
          f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}; medians of {args.repeats}, "
          f"{args.seconds:g} s each\n")
    print("| variant | training images/s | vs default | sampling images/s per evaluation | vs default "
          "| utilisation |")
    print("|---|---|---|---|---|---|")
    for name in names:
        t, s = median(name, "train_images_per_s"), median(name, "sample_images_per_s")
        print(f"| {name} | {t:.1f} | {t / base_train:.2f}x | {s:.1f} | {s / base_sample:.2f}x | "
              f"{median(name, 'utilisation'):.1%} |")
    print(f"\npeak matmul: {first['peak_gflops_fp32']:.1f} GFLOP/s float32, "
          f"{first['peak_gflops_bf16']:.2f} GFLOP/s bfloat16\n")
    print("| data path, batch 64 with flips | ms per batch |")
    print("|---|---|")
    for name, ms in data_path():
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
