"""Each defense's clean-data cost against its mean and its worst poison column, the attack crafted through the
defense itself included: the frontier issue 30 asks for where its targets are not met.

    python benchmarks/frontier.py                 # quick tier: the committed quick and defense-search cells
    python benchmarks/frontier.py --tier standard

reads the committed bench cells (no training) and prints a Markdown table. On the quick tier a row's *adaptive*
column is the lowest of the attacks crafted through that defense's own stages (the bench's ADP through ECLIPSE for
ECLIPSE; EM-style ADP through JPEG q10 for ISS-JPEG; ADP and REM through the squeeze for the squeeze and its PGD
variants, the REM one modelling adversarial training too; for the squeeze with 400 trusted images also the ADPs that
model them, seen once or five times an epoch); on the standard tier it is the bench's ADP column
(crafted through ECLIPSE; the lower of its float32 and bfloat16 sets), the column the issue's targets average. A row is *on the frontier* when no other row is at least as good on clean
data, mean and worst column and better on one. Every cell is one seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

SQUEEZE_ADP = "adp[despeckle=true,despeckle_threshold=64,diffusion=false,jpeg_quality=20,repair_border=true,sigma=0.0]"
SQUEEZE_REM = (
    "rem[despeckle=true,despeckle_threshold=64,jpeg_quality=20,lr_decay_steps=120,p_gray=0.4,repair_border=true,"
    "train_steps=300]"
)
THROUGH_SQUEEZE = (SQUEEZE_ADP, SQUEEZE_REM)
STANDARD_ADP = ("adp", "adp[dtype=bfloat16]")  # the standard tier's two ADP sets, both crafted through ECLIPSE
# the ADP through the squeeze that also models the defender's 400 clean images (seen once, or five times, an epoch)
SQUEEZE_CLEAN_ADP = SQUEEZE_ADP.replace("adp[", "adp[clean_images=400,")
SQUEEZE_CLEAN5_ADP = SQUEEZE_ADP.replace("adp[", "adp[clean_images=400,clean_repeat=5,")

# per tier: the cell folders (first found wins), the poison columns, and each row's attacks crafted through it
TIERS = {
    "quick": {
        "folders": ("quick/cells", "defense-search/cells"),
        "columns": ("urp", "lsp", "ar", "ops", "cuda", "em", "sep", "rem[lr_decay_steps=120,train_steps=300]", "tap"),
        "adaptive": {
            "iss-jpeg": ("adp[compensation=false,diffusion=false,jpeg_quality=10]",),
            "eclipse": ("adp[dtype=bfloat16]",),
            "border-despeckle-jpeg": THROUGH_SQUEEZE,
            "border-despeckle-jpeg-at1": THROUGH_SQUEEZE,
            "border-despeckle-jpeg-at2": THROUGH_SQUEEZE,
            "border-despeckle-jpeg-clean400": (*THROUGH_SQUEEZE, SQUEEZE_CLEAN_ADP),
            "border-despeckle-jpeg-clean400x5": (*THROUGH_SQUEEZE, SQUEEZE_CLEAN_ADP, SQUEEZE_CLEAN5_ADP),
        },
        "note": "adaptive: the lowest of the attacks crafted through the row's own stages",
    },
    "standard": {
        "folders": ("standard/cells", "defense-search-standard/cells"),
        "columns": ("urp", "lsp", "ar", "ops", "cuda", "rem", "em[dtype=bfloat16]", "sep[dtype=bfloat16]", "tap"),
        # the standard tier's ADP is crafted through ECLIPSE only, in two sets (float32 and bfloat16, the column's
        # set being switched to the second): every row's adaptive column is the lower of those it was measured on
        "adaptive": {
            d: STANDARD_ADP
            for d in (
                "eclipse",
                "iss-jpeg",
                "border-despeckle-jpeg",
                "border-despeckle-jpeg-clean2000",
                "border-despeckle-jpeg-clean2000x5",
            )
        },
        "note": "adaptive: the bench's ADP crafted through ECLIPSE (through the row's own stages for ECLIPSE only), "
        "the lower of its float32 and bfloat16 sets where the row has cells on both",
    },
}


def cell(folders: list[Path], poison: str, defense: str) -> float | None:
    """A committed cell's test accuracy (%), or None where it was not run."""
    for folder in folders:
        path = folder / f"{poison}__{defense}.json"
        if path.is_file():
            return 100 * json.loads(path.read_text())["test_accuracy"]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", default="quick", choices=sorted(TIERS))
    parser.add_argument("--results", default=str(RESULTS), help="the folder that holds the tiers' cell folders")
    args = parser.parse_args(argv)
    tier = TIERS[args.tier]
    folders = [Path(args.results) / f for f in tier["folders"]]
    rows = {}
    for defense, attacks in tier["adaptive"].items():
        through = [a for a in (cell(folders, p, defense) for p in attacks) if a is not None]
        scores = {c: cell(folders, c, defense) for c in tier["columns"]}
        scores["adaptive"] = min(through) if through else None
        measured = {c: v for c, v in scores.items() if v is not None}
        worst = min(measured, key=measured.get) if measured else None
        rows[defense] = {
            "point": (
                cell(folders, "clean", defense),
                sum(measured.values()) / len(measured) if measured else None,
                measured[worst] if measured else None,
            ),
            "worst": worst,
            "measured": len(measured),
            "columns": len(scores),
            "adaptive": scores["adaptive"],
        }
    complete = {d: r["point"] for d, r in rows.items() if r["measured"] == r["columns"] and None not in r["point"]}
    print(f"| defense ({args.tier} tier) | clean | mean | worst | columns measured | adaptive | frontier |")
    print("|---|---|---|---|---|---|---|")
    for defense, r in rows.items():
        clean, mean, worst = r["point"]
        if defense not in complete:
            frontier = "—"
        else:
            dominated = any(_dominates(other, complete[defense]) for d, other in complete.items() if d != defense)
            frontier = "no" if dominated else "yes"
        print(
            f"| {defense} | {_fmt(clean)} | {_fmt(mean)} | {_fmt(worst)} ({r['worst'] or '—'}) | {r['measured']} of "
            f"{r['columns']} | {_fmt(r['adaptive'])} | {frontier} |"
        )
    print(
        f"\nTest accuracy (%); mean and worst over the columns measured (the {len(tier['columns'])} poison columns and "
        f"the adaptive one); 'frontier' only for rows with every column; {tier['note']}. One seed."
    )
    return 0


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """``a`` is at least as good as ``b`` on clean data, mean and worst column, and better on one."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and a != b


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    raise SystemExit(main())
