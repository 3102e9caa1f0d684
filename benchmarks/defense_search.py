"""Search for a defense that beats ISS-JPEG on every poison: candidate defenses on the bench, as plug-ins.

Each candidate is a recipe of stages (a one-time ``prepare`` of the whole training set, and an ``epoch_transform``
redrawn every epoch), registered here with the bench's public ``register_defense`` and run by the bench's own
runner, so its cells share the tier's subset, recipe, seed and test set with the committed tables. A candidate
that wins moves into the library; the others stay here as measured dead ends.

    python benchmarks/defense_search.py --data ../shared/data/cifar10/cifar10.npz --cache-dir .devdata/bench-cache \
        --output-dir benchmarks/results/defense-search --poisons urp,lsp,ar,ops,cuda,em \
        --defenses jpeg-q20,jpeg-q30,jpeg-then-eclipse

Candidates (``--list`` prints them):

* ``jpeg-q{15,20,30,50}``: ISS-JPEG at a higher quality, once. Where does a poison survive, and what does each
  quality cost clean data? (ISS uses quality 10.)
* ``jpeg-then-purify`` / ``jpeg-then-eclipse``: JPEG at quality 10, then ECLIPSE's purification (t* of the run,
  4 steps), without / with the per-epoch compensation. Does the denoiser give back what JPEG takes?
* ``random-jpeg``: JPEG redrawn every epoch, each image at a quality drawn uniformly from [10, 30]: randomness
  the attacker cannot fit, and no two epochs see the same artefacts.
* ``random-jpeg-shifted``: the same with the 8x8 block grid moved by a random offset per image and epoch, so
  the blocks' artefacts never line up twice.
* ``displace-{0.8,1.2,2.0}``: COIN's corruption (wxldragon/COIN ``COIN_trans``), redrawn every epoch: every pixel
  is resampled (bilinear, wrapping at the borders) at its own offset, drawn uniformly from [-a, a] pixels in x and
  in y and shared by the three channels. COIN's default is a = 2 (severity 4) after crop and flip; here it runs
  before them, as every epoch transform of the bench does.
* ``random-blur``: against CUDA's class-wise blur kernels, every image is convolved every epoch with its own
  random 3x3 kernel, ``(1 - s) * identity + s * k`` with k's entries uniform and normalised to sum 1 and the
  strength s uniform in [0, 1], so a blur no longer tells the class.
* ``jpeg-restore`` / ``jpeg-restore-eclipse``: JPEG at quality 10, then the restorer that
  ``benchmarks/train_restorer.py`` trained on the sparse clean set to undo JPEG (``--restorer FOLDER``); the second
  adds ECLIPSE's per-epoch compensation.
* ``jpeg-q20-displace-0.8`` / ``eclipse-displace-0.8``: JPEG q20 once, or ECLIPSE's purification once, then
  COIN's displacement (±0.8 px) every epoch (and, for ECLIPSE, its compensation after it).
* ``jpeg-then-purify-t300`` / ``jpeg-then-eclipse-t300``: the same at t* = 300 (σ = 16.4/255, about JPEG q10's
  RMS error), where the diffusion noise covers JPEG's artefacts and the denoiser may put texture back.
* ``median3``: a 3x3 median filter, once: a one-pixel shortcut (OPS) is an outlier a median removes.
* ``despeckle``: only the outliers: a pixel that differs from the median of its 3x3 neighbourhood by more than
  32/255 in some channel takes that median, once; everything else is left as it is.
* ``despeckle-eclipse``: ``despeckle``, then ECLIPSE (purification once, compensation every epoch).
* ``despeckle-jpeg-q20`` (and ``-q10``): ``despeckle``, then JPEG at quality 20 (10), once: JPEG q20 kept TAP at
  q10's level at ECLIPSE's clean cost, and the despeckle takes the OPS that q20 lets through.
* ``despeckle{48,64}-jpeg-q20``: the same with the despeckle's threshold at 48/255 or 64/255: a clean image
  loses 1.9 % or 0.7 % of its pixels to it instead of 5.4 %, and the OPS pixels still come back (87.6 % within 32
  levels of the clean pixel at 64, 90.2 % at 32; 3,000 images of the quick subset).
* ``despeckle-jpeg-purify-t300`` / ``despeckle-jpeg-eclipse-t300``: ``despeckle``, JPEG q10, then the diffusion
  at t* = 300 (4 steps), once; the second adds the per-epoch compensation (one purified cache for both).
* ``border-despeckle-jpeg-q20-gray-at4``: the same, trained adversarially (PGD, L∞ 4/255, 2 steps, on the
  squeezed and grayscaled images; 3x the training cost): the squeeze takes the poisons an attacker did not craft
  through it, and the adversarial training is there for the one who did (the ADP through the recipe, whose
  noise lives in what JPEG q20 keeps).
* ``border-despeckle-jpeg-at{1,2,4}``: the bench's ``border-despeckle-jpeg`` trained adversarially (PGD, L∞ 1/255
  or 2/255 with 1 step, or 4/255 with 2 steps): the same question at the cheaper end.
* ``border-despeckle-jpeg-at2-first8``: the PGD of ``-at2`` in the first 8 of the 15 epochs only: if the
  shortcut is to be kept out, it must be while the network is still choosing its features; the last 7 epochs
  train on the squeezed images alone, to give back clean accuracy.
* ``border-despeckle-jpeg-max4``: the bench's ``border-despeckle-jpeg``, and the trainer keeps, for every image
  and step, the worst (highest-loss) of 4 draws of its grayscale and crop/flip: an error-minimising noise is a
  shortcut in most draws, and the one draw where it fails is the one the network is trained on. An adversarial
  choice without input gradients (4 extra forward passes, no extra backward).
* ``border-despeckle-jpeg-clean{400,2000}``: the bench's ``border-despeckle-jpeg``, and the classifier trains also
  on 400 (2,000) images of the defender's own clean set, the sparse set ECLIPSE trains its denoiser on (the test
  images the bench excludes from its test set), class-balanced and as they are (grayscale per epoch, as for every
  image). The squeeze takes the poisons; the clean images give back the detail JPEG takes and are a shortcut's
  counter-examples, which no attacker can craft. 400 is the quick subset's 4 % (the standard tier's 2,000 of
  50,000); 2,000 all of it. ``none-clean400`` and ``iss-jpeg-clean400``: the same 400 clean images beside no
  defense and beside ISS-JPEG (is it the clean images alone; would any defense gain as much from them?).
  ``border-despeckle-jpeg-clean400x5`` (``-clean2000x5``): the 400 (2,000) five times per epoch (a sixth of every
  epoch's images); ``-clean400x10``: ten times (2 of every 7). The squeeze's four (400 or 2,000, once or five
  times) won and are now the library bench's own defenses (``eclipse-transforms bench --defenses ...``); the rest
  stay here.
* ``class-equalize``: against CUDA's class-wise kernels, a blind deconvolution per class, once: every image is
  filtered with the zero-phase gain that brings its class's mean amplitude spectrum to the classes' geometric
  mean (gain clipped to [1/4, 4]), after its outermost pixel ring is replaced by the ring inside it (a
  zero-padded class kernel darkens the class's edges). It uses the labels, as the defender may: the poisons are
  clean-label.
* ``despeckle-equalize-jpeg-q20``: ``despeckle``, ``class-equalize``, then JPEG at quality 20, once.
* ``repair-border``: the outermost ring of pixels replaced by the ring inside it, once: CUDA's zero-padded
  class kernels darken each class's edges (to 0.61-0.81 of the next ring's brightness on the bench's set, against
  1.00-1.04 on clean images).
* ``border-jpeg-q20``: ``repair-border``, then JPEG at quality 20, once: is the despeckle's work on CUDA's dark
  border (46 % of the border pixels change, 1.5 % of the interior) what lets JPEG break it?
* ``border-despeckle-jpeg-q20``: ``repair-border``, ``despeckle``, then JPEG at quality 20, once.
* ``border-despeckle{64,96}-jpeg-q20``: the same with the despeckle at 64/255 or 96/255: the border repair does
  the despeckle's work on CUDA (``border-jpeg-q20``: CUDA 41.8), so the despeckle need only take OPS's pixel,
  and a higher threshold spares clean images (0.7 % or 0.1 % of their pixels change instead of 5.4 %).
* ``border-despeckle64-jpeg-q20-blur``: ``border-despeckle64-jpeg-q20``, then ``random-blur`` every epoch: with
  CUDA's border cue gone, does a random blur mask what is left of its class-wise blur? (``random-blur`` alone
  did nothing, 32.6: the border still told the class.)
* ``border-despeckle-jpeg-q20-gray``: the same, then every epoch grayscale with probability 0.4 (ECLIPSE's
  compensation without its Gaussian noise): grayscale alone takes LSP (``iss-gray``: 76.4 on the quick tier).
* ``border-despeckle-jpeg-eclipse``: the bench's ``border-despeckle-jpeg`` (border, despeckle at 64/255, JPEG
  q20), then ECLIPSE's diffusion (t* of the run, 4 steps) once, then the grayscale every epoch: JPEG then ECLIPSE
  at q10 gave clean data 71.0 where JPEG q10 alone gives 69.1; does the denoiser give back as much at q20?
* ``border-despeckle-jpeg-gray{0.7,1.0}``: the bench's ``border-despeckle-jpeg`` with the per-epoch grayscale at
  p = 0.7 or 1.0 instead of 0.4: LSP is the one model-free column where it trails (standard tier: 73.9 against
  ISS-JPEG's 75.3), and grayscale alone takes LSP (``iss-gray``: 76.4 quick, 86.0 standard) at a small clean cost.
* ``border-despeckle-jpeg444``: the bench's ``border-despeckle-jpeg`` with JPEG q20 at full chroma resolution
  (4:4:4; Pillow's default, used everywhere else, halves the chroma in both directions, 4:2:0): 26.0 dB against
  25.2 dB on 1,000 clean CIFAR-10 test images (q30 4:2:0: 26.4). Does the detail it keeps lower the clean cost,
  and does the poison come back with it?
* ``border-despeckle-csjpeg-q{15,20}``: the bench's ``border-despeckle-jpeg`` with the JPEG cycle-spun: the
  image through JPEG once for each of 16 offsets of the block grid (4-pixel steps over the 16x16 macroblock),
  the 16 decodings averaged. On 1,000 clean images of the quick subset it keeps more of the image than one JPEG
  (q20: 26.4 dB against 24.6; q15: 25.8; q10: 24.8) and less of TAP's perturbation along its own direction
  (the projection of what comes through on the perturbation, over its norm: q20 0.23, q15 0.20, q10 0.15,
  against 0.22 for one JPEG q20 and 0.28 for q30). Does the network see that as one JPEG of a higher quality
  for the clean cost, and of a lower one for the poisons?
* ``border-despeckle-jpeg-hue``: the bench's ``border-despeckle-jpeg`` with every image's hue rotated by its own
  random angle every epoch, before the grayscale: LSP's class-wise colour patches lose their direction in colour
  space, while an image keeps its channels' mean and its saturation (grayscale alone takes LSP at a small clean cost:
  ``iss-gray``). Is a colour that never means the same twice cheaper than no colour 40 % of the time?
* ``cuda-oracle-deconvolve`` / ``cuda-oracle-deconvolve-displace-0.8``: diagnostics, not defenses: every class
  Wiener-deconvolved with the true kernel of the bench's CUDA set (seed 0), alone or before COIN's displacement.
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from eclipse_transforms import RepairBorder, cli
from eclipse_transforms import functional as EF
from eclipse_transforms.bench import Defense, get_defense, register_defense
from eclipse_transforms.bench.defenses import DefenseContext, compensation, jpeg, purified, with_trusted
from eclipse_transforms.bench.poisons import cuda_kernels, num_classes
from eclipse_transforms.purify import DEFAULT_STEPS
from eclipse_transforms.utils import file_digest, quantize

CANDIDATES: list[str] = []


def candidate(name: str):
    CANDIDATES.append(name)
    return register_defense(name)


for _quality in (15, 20, 30, 50):

    def _jpeg_factory(context: DefenseContext, quality: int = _quality) -> Defense:
        return Defense(f"jpeg-q{quality}", prepare=lambda x, y: jpeg(x, quality), options={"quality": quality})

    candidate(f"jpeg-q{_quality}")(_jpeg_factory)


def _jpeg_then(name: str, compensate: bool):
    def factory(context: DefenseContext) -> Defense:
        return Defense(
            name,
            prepare=lambda x, y: purified(jpeg(x, 10), y, context, DEFAULT_STEPS),
            epoch_transform=compensation() if compensate else None,
            options={"quality": 10, "t_star": context.t_star, "steps": DEFAULT_STEPS, "compensation": compensate},
        )

    return factory


candidate("jpeg-then-purify")(_jpeg_then("jpeg-then-purify", False))
candidate("jpeg-then-eclipse")(_jpeg_then("jpeg-then-eclipse", True))


def _jpeg_then_t300(name: str, compensate: bool):
    def factory(context: DefenseContext) -> Defense:
        return _jpeg_then(name, compensate)(replace(context, t_star=300))

    return factory


candidate("jpeg-then-purify-t300")(_jpeg_then_t300("jpeg-then-purify-t300", False))
candidate("jpeg-then-eclipse-t300")(_jpeg_then_t300("jpeg-then-eclipse-t300", True))


def random_jpeg(x: torch.Tensor, generator: torch.Generator, low: int = 10, high: int = 30) -> torch.Tensor:
    """JPEG of every float image of ``x`` (``(N, 3, H, W)`` in [0, 1]) at its own quality in [low, high]."""
    qualities = torch.randint(low, high + 1, (len(x),), generator=generator).tolist()
    images = quantize(x)
    return torch.stack([jpeg(img[None], q)[0] for img, q in zip(images, qualities, strict=True)]).float() / 255


@candidate("random-jpeg")
def _random_jpeg(context: DefenseContext) -> Defense:
    return Defense("random-jpeg", epoch_transform=random_jpeg, options={"quality": [10, 30], "per": "image, epoch"})


def shifted_random_jpeg(x: torch.Tensor, generator: torch.Generator, low: int = 10, high: int = 30) -> torch.Tensor:
    """:func:`random_jpeg` on a JPEG block grid moved by its own offset in [0, 7]^2 per image (reflect-padded,
    then cropped back), so the 8x8 blocks, and what they quantise away, fall elsewhere every epoch."""
    n, _, h, w = x.shape
    shifts = torch.randint(0, 8, (n, 2), generator=generator).tolist()
    qualities = torch.randint(low, high + 1, (n,), generator=generator).tolist()
    out = torch.empty_like(x)
    for i, ((dy, dx), q) in enumerate(zip(shifts, qualities, strict=True)):
        padded = torch.nn.functional.pad(x[i : i + 1], (dx, 8 - dx, dy, 8 - dy), mode="reflect")
        out[i] = jpeg(quantize(padded), q)[0, :, dy : dy + h, dx : dx + w].float() / 255
    return out


@candidate("random-jpeg-shifted")
def _shifted_random_jpeg(context: DefenseContext) -> Defense:
    return Defense(
        "random-jpeg-shifted",
        epoch_transform=shifted_random_jpeg,
        options={"quality": [10, 30], "grid_shift": [0, 7], "per": "image, epoch"},
    )


def displace(x: torch.Tensor, generator: torch.Generator, alpha: float) -> torch.Tensor:
    """Resample every pixel of ``x`` (``(N, C, H, W)``) at its own offset in [-alpha, alpha]^2, bilinearly, with
    wrap-around; the offsets are shared by the channels (COIN's random pixel interpolation)."""
    n, c, h, w = x.shape
    offsets = ((torch.rand((2, n, h, w), generator=generator) * 2 - 1) * alpha).to(x.device)
    ys = torch.arange(h, device=x.device, dtype=x.dtype).view(1, h, 1) + offsets[0]
    xs = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, w) + offsets[1]
    y0, x0 = ys.floor(), xs.floor()
    wy, wx = (ys - y0).unsqueeze(1), (xs - x0).unsqueeze(1)
    y0, x0 = y0.long(), x0.long()
    flat = x.flatten(2)

    def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        index = ((yy % h) * w + (xx % w)).flatten(1).unsqueeze(1).expand(n, c, h * w)
        return flat.gather(2, index).view(n, c, h, w)

    top = at(y0, x0) * (1 - wx) + at(y0, x0 + 1) * wx
    bottom = at(y0 + 1, x0) * (1 - wx) + at(y0 + 1, x0 + 1) * wx
    return (top * (1 - wy) + bottom * wy).clamp(0, 1)


