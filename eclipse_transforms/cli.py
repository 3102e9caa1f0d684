"""eclipse-transforms: the command line, a thin layer over the library's API.

eclipse-transforms demo   [--out grid.png]                 # purify generated poisoned images, write a grid
eclipse-transforms purify INPUT OUTPUT [--steps --dtype]   # ImageFolder / CIFAR root / .npz -> folder or .npz
eclipse-transforms info   [--weights PATH_OR_REPO]         # which weights, their config
eclipse-transforms train  --data D --output-dir O [...]    # train a denoiser on a sparse clean set
eclipse-transforms bench  --data D --poisons lsp,ar --tier quick   # poisons x defenses -> table, chart
                          [--report-only]                  # tabulate finished cells, train nothing
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from .purify import EclipsePurify

_Config = TypeVar("_Config", bound="DataclassInstance")  # TrainConfig, BenchConfig

__all__ = ["main"]


# The options that set the diffusion, which the squeeze recipe does not run.
_DIFFUSION_OPTIONS = ("weights", "revision", "t_star", "steps", "dtype")


def _add_purify_options(p: argparse.ArgumentParser) -> None:
    from .denoiser import DTYPES
    from .purify import DEFAULT_RECIPE, DEFAULT_STEPS, RECIPES

    p.add_argument(
        "--recipe",
        choices=RECIPES,
        default=DEFAULT_RECIPE,
        help=f"squeeze: border repair, despeckle, JPEG q20 (the bench's best); eclipse: the paper's diffusion "
        f"(default: {DEFAULT_RECIPE}); the options below up to --dtype need --recipe eclipse",
    )
    p.add_argument("--weights", default=None, help="denoiser folder or Hub repo id (default: bundled CIFAR-10)")
    p.add_argument("--revision", default=None, help="Hub revision of --weights")
    p.add_argument("--t-star", type=int, default=None, help="diffusion time t* (default: 100, the paper's)")
    p.add_argument(
        "--steps",
        default=None,
        help=f"reverse steps; 'paper' for t* ancestral steps (default: {DEFAULT_STEPS})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the purification noise (default: 0)")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="images per denoiser batch (default: 256)")
    p.add_argument("--device", default=None, help="'cpu', 'cuda', ... (default: cpu)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=tuple(DTYPES),
        help="the UNet's precision; bfloat16 is faster on CPUs with AVX512-BF16/AMX and on GPUs (default: float32 "
        "on a CPU, bfloat16 or float16 on a CUDA device)",
    )


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for ints >= ``minimum``."""

    what = "a positive int" if minimum == 1 else f"an int >= {minimum}"

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {number}")
        return number

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _steps(value: str) -> int | None:
    if value in ("paper", "none", "None"):
        return None
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"--steps must be an int or 'paper', got {value!r}.") from None


def _make_purify(args: argparse.Namespace) -> EclipsePurify:
    """The command's ``EclipsePurify``, without its per-access compensation (the commands write purified images)."""
    from . import EclipsePurify, load_denoiser

    if args.recipe != "eclipse":
        given = [f"--{name.replace('_', '-')}" for name in _DIFFUSION_OPTIONS if getattr(args, name) is not None]
        if given:
            raise SystemExit(
                f"{', '.join(given)} set{'s' if len(given) == 1 else ''} the diffusion, which --recipe "
                f"{args.recipe} does not run; add --recipe eclipse."
            )
        purify = EclipsePurify(recipe=args.recipe, seed=args.seed, compensation=None)
        return purify if args.device is None else purify.to(args.device)
    den = load_denoiser(args.weights, revision=args.revision, device=args.device, dtype=args.dtype)
    settings = {} if args.t_star is None else {"t_star": args.t_star}
    if args.steps is not None:
        settings["steps"] = _steps(args.steps)
    return EclipsePurify(den, recipe="eclipse", seed=args.seed, compensation=None, **settings)


