"""The bench's outputs for people: a Markdown table in the paper's layout and a grouped bar chart."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

from ..utils import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["accuracy_grid", "column_label", "format_table", "write_table", "write_chart"]

_warned: list[bool] = []  # warn once per process about a missing matplotlib


def accuracy_grid(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """``{defense: {column: test accuracy in %, or None if not run yet}}``, plus ``"mean"`` over the poisons."""
    acc = {(c["poison"], c["defense"]): 100 * c["test_accuracy"] for c in results["cells"]}
    poisons = [c for c in results["columns"] if c != "clean"]
    grid: dict[str, dict[str, float | None]] = {}
    for defense in results["defenses"]:
        row: dict[str, float | None] = {col: acc.get((col, defense)) for col in results["columns"]}
        values = [row[p] for p in poisons]
        row["mean"] = sum(values) / len(values) if poisons and None not in values else None  # type: ignore[arg-type]
        grid[defense] = row
    return grid


def column_label(column: str) -> str:
    """``"lsp"`` -> ``"LSP"``, ``"rem[train_steps=1000]"`` -> ``"REM[train_steps=1000]"``; clean and mean as they are."""
    if column in ("clean", "mean"):
        return column
    name, bracket, rest = column.partition("[")
    return name.upper() + bracket + rest


def format_table(results: dict[str, Any]) -> str:
    """Markdown: rows = defenses, columns = clean, each poison, mean over poisons (test accuracy %)."""
    grid = accuracy_grid(results)
    columns = [*results["columns"], "mean"]
    head = "| defense | " + " | ".join(column_label(c) for c in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for defense, row in grid.items():
        cells = ["—" if row[c] is None else f"{row[c]:.1f}" for c in columns]
        lines.append(f"| {defense} | " + " | ".join(cells) + " |")
    cells = results["cells"]
    tier = results.get("tier", {})
    n_test = cells[0]["test_images"] if cells else "?"
    note = (
        f"\nTest accuracy (%) on {n_test} held-out CIFAR-10 test images; tier `{tier.get('name')}` "
        f"({tier.get('about')}); seed {results['config']['seed']}; eclipse-transforms {results['version']}. "
        "`mean` averages the poison columns (not clean).\n"
    )
    return "\n".join(lines) + "\n" + note


def write_table(results: dict[str, Any], path: Path) -> None:
    atomic_write(Path(path), format_table(results).encode())


def write_chart(results: dict[str, Any], path: Path) -> bool:
    """Grouped bars (one group per column, one bar per defense) as a PNG. Returns False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned:
            logger.warning(
                "matplotlib is not installed, so no chart is drawn: pip install 'eclipse-transforms[bench]'"
            )
            _warned.append(True)
        return False
    grid = accuracy_grid(results)
    columns = [*results["columns"], "mean"]
    width = 0.8 / max(len(grid), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(columns) + 2), 4.6))
    for i, (defense, row) in enumerate(grid.items()):
        xs = [j + (i - (len(grid) - 1) / 2) * width for j in range(len(columns))]
        ax.bar(xs, [row[c] or 0.0 for c in columns], width, label=defense)
    # a poison's settings go under its name, one per line, so long labels do not run into their neighbours
    labels = [column_label(c).replace("[", "\n[").replace(",", ",\n") for c in columns]
    ax.set_xticks(range(len(columns)), labels)
    below = 0.1 + 0.05 * max(label.count("\n") for label in labels)  # the legend goes under the longest label
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"eclipse-transforms bench, tier {results['tier']['name']}")
    ax.grid(axis="y", alpha=0.3)
    clean = grid.get("none", {}).get("clean")
    if clean is not None:
        ax.axhline(clean, color="0.3", linestyle="--", linewidth=0.8, label="clean data, no defense")
    ax.legend(fontsize=8, ncol=min(4, len(grid) + 1), loc="upper center", bbox_to_anchor=(0.5, -below), frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write(Path(path), buf.getvalue())
    return True
