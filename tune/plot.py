"""results.png: validation loss against training tokens per trial, and the final loss over the lr × batch grid."""

from __future__ import annotations

import io
import math


def plot_results(rows: list[dict], best: dict) -> bytes:
    """PNG bytes of the two panels; diverged trials are marked with a red ×, the best with a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (curves, grid) = plt.subplots(1, 2, figsize=(13, 5))
    for r in rows:
        label = f"lr {r['lr']:.1e}, B {r['global_batch']} ({r['status']})"
        if r["curve"]:
            tokens, losses = zip(*r["curve"])
            curves.plot(tokens, losses, marker="o", lw=2.5 if r is best else 1.2, label=label,
                        ls="--" if r["status"] != "completed" else "-")
        if r["status"] == "diverged":
            curves.plot([], [], "rx", label=label)
    curves.set(xlabel="training tokens", ylabel="validation loss", title="validation loss at equal-token marks")
    curves.legend(fontsize=7)
    curves.grid(alpha=0.3)

    ok = [r for r in rows if math.isfinite(r["final_val_loss"]) and r["status"] != "diverged"]
    if ok:
        points = grid.scatter([r["lr"] for r in ok], [r["global_batch"] for r in ok],
                              c=[r["final_val_loss"] for r in ok], cmap="viridis_r", s=90, edgecolors="k")
        fig.colorbar(points, ax=grid, label="final validation loss (stopped early: at its last mark)")
    bad = [r for r in rows if r["status"] == "diverged"]
    grid.scatter([r["lr"] for r in bad], [r["global_batch"] for r in bad], marker="x", c="red", s=90, label="diverged")
    grid.scatter([best["lr"]], [best["global_batch"]], marker="*", c="gold", s=400, edgecolors="k", label="best")
    grid.set(xscale="log", yscale="log", xlabel="peak learning rate", ylabel="global batch (sequences)",
             title="final validation loss over lr × batch")
    batches = sorted({r["global_batch"] for r in rows})
    grid.set_yticks(batches, labels=[str(b) for b in batches])
    grid.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    grid.legend(fontsize=8)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)
    return out.getvalue()
