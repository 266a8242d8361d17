"""AdAdaGrad on scikit-learn's digits: adaptive batch vs the best fixed batch of AdaGrad and AdamW.

Data: ``sklearn.datasets.load_digits`` (1797 8×8 images, 10 classes, ships with
scikit-learn), split 60/20/20 into train/validation/test with a fixed seed. Model: MLP
64-128-10. Every run sees the same number of samples (``--epochs`` passes over the train
split). Configurations are chosen on validation accuracy; test accuracy is reported.

Runs
  - AdaGrad and AdamW at fixed batches {32, 128, 512} × a small LR sweep;
  - AdAdaGrad (coordinate-wise AdaGrad + norm test) and AdAdaGradNorm, batch 32 → ≤ 1024,
    micro-batch 16, same LR sweep as AdaGrad;
  - an overhead run: the chosen AdAdaGrad configuration again, timing every step three ways
    on the same micro-batches: gradients without hooks (T₀), with the micro-batch
    estimator's hooks (T₁), and the per-sample ``torch.func`` estimator on the step's batch
    (Tₚ), plus the controller's own ``step()`` (T_c); T₀, T₁ are minima over 3 alternating
    repetitions and Tₚ over 2 (the machine may be shared). Overheads are reported as a fraction
    of the plain step time (T₀ + optimizer step): cheap = (T₁ − T₀ + T_c)/T_step,
    per-sample = (Tₚ + T_c)/T_step. The order of the T₀/T₁ passes alternates.

Outputs (``--out``, default ``bench/results``): ``adadagrad.md`` (table), ``adadagrad.json``,
``adadagrad_batch.png`` (batch size over training).

    python bench/adadagrad.py            # ~2-3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from lbopt.batch import BatchSizeController, PerSampleGradients
from lbopt.optim.adagrad import AdAdaGrad, AdAdaGradNorm, AdaGrad

MICRO = 32
INITIAL, MAX = 64, 1024
FIXED = (32, 64, 128, 512)
ETAS = (0.5, 1.0, 2.0)
ADAGRAD_LRS = (0.01, 0.03, 0.1)
ADAMW_LRS = (1e-3, 3e-3, 1e-2)


@dataclass
class Run:
    method: str
    batch: str
    lr: float
    eta: float = float("nan")
    val_acc: float = 0.0
    test_acc: float = 0.0
    steps: int = 0
    samples: int = 0
    seconds: float = 0.0
    batch_trace: list[tuple[int, int]] = field(default_factory=list)  # (samples seen, batch)


def load(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    idx = list(range(len(y)))
    tr, rest = train_test_split(idx, test_size=0.4, random_state=seed, stratify=y.numpy())
    va, te = train_test_split(rest, test_size=0.5, random_state=seed, stratify=y[rest].numpy())
    return (x[tr], y[tr]), (x[va], y[va]), (x[te], y[te])


def model_fn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def accuracy(model: nn.Module, data) -> float:
    with torch.no_grad():
        return float((model(data[0]).argmax(1) == data[1]).float().mean())


def epochs_of(train, epochs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        yield torch.randperm(len(train[1]), generator=g)


def run_fixed(name: str, lr: float, batch: int, train, val, test, epochs: int, seed: int) -> Run:
    model = model_fn(seed)
    opt = AdaGrad(model.parameters(), lr=lr) if name == "AdaGrad" else torch.optim.AdamW(model.parameters(), lr=lr)
    run = Run(name, str(batch), lr)
    t0 = time.perf_counter()
    for perm in epochs_of(train, epochs, seed):
        for i in range(0, len(perm), batch):
            sl = perm[i:i + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(train[0][sl]), train[1][sl]).backward()
            opt.step()
            run.steps += 1
            run.samples += len(sl)
    run.seconds = time.perf_counter() - t0
    run.val_acc, run.test_acc = accuracy(model, val), accuracy(model, test)
    return run


def run_adaptive(name: str, lr: float, eta: float, train, val, test, epochs: int, seed: int,
                 timing: dict[str, list[float]] | None = None) -> Run:
    model = model_fn(seed)
    cls = AdAdaGrad if name == "AdAdaGrad" else AdAdaGradNorm
    lr_eff = lr if name == "AdAdaGrad" else lr * 10  # AdaGradNorm's step is η/b_t for all coordinates
    opt = cls(model.parameters(), lr=lr_eff, initial_batch_size=INITIAL, max_batch_size=MAX, micro_batch_size=MICRO,
              world_size=1, test="norm", eta=eta)
    ctrl: BatchSizeController = opt.batch_controller
    run = Run(name, f"{INITIAL}→adaptive", lr_eff, eta=eta)
    per_sample = PerSampleGradients(model, nn.functional.cross_entropy) if timing is not None else None
    if timing is not None:
        inner = ctrl.step

        def timed_step(*a, **k):
            t = time.perf_counter()
            out = inner(*a, **k)
            timing["ctrl"].append(time.perf_counter() - t)
            return out

        ctrl.step = timed_step  # type: ignore[method-assign]
    t_start = time.perf_counter()
    for perm in epochs_of(train, epochs, seed):
        pos = 0
        while pos < len(perm):
            run.batch_trace.append((run.samples, ctrl.batch_size))
            sl = perm[pos:pos + ctrl.batch_size]
            pos += len(sl)
            micro = [sl[i:i + MICRO] for i in range(0, len(sl), MICRO)]

            def grads(hooks: bool, micro: list[torch.Tensor] = micro) -> float:
                ctrl.samples.active = hooks
                opt.zero_grad()
                t = time.perf_counter()
                for mb in micro:
                    loss = nn.functional.cross_entropy(model(train[0][mb]), train[1][mb]) / len(micro)
                    loss.backward()
                return time.perf_counter() - t

            if timing is not None:
                # Min over 3 alternating repetitions per step: robust to other load on the machine.
                want = ctrl.samples.active
                t0s, t1s = [], []
                for rep in range(3):
                    for hooks in ((False, True) if (run.steps + rep) % 2 else (True, False)):
                        if hooks:
                            ctrl.samples.reset()  # keep exactly one pass of samples
                            t1s.append(grads(want))
                        else:
                            t0s.append(grads(False))
                t0, t1 = min(t0s), min(t1s)
                ps = []
                for _ in range(2):
                    t = time.perf_counter()
                    per_sample.samples(train[0][sl], train[1][sl])  # type: ignore[union-attr]
                    ps.append(time.perf_counter() - t)
                timing["per_sample"].append(min(ps))
                timing["grads_plain"].append(t0)
                timing["grads_hooks"].append(t1)
                t = time.perf_counter()
                opt.step()
                timing["opt_step"].append(time.perf_counter() - t)  # includes ctrl.step
            else:
                grads(ctrl.samples.active)
                opt.step()
            run.steps += 1
            run.samples += len(sl)
    run.seconds = time.perf_counter() - t_start
    run.batch_trace.append((run.samples, ctrl.batch_size))
    run.val_acc, run.test_acc = accuracy(model, val), accuracy(model, test)
    return run


def hook_microbenchmark(pairs: int = 300, number: int = 10) -> dict[str, float]:
    """Forward/backward of one micro-batch with the controller's hooks active vs idle.

    Blocks of ``number`` passes alternate (hooks, plain, plain, hooks, ...); the overhead is
    the median over ``pairs`` of the paired ratio, which slow drifts and other load on the
    machine affect far less than totals.
    """
    model = model_fn()
    ctrl = BatchSizeController(2 * MICRO, 2 * MICRO, MICRO, 1).attach(model)
    x, y = torch.randn(MICRO, 64), torch.randint(0, 10, (MICRO,))

    def block(active: bool) -> float:
        ctrl.samples.active = active
        t = time.perf_counter()
        for _ in range(number):
            nn.functional.cross_entropy(model(x), y).backward()
        out = time.perf_counter() - t
        ctrl.samples.reset()
        return out / number

    for _ in range(20):
        block(True), block(False)
    ratios, plain, hooks = [], [], []
    for i in range(pairs):
        order = (True, False) if i % 2 else (False, True)
        t = {a: block(a) for a in order}
        ratios.append(t[True] / t[False] - 1)
        plain.append(t[False])
        hooks.append(t[True])
    return {"micro_plain_us": 1e6 * statistics.median(plain), "micro_hooks_us": 1e6 * statistics.median(hooks),
            "micro_hook_fraction": statistics.median(ratios)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    train, val, test = load(args.seed)
    jobs = [("AdaGrad", lr, b) for b in FIXED for lr in ADAGRAD_LRS]
    jobs += [("AdamW", lr, b) for b in FIXED for lr in ADAMW_LRS]
    jobs += [(m, lr, eta) for m in ("AdAdaGrad", "AdAdaGradNorm") for lr in ADAGRAD_LRS for eta in ETAS]
    runs: list[Run] = []
    for name, lr, batch in tqdm(jobs, desc="sweep"):
        if name.startswith("AdAda"):
            runs.append(run_adaptive(name, lr, batch, train, val, test, args.epochs, args.seed))
        else:
            runs.append(run_fixed(name, lr, batch, train, val, test, args.epochs, args.seed))

    def best(method: str) -> Run:
        return max((r for r in runs if r.method == method), key=lambda r: (r.val_acc, -r.steps))

    chosen = [best(m) for m in ("AdaGrad", "AdamW", "AdAdaGrad", "AdAdaGradNorm")]
    # Overhead, side by side in one run of the chosen AdAdaGrad configuration.
    timing: dict[str, list[float]] = {k: [] for k in ("grads_plain", "grads_hooks", "per_sample", "ctrl", "opt_step")}
    ada_best = chosen[2]
    for _ in tqdm(range(1), desc="overhead run"):
        run_adaptive("AdAdaGrad", ada_best.lr, ada_best.eta, train, val, test, args.epochs, args.seed, timing=timing)
    # Per step: plain = gradients without hooks + optimizer step without the controller.
    plain = [g + (o - c) for g, o, c in zip(timing["grads_plain"], timing["opt_step"], timing["ctrl"])]
    cheap_r = [(h - g + c) / p
               for h, g, c, p in zip(timing["grads_hooks"], timing["grads_plain"], timing["ctrl"], plain)]
    exact_r = [(e + c) / p for e, c, p in zip(timing["per_sample"], timing["ctrl"], plain)]
    overhead = {
        "steps": len(plain),
        "plain_step_ms_median": 1e3 * statistics.median(plain),
        "hooks_ms_median": 1e3 * statistics.median(h - g for h, g in zip(timing["grads_hooks"], timing["grads_plain"])),
        "controller_step_ms_median": 1e3 * statistics.median(timing["ctrl"]),
        "per_sample_ms_median": 1e3 * statistics.median(timing["per_sample"]),
        "cheap_overhead_median": statistics.median(cheap_r),
        "per_sample_overhead_median": statistics.median(exact_r),
        "cheap_overhead_total": (sum(timing["grads_hooks"]) - sum(timing["grads_plain"]) + sum(timing["ctrl"]))
        / sum(plain),
        "per_sample_overhead_total": (sum(timing["per_sample"]) + sum(timing["ctrl"])) / sum(plain),
    }
    overhead.update(hook_microbenchmark())

    lines = [
        f"# AdAdaGrad on digits ({args.epochs} epochs, {len(train[1])} train / {len(val[1])} val / "
        f"{len(test[1])} test samples, seed {args.seed})",
        "",
        "Best configuration per method (chosen on validation accuracy):",
        "",
        "| method | batch | lr | val acc | test acc | optimizer steps | samples | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in chosen:
        batch = r.batch if r.batch_trace == [] else f"{INITIAL}→{r.batch_trace[-1][1]} (η={r.eta:g})"
        lines.append(f"| {r.method} | {batch} | {r.lr:g} | {r.val_acc:.4f} | {r.test_acc:.4f} | {r.steps} | "
                     f"{r.samples} | {r.seconds:.1f} |")
    lines += ["", "All runs:", "", "| method | batch | lr | val acc | test acc | steps |", "|---|---|---|---|---|---|"]
    for r in runs:
        batch = r.batch if not r.batch_trace else f"{INITIAL}→{r.batch_trace[-1][1]} (η={r.eta:g})"
        lines.append(f"| {r.method} | {batch} | {r.lr:g} | {r.val_acc:.4f} | {r.test_acc:.4f} | {r.steps} |")
    lines += [
        "",
        f"Controller overhead (AdAdaGrad lr={ada_best.lr:g}, η={ada_best.eta:g}; one run, {overhead['steps']} "
        f"steps, micro-batch {MICRO}, 1 thread; each step's micro-batches timed with and without hooks, min of "
        "3 alternating repetitions; median over steps of the per-step fraction, and total-time fraction):",
        "",
        f"- plain step (gradients + AdaGrad update), median: {overhead['plain_step_ms_median']:.3f} ms",
        f"- micro-batch estimator (hooks + controller.step): {100 * overhead['cheap_overhead_median']:.1f}% median, "
        f"{100 * overhead['cheap_overhead_total']:.1f}% of total (hooks {overhead['hooks_ms_median']:.3f} ms, "
        f"controller.step {overhead['controller_step_ms_median']:.3f} ms per step, medians)",
        f"- per-sample estimator (torch.func on the step's batch + controller.step): "
        f"{100 * overhead['per_sample_overhead_median']:.0f}% median, "
        f"{100 * overhead['per_sample_overhead_total']:.0f}% of total "
        f"({overhead['per_sample_ms_median']:.3f} ms per step, median)",
        f"- hooks alone, one micro-batch of {MICRO} (median of 300 paired, alternating blocks): "
        f"{overhead['micro_plain_us']:.0f} µs plain, {overhead['micro_hooks_us']:.0f} µs with hooks "
        f"(+{100 * overhead['micro_hook_fraction']:.1f}%)",
    ]
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "adadagrad.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "adadagrad.json"), "w") as f:
        json.dump({"runs": [asdict(r) for r in runs], "chosen": [asdict(r) for r in chosen],
                   "overhead": overhead}, f, indent=1)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    traced = [r for r in runs if r.method == "AdAdaGrad" and r.lr == chosen[2].lr] + [chosen[3]]
    for r in traced:
        xs, ys = zip(*r.batch_trace)
        style = "-" if r.method == "AdAdaGrad" else ":"
        ax.step([x / len(train[1]) for x in xs], ys, style, where="post",
                label=f"{r.method} (lr {r.lr:g}, η {r.eta:g}; test acc {r.test_acc:.3f})")
    for r in chosen[:2]:
        ax.axhline(int(r.batch), ls="--", lw=1, color="grey" if r.method == "AdamW" else "black",
                   label=f"best fixed {r.method} ({r.batch})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("global batch size")
    ax.set_yscale("log", base=2)
    ticks = [b for b in (32, 64, 128, 256, 512, 1024) if b <= MAX]
    ax.set_yticks(ticks, [str(b) for b in ticks])
    ax.legend(fontsize=8)
    ax.set_title("Adaptive batch size on digits (norm test; η sweep at the chosen lr)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "adadagrad_batch.png"), dpi=120)
    print(f"saved {args.out}/adadagrad.md, adadagrad.json, adadagrad_batch.png")


if __name__ == "__main__":
    main()
