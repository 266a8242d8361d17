"""Optimizer step time of each lbopt optimizer vs torch.optim.AdamW(foreach=True).

Same ~50M-parameter set (the tensor shapes of a 10-block transformer, d=640, ff=2560),
same fixed gradients, one process. Rounds are interleaved (every optimizer once per
round) so machine noise hits all of them alike; the figure is the median over rounds and
the ratio is against AdamW measured in the same run.

    python bench/step_time.py [--rounds 5] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

import lbopt


def transformer_shapes(blocks: int = 10, d: int = 640, ff: int = 2560, vocab: int = 0) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    for _ in range(blocks):
        shapes += [(d, d), (d,)] * 4  # q, k, v, o
        shapes += [(ff, d), (ff,), (d, ff), (d,)]  # feed-forward
        shapes += [(d,), (d,)] * 2  # two LayerNorms
    if vocab:
        shapes.append((vocab, d))
    return shapes


def make_params(shapes: list[tuple[int, ...]], seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=g) * 0.02)
        p.grad = torch.randn(shape, generator=g) * 1e-3
        params.append(p)
    return params


OPTIMIZERS = {
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    "LARS": lambda ps: lbopt.LARS(ps, lr=1.0, weight_decay=1e-4),
    "LAMB": lambda ps: lbopt.LAMB(ps, lr=1e-3),
    "CBLR": lambda ps: lbopt.CBLR(ps, lr=1.0, weight_decay=1e-4),
    "MCLR": lambda ps: lbopt.MCLR(ps, lr=1.0, weight_decay=1e-4),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per optimizer per round")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    shapes = transformer_shapes()
    runs = {}
    for name, make in OPTIMIZERS.items():
        params = make_params(shapes)
        opt = make(params)
        opt.step()  # allocate state outside the timing
        opt.step()
        runs[name] = (params, opt)
    n_params = sum(p.numel() for p in runs["AdamW"][0])
    times: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for name, (_, opt) in runs.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            times[name].append((time.perf_counter() - t0) / args.steps)

    base = statistics.median(times["AdamW"])
    rows = []
    print(f"\n{n_params / 1e6:.1f}M parameters, {len(shapes)} tensors, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'optimizer':<8} {'step ms':>9} {'vs AdamW':>9}")
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"optimizer": name, "step_ms": med * 1e3, "ratio_vs_adamw": med / base})
        print(f"{name:<8} {med * 1e3:>9.1f} {med / base:>8.2f}x")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_time.json").write_text(json.dumps({"params": n_params, "rows": rows}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([r["optimizer"] for r in rows], [r["ratio_vs_adamw"] for r in rows], color="tab:blue")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("step time / AdamW")
    ax.set_title(f"Optimizer step, {n_params / 1e6:.0f}M params, CPU")
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=120)
    print(f"wrote {out / 'step_time.json'} and {out / 'step_time.png'}")


if __name__ == "__main__":
    main()
