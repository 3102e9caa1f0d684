"""Benchmark: how long the bench's poisons take on this machine (not a test).

Prints, in one run:
- each model-free poison (``urp``, ``lsp``, ``ar``, ``ops``, ``cuda``) on N generated CIFAR-sized images: seconds,
  images/s and the size of the perturbation;
- with ``--crafting``, each model-based poison (``em``, ``tap``, ``sep``, ``rem``, ``adp``; ``--poisons`` picks
  some) on a small fixed workload (their iteration counts cut, stated in the output) in float32 and in each
  precision of ``--dtypes`` (the config's ``dtype``: the surrogate under ``torch.autocast``; for ``adp`` the
  attacker's copy of the denoiser), best of ``--repeats`` alternating runs, with the speed-up over float32
  measured in the same run and how many pixels of the two outputs agree.

    python benchmarks/bench_poisons.py --num-images 50000
    python benchmarks/bench_poisons.py --skip-model-free --crafting --dtypes bfloat16
    python benchmarks/bench_poisons.py --skip-model-free --crafting --poisons adp --crafting-images 256
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from eclipse_transforms.bench.adp import ADPConfig
from eclipse_transforms.bench.em import EMConfig
from eclipse_transforms.bench.poisons import get_poison, list_poisons
from eclipse_transforms.bench.rem import REMConfig
from eclipse_transforms.bench.sep import SEPConfig
from eclipse_transforms.bench.specs import is_model_based
from eclipse_transforms.bench.tap import TAPConfig

MODEL_FREE = [name for name in list_poisons() if not is_model_based(name)]

#: The crafting workloads: the published step sizes and budgets, fewer iterations (what a full run repeats).
WORKLOADS = {
    "em": EMConfig(max_rounds=1),  # one round: 10 training batches and a 20-step pass over every image
    "tap": TAPConfig(iterations=25, surrogate_epochs=1),  # 25 of the 250 steps; a 1-epoch surrogate
    "sep": SEPConfig(iterations=10, checkpoints=1, surrogate_epochs=1),  # 10 of 30 steps, one snapshot
    "rem": REMConfig(train_steps=5, checkpoint_steps=5),  # 5 surrogate steps, then the crafting pass
    # one round of ADP's own EM settings: 10 training batches and a pass through the defense
    "adp": ADPConfig(em=dataclasses.replace(ADPConfig.em, max_rounds=1)),
}


def images_and_labels(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n) % 10


def model_free(num_images: int) -> None:
    images, labels = images_and_labels(num_images)
    for name in MODEL_FREE:
        t0 = time.perf_counter()
        out = get_poison(name)(images, labels, seed=0)
        seconds = time.perf_counter() - t0
        delta = (out.float() - images.float()) / 255
        print(
            f"{name:<5} {seconds:7.2f} s  ({num_images / seconds:9.0f} images/s)  "
            f"L-inf {delta.abs().max():.4f}  mean L2 {delta.flatten(1).norm(dim=1).mean():.3f}  "
            f"mean L0 {(delta != 0).any(1).flatten(1).sum(1).float().mean():.0f} px",
            flush=True,
        )


def crafting(num_images: int, dtypes: list[str], repeats: int, poisons: list[str]) -> None:
    images, labels = images_and_labels(num_images)
    print(f"\nmodel-based crafting on {num_images} images, {torch.get_num_threads()} threads (best of {repeats})")
    for name in poisons:
        config = WORKLOADS[name]
        configs = {d: dataclasses.replace(config, dtype=d) for d in ["float32", *dtypes]}
        best = dict.fromkeys(configs, float("inf"))
        outputs = {}
        for _ in range(repeats):  # alternate, so a slow spell of the machine hits every precision alike
            for d, c in configs.items():
                t0 = time.perf_counter()
                outputs[d] = get_poison(name)(images, labels, seed=0, config=c, progress=False)
                best[d] = min(best[d], time.perf_counter() - t0)
        default = type(config)()
        changed = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        changed = {k: v for k, v in changed.items() if v != getattr(default, k)}
        print(f"{name} {changed}")
        for d in configs:
            same = (outputs[d] == outputs["float32"]).float().mean().item()
            print(
                f"  {d:<9} {best[d]:7.1f} s  speed-up x{best['float32'] / best[d]:4.2f}  "
                f"max |δ| {(outputs[d].int() - images.int()).abs().max().item()}/255  "
                f"pixels equal to float32's {100 * same:5.1f} %",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=10_000, help="images for the model-free poisons")
    parser.add_argument("--skip-model-free", action="store_true")
    parser.add_argument("--crafting", action="store_true", help="time the model-based poisons' crafting too")
    parser.add_argument("--crafting-images", type=int, default=1024)
    parser.add_argument("--dtypes", default="bfloat16", help="precisions to compare with float32 (comma-separated)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--poisons", default=",".join(WORKLOADS), help="model-based poisons to time (comma-separated)")
    args = parser.parse_args()
    poisons = [p for p in args.poisons.split(",") if p]
    unknown = sorted(set(poisons) - set(WORKLOADS))
    if unknown:
        parser.error(f"--poisons: unknown {unknown}; choose from {', '.join(WORKLOADS)}")
    if not args.skip_model_free:
        model_free(args.num_images)
    if args.crafting:
        dtypes = [d for d in args.dtypes.split(",") if d and d != "float32"]
        crafting(args.crafting_images, dtypes, args.repeats, poisons)


if __name__ == "__main__":
    main()
