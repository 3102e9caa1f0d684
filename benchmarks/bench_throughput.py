"""Benchmark: purification throughput and PurifiedDataset access rate on this machine (not a test).

Prints, in one run:
- EclipsePurify(recipe="eclipse") images/s at batch sizes 1, 32 and 256 with its default 4 steps (and the paper's
  sampler at 32);
- the default recipe, the squeeze (the bench's ``border-despeckle-jpeg``, no diffusion), against ECLIPSE's
  purification (the default until the squeeze replaced it), at batch 32 and 256;
- the same at ``--batch-size`` (256) in each precision of ``--dtypes`` (``load_denoiser(dtype=...)``) against
  float32, with the FLOP rate the UNet reaches and its fraction of the device's measured matmul peak in that
  precision, how far its uint8 output is from float32's (same images, same noise) and its PSNR against the clean images
  (generated images, or with ``--data`` the first 256 CIFAR-10 test images outside the bundled sparse set);
- PurifiedDataset.__getitem__ items/s (cached purified image + compensation + crop/flip) against a plain in-memory
  TensorDataset of the same uint8 images with the same crop/flip, both read in the same process.

    python benchmarks/bench_throughput.py                 # bundled weights, generated images
    python benchmarks/bench_throughput.py --weights runs/my-ddpm --device cuda --dtypes float16,bfloat16
    python benchmarks/bench_throughput.py --only-precision --data ../shared/data/cifar10/cifar10.npz
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch
from torch.utils.data import TensorDataset
from torchvision.transforms import v2

from eclipse_transforms import (
    DEFAULT_STEPS,
    EclipsePurify,
    PurifiedDataset,
    load_denoiser,
)
from eclipse_transforms.denoiser import bundled_weights_path
from eclipse_transforms.utils import generated_images, load_image_set, load_indices


def rate(fn, n_items: int, repeats: int = 3) -> float:
    """Items per second of ``fn`` (which processes ``n_items``), best of ``repeats`` after one warm-up."""
    fn()
    best = min(_timed(fn) for _ in range(repeats))
    return n_items / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def unet_flops(den, size: int = 32) -> float:
    """FLOPs of one UNet evaluation on one image (convolutions and matmuls, as torch's FlopCounterMode counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, den.in_channels, size, size, device=den.device, dtype=den.dtype)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        den(x, torch.tensor(10, device=den.device))
    return float(counter.get_total_flops())


def peak_flops(device: str, dtype: torch.dtype) -> float:
    """Measured matmul FLOP/s on ``device`` in ``dtype`` (best of 3): the peak the UNet's rate is compared with."""
    n = 8192 if torch.device(device).type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 * rate(lambda: a @ b, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dataset-size", type=int, default=1024)
    parser.add_argument("--dtypes", default="bfloat16", help="precisions to compare with float32 (comma-separated)")
    parser.add_argument("--only-precision", action="store_true", help="skip everything but the precision table")
    parser.add_argument("--data", default=None, help="CIFAR-10 .npz or root: real images for the precision table")
    parser.add_argument("--batch-size", type=int, default=256, help="precision table's batch (GPU: e.g. 2048)")
    args = parser.parse_args()
    den = load_denoiser(args.weights, device=args.device)
    print(f"denoiser: {den}\ntorch threads: {torch.get_num_threads()}, device: {args.device}\n")

    images = generated_images(args.batch_size, 32)
    precision_table(den, args, images if args.data is None else held_out_cifar(args.data, args.batch_size))
    if not args.only_precision:
        sampler_table(den, images, args.device)
        squeeze_table(den, images, args.device)
        dataset_rates(den, args)


def held_out_cifar(data: str, n: int) -> torch.Tensor:
    """The first ``n`` CIFAR-10 test images outside the bundled denoiser's sparse set, float in [0, 1]."""
    test = load_image_set(data, split="test")
    sparse = set(load_indices(bundled_weights_path().parent / "cifar10_sparse_indices.json"))
    keep = [i for i in range(len(test.labels)) if i not in sparse][:n]
    return test.images[keep].float() / 255


def precision_table(den, args: argparse.Namespace, images: torch.Tensor) -> None:
    """Batch-256 throughput per precision, each against float32 (``den``) measured in the same run on the same
    images."""
    print(f"precision: {len(images)} {'generated' if args.data is None else 'held-out CIFAR-10 test'} images")
    x = images.to(args.device)
    names = [d.strip() for d in args.dtypes.split(",") if d.strip() not in ("", "float32")]
    denoisers = {"float32": den, **{n: load_denoiser(args.weights, device=args.device, dtype=n) for n in names}}
    flops = unet_flops(den, images.shape[-1])
    peaks = {name: peak_flops(args.device, d.dtype) for name, d in denoisers.items()}
    print(
        f"UNet: {flops / 1e9:.3f} GFLOP per image and evaluation; measured matmul peak: "
        + ", ".join(f"{name} {peak / 1e12:.2f} TFLOP/s" for name, peak in peaks.items())
    )
    print(
        f"{'precision':<10} {'steps':>5} {'images/s':>9} {'speed-up':>9} {'TFLOP/s':>8} {'of peak':>8} "
        f"{'max |d| (levels)':>17} {'pixels equal':>13} {'PSNR vs clean':>14}"
    )
    for steps in (DEFAULT_STEPS, 1):
        base_rate, base = None, None
        for name, denoiser in denoisers.items():
            purify = EclipsePurify(denoiser, recipe="eclipse", t_star=100, steps=steps, seed=0, compensation=None)
            speed = rate(lambda p=purify: p(x), len(x))
            out = (purify(x) * 255).round().to(torch.uint8).cpu()  # the uint8 images a cache would hold
            if base is None:
                base_rate, base = speed, out
            d = (out.int() - base.int()).abs()
            mse = ((out.float() / 255 - images) ** 2).mean().item()
            achieved = flops * steps * speed  # the sampler evaluates the UNet once per step
            print(
                f"{name:<10} {steps:>5} {speed:>9.1f} {speed / base_rate:>8.2f}x {achieved / 1e12:>8.3f} "
                f"{achieved / peaks[name]:>8.1%} {d.max().item():>17} "
                f"{(d == 0).float().mean().item():>12.1%} {10 * math.log10(1 / mse):>13.2f} dB",
                flush=True,
            )
    print()


def sampler_table(den, images: torch.Tensor, device: str) -> None:
    print(f"{'setting':<40} {'batch':>6} {'images/s':>10}")
    for steps, label in (
        (DEFAULT_STEPS, f"default ({DEFAULT_STEPS} steps)"),
        (2, "2 steps"),
        (1, "one-step x0 estimate"),
        (None, "paper sampler (100 steps)"),
    ):
        purify = EclipsePurify(den, recipe="eclipse", t_star=100, steps=steps, seed=0, compensation=None)
        for batch in (1, 32, 256) if steps is not None else (32,):
            x = images[:batch].to(device)
            print(
                f"{label:<40} {batch:>6} "
                f"{rate(lambda p=purify, x=x: p(x), batch, repeats=1 if steps is None else 3):>10.2f}",
                flush=True,
            )


def squeeze_table(den, images: torch.Tensor, device: str) -> None:
    """The default recipe's one-time stages (the squeeze: no diffusion) against ECLIPSE's purification, the default
    before it, same run, same images: the speed target of the squeeze's issue ("within 2x of today's default")."""
    squeeze = EclipsePurify(compensation=None)
    eclipse = EclipsePurify(den, recipe="eclipse", t_star=100, seed=0, compensation=None)
    print(f"\n{'one-time stages':<40} {'batch':>6} {'images/s':>10} {'vs ECLIPSE':>11}")
    for batch in (32, 256):
        x = images[:batch].to(device)
        base = rate(lambda x=x: eclipse(x), batch)
        fast = rate(lambda x=x: squeeze(x), batch)
        print(f"{f'ECLIPSE purification ({DEFAULT_STEPS} steps)':<40} {batch:>6} {base:>10.2f} {1:>10.2f}x")
        print(f"{'squeeze (the default recipe)':<40} {batch:>6} {fast:>10.2f} {fast / base:>10.2f}x", flush=True)


def dataset_rates(den, args: argparse.Namespace) -> None:
    """PurifiedDataset access rate vs a TensorDataset with the same augmentation, same process."""
    data = (generated_images(args.dataset_size, 32, seed=1) * 255).round().to(torch.uint8)
    labels = torch.arange(args.dataset_size) % 10
    aug = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        purified = PurifiedDataset(
            TensorDataset(data, labels),
            EclipsePurify(den, recipe="eclipse", seed=0),
            cache_dir=cache,
            transform=aug,
            progress=False,
        )
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        PurifiedDataset(
            TensorDataset(data, labels),
            EclipsePurify(den, recipe="eclipse", seed=0),
            cache_dir=cache,
            transform=aug,
            progress=False,
        )
        reopen = time.perf_counter() - t0

        class Plain(TensorDataset):
            def __getitem__(self, i):
                x, y = super().__getitem__(i)
                return aug(x.float() / 255), int(y)

        plain = Plain(data, labels)
        read = lambda ds: [ds[i] for i in range(len(ds))]  # noqa: E731
        print(
            f"\nPurifiedDataset of {args.dataset_size} images: build {build:.1f} s "
            f"({args.dataset_size / build:.1f} images/s), reopen from cache {reopen:.2f} s"
        )
        r_plain, r_purified = rate(lambda: read(plain), len(plain)), rate(lambda: read(purified), len(purified))
        print(f"{'TensorDataset + crop/flip':<40} {r_plain:>10.0f} items/s")
        print(
            f"{'PurifiedDataset (+ compensation)':<40} {r_purified:>10.0f} items/s "
            f"({r_purified / r_plain:.2f}x the plain dataset)"
        )


if __name__ == "__main__":
    main()
