"""Draws Figure 2 of the paper from the curves `table2.run_table2` records.

Validation accuracy against training steps for every net, with Inception's best accuracy as a
dashed line and a dot where each net first reaches it (the steps Table 2 counts). matplotlib's
object API with the Agg canvas: no pyplot, no display, no global state.

Example:

```python
import json
from keras_bn.train.experiments.table2_plot import plot_figure2

plot_figure2(json.load(open("runs/table2/table2.json")), "figure2.png")
```
"""

from __future__ import annotations

_STYLES = {  # folder -> (color, line style); the paper's Figure 2 draws the first five
    "inception": ("black", "-"),
    "bn_baseline": ("tab:blue", "-"),
    "bn_x5": ("tab:green", "-"),
    "bn_x30": ("tab:red", "-"),
    "bn_x5_sigmoid": ("tab:purple", "--"),
    "inception_sigmoid": ("tab:gray", ":"),
}


def plot_figure2(result, path, *, dpi=120):
    """Writes the figure to `path` (format from its extension); returns `path`.

    Args:
        result: the dict saved as `table2.json` (`"curves"`, `"table"`).
        path: output file.
        dpi: resolution.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    table = result["table"]
    target = table["inception"]["best_accuracy"]
    best = max(row["best_accuracy"] for row in table.values())
    for ax, low in zip(fig.subplots(1, 2), (0.0, max(0.0, target - 0.05)), strict=True):
        for key, (color, style) in _STYLES.items():
            curve, row = result["curves"][key], table[key]
            label = row["label"]
            ax.plot(curve["steps"], curve["accuracy"], color=color, linestyle=style, label=label)
            if row["steps_to_inception_best"] is not None:
                ax.plot(row["steps_to_inception_best"], target, "o", color=color, markersize=5)
        ax.axhline(target, color="black", linewidth=0.8, linestyle="--", alpha=0.6)
        ax.set_xlabel("training steps (batch 32)")
        ax.set_ylabel("validation accuracy (single crop)")
        ax.set_ylim(low, 1.0 if low == 0 else min(1.0, best + 0.01))
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    ax.set_title(f"zoomed on Inception's best ({target:.2%}, dashed); dots: first reached")
    ax.legend(loc="lower right")
    fig.suptitle("Figure 2: Inception and its batch-normalized variants")
    fig.savefig(path)
    return path
