"""eclipse-transforms: strip clean-label availability poisons: the squeeze, and diffusion purification (ECLIPSE).

The public surface: :class:`EclipsePurify` (a recipe's stages as one torchvision transform: ``recipe="squeeze"``,
the default, or ``recipe="eclipse"``; :data:`RECIPES`), the stages
:class:`ForwardDiffusion`, :class:`ReverseDiffusion` and :class:`CorruptionCompensation`, the squeezes
:class:`Despeckle` (one-pixel shortcut), :class:`RepairBorder` (a zero-padded convolution's border) and
:class:`JPEGCompression` (deterministic: before the cache, or ``EclipsePurify(prefilter=...)``), the cached
:class:`PurifiedDataset`, and :func:`load_denoiser` for the DDPM weights (bundled, a folder or a Hub repo id).
"""

from ._version import __version__
from .corruption_compensation import CorruptionCompensation
from .dataset import PurifiedDataset
from .denoiser import Denoiser, load_denoiser
from .despeckle import Despeckle
from .forward_diffusion import ForwardDiffusion
from .jpeg_compression import JPEGCompression
from .purify import DEFAULT_STEPS, RECIPES, EclipsePurify
from .repair_border import RepairBorder
from .reverse_diffusion import ReverseDiffusion

__all__ = [
    "__version__",
    "EclipsePurify",
    "ForwardDiffusion",
    "ReverseDiffusion",
    "CorruptionCompensation",
    "Despeckle",
    "RepairBorder",
    "JPEGCompression",
    "PurifiedDataset",
    "Denoiser",
    "load_denoiser",
    "DEFAULT_STEPS",
    "RECIPES",
]
