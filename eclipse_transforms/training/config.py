"""The trainer's configuration: a frozen dataclass that the CLI is built from and each run writes out."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """How to train a sparse-set DDPM noise predictor.

    Defaults follow the paper where it speaks (cosine schedule over 4000 steps, duplication M = 4) and this
    project's CPU budget where it does not (a 5.7 M-parameter UNet, training only on ``t < t_max``).
    """

    data: str = field(metadata={"help": "an .npz of uint8 images, a torchvision CIFAR root, or an ImageFolder"})
    output_dir: str = field(metadata={"help": "folder for the trained denoiser (diffusers layout)"})
    indices: str | None = field(default=None, metadata={"help": "file of indices into data: the sparse set"})
    split: str = field(default="train", metadata={"help": "'train' or 'test' split of a CIFAR root or .npz"})
    duplicate: int = field(default=4, metadata={"help": "M: each image repeated M times per epoch"})
    flip: bool = field(default=True, metadata={"help": "random horizontal flips of training images"})
    t_max: int = field(default=300, metadata={"help": "train on t in [0, t_max); the largest t_star supported"})
    num_train_timesteps: int = field(default=4000, metadata={"help": "T of the DDPM schedule"})
    beta_schedule: str = field(default="squaredcos_cap_v2", metadata={"help": "diffusers beta schedule (cosine)"})
    block_out_channels: tuple[int, ...] = field(default=(48, 96, 192), metadata={"help": "UNet widths"})
    layers_per_block: int = field(default=1, metadata={"help": "ResNet blocks per UNet level"})
    norm_num_groups: int = field(default=16, metadata={"help": "GroupNorm groups"})
    dropout: float = field(default=0.1, metadata={"help": "dropout in the ResNet blocks"})
    batch_size: int = field(default=64, metadata={"help": "images per step"})
    lr: float = field(default=2e-4, metadata={"help": "AdamW learning rate"})
    warmup_steps: int = field(default=200, metadata={"help": "linear learning-rate warm-up"})
    max_steps: int = field(default=20_000, metadata={"help": "total optimizer steps (a resumed run continues)"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of the saved weights"})
    checkpoint_minutes: float = field(default=5.0, metadata={"help": "minutes between checkpoints"})
    holdout: str | None = field(
        default=None,
        metadata={
            "help": "file of indices of held-out images: the exported weights are the EMA "
            "checkpoint with the lowest held-out loss (early stopping)"
        },
    )
    holdout_split: str | None = field(
        default=None, metadata={"help": "split of the held-out indices (default: split)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of data order, timesteps and noise"})
    device: str = field(default="cpu", metadata={"help": "'cpu', 'cuda' or 'auto'"})
    save_dtype: str = field(default="float32", metadata={"help": "'float32' or 'float16' for the saved weights"})

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")

        for name in ("duplicate", "t_max", "num_train_timesteps", "batch_size", "max_steps", "layers_per_block"):
            positive(name)
        if self.t_max > self.num_train_timesteps:
            raise ValueError(f"t_max must be <= num_train_timesteps={self.num_train_timesteps}, got {self.t_max}.")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}.")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")
        if self.save_dtype not in ("float32", "float16"):
            raise ValueError(f"save_dtype must be 'float32' or 'float16', got {self.save_dtype!r}.")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"block_out_channels={self.block_out_channels} must all be multiples of norm_num_groups="
                f"{self.norm_num_groups}."
            )
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {sorted(unknown)}; known: {sorted(names)}.")
        fields: dict[str, Any] = {k: tuple(v) if k == "block_out_channels" else v for k, v in d.items()}
        return cls(**fields)
