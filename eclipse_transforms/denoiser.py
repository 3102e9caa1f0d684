"""The DDPM denoiser: a diffusers ``UNet2DModel`` noise predictor with its ``DDPMScheduler``.

A denoiser folder uses diffusers' ``DDPMPipeline`` layout, so the same folder loads as a local path, a Hub
repo id, with ``DDPMPipeline.from_pretrained`` and as the bundled default::

    model_index.json
    unet/config.json
    unet/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json
    eclipse_config.json          # optional: the timestep range the UNet was trained on (t_max)

A flat folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` + ``scheduler_config.json``) loads too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, overload

import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from ._hub import resolve_pretrained

logger = logging.getLogger(__name__)

__all__ = ["Denoiser", "load_denoiser", "bundled_weights_path", "check_device"]

ECLIPSE_CONFIG_NAME = "eclipse_config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_NAMES = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.pt", "pytorch_model.bin", "model.ckpt")
BUNDLED_NAME = "cifar10-sparse-ddpm"


class Denoiser(nn.Module):
    """A noise-predicting UNet and the DDPM schedule it was trained with.

    Args:
        unet: diffusers ``UNet2DModel`` that predicts the noise ``ε`` from ``(x_t, t)``, images in ``[-1, 1]``.
        scheduler: the ``DDPMScheduler`` the UNet was trained with (its ``num_train_timesteps`` defines ``T``).
        t_max: largest ``t_star`` the UNet was trained for (training may cover only ``t < t_max``). Defaults to ``T``.
        source: where the weights came from (a path or ``repo@revision``), for ``repr`` and logs.

    Example:
        >>> from diffusers import DDPMScheduler, UNet2DModel
        >>> unet = UNet2DModel(sample_size=8, block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=4,
        ...                    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
        >>> den = Denoiser(unet, DDPMScheduler(num_train_timesteps=4000, beta_schedule="squaredcos_cap_v2"), t_max=300)
        >>> den.t_max, den.num_train_timesteps
        (300, 4000)
    """

    def __init__(
        self, unet: UNet2DModel, scheduler: DDPMScheduler, *, t_max: int | None = None, source: str = "<in memory>"
    ) -> None:
        super().__init__()
        if not isinstance(unet, UNet2DModel):
            raise TypeError(f"unet must be a diffusers UNet2DModel, got {type(unet).__name__}.")
        if not isinstance(scheduler, DDPMScheduler):
            raise TypeError(f"scheduler must be a diffusers DDPMScheduler, got {type(scheduler).__name__}.")
        T = scheduler.config.num_train_timesteps
        t_max = T if t_max is None else int(t_max)
        if not 1 <= t_max <= T:
            raise ValueError(f"t_max must be in [1, {T}] (the scheduler's num_train_timesteps), got {t_max}.")
        # channels_last: 1.3-1.7x faster convolutions on CPU (measured by benchmarks/bench_throughput.py) and GPU.
        self.unet = unet.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.scheduler = scheduler
        self.t_max = t_max
        self.source = source
        self._fingerprint: str | None = None

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def in_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this (the UNet's total downsampling)."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the weights, the UNet config, the schedule, ``t_max`` and the compute dtype (when not
        float32): what changes the output."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            public = lambda cfg: {k: v for k, v in dict(cfg).items() if not k.startswith("_")}  # noqa: E731
            config = {
                "unet": public(self.unet.config),
                "scheduler": public(self.scheduler.config),
                "t_max": self.t_max,
            }
            if self.dtype != torch.float32:  # the same values computed in another precision give other outputs
                config["dtype"] = str(self.dtype)
            h.update(json.dumps(config, sort_keys=True, default=str).encode())
            for name, tensor in sorted(self.unet.state_dict().items()):
                h.update(name.encode())
                h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Denoiser:
        # Moving between devices keeps the weights' values; a dtype change does not, so forget the hash then.
        dtype = self.dtype
        out = super()._apply(fn, recurse)
        if self.dtype != dtype:
            self._fingerprint = None
        return out

    #: On CPU the UNet runs over sub-batches of this many images: for 32x32 images the activations of a 32-image
    #: chunk stay in cache, which is about 2x faster per image than one 256-image call (benchmarks/bench_throughput.py).
    cpu_micro_batch: int | None = 32

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int) -> torch.Tensor:
        """Predict the noise ``ε`` in ``sample`` (model space ``[-1, 1]``, shape ``(N, C, H, W)``) at ``timestep``."""
        sample = sample.contiguous(memory_format=torch.channels_last)
        chunk = self.cpu_micro_batch if sample.device.type == "cpu" else None
        if chunk is None or sample.shape[0] <= chunk:
            return self.unet(sample, timestep).sample
        timestep = torch.as_tensor(timestep, device=sample.device).expand(sample.shape[0])
        parts = zip(sample.split(chunk), timestep.split(chunk), strict=True)
        return torch.cat([self.unet(part, t).sample for part, t in parts])

    def save_pretrained(self, save_directory: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
        """Write the denoiser in diffusers' ``DDPMPipeline`` layout (safetensors only).

        Args:
            save_directory: output folder; created if missing.
            dtype: store the weights in this dtype (e.g. ``torch.float16`` to halve the size). Default: as is.

        Returns:
            The folder written.
        """
        root = Path(save_directory)
        root.mkdir(parents=True, exist_ok=True)
        # The UNet computes in channels-last; safetensors before 0.4.3 refuses the strided tensors that gives.
        self.unet.to(memory_format=torch.contiguous_format)
        try:
            self.unet.save_pretrained(root / "unet", safe_serialization=True)
        finally:
            self.unet.to(memory_format=torch.channels_last)
        if dtype is not None and dtype != self.dtype:
            weights = root / "unet" / WEIGHTS_NAME
            save_file(
                {k: v.to(dtype).contiguous() for k, v in load_file(weights).items()},
                weights,
                metadata={"format": "pt"},
            )
        self.scheduler.save_pretrained(root / "scheduler")
        model_index = {
            "_class_name": "DDPMPipeline",
            "_diffusers_version": _diffusers_version(),
            "scheduler": ["diffusers", "DDPMScheduler"],
            "unet": ["diffusers", "UNet2DModel"],
        }
        (root / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
        (root / ECLIPSE_CONFIG_NAME).write_text(json.dumps({"t_max": self.t_max}, indent=2) + "\n")
        return root

    def __repr__(self) -> str:
        params = sum(p.numel() for p in self.unet.parameters())
        return (
            f"Denoiser(source={self.source!r}, params={params / 1e6:.2f}M, "
            f"block_out_channels={tuple(self.unet.config.block_out_channels)}, T={self.num_train_timesteps}, "
            f"beta_schedule={self.scheduler.config.beta_schedule!r}, t_max={self.t_max}, device={self.device}, "
            f"dtype={self.dtype})"
        )


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def bundled_weights_path() -> Path | None:
    """The folder of the bundled CIFAR-10 denoiser, or ``None`` when it is not installed.

    Looks inside the installed package first (wheels copy ``weights/`` to ``eclipse_transforms/_weights``),
    then in a source checkout's top-level ``weights/``.
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "_weights" / BUNDLED_NAME, here.parent / "weights" / BUNDLED_NAME):
        if _find_layout(candidate) is not None:
            return candidate
    return None


