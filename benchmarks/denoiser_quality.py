"""Measure a denoiser's purification quality and speed, and write them into its model card.

On held-out CIFAR-10 test images (not in the sparse set) at t* (default 100):

- PSNR(purified, clean) for the paper's sampler (t* ancestral steps) and each faster setting, against the
  PSNR of the noisy input x_{t*} and of a Gaussian blur of x_{t*} whose sigma is tuned on the sparse set;
- throughput on this machine at batch 256 for each setting, in the same run as the official configuration
  (a randomly initialised 52 M-parameter improved-diffusion UNet, 100 ancestral steps), so the ratio is measured.

    python benchmarks/denoiser_quality.py --data ../shared/data/cifar10/cifar10.npz            # bundled weights
    python benchmarks/denoiser_quality.py --weights runs/my-ddpm --data ~/data/cifar10 --write-card
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel
from torchvision.transforms.v2 import functional as F

from eclipse_transforms import Denoiser, load_denoiser
from eclipse_transforms import functional as EF
from eclipse_transforms.denoiser import bundled_weights_path
from eclipse_transforms.training.card import QUALITY_NAME, write_model_card
from eclipse_transforms.training.config import TrainConfig
from eclipse_transforms.utils import hardware_name, index_generators, load_image_set, portable_path, quantize

REPO = Path(__file__).resolve().parents[1]
PATH_ARGS = ("weights", "data", "sparse")  # recorded relative to the repository (utils.portable_path)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of per-image PSNR in dB, images in [0, 1]."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(1 / mse)).mean())


def official_unet() -> UNet2DModel:
    """The paper's denoiser shape: improved-diffusion CIFAR-10 (128 channels, mult 1-2-2-2, 3 res blocks,
    attention at 16x16 and 8x8, learned sigma -> 6 output channels), randomly initialised: only its speed is used."""
    return UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=6,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=64,
        dropout=0.3,
    ).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=None, help="denoiser folder (default: bundled)")
    parser.add_argument(
        "--data",
        default=str(REPO.parent / "shared" / "data" / "cifar10" / "cifar10.npz"),
        help="CIFAR-10 .npz or torchvision root (test split is used)",
    )
    parser.add_argument("--sparse", default=str(REPO / "weights" / "cifar10_sparse_indices.json"))
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--t-star", type=int, default=100)
    parser.add_argument("--steps", default="paper,10,4,2,1")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--official-steps-timed",
        type=int,
        default=2,
        help="ancestral steps of the official configuration actually timed (x100 extrapolated)",
    )
    parser.add_argument("--write-card", action="store_true", help="write quality.json and the model card")
    args = parser.parse_args()
    torch.manual_seed(0)

    den: Denoiser = load_denoiser(args.weights)
    folder = Path(args.weights) if args.weights else bundled_weights_path()
    test = load_image_set(args.data, split="test")
    sparse = json.loads(Path(args.sparse).read_text())["indices"]
    rest = np.setdiff1d(np.arange(len(test.images)), sparse)
    held = np.sort(np.random.default_rng(1).choice(rest, args.num_images, replace=False))
    clean = test.images[held].float() / 255
    gens = lambda: index_generators(held.tolist(), 0)  # noqa: E731
    rows = []

    noisy = EF.forward_diffusion(clean, den, args.t_star, generator=gens())
    rows.append(
        {"name": f"noisy input x_t* (t*={args.t_star})", "psnr": psnr(noisy.clamp(0, 1), clean), "images_per_s": None}
    )

    # Gaussian-blur baseline on x_t*, sigma tuned on 500 sparse-set images.
    tune = test.images[sparse[:500]].float() / 255
    tune_noisy = EF.forward_diffusion(tune, den, args.t_star, generator=index_generators(sparse[:500], 0)).clamp(0, 1)
    sigmas = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.2]
    best = max(sigmas, key=lambda s: psnr(F.gaussian_blur(tune_noisy, [5, 5], [s, s]), tune))
    blurred = F.gaussian_blur(noisy.clamp(0, 1), [5, 5], [best, best])
    rows.append(
        {
            "name": f"Gaussian blur of x_t* (sigma={best}, tuned on the sparse set)",
            "psnr": psnr(blurred, clean),
            "images_per_s": None,
        }
    )

    bench = clean[: args.batch_size]
    for spec in args.steps.split(","):
        steps = None if spec == "paper" else int(spec)
        t0 = time.perf_counter()
        purified_bench = EF.purify(bench, den, args.t_star, steps=steps, generator=gens()[: len(bench)])
        seconds = time.perf_counter() - t0
        if steps is None or steps > 10:  # slow settings: measured on the timed batch only
            out, ref = quantize(purified_bench).float() / 255, bench
        else:
            all_gens = gens()
            out = torch.cat(
                [
                    quantize(
                        EF.purify(
                            clean[i : i + args.batch_size],
                            den,
                            args.t_star,
                            steps=steps,
                            generator=all_gens[i : i + args.batch_size],
                        )
                    ).float()
                    / 255
                    for i in range(0, len(clean), args.batch_size)
                ]
            )
            ref = clean
        label = f"paper sampler ({args.t_star} ancestral steps)" if steps is None else f"{steps} step(s)"
        if steps == 1:
            label += " (one-step x0 estimate)"
        rows.append(
            {
                "name": label,
                "steps": steps or args.t_star,
                "psnr": psnr(out, ref),
                "num_images": len(ref),
                "images_per_s": len(bench) / seconds,
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    # The official configuration: 52 M parameters, 100 ancestral steps. Time a few steps at batch 256.
    official = official_unet()
    params = sum(p.numel() for p in official.parameters())
    x = torch.randn(args.batch_size, 3, 32, 32)
    with torch.inference_mode():
        official(x[:8], 50)
        t0 = time.perf_counter()
        for t in range(args.official_steps_timed):
            official(x, 99 - t)
        per_step = (time.perf_counter() - t0) / args.official_steps_timed
    official_rate = args.batch_size / (per_step * 100)
    rows.append(
        {
            "name": f"official configuration ({params / 1e6:.1f} M params, 100 ancestral steps; "
            f"{args.official_steps_timed} steps timed, x100)",
            "psnr": float("nan"),
            "images_per_s": official_rate,
        }
    )

    for r in rows:
        speed = "-" if r["images_per_s"] is None else f"{r['images_per_s']:.3f} img/s"
        print(f"{r['name']:<80} {r['psnr']:6.2f} dB  {speed}")
    fastest = max((r for r in rows if r.get("steps")), key=lambda r: r["images_per_s"])
    print(
        f"speed-up of the {fastest['name']} over the official configuration: "
        f"{fastest['images_per_s'] / official_rate:.0f}x"
    )

    if args.write_card:
        quality = {
            "command": "python benchmarks/denoiser_quality.py "
            + " ".join(
                f"--{k.replace('_', '-')} {portable_path(v, REPO) if k in PATH_ARGS else v}"
                for k, v in vars(args).items()
                if v not in (None, False, True)
            ),
            "num_images": args.num_images,
            "t_star": args.t_star,
            "batch_size": args.batch_size,
            "hardware": hardware_name(),
            "rows": [{**r, "psnr": None if math.isnan(r["psnr"]) else r["psnr"]} for r in rows],
            "notes": [
                "Settings with more than 10 steps are measured on the timed batch of "
                f"{args.batch_size} held-out images only."
            ],
        }
        (folder / QUALITY_NAME).write_text(json.dumps(quality, indent=2) + "\n")
        config = TrainConfig.from_dict(json.loads((folder / "train_config.json").read_text()))
        state = json.loads((folder / "train_state.json").read_text())
        write_model_card(folder, config, state, num_images=len(sparse))
        print(f"wrote {folder / QUALITY_NAME} and {folder / 'README.md'}")


if __name__ == "__main__":
    main()
