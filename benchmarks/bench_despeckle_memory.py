"""Peak memory and time of ``functional.despeckle`` on a whole training set: in chunks (as it runs now) against the
whole batch at once (as it ran before: the 3x3 neighbourhoods are nine copies of the batch).

    python benchmarks/bench_despeckle_memory.py [--images 50000]

Each mode runs in its own process (peak RSS is per process); prints one line each, with the CPU.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import torch

from eclipse_transforms.utils import hardware_name


def _run(mode: str, images: int) -> None:
    from eclipse_transforms import functional as EF

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (images, 3, 32, 32), generator=gen, dtype=torch.uint8).float() / 255
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "whole":
        EF._DESPECKLE_CHUNK_PIXELS = 1 << 62  # one chunk: the whole batch's neighbourhoods at once
    start = time.perf_counter()
    EF.despeckle(x, threshold=64 / 255)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(
        f"{mode:8s} {images} CIFAR-sized images: {seconds:6.1f} s, peak RSS {peak / 2**20:5.2f} GiB "
        f"(the input alone: {before / 2**20:.2f} GiB)",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50000)
    parser.add_argument("--mode", choices=["chunked", "whole"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode:
        _run(args.mode, args.images)
        return 0
    print(hardware_name())
    for mode in ("whole", "chunked"):
        subprocess.run([sys.executable, __file__, "--mode", mode, "--images", str(args.images)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
