"""The model card (README.md) written next to trained weights, ready to upload to the Hub as is."""

from __future__ import annotations

import json
from pathlib import Path

from .._version import __version__
from .config import TrainConfig

__all__ = ["write_model_card"]

QUALITY_NAME = "quality.json"


def _quality_section(root: Path) -> str:
    path = root / QUALITY_NAME
    if not path.is_file():
        return "Not measured yet: run `python benchmarks/denoiser_quality.py` and re-export the card.\n"
    q = json.loads(path.read_text())
    lines = [
        f"Measured by `{q.get('command', 'benchmarks/denoiser_quality.py')}` on {q.get('num_images')} held-out images "
        f"(not in the sparse set), t* = {q.get('t_star')}, hardware: {q.get('hardware')}.",
        "",
        "| setting | PSNR vs clean (dB) | images/s (batch " + str(q.get("batch_size")) + ") |",
        "|---|---|---|",
    ]
    for row in q.get("rows", []):
        speed = f"{row['images_per_s']:.2f}" if row.get("images_per_s") is not None else "-"
        psnr = f"{row['psnr']:.2f}" if row.get("psnr") is not None else "-"
        lines.append(f"| {row['name']} | {psnr} | {speed} |")
    for note in q.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _best_line(config: TrainConfig, state: dict) -> str:
    best = state.get("best")
    if best is None:
        return "- Saved weights: the EMA at the last step.\n"
    return (
        f"- Saved weights: the EMA checkpoint with the lowest held-out loss, step {best['step']} "
        f"(MSE {best['holdout_loss']:.5f}; held-out images: `{config.holdout}`, split "
        f"`{config.holdout_split or config.split}`, used only to choose this step).\n"
    )


def write_model_card(root: Path, config: TrainConfig, state: dict, *, num_images: int | None) -> Path:
    """Write ``root/README.md`` from the config, the training state and ``quality.json`` if present."""
    runs = state.get("runs", [])
    hardware = sorted({f"{r.get('hardware')} ({r.get('device')})" for r in runs})
    hours = state.get("seconds", 0.0) / 3600
    holdout = state.get("holdout_loss")
    card = f"""---
library_name: diffusers
tags: [ddpm, unconditional-image-generation, data-poisoning-defense, eclipse-transforms]
license: bsd-3-clause
---

# Sparse-set DDPM denoiser for ECLIPSE purification

A diffusers `UNet2DModel` noise predictor with a `DDPMScheduler` ({config.beta_schedule}, T = {config.num_train_timesteps}),
trained with `eclipse-transforms train` (version {__version__}) on a *sparse* clean set, for the purification
stage of ECLIPSE (Wang et al., ESORICS 2024). Load it with `eclipse_transforms.load_denoiser(path)` or
`diffusers.DDPMPipeline.from_pretrained(path)`.

## Training

- Data: `{config.data}` (split `{config.split}`), {num_images if num_images is not None else "all"} images
  (indices in `sparse_indices.json`), each repeated M = {config.duplicate} times per epoch, flips: {config.flip}.
- Timesteps: trained on t in [0, {config.t_max}) only, so purification supports t* <= {config.t_max}
  (`eclipse_config.json` records `t_max`; the loader refuses larger t*).
- UNet: block_out_channels {list(config.block_out_channels)}, layers_per_block {config.layers_per_block}, attention only in
  the middle block, dropout {config.dropout}.
- Optimisation: AdamW lr {config.lr}, batch {config.batch_size}, {state.get("step")} steps, EMA decay {config.ema_decay}
  (the saved weights are the EMA), seed {config.seed}.
- Time: {hours:.2f} h of training over {len(runs)} run(s) on {", ".join(hardware) or "n/a"}.
- Held-out noise-prediction MSE of the EMA weights, last checkpoint: {f"{holdout:.5f}" if holdout is not None else "n/a"}.
{_best_line(config, state)}
The full resolved configuration is in `train_config.json`.

## Measured quality

{_quality_section(root)}"""
    path = root / "README.md"
    path.write_text(card)
    return path
