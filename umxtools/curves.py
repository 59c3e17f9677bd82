"""``curves.png``: the loss curves of every run in a model folder, redrawn as training goes.

One figure per folder (:attr:`umxtools.model_folder.RunFiles.curves`), drawn from the runs'
``<run>.history.csv`` files, so runs trained side by side in one folder share it.
"""

from __future__ import annotations

import math

from umxtools import fileio
from umxtools.model_folder import RunFiles, read_history


def write_curves(files: RunFiles) -> None:
    """``curves.png``: train (dashed) and valid (solid) loss per epoch of every run in the folder,
    the epoch of the kept weights marked (on the train loss for a run without validation)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: training runs on servers
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    runs = {}
    for p in sorted(files.folder.glob("*.history.csv")):
        try:
            runs[p.name[: -len(".history.csv")]] = read_history(p)
        except (OSError, ValueError, KeyError):
            continue  # another process is rewriting it: its next epoch redraws the figure
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    # fixed margins: tight_layout measures every label and costs more than the drawing (0.7 s)
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.12, top=0.92)
    values = []
    for k, (name, rows) in enumerate(runs.items()):
        color = f"C{k % 10}"
        epochs = [r["epoch"] for r in rows]
        validated = any("valid_loss" in r for r in rows)  # a run without --valid has none
        for key, style in (("train_loss", "--"), ("valid_loss", "-")):
            if key == "valid_loss" and not validated:
                continue
            ys = [r.get(key, math.nan) for r in rows]
            values += [y for y in ys if math.isfinite(y)]
            ax.plot(epochs, ys, style, color=color, label=f"{name} {key.split('_')[0]}")
        best = [r["epoch"] for r in rows if r.get("best")]
        if best:
            row = next(r for r in rows if r["epoch"] == best[-1])
            ax.plot([best[-1]], [row["valid_loss" if validated else "train_loss"]], "o", color=color)
    if values and min(values) > 0:
        ax.set_yscale("log")  # MSE losses span decades; SDR losses are negative and stay linear
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%.3g"))
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(files.folder.name)
    ax.grid(True, alpha=0.3)
    if runs:
        ax.legend(fontsize="small")
    with fileio.atomic(files.curves) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
