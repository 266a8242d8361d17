"""Sharpness trace: λ_max against 2/η for one small-batch and one large-batch run, and the probe's cost.

Trains the same MLP (tanh, hashed bag of words of the shipped stdlib-topics texts, 9 classes) with
plain SGD at one learning rate η, once with a small and once with a large batch, and probes the
top Hessian eigenvalue of the training loss (:class:`lbopt.SharpnessMonitor`, fixed probe batch)
every ``--every`` steps. Writes ``bench/results/sharpness_trace.{json,png}`` and prints, per run,
the monitor's time per probe next to the time of one training step (median and spread).

    python bench/sharpness_trace.py                 # ~2-5 minutes on one CPU core
    python bench/sharpness_trace.py --steps 100     # quicker
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lbopt.diagnostics.perturbation import load_task  # noqa: E402
from lbopt.sharpness import SharpnessMonitor, plot_sharpness  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def train(batch_size: int, args, data) -> tuple[SharpnessMonitor, list[float]]:
    (x, y), classes = data
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(x.shape[1], args.hidden), nn.Tanh(), nn.Linear(args.hidden, classes))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    probe = (x[: args.probe], y[: args.probe])

    def loss_fn(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1])

    monitor = SharpnessMonitor(model, loss_fn, probe, every=args.every, iters=args.iters, optimizer=opt)
    gen = torch.Generator().manual_seed(args.seed)
    perm, pos, step_times = torch.randperm(len(x), generator=gen), 0, []
    monitor.probe(0)
    for step in range(1, args.steps + 1):
        if pos + batch_size > len(x):
            perm, pos = torch.randperm(len(x), generator=gen), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        t0 = time.perf_counter()
        opt.zero_grad()
        loss_fn(model, (x[idx], y[idx])).backward()
        opt.step()
        step_times.append(time.perf_counter() - t0)
        monitor.maybe_probe(step)
    return monitor, step_times


def probe_batch_step_seconds(monitor: SharpnessMonitor, reps: int = 7) -> list[float]:
    """Times of one forward + backward on the probe batch: the unit the probe's cost is given in."""
    model, batch, times = monitor.model, monitor.probe_batch, []
    for _ in range(reps):
        t0 = time.perf_counter()
        grads = torch.autograd.grad(monitor.loss_fn(model, batch), list(model.parameters()))
        times.append(time.perf_counter() - t0)
    del grads
    return times


def spread(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return f"{1e3 * statistics.median(values):.1f} ms (IQR {1e3 * q[0]:.1f}-{1e3 * q[2]:.1f})"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", type=int, default=32)
    p.add_argument("--large", type=int, default=3049, help="3049: the whole training set (full-batch GD)")
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--probe", type=int, default=3049, help="probe batch: the first N training examples")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "sharpness_trace"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    train_set, _, classes = load_task("stdlib-topics")
    runs, rows = {}, {}
    for name, b in (("small", args.small), ("large", args.large)):
        monitor, step_times = train(b, args, (train_set, classes))
        unit = probe_batch_step_seconds(monitor)
        probes = [r.seconds for r in monitor.history[1:]]  # the first probe starts cold (no warm start)
        iters = [r.iterations for r in monitor.history[1:]]
        runs[f"batch {b} (η = {args.lr})"] = monitor.history
        last = monitor.history[-1]
        rows[name] = {
            "batch_size": b,
            "lambda_max": [[r.step, r.lambda_max] for r in monitor.history],
            "two_over_lr": 2 / args.lr,
            "final_lambda_max": last.lambda_max,
            "max_lambda_max": max(r.lambda_max for r in monitor.history),
            "probe_seconds_median": statistics.median(probes),
            "probe_iterations_median": statistics.median(iters),
            "step_seconds_median": statistics.median(step_times),
            "probe_batch_forward_backward_seconds_median": statistics.median(unit),
            "probe_in_forward_backwards": statistics.median(probes) / statistics.median(unit),
        }
        print(f"batch {b:5d}: λ_max {monitor.history[0].lambda_max:.2f} -> {last.lambda_max:.2f} "
              f"(max {rows[name]['max_lambda_max']:.2f}; 2/η = {2 / args.lr:.2f}); probe {spread(probes)}, "
              f"{statistics.median(iters):.0f} power iterations; train step {spread(step_times)}; "
              f"probe / step = {statistics.median(probes) / statistics.median(step_times):.1f}; "
              f"probe = {rows[name]['probe_in_forward_backwards']:.1f} forward+backward passes on the probe batch")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"config": vars(args), "runs": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot_sharpness(runs, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
