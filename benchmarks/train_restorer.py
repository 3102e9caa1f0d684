"""Train a JPEG restorer on the sparse clean set: a small UNet that maps JPEG(x) back to x.

JPEG at quality 10 breaks every poison but CUDA on the bench, and costs clean data about 9 points; the
defender knows the degradation, so training pairs (JPEG(x), x) cost nothing but the sparse clean set that
ECLIPSE's denoiser already uses (the 2,000 CIFAR-10 *test* images of ``weights/cifar10_sparse_indices.json``,
which the bench leaves out of its test set). Whatever the poison was, JPEG has already broken it before the
restorer sees the image; the restorer, trained on clean images only, can give back what JPEG took from clean
content. ``benchmarks/defense_search.py`` evaluates it as the candidate ``jpeg-restore``.

    python benchmarks/train_restorer.py --data ../shared/data/cifar10/cifar10.npz --output .devdata/restorer \
        --steps 3000

The UNet predicts the residual x - JPEG(x) (``UNet2DModel`` at timestep 0, diffusers' building block); the loss
is L1; training resumes from ``<output>/state.pt`` and writes ``<output>/restorer.safetensors`` (the weights
with the best held-out PSNR so far: the 2,000 images are over-fitted within a thousand steps),
``config.json`` and ``log.json`` (PSNR of JPEG(x) and of the restored image against x on 1,000 held-out CIFAR-10
*train* images, indices 0-999, the images the bundled denoiser was early-stopped on).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file

from eclipse_transforms.bench.defenses import jpeg
from eclipse_transforms.utils import load_image_set, load_indices

SPARSE = Path(__file__).resolve().parents[1] / "weights" / "cifar10_sparse_indices.json"


def build_restorer(widths: tuple[int, ...] = (32, 64, 128)) -> UNet2DModel:
    """The residual UNet; its output layer starts at zero, so an untrained restorer returns JPEG(x) unchanged."""
    model = UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=widths,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * len(widths),
        up_block_types=("UpBlock2D",) * len(widths),
        norm_num_groups=8,
    )
    torch.nn.init.zeros_(model.conv_out.weight)
    torch.nn.init.zeros_(model.conv_out.bias)
    return model


def restore(model: UNet2DModel, degraded: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Restored uint8 images from uint8 JPEG'd ``(N, 3, H, W)``."""
    out = torch.empty_like(degraded)
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(degraded), batch_size):
            x = degraded[i : i + batch_size].float() / 127.5 - 1
            y = x + model(x, 0).sample
            out[i : i + batch_size] = ((y + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return out


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).div(255).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


def load_restorer(folder: str | Path) -> UNet2DModel:
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    model = build_restorer(tuple(config["widths"]))
    model.load_state_dict(load_file(folder / "restorer.safetensors"))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--quality", type=int, default=10)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--max-images", type=int, default=None, help="use only this many sparse images (tests)")
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    sparse = load_image_set(args.data, split="test").images[load_indices(SPARSE)][: args.max_images]
    held_out = load_image_set(args.data, split="train").images[:1000][: args.max_images]
    # Every sparse image and its mirror image, each with its JPEG: flips are the only augmentation, and JPEG of a
    # 32-pixel-wide image has its 8x8 grid where the mirrored image has it.
    clean = torch.cat([sparse, sparse.flip(-1)])
    degraded = jpeg(clean, args.quality)
    held_degraded = jpeg(held_out, args.quality)

    torch.manual_seed(args.seed)
    model = build_restorer(tuple(args.widths))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    state_path = out / "state.pt"
    step, log = 0, {"config": vars(args), "evals": [], "seconds": 0.0}
    if state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, log = state["step"], json.loads(state["log"])
        print(f"resumed at step {step}")
    (out / "config.json").write_text(json.dumps({"widths": args.widths, "quality": args.quality}) + "\n")
    g = torch.Generator().manual_seed(args.seed + step)
    start = time.perf_counter()
    while step < args.steps:
        model.train()
        idx = torch.randint(0, len(clean), (args.batch_size,), generator=g)
        x = degraded[idx].float() / 127.5 - 1
        target = clean[idx].float() / 127.5 - 1
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = (x + model(x, 0).sample - target).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % args.checkpoint_every == 0 or step == args.steps:
            restored = restore(model, held_degraded)
            entry = {
                "step": step,
                "loss": round(loss.item(), 5),
                "psnr_jpeg": round(psnr(held_degraded, held_out), 3),
                "psnr_restored": round(psnr(restored, held_out), 3),
            }
            log["evals"].append(entry)
            log["seconds"] = round(log["seconds"] + time.perf_counter() - start, 1)
            start = time.perf_counter()
            print(json.dumps(entry), flush=True)
            best = max(e["psnr_restored"] for e in log["evals"])
            if entry["psnr_restored"] >= best:  # early stopping on the held-out images: keep the best weights
                log["best"] = entry
                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "restorer.safetensors")
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "log": json.dumps(log),
                },
                state_path,
            )
            (out / "log.json").write_text(json.dumps(log, indent=1) + "\n")


if __name__ == "__main__":
    main()