for _alpha in (0.8, 1.2, 2.0):

    def _displace_factory(context: DefenseContext, alpha: float = _alpha) -> Defense:
        return Defense(
            f"displace-{alpha}",
            epoch_transform=lambda x, g: displace(x, g, alpha),
            options={"alpha": alpha, "per": "pixel, epoch"},
        )

    candidate(f"displace-{_alpha}")(_displace_factory)


@candidate("jpeg-q20-displace-0.8")
def _jpeg_displace(context: DefenseContext) -> Defense:
    return Defense(
        "jpeg-q20-displace-0.8",
        prepare=lambda x, y: jpeg(x, 20),
        epoch_transform=lambda x, g: displace(x, g, 0.8),
        options={"quality": 20, "alpha": 0.8},
    )


@candidate("eclipse-displace-0.8")
def _eclipse_displace(context: DefenseContext) -> Defense:
    compensate = compensation()
    return Defense(
        "eclipse-displace-0.8",
        prepare=lambda x, y: purified(x, y, context, DEFAULT_STEPS),
        epoch_transform=lambda x, g: compensate(displace(x, g, 0.8), g),
        options={"t_star": context.t_star, "steps": DEFAULT_STEPS, "alpha": 0.8, "compensation": True},
    )


def random_blur(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Convolve every image of ``x`` with its own random 3x3 kernel (the channels share it), reflect-padded."""
    n, c, h, w = x.shape
    k = torch.rand((n, 9), generator=generator)
    k = k / k.sum(1, keepdim=True)
    strength = torch.rand((n, 1), generator=generator)
    identity = torch.zeros(9)
    identity[4] = 1
    kernels = ((1 - strength) * identity + strength * k).view(n, 1, 3, 3).to(x)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    # one group per image and channel: (1, N*C, H+2, W+2) convolved with N*C kernels
    out = torch.nn.functional.conv2d(
        padded.reshape(1, n * c, h + 2, w + 2), kernels.repeat_interleave(c, 0), groups=n * c
    )
    return out.view(n, c, h, w).clamp(0, 1)


@candidate("random-blur")
def _random_blur(context: DefenseContext) -> Defense:
    return Defense(
        "random-blur", epoch_transform=random_blur, options={"kernel": "3x3 uniform", "per": "image, epoch"}
    )


def despeckle(x: torch.Tensor, threshold: int = 32) -> torch.Tensor:
    """:func:`eclipse_transforms.functional.despeckle` on uint8 ``(N, C, H, W)``, ``threshold`` in levels; at
    ``threshold=0`` every pixel takes its 3x3 medians (a median filter)."""
    return quantize(EF.despeckle(x.float() / 255, threshold=threshold / 255))


@candidate("median3")
def _median(context: DefenseContext) -> Defense:
    return Defense("median3", prepare=lambda x, y: despeckle(x, threshold=0), options={"kernel": 3})


@candidate("despeckle")
def _despeckle(context: DefenseContext) -> Defense:
    return Defense("despeckle", prepare=lambda x, y: despeckle(x), options={"threshold": 32})


@candidate("despeckle-eclipse")
def _despeckle_eclipse(context: DefenseContext) -> Defense:
    return Defense(
        "despeckle-eclipse",
        prepare=lambda x, y: purified(despeckle(x), y, context, DEFAULT_STEPS),
        epoch_transform=compensation(),
        options={"threshold": 32, "t_star": context.t_star, "steps": DEFAULT_STEPS, "compensation": True},
    )


def _despeckle_jpeg_purify(name: str, compensate: bool):
    def factory(context: DefenseContext) -> Defense:
        context = replace(context, t_star=300)
        return Defense(
            name,
            prepare=lambda x, y: purified(jpeg(despeckle(x), 10), y, context, DEFAULT_STEPS),
            epoch_transform=compensation() if compensate else None,
            options={
                "threshold": 32,
                "quality": 10,
                "t_star": context.t_star,
                "steps": DEFAULT_STEPS,
                "compensation": compensate,
            },
        )

    return factory


candidate("despeckle-jpeg-purify-t300")(_despeckle_jpeg_purify("despeckle-jpeg-purify-t300", False))
candidate("despeckle-jpeg-eclipse-t300")(_despeckle_jpeg_purify("despeckle-jpeg-eclipse-t300", True))


for _quality in (10, 20):

    def _despeckle_jpeg_factory(context: DefenseContext, quality: int = _quality) -> Defense:
        return Defense(
            f"despeckle-jpeg-q{quality}",
            prepare=lambda x, y: jpeg(despeckle(x), quality),
            options={"threshold": 32, "quality": quality},
        )

    candidate(f"despeckle-jpeg-q{_quality}")(_despeckle_jpeg_factory)


for _threshold in (48, 64):

    def _despeckle_t_jpeg_factory(context: DefenseContext, threshold: int = _threshold) -> Defense:
        return Defense(
            f"despeckle{threshold}-jpeg-q20",
            prepare=lambda x, y: jpeg(despeckle(x, threshold), 20),
            options={"threshold": threshold, "quality": 20},
        )

    candidate(f"despeckle{_threshold}-jpeg-q20")(_despeckle_t_jpeg_factory)


repair_border = RepairBorder()  # the outermost pixel ring from the ring inside it; uint8 in, uint8 out


def class_equalize(x: torch.Tensor, y: torch.Tensor, max_gain: float = 4.0, border: bool = True) -> torch.Tensor:
    """Equalise the classes' mean amplitude spectra of uint8 ``(N, C, H, W)`` images with labels ``y``.

    A class-wise convolution (CUDA) multiplies the amplitude spectrum of every image of a class by the same
    ``|K_c(f)|``; the class's mean amplitude spectrum shows it. Every image is filtered with the zero-phase gain
    ``clamp(A(f) / A_c(f), 1/max_gain, max_gain)``, where ``A_c`` is its class's mean amplitude spectrum (over
    images and channels) and ``A`` their geometric mean over the classes, so that every class ends with the same
    mean spectrum. The images are mirrored to ``2H x 2W`` first (no wrap-around edges), and with ``border`` the
    outermost ring is replaced by its inner neighbour first (a zero-padded class kernel darkens the class's edges).
    """
    images = repair_border(x) if border else x
    n, c, h, w = images.shape
    z = images.float() / 255
    z = torch.cat([z, z.flip(-1)], -1)
    z = torch.cat([z, z.flip(-2)], -2)
    spectra = torch.fft.rfft2(z)
    amplitude = spectra.abs().mean(1)  # (N, 2H, W+1), channels averaged
    classes = y.unique()
    class_means = torch.stack([amplitude[y == cls].mean(0) for cls in classes]).clamp_min(1e-8)
    target = class_means.log().mean(0).exp()
    gains = (target / class_means).clamp(1 / max_gain, max_gain)
    gains[:, 0, 0] = 1.0  # keep every image's mean colour
    index = torch.searchsorted(classes, y)
    out = torch.fft.irfft2(spectra * gains[index].unsqueeze(1), s=z.shape[-2:])[..., :h, :w]
    return quantize(out.clamp(0, 1))


@candidate("repair-border")
def _repair_border(context: DefenseContext) -> Defense:
    return Defense("repair-border", prepare=lambda x, y: repair_border(x), options={"ring": 1})


@candidate("border-jpeg-q20")
def _border_jpeg(context: DefenseContext) -> Defense:
    return Defense(
        "border-jpeg-q20", prepare=lambda x, y: jpeg(repair_border(x), 20), options={"ring": 1, "quality": 20}
    )


@candidate("border-despeckle-jpeg-q20")
def _border_despeckle_jpeg(context: DefenseContext) -> Defense:
    return Defense(
        "border-despeckle-jpeg-q20",
        prepare=lambda x, y: jpeg(despeckle(repair_border(x)), 20),
        options={"ring": 1, "threshold": 32, "quality": 20},
    )


for _threshold in (64, 96):

    def _border_despeckle_t_jpeg_factory(context: DefenseContext, threshold: int = _threshold) -> Defense:
        return Defense(
            f"border-despeckle{threshold}-jpeg-q20",
            prepare=lambda x, y: jpeg(despeckle(repair_border(x), threshold), 20),
            options={"ring": 1, "threshold": threshold, "quality": 20},
        )

    candidate(f"border-despeckle{_threshold}-jpeg-q20")(_border_despeckle_t_jpeg_factory)


@candidate("border-despeckle64-jpeg-q20-blur")
def _border_despeckle_jpeg_blur(context: DefenseContext) -> Defense:
    return Defense(
        "border-despeckle64-jpeg-q20-blur",
        prepare=lambda x, y: jpeg(despeckle(repair_border(x), 64), 20),
        epoch_transform=random_blur,
        options={"ring": 1, "threshold": 64, "quality": 20, "kernel": "3x3 uniform", "per": "image, epoch"},
    )


@candidate("border-despeckle-jpeg-q20-gray")
def _border_despeckle_jpeg_gray(context: DefenseContext) -> Defense:
    return Defense(
        "border-despeckle-jpeg-q20-gray",
        prepare=lambda x, y: jpeg(despeckle(repair_border(x)), 20),
        epoch_transform=compensation(p_gray=0.4, sigma=0.0),
        options={"ring": 1, "threshold": 32, "quality": 20, "p_gray": 0.4},
    )


@candidate("border-despeckle-jpeg-eclipse")
def _border_despeckle_jpeg_eclipse(context: DefenseContext) -> Defense:
    """The bench's ``border-despeckle-jpeg``, then ECLIPSE's noise-and-denoise on its output (cached once): does the
    sparse-set denoiser give back some of what JPEG took from clean images?"""
    squeeze = get_defense("border-despeckle-jpeg", context)
    return replace(
        squeeze,
        name="border-despeckle-jpeg-eclipse",
        prepare=lambda x, y: purified(squeeze.prepare(x, y), y, context, DEFAULT_STEPS),
        options={**squeeze.options, "t_star": context.t_star, "steps": DEFAULT_STEPS},
    )


for _p_gray in (0.7, 1.0):

    def _border_despeckle_jpeg_p_gray_factory(context: DefenseContext, p_gray: float = _p_gray) -> Defense:
        defense = get_defense("border-despeckle-jpeg", context)
        return replace(
            defense,
            name=f"border-despeckle-jpeg-gray{p_gray}",
            epoch_transform=compensation(p_gray=p_gray, sigma=0.0),
            options={**defense.options, "p_gray": p_gray},
        )

    candidate(f"border-despeckle-jpeg-gray{_p_gray}")(_border_despeckle_jpeg_p_gray_factory)


def jpeg444(images: torch.Tensor, quality: int) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` through Pillow's JPEG at ``quality`` without chroma subsampling (4:4:4)."""
    out = torch.empty_like(images)
    for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
        buf = io.BytesIO()
        PIL.Image.fromarray(img).save(buf, format="JPEG", quality=quality, subsampling=0)
        out[i] = torch.from_numpy(np.array(PIL.Image.open(buf).convert("RGB"))).permute(2, 0, 1)
    return out


@candidate("border-despeckle-jpeg444")
def _border_despeckle_jpeg444(context: DefenseContext) -> Defense:
    return Defense(
        "border-despeckle-jpeg444",
        prepare=lambda x, y: jpeg444(despeckle(repair_border(x), 64), 20),
        epoch_transform=compensation(p_gray=0.4, sigma=0.0),
        options={"ring": 1, "threshold": 64, "quality": 20, "subsampling": "4:4:4", "p_gray": 0.4},
    )


def cycle_spun_jpeg(images: torch.Tensor, quality: int, step: int = 4) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` through JPEG at ``quality`` once for every offset of the block grid on a ``step``-pixel
    lattice of the 16x16 macroblock (4:2:0 chroma), averaged: each copy is padded by reflection so that its grid
    starts ``(dy, dx)`` pixels before the image's, encoded, decoded and cropped back. Every copy quantises the DCT
    of its own blocks; the average has no block edges and keeps more of the image than any one copy."""
    height, width = images.shape[-2:]
    total = torch.zeros(images.shape, dtype=torch.float64)
    offsets = range(0, 16, step)
    for dy in offsets:
        for dx in offsets:
            pad = (dx, -(width + dx) % 16, dy, -(height + dy) % 16)
            padded = torch.nn.functional.pad(images.float(), pad, mode="reflect").to(torch.uint8)
            total += jpeg(padded, quality)[..., dy : dy + height, dx : dx + width].double()
    return total.div_(len(offsets) ** 2).round_().clamp_(0, 255).to(torch.uint8)


for _quality in (15, 20):

    def _border_despeckle_csjpeg_factory(context: DefenseContext, quality: int = _quality) -> Defense:
        return Defense(
            f"border-despeckle-csjpeg-q{quality}",
            prepare=lambda x, y: cycle_spun_jpeg(despeckle(repair_border(x), 64), quality),
            epoch_transform=compensation(p_gray=0.4, sigma=0.0),
            options={"ring": 1, "threshold": 64, "quality": quality, "grid_offsets": "4x4, step 4", "p_gray": 0.4},
        )

    candidate(f"border-despeckle-csjpeg-q{_quality}")(_border_despeckle_csjpeg_factory)


def random_hue(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Every float image ``(N, 3, H, W)`` rotated about the RGB cube's gray axis by its own angle, uniform in
    [0, 2 pi) (a hue rotation: the channels' mean and the distance from gray are kept, the direction of the colour
    is redrawn), then clamped to [0, 1]."""
    theta = torch.rand(len(x), generator=generator) * (2 * torch.pi)
    cos, sin = theta.cos().view(-1, 1, 1), theta.sin().view(-1, 1, 1)
    axis = torch.full((3,), 3**-0.5)
    cross = torch.tensor([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    rotation = cos * torch.eye(3) + sin * cross + (1 - cos) * torch.outer(axis, axis)  # Rodrigues, one per image
    return torch.einsum("nij,njhw->nihw", rotation.to(x.dtype), x).clamp_(0, 1)


@candidate("border-despeckle-jpeg-hue")
def _border_despeckle_jpeg_hue(context: DefenseContext) -> Defense:
    defense = get_defense("border-despeckle-jpeg", context)
    gray = defense.epoch_transform
    return replace(
        defense,
        name="border-despeckle-jpeg-hue",
        epoch_transform=lambda x, g: gray(random_hue(x, g), g),
        options={**defense.options, "hue": "uniform rotation per image and epoch, before the grayscale"},
    )


def with_pgd(base: str, name: str, epsilon: int, steps: int, epochs: int | None = None):
    """A factory for defense ``base`` trained adversarially: PGD in an L∞ ball of ``epsilon``/255, ``steps`` steps,
    in every epoch or the first ``epochs``."""

    def factory(context: DefenseContext) -> Defense:
        defense = get_defense(base, context)
        pgd = {"pgd": f"Linf {epsilon}/255, {steps} steps" + ("" if epochs is None else f", first {epochs} epochs")}
        return replace(
            defense,
            name=name,
            adversarial_epsilon=epsilon / 255,
            adversarial_steps=steps,
            adversarial_epochs=epochs,
            options={**defense.options, **pgd},
        )

    return factory


def with_worst_of(base: str, name: str, k: int):
    """A factory for defense ``base`` whose trainer keeps, per image and step, the highest-loss of ``k`` draws of
    the per-epoch stages and crop/flip (an adversarial choice among random augmentations, no input gradients)."""

    def factory(context: DefenseContext) -> Defense:
        defense = get_defense(base, context)
        return replace(defense, name=name, worst_of=k, options={**defense.options, "worst_of": k})

    return factory


candidate("border-despeckle-jpeg-max4")(with_worst_of("border-despeckle-jpeg", "border-despeckle-jpeg-max4", 4))
candidate("border-despeckle-jpeg-q20-gray-at4")(
    with_pgd("border-despeckle-jpeg-q20-gray", "border-despeckle-jpeg-q20-gray-at4", 4, 2)
)
for _epsilon, _steps in ((1, 1), (2, 1), (4, 2)):
    candidate(f"border-despeckle-jpeg-at{_epsilon}")(
        with_pgd("border-despeckle-jpeg", f"border-despeckle-jpeg-at{_epsilon}", _epsilon, _steps)
    )
candidate("border-despeckle-jpeg-at2-first8")(
    with_pgd("border-despeckle-jpeg", "border-despeckle-jpeg-at2-first8", 2, 1, epochs=8)
)


# The squeeze with 400 or 2,000 trusted images, once or five times an epoch, moved into the library's bench
# (eclipse_transforms.bench.defenses.with_trusted); ten times an epoch, and beside other defenses, stay here.
candidate("border-despeckle-jpeg-clean400x10")(
    with_trusted("border-despeckle-jpeg", "border-despeckle-jpeg-clean400x10", 400, 10)
)
# half the quick tier's 400 at twice the weight: the other half is kept out of training for a refit of the last layer
# (benchmarks/refit_head.py --held-out)
candidate("border-despeckle-jpeg-clean200x10")(
    with_trusted("border-despeckle-jpeg", "border-despeckle-jpeg-clean200x10", 200, 10)
)
for _base in ("none", "iss-jpeg"):  # is it the clean images alone? does any defense gain as much from them?
    candidate(f"{_base}-clean400")(with_trusted(_base, f"{_base}-clean400", 400))


@candidate("class-equalize")
def _class_equalize(context: DefenseContext) -> Defense:
    return Defense(
        "class-equalize", prepare=lambda x, y: class_equalize(x, y), options={"max_gain": 4.0, "border": True}
    )


@candidate("despeckle-equalize-jpeg-q20")
def _despeckle_equalize_jpeg(context: DefenseContext) -> Defense:
    return Defense(
        "despeckle-equalize-jpeg-q20",
        prepare=lambda x, y: jpeg(class_equalize(despeckle(x), y), 20),
        options={"threshold": 32, "max_gain": 4.0, "border": True, "quality": 20},
    )


def wiener_deconvolve(x: torch.Tensor, kernel: torch.Tensor, noise: float = 0.01, pad: int = 8) -> torch.Tensor:
    """Undo ``conv2d(x, kernel, padding=1)`` (the same 3x3 ``kernel`` on every channel) on float ``(N, C, H, W)``.

    Wiener filter ``conj(K) / (|K|^2 + noise * mean |K|^2)`` on the image edge-padded by ``pad`` pixels; the
    kernel is normalised to sum 1 first (CUDA rescales every image to its maximum anyway)."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad,) * 4, mode="replicate")
    big_h, big_w = padded.shape[-2:]
    kernel = kernel / kernel.sum()
    impulse = torch.zeros(big_h, big_w)
    for a in range(3):
        for b in range(3):  # conv2d correlates: out[i] = sum_a k[a] x[i + a - 1]
            impulse[(1 - a) % big_h, (1 - b) % big_w] += kernel[a, b]
    response = torch.fft.fft2(impulse)
    power = response.abs() ** 2
    restored = torch.fft.ifft2(torch.fft.fft2(padded) * response.conj() / (power + noise * power.mean())).real
    return restored[..., pad : pad + h, pad : pad + w]


def deconvolve_classes(x: torch.Tensor, y: torch.Tensor, kernels: torch.Tensor, noise: float = 0.01) -> torch.Tensor:
    """:func:`wiener_deconvolve` every class of uint8 ``x`` with its own kernel (``kernels[label]``), each image
    then rescaled to its maximum as CUDA leaves it."""
    z = x.float() / 255
    out = torch.empty_like(z)
    for cls in y.unique().tolist():
        idx = (y == cls).nonzero().flatten()
        out[idx] = wiener_deconvolve(z[idx], kernels[cls], noise)
    out = out.clamp_min(0)
    return quantize((out / out.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)).clamp(0, 1))


@candidate("cuda-oracle-deconvolve")
def _cuda_oracle(context: DefenseContext) -> Defense:
    """Diagnostic, not a defense: Wiener-deconvolve every class with the true CUDA kernel of the bench's poison
    (seed 0), the upper bound of any blind deconvolution."""

    def prepare(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return deconvolve_classes(x, y, cuda_kernels(num_classes(y), seed=0))

    return Defense("cuda-oracle-deconvolve", prepare=prepare, options={"noise": 0.01, "oracle": "cuda seed 0"})


@candidate("cuda-oracle-deconvolve-displace-0.8")
def _cuda_oracle_displace(context: DefenseContext) -> Defense:
    """Diagnostic: the oracle deconvolution once, then COIN's displacement (±0.8 px) every epoch."""
    oracle = _cuda_oracle(context)
    return Defense(
        "cuda-oracle-deconvolve-displace-0.8",
        prepare=oracle.prepare,
        epoch_transform=lambda x, g: displace(x, g, 0.8),
        options={**oracle.options, "alpha": 0.8},
    )


#: Set from ``--restorer``: the folder that benchmarks/train_restorer.py wrote.
RESTORER: dict[str, str] = {}


def _jpeg_restore(name: str, compensate: bool):
    def factory(context: DefenseContext) -> Defense:
        from train_restorer import load_restorer, restore  # benchmarks/, beside this script

        folder = Path(RESTORER.get("folder", ".devdata/restorer"))
        weights = folder / "restorer.safetensors"
        digest = file_digest(weights, 16) if weights.is_file() else "missing"

        def prepare(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return restore(load_restorer(folder), jpeg(x, 10))

        return Defense(
            name,
            prepare=prepare,
            epoch_transform=compensation() if compensate else None,
            options={"quality": 10, "restorer": digest, "compensation": compensate},
        )

    return factory


candidate("jpeg-restore")(_jpeg_restore("jpeg-restore", False))
candidate("jpeg-restore-eclipse")(_jpeg_restore("jpeg-restore-eclipse", True))


def main(argv: list[str] | None = None) -> int:
    """Register the candidates, then run ``eclipse-transforms bench`` with this search's defaults: every option
    of the bench (``--seed``, ``--tier``, ``--report-only``, ``--no-clean``, ...) is taken as the bench takes it."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Every other option is the bench's (eclipse-transforms bench --help). Defaults here: --output-dir "
        "benchmarks/results/defense-search --poisons urp,lsp,ar,ops,cuda --defenses <every candidate>.",
    )
    parser.add_argument("--list", action="store_true", help="print the candidates and exit")
    parser.add_argument("--restorer", default=".devdata/restorer", help="folder of benchmarks/train_restorer.py")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args, bench_args = parser.parse_known_args(argv)
    RESTORER["folder"] = args.restorer
    if args.list:
        print("\n".join(CANDIDATES))
        return 0
    defaults = ["--output-dir", "benchmarks/results/defense-search", "--poisons", "urp,lsp,ar,ops,cuda"]
    defaults += ["--defenses", ",".join(CANDIDATES)]
    progress = ["--no-progress"] if args.no_progress else []
    return cli.main(["--verbose", *progress, "bench", *defaults, *bench_args])  # later flags win


if __name__ == "__main__":
    sys.exit(main())
