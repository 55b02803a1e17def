"""results.png: the study's metric (validation loss, or a DPO study's reward accuracy) against training tokens per
trial, and its final value over the lr × batch grid (lr × β where β was searched)."""

from __future__ import annotations

import io
import math


def plot_results(rows: list[dict], best: dict, metric) -> bytes:
    """PNG bytes of the two panels; diverged trials are marked with a red ×, the best with a star. `metric`: the
    study's (tune.study.Metric), its better values darker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    label, across = metric.label, "beta" if "beta" in best else "global_batch"
    fig, (curves, grid) = plt.subplots(1, 2, figsize=(13, 5))
    for r in rows:
        beta = f", β {r['beta']:.3g}" if "beta" in r else ""
        name = f"lr {r['lr']:.1e}{beta}, B {r['global_batch']} ({r['status']})"
        if r["curve"]:
            tokens, values = zip(*r["curve"])
            curves.plot(tokens, values, marker="o", lw=2.5 if r is best else 1.2, label=name,
                        ls="--" if r["status"] != "completed" else "-")
        if r["status"] == "diverged":
            curves.plot([], [], "rx", label=name)
    curves.set(xlabel="training tokens", ylabel=label, title=f"{label} at equal-token marks")
    curves.legend(fontsize=7)
    curves.grid(alpha=0.3)

    ok = [r for r in rows if math.isfinite(r["final"]) and r["status"] != "diverged"]
    if ok:
        points = grid.scatter([r["lr"] for r in ok], [r[across] for r in ok], c=[r["final"] for r in ok],
                              cmap="viridis_r" if metric.mode == "min" else "viridis", s=90, edgecolors="k")
        fig.colorbar(points, ax=grid, label=f"final {label} (stopped early: at its last mark)")
    bad = [r for r in rows if r["status"] == "diverged"]
    grid.scatter([r["lr"] for r in bad], [r[across] for r in bad], marker="x", c="red", s=90, label="diverged")
    grid.scatter([best["lr"]], [best[across]], marker="*", c="gold", s=400, edgecolors="k", label="best")
    ylabel = "DPO β" if across == "beta" else "global batch (sequences)"
    grid.set(xscale="log", yscale="log", xlabel="peak learning rate", ylabel=ylabel,
             title=f"final {label} over lr × {'β' if across == 'beta' else 'batch'}")
    if across == "global_batch":
        batches = sorted({r["global_batch"] for r in rows})
        grid.set_yticks(batches, labels=[str(b) for b in batches])
        grid.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    grid.legend(fontsize=8)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)
    return out.getvalue()
