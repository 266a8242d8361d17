"""Step time of lbopt LAMB / CBLR / MCLR vs torch.optim.AdamW on the same FSDP2-sharded model.

A small GPT-2 (random init, from a transformers config; ``fully_shard`` on every block and
the root) on 2 CPU ranks (gloo). One sharded model + optimizer per row, all in one launch;
rounds are interleaved (each row runs a few steps per round, the order alternating) so
machine noise hits all rows alike. Reported per row, as the median over the timed steps
with the interquartile range, and as a ratio to AdamW (median of the per-round ratios,
with their min-max spread):

- ``opt``: ``optimizer.step()``, including lbopt's statistics all-reduce;
- ``train``: forward + backward (FSDP2's all-gathers and reduce-scatters) + ``step()``.

It also counts what each ``step()`` communicates (CommDebugMode: every collective, DTensor's
implicit ones included) and the bytes of the all-reduces lbopt issues. The ``DTensorLAMB``
row is a per-tensor LAMB written with plain DTensor ops: exact under FSDP2, but one
collective per norm per tensor, the cost lbopt's one all-reduce per step avoids.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/fsdp_step_time.py [--rounds 5] [--steps 3] \\
        [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.debug import CommDebugMode
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

import lbopt


class DTensorLAMB(torch.optim.Optimizer):
    """Per-tensor LAMB with plain tensor ops: on DTensors every norm is a collective."""

    def __init__(self, params: Any, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st["t"], st["m"], st["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                st["t"] += 1
                st["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                u = (st["m"] / (1 - b1 ** st["t"])) / ((st["v"] / (1 - b2 ** st["t"])).sqrt() + group["eps"])
                u.add_(p, alpha=group["weight_decay"])
                wn, un = p.norm().full_tensor(), u.norm().full_tensor()
                r = float(wn / un) if wn > 0 and un > 0 else 1.0
                p.sub_(u, alpha=group["lr"] * r)


OPTIMIZERS = {
    "AdamW": lambda groups: torch.optim.AdamW(groups, lr=1e-4, foreach=True),
    "LAMB": lambda groups: lbopt.LAMB(groups, lr=1e-3),
    "CBLR": lambda groups: lbopt.CBLR(groups, lr=1.0),
    "MCLR": lambda groups: lbopt.MCLR(groups, lr=1.0),
    "DTensorLAMB": lambda groups: DTensorLAMB(groups, lr=1e-3),
}


def make_model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=8000, n_positions=128, n_embd=args.width, n_layer=args.layers, n_head=4,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    for block in model.transformer.h:
        fully_shard(block)
    return fully_shard(model)


def groups_of(model: torch.nn.Module, wd: float = 0.01) -> list[dict]:
    named = list(model.named_parameters())
    return [
        {"params": [p for _, p in named if p.ndim > 1], "weight_decay": wd},
        {"params": [p for _, p in named if p.ndim <= 1], "weight_decay": 0.0},
    ]


class Probe:
    """Counts collectives (CommDebugMode) and all-reduce bytes inside one call."""

    def __init__(self) -> None:
        self.collectives = 0
        self.bytes = 0

    def run(self, fn) -> float:
        orig = dist.all_reduce

        def counting(tensor, *a, **k):
            self.bytes += tensor.numel() * tensor.element_size()
            return orig(tensor, *a, **k)

        self.bytes = 0
        dist.all_reduce = counting
        try:
            with CommDebugMode() as mode:
                t0 = time.perf_counter()
                fn()
                seconds = time.perf_counter() - t0
        finally:
            dist.all_reduce = orig
        self.collectives = mode.get_total_counts()
        return seconds


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["ms"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, kind in zip(axes, ("opt", "train")):
        med = [result["ms"][n][kind]["median"] for n in names]
        lo = [m - result["ms"][n][kind]["q1"] for n, m in zip(names, med)]
        hi = [result["ms"][n][kind]["q3"] - m for n, m in zip(names, med)]
        ax.bar(names, med, yerr=[lo, hi], capsize=4, color=["0.6"] + ["C0"] * (len(names) - 1))
        ax.set_title(f"{kind}: ms per step (median, IQR)")
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"FSDP2, {result['world']} CPU ranks, GPT-2 {result['params'] / 1e6:.1f}M params")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per row per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    models, opts = {}, {}
    for name, build in OPTIMIZERS.items():
        models[name] = make_model(args)
        opts[name] = build(groups_of(models[name]))
    n_params = sum(p.numel() for p in models["AdamW"].parameters())
    n_tensors = sum(1 for _ in models["AdamW"].parameters())
    g = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, 8000, (args.micro_batch, args.seq), generator=g) for _ in range(4)]
    times: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    comm: dict[str, dict[str, int]] = {}
    probe = Probe()

    def one_step(name: str, i: int, record: bool) -> None:
        model, opt = models[name], opts[name]
        ids = batches[i % len(batches)]
        opt.zero_grad()
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt_s = probe.run(opt.step)
        total = time.perf_counter() - t0
        if record:
            times[name]["opt"].append(opt_s)
            times[name]["train"].append(total)
            comm[name] = {"collectives": probe.collectives, "all_reduce_bytes": probe.bytes}

    total_steps = len(OPTIMIZERS) * (args.warmup + args.rounds * args.steps)
    bar = tqdm(total=total_steps, disable=rank != 0, desc="fsdp2 step time")
    for name in OPTIMIZERS:
        for i in range(args.warmup):
            one_step(name, i, record=False)
            bar.update()
    for r in range(args.rounds):
        order = list(OPTIMIZERS) if r % 2 == 0 else list(reversed(OPTIMIZERS))
        for name in order:
            for i in range(args.steps):
                one_step(name, i, record=True)
                bar.update()
    bar.close()

    def per_round_ratios(name: str, kind: str) -> list[float]:
        k = args.steps
        a, b = times[name][kind], times["AdamW"][kind]
        return [statistics.median(a[j:j + k]) / statistics.median(b[j:j + k]) for j in range(0, len(a), k)]

    result: dict[str, Any] = {"world": world, "params": n_params, "tensors": n_tensors, "ms": {}, "ratio": {},
                              "comm": comm, "torch": torch.__version__, "args": vars(args)}
    for name in OPTIMIZERS:
        result["ms"][name] = {}
        result["ratio"][name] = {}
        for kind in ("opt", "train"):
            q1, med, q3 = quartiles(times[name][kind])
            result["ms"][name][kind] = {"q1": q1 * 1e3, "median": med * 1e3, "q3": q3 * 1e3}
            rr = per_round_ratios(name, kind)
            result["ratio"][name][kind] = {"median": statistics.median(rr), "min": min(rr), "max": max(rr)}
    if rank == 0:
        print(f"\nFSDP2, {world} CPU ranks (gloo), GPT-2 {n_params / 1e6:.1f}M params in {n_tensors} tensors, "
              f"micro-batch {args.micro_batch}x{args.seq}, {args.rounds}x{args.steps} timed steps per row")
        print(f"{'optimizer':12s} {'opt ms (IQR)':>22s} {'ratio (min-max)':>18s} {'train ms (IQR)':>24s} "
              f"{'ratio (min-max)':>18s} {'collectives':>11s} {'AR bytes':>9s}")
        for name in OPTIMIZERS:
            row = f"{name:12s}"
            for kind in ("opt", "train"):
                m, q = result["ms"][name][kind], result["ratio"][name][kind]
                row += (f" {m['median']:8.1f} ({m['q1']:6.1f}-{m['q3']:6.1f})"
                        f" {q['median']:5.2f} ({q['min']:4.2f}-{q['max']:4.2f})")
            row += f" {comm[name]['collectives']:11d} {comm[name]['all_reduce_bytes']:9d}"
            print(row)
        print("(collectives: all collectives inside one optimizer step; AR bytes: bytes of the dist.all_reduce "
              "calls in it = lbopt's statistics, num_stats x num_layers x 8)")
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "fsdp_step_time.json").write_text(json.dumps(result, indent=2))
            write_plot(result, out / "fsdp_step_time.png")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
