"""Step time of lbopt LAMB and CBLR vs torch.optim.AdamW(foreach=True) under DeepSpeed ZeRO-2.

A ~20M-parameter GPT-2 (random init, from a transformers config) on 2 CPU ranks (gloo),
two parameter groups (decay / no-decay), the same micro-batches for every optimizer. One
engine per optimizer, all in one launch; rounds are interleaved (each engine runs a few
steps per round) so machine noise hits all of them alike. Reported, as medians over the
timed steps, with ratios against AdamW from the same run:

- ``opt``: the optimizer's own ``step()`` calls inside DeepSpeed's step (sum over the
  per-group calls), including lbopt's statistics all-reduce;
- ``engine.step``: DeepSpeed's whole step (gradient norm, clipping, optimizer, all-gather);
- ``train``: forward + backward + ``engine.step``.

It also counts the extra bytes lbopt communicates per step: every ``all_reduce`` issued
inside the optimizer's ``step()`` (DeepSpeed's own collectives happen outside it).

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/zero_step_time.py \\
        [--rounds 6] [--steps 3] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from lbopt.integrations import deepspeed as adapter
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import lbopt

OPTIMIZERS = {
    "AdamW": lambda groups: torch.optim.AdamW(groups, lr=1e-4, foreach=True),
    "LAMB": lambda groups: lbopt.LAMB(groups, lr=1e-3),
    "CBLR": lambda groups: lbopt.CBLR(groups, lr=1.0),
}


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=16000, n_positions=256, n_embd=384, n_layer=8, n_head=6, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def groups_of(model: torch.nn.Module, wd: float = 0.01) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


class StepProbe:
    """Times the optimizer's ``step()`` calls and counts the all-reduces issued inside them."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.seconds = 0.0
        self.calls = 0
        self.all_reduces = 0
        self.bytes = 0
        self._inner = optimizer.step
        optimizer.step = self.step  # type: ignore[method-assign]

    def reset(self) -> None:
        self.seconds, self.calls, self.all_reduces, self.bytes = 0.0, 0, 0, 0

    def step(self, *args, **kwargs):
        orig = dist.all_reduce

        def counting(tensor, *a, **k):
            self.all_reduces += 1
            self.bytes += tensor.numel() * tensor.element_size()
            return orig(tensor, *a, **k)

        dist.all_reduce = counting
        t0 = time.perf_counter()
        try:
            return self._inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            dist.all_reduce = orig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per engine per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7},
    }
    engines, probes = {}, {}
    for name, build in OPTIMIZERS.items():
        model = make_model()
        groups = groups_of(model)
        engine, _, _, _ = adapter.initialize(model=model, optimizer=build(groups), config=config)
        engines[name] = engine
        probes[name] = StepProbe(engine.basic_optimizer)
    n_params = sum(p.numel() for p in next(iter(engines.values())).module.parameters())
    table = next(e.basic_optimizer for e in engines.values() if hasattr(e.basic_optimizer, "table")).table
    g = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, 16000, (args.micro_batch, args.seq), generator=g) for _ in range(4)]
    times: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    comm: dict[str, dict[str, int]] = {}

    def one_step(name: str, i: int, record: bool) -> None:
        engine, probe = engines[name], probes[name]
        ids = batches[i % len(batches)]
        probe.reset()
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        t1 = time.perf_counter()
        engine.step()
        t2 = time.perf_counter()
        if record:
            times[name]["opt"].append(probe.seconds)
            times[name]["engine.step"].append(t2 - t1)
            times[name]["train"].append(t2 - t0)
            comm[name] = {"opt_calls": probe.calls, "all_reduces": probe.all_reduces, "bytes": probe.bytes}

    for name in engines:
        for i in range(args.warmup):
            one_step(name, i, record=False)
    for r in range(args.rounds):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        for name in order:
            for i in range(args.steps):
                one_step(name, i, record=True)

    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    if rank == 0:
        print(f"\nZeRO-2, {world} CPU ranks (gloo), GPT-2 {n_params / 1e6:.1f}M params, {table.num_layers} layers, "
              f"micro-batch {args.micro_batch}x{args.seq}, {args.rounds}x{args.steps} timed steps each")
        print(f"{'optimizer':10s} {'opt ms':>9s} {'ratio':>6s} {'engine.step ms':>15s} {'ratio':>6s} "
              f"{'train ms':>9s} {'ratio':>6s} {'allreduces':>10s} {'extra bytes':>12s}")
        base = med["AdamW"]
        for name, m in med.items():
            c = comm[name]
            print(f"{name:10s} {m['opt'] * 1e3:9.1f} {m['opt'] / base['opt']:6.2f} {m['engine.step'] * 1e3:15.1f} "
                  f"{m['engine.step'] / base['engine.step']:6.2f} {m['train'] * 1e3:9.1f} "
                  f"{m['train'] / base['train']:6.2f} {c['all_reduces']:10d} {c['bytes']:12d}")
        print(f"(stats all-reduce: num_stats x num_layers({table.num_layers}) x 8 bytes per call; "
              f"optimizer step() calls per engine step: {comm['LAMB']['opt_calls']} (one per parameter group))")
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            result = {"world": world, "params": n_params, "layers": table.num_layers, "median_s": med, "comm": comm,
                      "torch": torch.__version__, "deepspeed": deepspeed.__version__}
            (out / "zero_step_time.json").write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
