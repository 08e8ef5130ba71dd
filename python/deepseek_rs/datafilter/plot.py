"""PNG of the signal distributions of a run, with the stage-1 thresholds marked (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Union

import numpy as np


def plot_signals(stats: Dict[str, Any], path: Union[str, Path]) -> None:
    """One histogram per signal from ``stats["histograms"]``; thresholds as red lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hists = stats["histograms"]
    names = list(hists)
    cols = 6
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        h = hists[name]
        counts = np.asarray(h["counts"])
        edges = np.linspace(h["low"], h["high"], len(counts) + 1)
        ax.stairs(counts, edges, fill=True, alpha=0.6)
        for t in stats.get("thresholds", []):
            if t["signal"] != name:
                continue
            for bound in (t["min"], t["max"]):
                if bound is not None:
                    x = np.log10(1 + bound) if h["log10_1p"] else bound
                    ax.axvline(x, color="red", linewidth=1)
        ax.set_title(name + (" (log10 1+x)" if h["log10_1p"] else ""), fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(
        f"{stats['read']} documents read, {stats['kept']} kept, {stats['dropped']} dropped", fontsize=10
    )
    fig.subplots_adjust(left=0.03, right=0.99, bottom=0.04, top=0.93, hspace=0.45, wspace=0.25)
    tmp = Path(str(path) + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
