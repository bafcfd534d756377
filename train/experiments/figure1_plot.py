"""Draws the paper's Figure 1 from the curves `figure1.run_figure1` records.

Three panels, as in the paper: (a) test accuracy against training steps for both nets;
(b) the 15th, 50th and 85th percentiles of one sigmoid input of the last hidden layer of the
baseline; (c) the same for the BN net. Panels (b) and (c) share their y axis, so the drift
without BN and the stability with BN are drawn to the same scale.

Uses matplotlib's object API with the Agg canvas (no pyplot, no display, no global state).

Example:

```python
import json
from keras_bn.train.experiments.figure1_plot import plot_figure1

plot_figure1(json.load(open("runs/figure1/figure1.json")), "figure1.png")
```
"""

from __future__ import annotations

import numpy as np

_COLORS = {"baseline": "tab:blue", "bn": "tab:red"}
_LABELS = {"baseline": "Without BN", "bn": "With BN"}


def _steps_formatter(value, _):
    return f"{value / 1000:g}K" if value else "0"


def accuracy_ylim(steps, accuracies):
    """y limits of panel (a)'s inset: zoom on the part after the first 10% of training.

    The first evaluations (near chance for a slowly starting baseline) would otherwise squash
    the part where the nets differ; the panel itself shows them.

    Args:
        steps: the evaluation steps.
        accuracies: list of accuracy lists, one per net.

    Returns:
        `(low, high)` within [0, 1].
    """
    steps = np.asarray(steps)
    late = steps >= 0.1 * steps[-1]
    low = min(float(np.min(np.asarray(a)[late])) for a in accuracies)
    low = max(0.0, min(low - 0.02, 0.9))
    return low, 1.0


def plot_figure1(curves, path, *, dpi=120):
    """Writes the three-panel figure to `path` (format from its extension, e.g. ".png").

    Args:
        curves: the dict saved as `figure1.json`: `"steps"`, and for `"baseline"` and `"bn"`
            `"test_accuracy"` and `"sigmoid_input_percentiles"` (`"p15"`, `"p50"`, `"p85"`);
            `"config"` with `"percentile_unit"` and `"percentile_examples"` for the titles.
        path: output file.
        dpi: resolution.

    Returns:
        `path`.
    """
    draw_figure1(curves, dpi=dpi).savefig(path)
    return path


def draw_figure1(curves, *, dpi=120):
    """The figure `plot_figure1` writes, as a matplotlib `Figure` (panels (a), (b), (c))."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    steps = np.asarray(curves["steps"])
    config = curves.get("config", {})
    fig = Figure(figsize=(15, 4.2), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax_a, ax_b, ax_c = fig.subplots(1, 3)

    # The whole curves on the panel, the late part (where the nets differ by a point) zoomed
    # in an inset that carries the legend, so that nothing is drawn off the axes or covered.
    accuracies = [curves[n]["test_accuracy"] for n in _COLORS]
    zoom = ax_a.inset_axes([0.35, 0.08, 0.6, 0.55])
    for ax in (ax_a, zoom):
        for name in ("bn", "baseline"):
            ax.plot(steps, curves[name]["test_accuracy"], color=_COLORS[name], label=_LABELS[name])
    low = min(min(a) for a in accuracies)
    ax_a.set_ylim(max(0.0, low - 0.02), 1.0)
    zoom.set_ylim(*accuracy_ylim(steps, accuracies))
    zoom.set_xlim(0.1 * steps[-1], steps[-1])
    zoom.xaxis.set_major_formatter(FuncFormatter(_steps_formatter))
    zoom.tick_params(labelsize="x-small")
    zoom.grid(alpha=0.3)
    zoom.legend(loc="lower right", fontsize="small")
    ax_a.set_title("(a) Test accuracy")
    ax_a.set_ylabel("test accuracy")

    unit = config.get("percentile_unit", 0)
    examples = config.get("percentile_examples")
    for ax, name, letter in ((ax_b, "baseline", "b"), (ax_c, "bn", "c")):
        p = curves[name]["sigmoid_input_percentiles"]
        color = _COLORS[name]
        ax.fill_between(steps, p["p15"], p["p85"], color=color, alpha=0.15, linewidth=0)
        ax.plot(steps, p["p85"], color=color, linewidth=1, linestyle="--", label="85th pct")
        ax.plot(steps, p["p50"], color=color, linewidth=2, label="50th pct")
        ax.plot(steps, p["p15"], color=color, linewidth=1, linestyle=":", label="15th pct")
        ax.set_title(f"({letter}) {_LABELS[name]}: sigmoid input, last hidden layer")
        ax.set_ylabel(f"input of hidden3 unit {unit}")
        ax.legend(loc="best", fontsize="small")  # where it covers the least of the curves
    values = np.concatenate(
        [curves[n]["sigmoid_input_percentiles"][k] for n in _COLORS for k in ("p15", "p85")]
    )
    span = float(values.max() - values.min()) or 1.0
    for ax in (ax_b, ax_c):
        ax.set_ylim(values.min() - 0.05 * span, values.max() + 0.05 * span)

    for ax in (ax_a, ax_b, ax_c):
        ax.set_xlabel("training steps")
        ax.set_xlim(steps[0], steps[-1])
        ax.xaxis.set_major_formatter(FuncFormatter(_steps_formatter))
        ax.grid(alpha=0.3)
    if examples:
        fig.suptitle(
            f"MNIST, 3 x 100 sigmoid, batch {config.get('batch_size', 60)}, SGD lr "
            f"{config.get('learning_rate')}; percentiles over the first {examples} test images "
            "in training mode",
            fontsize="medium",
        )
    return fig