def _find_layout(root: Path) -> tuple[Path, Path] | None:
    """Return ``(unet_dir, scheduler_dir)`` for a pipeline or flat layout, or ``None`` if neither is there."""
    if (root / "unet" / "config.json").is_file():
        return root / "unet", root / "scheduler"
    if (root / "config.json").is_file():
        return root, root
    return None


def _read_eclipse_config(root: Path) -> dict[str, Any]:
    path = root / ECLIPSE_CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or delete it.") from e
    t_max = config.get("t_max") if isinstance(config, dict) else None
    if not isinstance(config, dict) or not (
        t_max is None or (isinstance(t_max, int) and not isinstance(t_max, bool) and t_max >= 1)
    ):
        raise ValueError(
            f'{path} must be a JSON object like {{"t_max": 300}} (t_max: the largest timestep the UNet was trained '
            f"for, a positive int), got {config!r}; fix or delete it (without it, t_max is the schedule's length)."
        )
    return config


@overload
def check_device(device: str | torch.device) -> torch.device: ...


@overload
def check_device(device: None) -> None: ...


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a ``torch.device`` that exists on this machine (``None`` stays ``None``), or a ``ValueError``
    that says which devices there are."""
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1'): {e}") from e
    if resolved.type == "cpu":
        return resolved
    backend = getattr(torch, resolved.type, None)
    available = getattr(backend, "is_available", lambda: False)()
    if not available:
        raise ValueError(
            f"device={device!r}, but this torch ({torch.__version__}) has no usable {resolved.type} device "
            f"(torch.{resolved.type}.is_available() is False); use device='cpu'."
        )
    count = getattr(backend, "device_count", lambda: 1)()
    if resolved.index is not None and resolved.index >= count:
        raise ValueError(f"device={device!r}, but there are only {count} {resolved.type} devices (0..{count - 1}).")
    return resolved


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``dtype`` as a ``torch.dtype`` the UNet can compute in (``None``: float32), or a ``ValueError``."""
    if dtype is None:
        return torch.float32
    resolved = DTYPES.get(dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype
    if resolved is None or resolved not in DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or the torch dtype), got {dtype!r}.")
    return resolved


def default_dtype(device: torch.device | None) -> torch.dtype:
    """The UNet's precision when none is asked for: float32 on a CPU (bfloat16 is emulated, and slower, on CPUs
    without AVX512-BF16 or AMX); on a CUDA device bfloat16 where it is supported, float16 otherwise. Half
    precision moved the bundled weights' purified images by at most one 8-bit level (docs/speed.md)."""
    if device is None or device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def dtype_name(dtype: str | torch.dtype | None) -> str:
    """``dtype``'s key in :data:`DTYPES` (``"bfloat16"`` for ``torch.bfloat16`` or ``"torch.bfloat16"``), checked."""
    return str(check_dtype(dtype)).removeprefix("torch.")


