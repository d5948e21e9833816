"""Small PNG helpers shared by the analyses and the variants' artifacts.

Matplotlib's object API with an explicit Agg canvas: no pyplot, no global backend switch, safe in
a library that may be imported into someone's notebook.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure drawn by the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: Path) -> Path:
    """Write ``fig`` to ``path`` under a temporary name, then rename: never a half-written PNG."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.tight_layout()
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)
    return path


def grid_heatmap(
    ax: Any,
    rows: Sequence[str],
    columns: Sequence[str],
    cells: dict[tuple[str, str], float],
    *,
    fmt: str = "{:.2f}",
    marked: set[tuple[str, str]] = frozenset(),
    **imshow: Any,
) -> Any:
    """Draw ``cells[(row, column)]`` as a heatmap (NaN where absent), values written in small cells.

    ``marked`` cells get a frame (e.g. LoRA-drop's kept layers). Returns the image for a colorbar.
    """
    from matplotlib.patches import Rectangle

    grid = [[cells.get((r, c), math.nan) for c in columns] for r in rows]
    image = ax.imshow(grid, aspect="auto", **imshow)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    small = len(rows) * len(columns) <= 400
    for i, r in enumerate(rows):
        for j, c in enumerate(columns):
            value = grid[i][j]
            if small and value == value:  # not NaN
                ax.text(j, i, fmt.format(value), ha="center", va="center", color="w", fontsize=6)
            if (r, c) in marked:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    return image