def _start_distributed(args: argparse.Namespace) -> int | None:
    """Under torchrun (``WORLD_SIZE`` > 1), join the job's process group (gloo on CPU, nccl on CUDA) and give each
    rank its own GPU; return this process's rank, or None outside a multi-process job."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    import torch.distributed as dist

    if args.device == "auto":  # the trainer's choice, which it makes per rank
        cuda = torch.cuda.is_available()
    else:
        cuda = args.device is not None and torch.device(args.device).type == "cuda"
        if cuda and torch.device(args.device).index is None:
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank()


def _on_every_rank(args: argparse.Namespace, work: Callable[[], object], note: str | None = None) -> int:
    """Run ``work()`` alone or as this process's rank of a torchrun job; the only process, or rank 0, says what
    ``work`` wrote (on stdout) and then ``note`` (on stderr)."""
    rank = _start_distributed(args)
    try:
        out = work()
    finally:
        if rank is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank in (None, 0):
        print(f"wrote {out}", flush=True)
        if note:
            print(note, file=sys.stderr)
    return 0


def _cmd_purify(args: argparse.Namespace) -> int:
    from ._purify_files import purify_files
    from .purify import recipe_settings

    per_epoch = recipe_settings(args.recipe)["compensation"]
    note = (
        f"note: the output holds --recipe {args.recipe}'s one-time stages; its per-epoch stage, {per_epoch!r}, is "
        "part of the defense: add it to your training transform (eclipse_transforms, redrawn every epoch; "
        "docs/usage.md), or train through PurifiedDataset, which applies it."
    )

    return _on_every_rank(
        args,
        lambda: purify_files(
            args.input,
            args.output,
            _make_purify(args),
            split=args.split,
            batch_size=args.batch_size,
            cache_dir=args.cache_dir,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            num_workers=args.num_workers,
        ),
        note=note,
    )


def _cmd_info(args: argparse.Namespace) -> int:
    from . import __version__, load_denoiser
    from .denoiser import bundled_weights_path

    den = load_denoiser(args.weights, revision=args.revision)
    info = {
        "eclipse_transforms": __version__,
        "weights": den.source,
        "path": str(bundled_weights_path()) if args.weights is None else args.weights,
        "parameters": sum(p.numel() for p in den.unet.parameters()),
        "t_max": den.t_max,
        "fingerprint": den.fingerprint,
        "used_by": "recipe='eclipse' (or diffusion=True); the default recipe, the squeeze, loads no denoiser",
        "unet": {k: v for k, v in dict(den.unet.config).items() if not k.startswith("_")},
        "scheduler": {k: v for k, v in dict(den.scheduler.config).items() if not k.startswith("_")},
    }
    print(json.dumps(info, indent=2, default=str))
    return 0


def _add_config_options(p: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of a config dataclass, typed from its annotation, with its help and default."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING
        value: Any = f.default  # the field's default (MISSING where required)
        help_ = f.metadata.get("help", "")
        kind = str(f.type)
        if kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=help_)
        elif kind.startswith("tuple[int"):
            default = list(value) if value else None
            p.add_argument(flag, type=int, nargs="+", default=default, help=f"{help_} (default: {default})")
        elif kind.startswith("tuple[str"):
            p.add_argument(flag, default=",".join(value), help=f"{help_} (default: {','.join(value)})")
        else:
            conv = int if kind.startswith("int") else float if kind.startswith("float") else str
            extra = {"required": True} if required else {"default": value}
            shown = required or "default" in help_
            p.add_argument(flag, type=conv, help=help_ if shown else f"{help_} (default: {value})", **extra)


def _config_from_args(cls: type[_Config], args: argparse.Namespace, **extra: Any) -> _Config:
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in names}
    return cls(**values, **extra)


def _train_parser(p: argparse.ArgumentParser) -> None:
    from .training import TrainConfig

    _add_config_options(p, TrainConfig)
    p.add_argument("--resume", action="store_true", help="continue from output-dir's latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output-dir")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and checkpoint) after this long")


def _cmd_train(args: argparse.Namespace) -> int:
    from .training import TrainConfig, train

    return _on_every_rank(
        args,
        lambda: train(
            _config_from_args(TrainConfig, args),
            resume=args.resume,
            overwrite=args.overwrite,
            max_minutes=args.max_minutes,
            progress=not args.no_progress,
        ),
    )


def _cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .bench.report import format_table
    from .bench.runner import BenchConfig, run_bench

    config = _config_from_args(BenchConfig, args, progress=not args.no_progress)
    results = run_bench(config, train=not args.report_only)
    print(format_table(results))
    out = Path(config.output_dir)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'} and {out / 'chart.png'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    result = run_demo(_make_purify(args), out=args.out, data=args.data, num_images=args.num_images)
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0


def _bench_epilog() -> str:
    from .bench import list_defenses, list_poisons
    from .bench.specs import is_model_based

    free = [p for p in list_poisons() if not is_model_based(p)]
    crafted = [p for p in list_poisons() if is_model_based(p)]
    return (
        f"poisons: {', '.join(free)} (model-free: seconds); {', '.join(crafted)} (crafted with a surrogate network: "
        "an hour or more on a 2-core CPU, cached in --cache-dir). A setting is changed as name[key=value], e.g. "
        f"'em[dtype=bfloat16]'; an unknown key lists the settable ones. defenses: {', '.join(list_defenses())}."
    )


COMMANDS = ("demo", "purify", "info", "train", "bench")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser. With ``command`` other than ``"bench"``, the bench's options (and the import of its
    crafting code) are left out: ``demo``, ``purify``, ``info`` and ``train`` start without them."""
    parser = argparse.ArgumentParser(prog="eclipse-transforms", description=__doc__.split("\n")[0])
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="purify poisoned images and write a before/after grid")
    _add_purify_options(p)
    p.add_argument("--out", default="eclipse-demo.png", help="PNG grid to write (default: eclipse-demo.png)")
    p.add_argument(
        "--data", default=None, help="an .npz/CIFAR root/ImageFolder to take images from (default: generated images)"
    )
    p.add_argument("--num-images", type=_positive_int, default=8, help="images to purify (default: 8)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("purify", help="purify an ImageFolder tree, CIFAR root or .npz")
    p.add_argument("input", help="ImageFolder root, torchvision CIFAR-10 root, or .npz of uint8 images")
    p.add_argument("output", help="an .npz file, or a folder (written as an ImageFolder tree of PNGs)")
    p.add_argument("--split", default="train", help="CIFAR / .npz split: train or test (default: train)")
    p.add_argument("--cache-dir", default=None, help="resumable work cache (default: ~/.cache/eclipse-transforms)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument(
        "--num-workers",
        type=_non_negative_int,
        default=0,
        help="processes that decode an ImageFolder input while the denoiser runs (default: 0, in this process)",
    )
    _add_purify_options(p)
    p.set_defaults(func=_cmd_purify)

    p = sub.add_parser("info", help="print the denoiser weights that recipe='eclipse' uses, and their config")
    p.add_argument("--weights", default=None)
    p.add_argument("--revision", default=None)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("train", help="train a denoiser on a sparse clean set")
    _train_parser(p)
    p.set_defaults(func=_cmd_train)

    bench_help = "train classifiers on poisoned data under each defense; write table and chart"
    if command not in (None, "bench"):
        sub.add_parser("bench", help=bench_help)
        return parser
    from .bench.runner import BenchConfig

    p = sub.add_parser("bench", help=bench_help, epilog=_bench_epilog())
    _add_config_options(p, BenchConfig, skip=("progress",))
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: tabulate the cells already in --output-dir that match these settings",
    )
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    command = next((w for w in words if w in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, OSError) as e:
        print(f"eclipse-transforms {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