def load_denoiser(
    pretrained: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Denoiser:
    """Load a DDPM denoiser from a local folder, a Hugging Face Hub repo id, or the bundled default.

    Args:
        pretrained: a local folder in diffusers' layout, a Hub repo id (``"owner/name"``), or ``None`` for the
            bundled CIFAR-10 weights trained on a sparse clean set (see ``weights/`` in the repository).
        revision: Hub branch, tag or commit; pin a commit for reproducible results. Ignored for local folders.
        allow_pickle: load a pickle checkpoint (``.bin``) when no safetensors file exists. Only for files
            you trust: unpickling can run arbitrary code.
        device: where to put the UNet. Default: CPU.
        dtype: the UNet's compute precision: ``torch.float32``, ``torch.bfloat16`` or ``torch.float16`` (or their
            names). Default: float32 on a CPU; on a CUDA device bfloat16, or float16 where bfloat16 is not
            supported (:func:`default_dtype`); pass ``torch.float32`` for full precision there. Lower precision is faster where the hardware has it (bfloat16 on CPUs with
            AVX512-BF16 or AMX, both on GPUs); bfloat16 moved the bundled weights' purified CIFAR-10 images by at
            most one 8-bit level (``benchmarks/bench_throughput.py``). The scheduler's arithmetic stays in float32.
            The dtype is part of :attr:`Denoiser.fingerprint`, so cached purifications of different precisions
            never mix.
        cache_dir: Hub cache folder. Default: huggingface_hub's (``HF_HOME`` / ``HF_HUB_CACHE``).

    Returns:
        The :class:`Denoiser`, in eval mode, in ``dtype``.

    Raises:
        FileNotFoundError: ``pretrained=None`` and no bundled weights are installed, or the folder lacks a config.
        ValueError: the folder holds only a pickle checkpoint and ``allow_pickle`` is False, its config is bad, or
            ``dtype`` is not a floating-point precision the UNet can run in.
        OSError: the Hub repo or revision does not exist, or is not cached while offline.

    Example:
        >>> den = load_denoiser()  # doctest: +SKIP
        >>> den = load_denoiser("my-org/my-ddpm", revision="0123abc")  # doctest: +SKIP
        >>> den = load_denoiser(dtype=torch.bfloat16)  # doctest: +SKIP
    """
    device = check_device(device)
    dtype = default_dtype(device) if dtype is None else check_dtype(dtype)
    if pretrained is None:
        root = bundled_weights_path()
        if root is None:
            raise FileNotFoundError(
                "No bundled denoiser weights are installed (looked for eclipse_transforms/_weights/"
                f"{BUNDLED_NAME} and weights/{BUNDLED_NAME}). Pass a folder or Hub repo id as `pretrained`, "
                "or train weights on your own clean images with `eclipse-transforms train` (see the README)."
            )
        source = f"bundled:{BUNDLED_NAME}"
    else:
        root = resolve_pretrained(pretrained, revision=revision, cache_dir=cache_dir)
        source = str(pretrained) if revision is None or Path(str(pretrained)).is_dir() else f"{pretrained}@{revision}"

    layout = _find_layout(root)
    if layout is None:
        raise FileNotFoundError(
            f"pretrained={str(pretrained)!r}: {root} has no config.json (neither unet/config.json nor config.json). "
            "A denoiser folder needs diffusers' layout; write one with Denoiser.save_pretrained()."
        )
    unet_dir, scheduler_dir = layout
    has_safetensors = (unet_dir / WEIGHTS_NAME).is_file()
    pickles = [name for name in PICKLE_NAMES if (unet_dir / name).is_file()]
    if not has_safetensors:
        if not pickles:
            raise FileNotFoundError(f"pretrained={str(pretrained)!r}: no {WEIGHTS_NAME} in {unet_dir}.")
        if not allow_pickle:
            raise ValueError(
                f"pretrained={str(pretrained)!r}: {unet_dir} holds only a pickle checkpoint ({pickles[0]}), which "
                "can run arbitrary code when loaded. Convert it to safetensors, or pass allow_pickle=True if you "
                "trust its source."
            )
        logger.warning("Loading pickle checkpoint %s (allow_pickle=True).", unet_dir / pickles[0])

    unet = UNet2DModel.from_pretrained(
        unet_dir, use_safetensors=has_safetensors, torch_dtype=torch.float32, low_cpu_mem_usage=False
    )
    scheduler_config = scheduler_dir / "scheduler_config.json"
    if not scheduler_config.is_file():
        raise FileNotFoundError(
            f"pretrained={str(pretrained)!r}: no scheduler_config.json in {scheduler_dir}; the denoiser's noise "
            "schedule must be saved beside the UNet."
        )
    scheduler = DDPMScheduler.from_pretrained(scheduler_dir)
    t_max = _read_eclipse_config(root).get("t_max")
    denoiser = Denoiser(unet.float(), scheduler, t_max=t_max, source=source)
    return denoiser.to(device=device, dtype=dtype)
