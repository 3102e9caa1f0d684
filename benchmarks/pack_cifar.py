"""Pack a bench tier's CIFAR-10 images losslessly for a machine that has no copy, and unpack them there.

For running the bench on a borrowed GPU machine whose upload is size-limited (here: 64 MiB a call, repository
included) and that cannot download CIFAR-10. Every image is stored as lossless WebP (about 1.8 kB of the 3 kB raw),
in parts of at most ``--max-part-mb``; ``unpack`` decodes them, checks the sha256 of every array against the
manifest and writes the ``.npz`` the bench reads (``x_train``/``y_train``/``x_test``/``y_test``, uint8 HWC).

``--tier quick`` packs only the tier's class-balanced training subset (10,000 images), in the bench's order:
run the bench there with ``--tier quick --subset 0`` and its data key, hence every cache and cell key, is the
same as the run here. ``--tier standard`` packs all 50,000 (about 90 MB: two parts, for two uploads). The test
split is always packed whole, since the bench drops the denoiser's sparse set from it itself.

    python benchmarks/pack_cifar.py pack --data ../shared/data/cifar10/cifar10.npz --tier quick --out .devpack
    python benchmarks/pack_cifar.py unpack .devpack --out /tmp/cifar10.npz   # on the other machine
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

FORMAT = 1


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def encode(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``(N, H, W, 3)`` -> (concatenated lossless WebP bytes, ``N + 1`` offsets)."""
    blobs = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="WEBP", lossless=True, quality=100, method=4)
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    return (np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)), offsets


def decode(codes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    images = [
        np.asarray(Image.open(io.BytesIO(codes[a:b].tobytes())).convert("RGB"))
        for a, b in zip(offsets[:-1], offsets[1:], strict=True)
    ]
    return np.stack(images)


def pack(data: str, tier: str, out: Path, seed: int = 0, max_part_mb: float = 45.0, subset: int | None = None) -> dict:
    """Write ``out/manifest.json`` and ``out/<split>-<k>.npz`` parts; returns the manifest.

    ``subset`` replaces the tier's training-subset size (as the bench's ``--subset`` does)."""
    # Imported here: ``unpack`` runs where the library's dependencies may not be installed yet.
    from eclipse_transforms.bench.runner import TIERS, balanced_subset
    from eclipse_transforms.utils import load_image_set

    if tier not in ("quick", "standard"):
        raise ValueError(
            f"tier must be 'quick' or 'standard' (the paper tier trains on all 50,000 too), got {tier!r}."
        )
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"format": FORMAT, "tier": tier, "seed": seed, "splits": {}}
    for split in ("train", "test"):
        s = load_image_set(data, split=split)
        images, labels = s.images, s.labels
        if split == "train":
            idx = balanced_subset(labels, TIERS[tier].subset if subset is None else subset, seed)
            images, labels = images[idx], labels[idx]
        hwc = images.permute(0, 2, 3, 1).contiguous().numpy()
        codes, offsets = encode(hwc)
        # Cut into parts of at most max_part_mb of codes, at image boundaries.
        limit, parts, start = int(max_part_mb * 2**20), [], 0
        while start < len(hwc):
            end = int(np.searchsorted(offsets, offsets[start] + limit, side="right")) - 1
            end = max(end, start + 1)
            name = f"{split}-{len(parts)}.npz"
            part_codes = codes[offsets[start] : offsets[end]]
            np.savez(out / name, codes=part_codes, offsets=offsets[start : end + 1] - offsets[start])
            parts.append(name)
            start = end
        manifest["splits"][split] = {
            "images": len(hwc),
            "parts": parts,
            "labels": labels.numpy().astype(np.int64).tolist(),
            "sha256_images": _sha256(hwc),
        }
    (out / "manifest.json").write_text(json.dumps(manifest) + "\n")
    return manifest


def unpack(folder: Path, out: Path) -> None:
    """Decode every part, check it against the manifest and write the bench's ``.npz``."""
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{folder}/manifest.json has format {manifest.get('format')!r}; this script reads {FORMAT}.")
    arrays = {}
    for split, info in manifest["splits"].items():
        missing = [p for p in info["parts"] if not (folder / p).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks {missing}: upload every part before unpacking.")
        chunks = []
        for name in info["parts"]:
            with np.load(folder / name) as part:
                chunks.append(decode(part["codes"], part["offsets"]))
        images = np.concatenate(chunks)
        if len(images) != info["images"] or _sha256(images) != info["sha256_images"]:
            raise ValueError(f"{split} images do not match the manifest's sha256: a part is damaged; pack again.")
        arrays[f"x_{split}"], arrays[f"y_{split}"] = images, np.asarray(info["labels"], dtype=np.int64)
    np.savez(out, **arrays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="encode a tier's images into a folder")
    p.add_argument("--data", required=True, help="CIFAR-10 .npz or torchvision root")
    p.add_argument("--tier", default="quick", help="quick (its 10,000-image subset) or standard (all 50,000)")
    p.add_argument("--seed", type=int, default=0, help="the bench's seed (picks the quick subset)")
    p.add_argument("--subset", type=int, default=None, help="training images to pack (default: the tier's)")
    p.add_argument("--max-part-mb", type=float, default=45.0, help="largest part, MiB of codes")
    p.add_argument("--out", required=True, type=Path)
    u = sub.add_parser("unpack", help="decode a packed folder into the bench's .npz")
    u.add_argument("folder", type=Path)
    u.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    if args.command == "pack":
        manifest = pack(args.data, args.tier, args.out, args.seed, args.max_part_mb, args.subset)
        size = sum((args.out / n).stat().st_size for s in manifest["splits"].values() for n in s["parts"])
        counts = ", ".join(f"{split}: {info['images']} images" for split, info in manifest["splits"].items())
        print(f"packed {counts} into {args.out} ({size / 2**20:.1f} MiB)")
    else:
        unpack(args.folder, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
