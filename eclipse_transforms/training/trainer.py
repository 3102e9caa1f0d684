"""Train a DDPM noise predictor on a sparse clean set, with checkpoints that resume exactly.

Every step's randomness (data order, timesteps, noise, flips, dropout) is derived from ``(seed, step)``, so a run
that is interrupted and resumed from a checkpoint computes the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .._data import load_image_set, load_indices
from .._dist import ranks as distributed_ranks
from .._images import derive_seed, keeps_global_rng
from .._machine import hardware_name
from .._outputs import check_output_location, is_owned
from ..denoiser import Denoiser, check_device
from .card import write_model_card
from .config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["train", "build_unet", "build_scheduler", "load_training_images"]

CONFIG_NAME = "train_config.json"
STATE_NAME = "train_state.json"


def build_unet(config: TrainConfig, image_size: int) -> UNet2DModel:
    """The UNet described by ``config``: no attention except in the 8x8 middle block."""
    levels = len(config.block_out_channels)
    return UNet2DModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        norm_num_groups=config.norm_num_groups,
        dropout=config.dropout,
    )


def build_scheduler(config: TrainConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule)


def _checked_indices(path: str, num_images: int) -> list[int]:
    """The indices in ``path``, each in ``[0, num_images)``: a negative index would silently pick from the end."""
    indices = load_indices(path)
    bad = [i for i in indices if not 0 <= i < num_images]
    if bad:
        raise ValueError(f"indices in {path} out of range [0, {num_images}): {bad[:5]}")
    return indices


def load_training_images(config: TrainConfig) -> tuple[torch.Tensor, list[int] | None]:
    """The sparse set as uint8 ``(N, 3, H, W)``, checked for what the trainer cannot use."""
    data = load_image_set(config.data, split=config.split)
    images, indices = data.images, None
    if config.indices is not None:
        indices = _checked_indices(config.indices, len(images))
        images = images[indices]
    if len(images) < 2:
        raise ValueError(f"the training set must hold at least 2 images, got {len(images)} (data={config.data!r}).")
    h, w = images.shape[-2:]
    multiple = 2 ** (len(config.block_out_channels) - 1)
    if h != w or h % multiple:
        raise ValueError(f"training images must be square with a side divisible by {multiple}, got {h}x{w}.")
    return images, indices


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(name)


class _Batches:
    """Step ``s`` -> (images, timesteps, noise): an endless stream of shuffled epochs of the set repeated M times."""

    def __init__(self, images: torch.Tensor, config: TrainConfig, device: torch.device) -> None:
        self.images = images.to(device, torch.float32).div_(127.5).sub_(1)  # [-1, 1]
        self.config = config
        self.device = device
        self.epoch_len = len(images) * config.duplicate
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(derive_seed(self.config.seed, "epoch", epoch))
            self._perms = {epoch: torch.randperm(self.epoch_len, generator=g)}
        return self._perms[epoch]

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, n = self.config.batch_size, len(self.images)
        positions = range(step * B, (step + 1) * B)
        idx = torch.tensor([int(self._perm(p // self.epoch_len)[p % self.epoch_len]) % n for p in positions])
        g = torch.Generator().manual_seed(derive_seed(self.config.seed, "step", step))
        t = torch.randint(0, self.config.t_max, (B,), generator=g)
        noise = torch.randn((B, *self.images.shape[1:]), generator=g)
        flip = torch.rand(B, generator=g) < 0.5
        x = self.images[idx.to(self.device)]
        if self.config.flip:
            x = torch.where(flip.to(self.device).view(B, 1, 1, 1), x.flip(-1), x)
        return x, t.to(self.device), noise.to(self.device)


def _holdout_loss(unet: UNet2DModel, scheduler: DDPMScheduler, images: torch.Tensor, config: TrainConfig) -> float:
    """Mean noise-prediction MSE on held-out images at fixed (t, noise) draws: comparable across checkpoints."""
    g = torch.Generator().manual_seed(derive_seed(config.seed, "holdout"))
    device = next(unet.parameters()).device
    x = images.to(device, torch.float32) / 127.5 - 1
    t = torch.randint(0, config.t_max, (len(x),), generator=g).to(device)
    noise = torch.randn(x.shape, generator=g).to(device)
    total = 0.0
    unet.eval()
    with torch.inference_mode():
        for i in range(0, len(x), 256):
            sl = slice(i, i + 256)
            pred = unet(scheduler.add_noise(x[sl], noise[sl], t[sl]), t[sl]).sample
            total += torch.nn.functional.mse_loss(pred.float(), noise[sl], reduction="sum").item()
    return total / noise.numel()


def _save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> None:
    """Write ``checkpoints/step-XXXXXXX`` then point ``checkpoints/latest.json`` at it (atomic rename)."""
    ckpt_dir = root / "checkpoints"
    target = ckpt_dir / f"step-{step:07d}"
    tmp = ckpt_dir / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / STATE_NAME).write_text(json.dumps(state, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    pointer = ckpt_dir / "latest.json.tmp"
    pointer.write_text(json.dumps({"step": step, "dir": target.name}))
    pointer.replace(ckpt_dir / "latest.json")
    for old in ckpt_dir.glob("step-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)


def _latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "checkpoints" / "latest.json"
    if not pointer.is_file():
        return None
    return root / "checkpoints" / json.loads(pointer.read_text())["dir"]


@keeps_global_rng
def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    max_minutes: float | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Train (or continue training) a denoiser and export its EMA weights in the loader's format.

    Args:
        config: what to train; written to ``output_dir/train_config.json``.
        resume: continue from ``output_dir``'s latest checkpoint. The saved config must match ``config`` except
            for ``max_steps``, ``checkpoint_minutes`` and ``device``.
        overwrite: delete an existing ``output_dir`` first.
        max_minutes: stop (with a checkpoint and an export) after this many minutes of this run.
        progress: show a tqdm bar with loss and images/s.
        on_step: called as ``on_step(step, loss)`` after every step (tests use it to interrupt a run).

    Returns:
        ``output_dir``, loadable with :func:`eclipse_transforms.load_denoiser`.
    """
    root = Path(config.output_dir).expanduser()
    inputs = {"data": config.data, "indices": config.indices, "holdout": config.holdout}
    check_output_location(root, name="output_dir", inputs=inputs)
    replace = root.exists() and any(root.iterdir()) and not resume
    if replace:
        if not overwrite:
            raise FileExistsError(
                f"output_dir {str(root)!r} exists; pass overwrite=True (--overwrite) to replace it or resume=True "
                "(--resume) to continue its training."
            )
        if not is_owned(root, CONFIG_NAME):
            raise FileExistsError(
                f"output_dir {str(root)!r} holds files that training did not write (it has no {CONFIG_NAME}); "
                "overwrite only replaces an earlier training run's folder. Pick a new output_dir, or empty this "
                "one yourself."
            )
    latest = _latest_checkpoint(root) if resume else None
    if resume and latest is None:
        raise FileNotFoundError(f"resume=True but {root} has no checkpoint (checkpoints/latest.json).")
    if latest is not None:
        saved = TrainConfig.from_dict(json.loads((root / CONFIG_NAME).read_text())).to_dict()
        mutable = {"max_steps", "checkpoint_minutes", "device"}
        diff = {k for k, v in config.to_dict().items() if k not in mutable and saved[k] != v}
        if diff:
            raise ValueError(f"resume=True with a config that differs from the saved one in {sorted(diff)}.")

    images, indices = load_training_images(config)
    holdout = None
    if config.holdout is not None:
        holdout_images = load_image_set(config.data, split=config.holdout_split or config.split).images
        holdout = holdout_images[_checked_indices(config.holdout, len(holdout_images))]
    device = _resolve_device(config.device)
    ranks = distributed_ranks()
    rank, world_size = ranks or (0, 1)
    if config.batch_size % world_size:
        raise ValueError(
            f"batch_size={config.batch_size} is the global batch of a step and must divide evenly among the "
            f"{world_size} ranks; pass a multiple of {world_size}."
        )
    if ranks is not None:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        dist.barrier()  # every rank has checked the output folder before rank 0 changes it
    if rank == 0:
        if replace:  # only now that every input has been read and checked
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        (root / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    from diffusers.training_utils import EMAModel  # heavy (imports the pipelines): only when training

    torch.manual_seed(config.seed)
    net = build_unet(config, images.shape[-1]).to(device)
    ema = build_unet(config, images.shape[-1]).to(device).requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.0)

    def warm_up(step: int) -> float:  # linear warm-up to config.lr, then constant
        return min(1.0, (step + 1) / max(1, config.warmup_steps))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warm_up)
    scheduler = build_scheduler(config)
    state: dict[str, Any] = {"step": 0, "seconds": 0.0, "runs": [], "holdout_loss": None}
    if latest is not None:
        net.load_state_dict(load_file(latest / "model.safetensors", device=str(device)))
        ema.load_state_dict(load_file(latest / "ema.safetensors", device=str(device)))
        optimizer.load_state_dict(torch.load(latest / "optimizer.pt", map_location=device, weights_only=True))
        state = json.loads((latest / STATE_NAME).read_text())
        lr_schedule.last_epoch = state["step"]  # the schedule is a function of the step alone
        for group in optimizer.param_groups:
            group["lr"] = config.lr * warm_up(state["step"])
        logger.info("resumed from %s (step %d)", latest, state["step"])
    # diffusers' EMA (decay (1 + n) / (10 + n) up to config.ema_decay) holds the average; ``ema`` receives it for
    # the holdout loss, the checkpoints and the export.
    averager = EMAModel(ema.parameters(), decay=config.ema_decay)
    averager.optimization_step = state["step"]

    # Under torchrun, DDP averages the ranks' gradients: each rank takes its slice of the step's global batch, so a
    # step is the same step as on the whole batch in one process (dropout masks aside: each rank draws its own).
    model = (
        net if ranks is None else DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    )
    batches = _Batches(images, config, device)
    use_bf16 = device.type == "cuda"
    start_step, run_start = state["step"], time.perf_counter()
    last_ckpt = run_start
    run_info = {
        "start_step": start_step,
        "device": str(device),
        "hardware": hardware_name(device),
        "torch_threads": torch.get_num_threads(),
    }
    bar = tqdm(
        total=config.max_steps, initial=start_step, disable=not (progress and rank == 0), desc="train", unit="step"
    )
    step = start_step
    losses: list[float] = []  # every step's training loss; a checkpoint logs the mean of the last 200
    since = run_start  # when the time in state["seconds"] was last added up

    def checkpoint() -> None:
        nonlocal since
        if rank != 0:  # one writer; the ranks hold the same weights
            return
        averager.copy_to(ema.parameters())
        elapsed = time.perf_counter() - run_start
        run_info.update(end_step=step, seconds=round(elapsed, 1))
        state.update(step=step, seconds=round(state["seconds"] + (time.perf_counter() - since), 1))
        since = time.perf_counter()
        if holdout is not None:
            state["holdout_loss"] = _holdout_loss(ema, scheduler, holdout, config)
            best = state.get("best")
            if best is None or state["holdout_loss"] < best["holdout_loss"]:
                state["best"] = {"step": step, "holdout_loss": state["holdout_loss"]}
                export(root, ema, scheduler, config, state, indices)  # early stopping: keep the best EMA
        recent = losses[-200:]
        state.setdefault("history", []).append(
            {"step": step, "train_loss": sum(recent) / max(1, len(recent)), "holdout_loss": state["holdout_loss"]}
        )
        logger.info("checkpoint at step %d: %s", step, state["history"][-1])
        state["runs"] = [r for r in state["runs"] if r.get("start_step") != start_step] + [dict(run_info)]
        _save_checkpoint(root, step, net, ema, optimizer, state)

    model.train()
    while step < config.max_steps:
        x, t, noise = batches(step)
        if ranks is not None:
            x, t, noise = (v.chunk(world_size)[rank] for v in (x, t, noise))
        torch.manual_seed(derive_seed(config.seed, "dropout", step, *([rank] if ranks is not None else [])))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            pred = model(scheduler.add_noise(x, noise, t), t).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        averager.step(net.parameters())
        step += 1
        loss_value = loss.item()
        losses.append(loss_value)
        bar.update(1)
        rate = (step - start_step) * config.batch_size / (time.perf_counter() - run_start)
        bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{rate:.0f}")
        if on_step is not None:
            on_step(step, loss_value)
        now = time.perf_counter()
        out_of_time = max_minutes is not None and now - run_start > 60 * max_minutes
        if ranks is not None:  # the ranks stop together, at rank 0's clock
            flag = torch.tensor([float(out_of_time)], device=device if dist.get_backend() == "nccl" else "cpu")
            dist.broadcast(flag, src=0)
            out_of_time = bool(flag.item())
        if now - last_ckpt > 60 * config.checkpoint_minutes or step == config.max_steps or out_of_time:
            checkpoint()
            last_ckpt = time.perf_counter()
        if out_of_time:
            logger.info("max_minutes=%s reached at step %d; resume with resume=True", max_minutes, step)
            break
    bar.close()
    if step == start_step and latest is None:
        checkpoint()
    if rank == 0 and holdout is None:
        averager.copy_to(ema.parameters())
        export(root, ema, scheduler, config, state, indices)
    elif rank == 0:  # the weights are the best checkpoint's; refresh the card with the whole run's history
        (root / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
        write_model_card(root, config, state, num_images=len(indices) if indices is not None else None)
    if ranks is not None:
        dist.barrier()  # the weights are written when train() returns, on every rank
    return root


def export(
    root: Path,
    ema: UNet2DModel,
    scheduler: DDPMScheduler,
    config: TrainConfig,
    state: dict,
    indices: list[int] | None,
) -> None:
    """Write the EMA weights in the loader's layout, the sparse-set indices and the model card into ``root``."""
    unet = UNet2DModel.from_config({**ema.config, "dropout": 0.0})
    unet.load_state_dict({k: v.cpu() for k, v in ema.state_dict().items()})
    denoiser = Denoiser(unet, scheduler, t_max=config.t_max)
    denoiser.save_pretrained(root, dtype=torch.float16 if config.save_dtype == "float16" else None)
    if indices is not None:
        (root / "sparse_indices.json").write_text(
            json.dumps({"data": config.data, "split": config.split, "indices": indices}) + "\n"
        )
    (root / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
    write_model_card(root, config, state, num_images=len(indices) if indices is not None else None)
