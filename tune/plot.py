"""results.png: the study's metric (validation loss, or a DPO study's reward accuracy) against training tokens per
trial, and its final value over the lr × batch grid (lr × β, or lr × a source's mix weight, where searched)."""

from __future__ import annotations

import io
import math


def plot_results(rows: list[dict], best: dict, metric, extras: list) -> bytes:
    """PNG bytes of the two panels; diverged trials are marked with a red ×, the best with a star. `metric`: the
    study's (tune.study.Metric), its better values darker; `extras`: what it searched beside lr and batch
    (tune.config.Searched), the first of which is the second panel's y axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    label = metric.label
    across, across_label = (extras[0].key, extras[0].column) if extras else ("global_batch", "global batch (sequences)")
    fig, (curves, grid) = plt.subplots(1, 2, figsize=(13, 5))
    for r in rows:
        searched = "".join(f", {extra.column} {r[extra.key]:.3g}" for extra in extras)
        name = f"lr {r['lr']:.1e}{searched}, B {r['global_batch']} ({r['status']})"
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
    grid.set(xscale="log", yscale="log", xlabel="peak learning rate", ylabel=across_label,
             title=f"final {label} over lr × {across_label.split(' (')[0]}")
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
