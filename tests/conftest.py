"""Shared fixtures: a tiny UNet2DModel denoiser saved and loaded through the real loader (diffusers' fast-test size)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from eclipse_transforms import Denoiser, load_denoiser

# Non-square sizes that the tiny UNet (2 levels: multiples of 2) accepts; H != W so H/W mix-ups show.
H, W = 12, 8


def make_tiny_denoiser(seed: int = 0, t_max: int = 40, num_train_timesteps: int = 100) -> Denoiser:
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(4, 8),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    # Non-zero output weights so the predicted noise is not trivially 0 at initialisation.
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="squaredcos_cap_v2")
    return Denoiser(unet, scheduler, t_max=t_max)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-denoiser")
    make_tiny_denoiser().save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny(tiny_folder) -> Denoiser:
    return load_denoiser(tiny_folder)


def cifar_npz() -> Path | None:
    """The real CIFAR-10 .npz: $ECLIPSE_CIFAR10, or ../shared/data/cifar10/cifar10.npz beside the checkout."""
    env = os.environ.get("ECLIPSE_CIFAR10")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "cifar10.npz")
    return next((p for p in candidates if p.is_file()), None)


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
