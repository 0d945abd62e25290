"""Class-conditional Fashion-MNIST: does guidance draw the class asked for, and at what cost in FID?

Trains (with ``--train``) the default preset with ``--conditional``, then for each guidance scale
draws the same number of images of every class from the same noise, and reports the share that
the project's Fashion-MNIST classifier (93% test accuracy, shipped with the package) assigns to the
requested class, with FID and KID against the training split (offline features), and the time.

    python benchmarks/conditional.py runs/conditional --train --n 1000 --guidance 0 1 3 5 \
        --grid docs/conditional.png

With ``--classifier CLF.pt`` (from ``ddpm train-classifier --noisy``) the scales are classifier
guidance's (Dhariwal & Nichol 2021) instead, on any run, conditional or not (a conditional one
keeps ``--cfg`` as its classifier-free scale):

    python benchmarks/conditional.py runs/demo --classifier clf.pt --guidance 0 1 3 10

Each row is judged twice: by that shipped CNN, and by a judge of another kind that no guidance
gradient can have been steered towards, the majority of the 5 nearest training images in pixel
space (k-NN; its accuracy on the test split is printed beside the CNN's).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time

import torch


class PixelKNN:
    """The class of the majority of the ``k`` training images nearest in pixel space: a judge
    with no gradient for guidance to follow, unlike any network classifier."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, k: int = 5):
        self.train = images.flatten(1).float() / 255  # [N, D]
        self.norms = (self.train ** 2).sum(1)
        self.labels, self.k = labels, k

    def predict(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        out = []
        for batch in images.flatten(1).float().div(255).split(batch_size):
            # squared distances ||a||^2 - 2 a.b + ||b||^2, without the constant ||a||^2
            dist = self.norms[None] - 2 * batch @ self.train.T  # [B, N]
            nearest = self.labels[dist.topk(self.k, largest=False).indices]  # [B, k]
            out.append(nearest.mode(dim=1).values)
        return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory of a class-conditional Fashion-MNIST model")
    parser.add_argument("--train", action="store_true",
                        help="first train it: ddpm train --conditional --out RUN (default preset)")
    parser.add_argument("--train-args", default="", help="more 'ddpm train' options, quoted")
    parser.add_argument("--n", type=int, default=1000, help="images per guidance scale")
    parser.add_argument("--guidance", type=float, nargs="+", default=[0.0, 1.0, 3.0, 5.0])
    parser.add_argument("--sampler", default="dpm++")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", metavar="PNG", help="also write a grid, one row per class")
    parser.add_argument("--grid-guidance", type=float, default=3.0)
    parser.add_argument("--classifier", metavar="CLF.pt",
                        help="the scales are classifier guidance's, with this noisy classifier")
    parser.add_argument("--cfg", type=float, default=0.0,
                        help="with --classifier: the classifier-free scale of a conditional run")
    args = parser.parse_args()

    from ddpm.classifier import load_classifier
    from ddpm.data import load_dataset, to_uint8
    from ddpm.metrics import Evaluator
    from ddpm.noisy_classifier import load_noisy_classifier
    from ddpm.pipeline import load_pipeline
    from ddpm.viz import save_grid

    if args.train:
        cmd = [sys.executable, "-m", "ddpm", "train", "--conditional", "--out", args.run,
               *args.train_args.split()]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)

    pipe = load_pipeline(args.run)
    noisy = load_noisy_classifier(args.classifier) if args.classifier else None
    k = pipe.num_classes or (noisy.num_classes if noisy else 0)
    names = pipe.classes or (noisy.classes if noisy else ())
    if k == 0 or pipe.config.data.dataset != "fashion-mnist":
        sys.exit(f"{args.run} is not a class-conditional Fashion-MNIST run (or give --classifier)")
    classifier = load_classifier("fashion-mnist")
    evaluator = Evaluator("fashion-mnist", pipe.config.data.data_dir, split="train")
    train, test = (load_dataset("fashion-mnist", pipe.config.data.data_dir, split)
                   for split in ("train", "test"))
    knn = PixelKNN(train.images, train.labels)
    knn_accuracy = (knn.predict(test.images) == test.labels).float().mean().item()
    labels = torch.arange(args.n) % k  # every class equally often
    rows = []
    for w in args.guidance:
        start = time.perf_counter()
        scales = ({"classifier": noisy, "classifier_scale": w, "guidance": args.cfg} if noisy
                  else {"guidance": w})
        images = to_uint8(pipe.generate(args.n, seed=args.seed, labels=labels, sampler=args.sampler,
                                        num_sample_steps=args.steps, **scales))
        seconds = time.perf_counter() - start
        predicted = classifier.predict(images)
        hit = predicted == labels
        per_class = [hit[labels == c].float().mean().item() for c in range(k)]
        r = evaluator.evaluate(images, seed=args.seed)
        knn_hit = (knn.predict(images) == labels).float().mean().item()
        rows.append({"guidance": w, "accuracy": hit.float().mean().item(), "knn_accuracy": knn_hit,
                     "worst_class":
                     names[min(range(k), key=per_class.__getitem__)] if names else "",
                     "worst_accuracy": min(per_class), "fid": r.fid, "kid": r.kid,
                     "floor_fid": r.floor_fid, "sampling_s": seconds})
        print(json.dumps(rows[-1]), flush=True)
    if args.grid:
        grid_labels = torch.arange(k).repeat_interleave(8)
        grid_scales = ({"classifier": noisy, "classifier_scale": args.grid_guidance,
                        "guidance": args.cfg} if noisy else {"guidance": args.grid_guidance})
        save_grid(pipe.generate(len(grid_labels), seed=args.seed, labels=grid_labels,
                                sampler=args.sampler, num_sample_steps=args.steps, **grid_scales),
                  args.grid, nrow=8)
        print(f"wrote {args.grid}: one row per class, guidance {args.grid_guidance:g}")

    print(f"\n{args.run}: {pipe.step} steps; {args.n} images per row ({args.sampler}, {args.steps} "
          f"steps), classifier test accuracy {classifier.test_accuracy:.1%}, pixel 5-NN test "
          f"accuracy {knn_accuracy:.1%}; "
          f"{platform.processor() or platform.machine()}, {datetime.date.today()}")
    if noisy:
        print(f"classifier guidance with {args.classifier} (accuracy by t: "
              f"{ {t: round(a, 3) for t, a in noisy.accuracy_by_t.items()} }), cfg {args.cfg:g}")
    scale = "classifier scale s" if noisy else "guidance w"
    print(f"| {scale} | of the requested class (CNN) | (pixel 5-NN) | worst class (CNN) | FID | "
          f"KID | sampling s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['guidance']:g} | {r['accuracy']:.1%} | {r['knn_accuracy']:.1%} | {r['worst_class']} "
              f"{r['worst_accuracy']:.0%} | {r['fid']:.2f} | {r['kid']:.3f} | {r['sampling_s']:.0f} |")
    print(f"(real images: FID {rows[0]['floor_fid']:.2f})")


if __name__ == "__main__":
    main()
