"""``training.png``: what a recipe run did, step by step, from its ``summary.json``.

Panels: training / validation loss; validation metrics; global batch size and learning rate
(two axes, one legend); and, when the optimizer exposes per-layer statistics (lbopt's
``last_layer_stats``), each layer's learning rate and its curvature estimate (CBLR/MCLR) or
trust ratio (LAMB/LARS) over the steps -- one thin line per layer coloured by depth, the median
over layers in black.
"""

from __future__ import annotations

from pathlib import Path

PLOTTED_LAYER_STATS = ("lr", "curvature", "trust_ratio")  # per-layer figures kept in the history
_LAYER_TITLES = {
    "lr": "per-layer learning rate",
    "curvature": "per-layer curvature estimate",
    "trust_ratio": "per-layer trust ratio",
}

__all__ = ["PLOTTED_LAYER_STATS", "write_plot"]


def _by_kind(layer_curves: dict[str, list]) -> dict[str, dict[str, list]]:
    """``{"lr/enc.w": [[step, v], ...]}`` -> ``{"lr": {"enc.w": [[step, v], ...]}}`` (layer order kept)."""
    out: dict[str, dict[str, list]] = {}
    for key, points in layer_curves.items():
        kind, _, layer = key.partition("/")
        out.setdefault(kind, {})[layer] = points
    return out


def _layer_panel(ax, kind: str, layers: dict[str, list]) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    cmap = plt.get_cmap("viridis")
    n = len(layers)
    for i, points in enumerate(layers.values()):
        pts = [(s, v) for s, v in points if v is not None]
        if pts:
            s, v = zip(*pts)
            ax.plot(s, v, color=cmap(i / max(1, n - 1)), linewidth=0.6, alpha=0.7)
    steps = sorted({s for points in layers.values() for s, v in points if v is not None})
    if steps:
        med = [
            float(np.median([v for points in layers.values() for s, v in points if s == step and v is not None]))
            for step in steps
        ]
        ax.plot(steps, med, color="black", linewidth=2, label=f"median of {n} layers")
    names = list(layers)
    # legend handles for the colour scale: first and last layer
    ax.plot([], [], color=cmap(0.0), label=f"first: {names[0]}"[:40])
    ax.plot([], [], color=cmap(1.0), label=f"last: {names[-1]}"[:40])
    values = [v for points in layers.values() for _, v in points if v is not None and v > 0]
    if values and max(values) / min(values) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_title(_LAYER_TITLES.get(kind, kind))
    ax.legend(fontsize=7)


def write_plot(summary: dict, path: Path) -> None:
    """Draw the run in ``summary`` (the dict written to summary.json) into the PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer_kinds = {k: v for k, v in _by_kind(summary.get("layer_curves", {})).items() if v}
    n_panels = 3 + len(layer_kinds)
    cols = 3
    rows = (n_panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(15, 4.2 * rows), squeeze=False)
    flat = list(axes.flat)
    _loss_panel(flat[0], summary)
    _metrics_panel(flat[1], summary)
    _batch_lr_panel(flat[2], summary)
    for ax, (kind, layers) in zip(flat[3:], layer_kinds.items()):
        _layer_panel(ax, kind, layers)
    for ax in flat[n_panels:]:
        ax.axis("off")
    batches = [b for _, b in summary["batch_size_trajectory"]] or [summary["global_batch_size"]]
    batch_text = f"{batches[0]}" if min(batches) == max(batches) else f"{batches[0]} -> {batches[-1]}"
    status = summary.get("status", "completed")
    fig.suptitle(
        f"{summary['task']} / {summary['optimizer']}: global batch {batch_text}, "
        f"{summary['steps']} steps, {summary['wall_time_s']:.0f} s" + ("" if status == "completed" else f" [{status}]")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _loss_panel(ax, summary: dict) -> None:
    pts = [(s, v) for s, v in summary["loss_curve"] if v is not None]
    if pts:
        steps, losses = zip(*pts)
        ax.plot(steps, losses, label="train loss")
    evals = [e for e in summary["evals"] if e.get("eval_loss") is not None]
    if evals:
        ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval loss")
    skipped = summary.get("skipped_at_steps") or []
    for i, step in enumerate(skipped):
        ax.axvline(step, color="red", alpha=0.3, label="skipped step" if i == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_title("loss")
    ax.legend()


def _metrics_panel(ax, summary: dict) -> None:
    evals = summary["evals"]
    keys = [
        k for k in (evals[0] if evals else {}) if k.startswith("eval_") and k not in ("eval_loss", "eval_perplexity")
    ]
    for key in keys:
        ax.plot([e["step"] for e in evals], [e[key] for e in evals], "o-", label=key)
    ax.set_xlabel("optimizer step")
    ax.set_title("validation metrics")
    if keys:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no evaluation", ha="center", va="center", transform=ax.transAxes, color="gray")


def _batch_lr_panel(ax, summary: dict) -> None:
    ax.set_xlabel("optimizer step")
    ax.set_title("batch size and learning rate")
    if not summary["batch_size_trajectory"]:
        return
    s, b = zip(*summary["batch_size_trajectory"])
    (batch_line,) = ax.step(s, b, where="post", color="C2", label="global batch (left)")
    ax.set_ylabel("global batch size")
    ax.set_ylim(0, 1.15 * max(b))
    twin = ax.twinx()
    ls, lr = zip(*summary["lr_curve"])
    (lr_line,) = twin.plot(ls, lr, color="C3", label="learning rate (right)")
    twin.set_ylabel("learning rate")
    ax.legend(handles=[batch_line, lr_line], loc="lower right", fontsize=8)
