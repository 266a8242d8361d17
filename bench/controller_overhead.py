"""Batch-size controller overhead on a transformer: cheap vs per-sample estimator.

A MiniLM-shaped BERT classifier (6 layers, d=384, ~22.7M parameters; random init — only
time is measured) trains with 4 accumulated micro-batches of 8 sequences x 64 tokens per
optimizer step, three ways, in interleaved rounds of one run:

- plain:      AdaGradNorm, no controller;
- cheap:      AdAdaGradNorm with the default micro-batch estimator (gradient hooks +
              law of total variance, one 5-number all-reduce when distributed);
- per-sample: AdaGradNorm + exact per-sample gradients (torch.func) fed to the controller.

Overhead = (variant step time − plain step time) / plain step time, medians over rounds.

    python bench/controller_overhead.py [--rounds 4]

**ZeRO-2 rows** (2 ranks, gloo/NCCL): the same model under DeepSpeed ZeRO-2, one engine per
variant, interleaved rounds: AdaGradNorm and AdaGrad without a controller, and AdAdaGradNorm
/ AdAdaGrad with the controller testing *every* step (so every timed step is a test step),
one row per test (norm, inner_product, orthogonality, augmented on AdAdaGradNorm; coordinate
on AdAdaGrad, compared with plain AdaGrad). The batch is held fixed (max = initial) so every
variant does the same work. Overhead = median step time / median of the matching plain
optimizer − 1; the spread is the min–max of the per-round ratios.

    torchrun --nproc_per_node 2 bench/controller_overhead.py --zero2 [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from lbopt.batch import BatchSizeController, PerSampleGradients
from lbopt.optim.adagrad import AdAdaGradNorm, AdaGradNorm

MICRO, ACCUM, SEQ, LABELS = 8, 4, 64, 4
LAYERS, VOCAB = 6, 30522


def make_model(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=384, num_hidden_layers=LAYERS, num_attention_heads=12, intermediate_size=1536,
        num_labels=LABELS, attn_implementation="eager", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg)


class Logits(nn.Module):
    """``model(ids) -> logits`` so torch.func sees a plain tensor output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, VOCAB, (MICRO * ACCUM, SEQ), generator=g)
    return ids, torch.randint(0, LABELS, (MICRO * ACCUM,), generator=g)


def accumulate(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> None:
    for k in range(ACCUM):
        sl = slice(k * MICRO, (k + 1) * MICRO)
        loss = nn.functional.cross_entropy(model(ids[sl]), labels[sl]) / ACCUM
        loss.backward()


ZERO2_TESTS = ("norm", "inner_product", "orthogonality", "augmented", "coordinate")


def zero2_rows(args: argparse.Namespace) -> None:
    """Per-test overhead under ZeRO-2 on the ranks torchrun started (see the module docstring)."""
    import os
    import warnings

    import deepspeed
    from lbopt.integrations import deepspeed as adapter

    warnings.simplefilter("ignore")
    deepspeed.init_distributed(dist_backend=os.environ.get("LBOPT_BENCH_BACKEND", "gloo"))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    batch = MICRO * ACCUM * world
    ctrl_kw = dict(initial_batch_size=batch, max_batch_size=batch, micro_batch_size=MICRO, world_size=world)

    def engine(kind: str, params: dict) -> tuple[Any, Any]:
        import lbopt.optim.adagrad as ada

        model = Logits(make_model())
        cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM,
               "gradient_clipping": 0.0, "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
               "zero_force_ds_cpu_optimizer": False}
        optimizer = getattr(ada, kind)(model.parameters(), **params)
        eng, *_ = adapter.initialize(model=model, optimizer=optimizer, config=cfg)
        return eng, model

    variants: dict[str, tuple[Any, str]] = {
        "plain AdaGradNorm": (engine("AdaGradNorm", {"lr": 0.01}), ""),
        "plain AdaGrad": (engine("AdaGrad", {"lr": 0.01}), ""),
    }
    for test in ZERO2_TESTS:
        kind = "AdAdaGrad" if test == "coordinate" else "AdAdaGradNorm"
        variants[test] = (engine(kind, {"lr": 0.01, "test": test, **ctrl_kw}), "plain " + kind[2:])

    def step(eng: Any, t: int) -> None:
        ids, y = data(t * world + rank)
        for k in range(ACCUM):
            sl = slice(k * MICRO, (k + 1) * MICRO)
            eng.set_gradient_accumulation_boundary(k == ACCUM - 1)
            eng.backward(nn.functional.cross_entropy(eng(ids[sl]), y[sl]) / ACCUM, scale_wrt_gas=False)
            eng.step()

    for (eng, _), _base in variants.values():
        step(eng, 0)  # warm-up (state allocation; the inner-product tests' first direction)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in tqdm(range(args.rounds), desc="rounds", disable=rank != 0):
        for name, ((eng, _), _base) in variants.items():
            torch.distributed.barrier()
            t0 = time.perf_counter()
            step(eng, r + 1)
            torch.distributed.barrier()
            times[name].append(time.perf_counter() - t0)
    if rank != 0:
        return
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = {}
    print(f"\nZeRO-2, {world} ranks, {ACCUM} x {MICRO} sequences x {SEQ} tokens per rank and step, "
          f"median of {args.rounds} interleaved rounds; every step a test step")
    for name, (_, base) in variants.items():
        if not base:
            print(f"{name:<18} {med[name]:8.3f} s/step")
            continue
        ratios = [a / b - 1 for a, b in zip(times[name], times[base])]
        rows[name] = {"step_s": med[name], "plain_s": med[base], "overhead": med[name] / med[base] - 1,
                      "spread": [min(ratios), max(ratios)]}
        print(f"{name:<18} {med[name]:8.3f} s/step  vs {base}: {rows[name]['overhead']:+7.1%} "
              f"(rounds {min(ratios):+.1%} .. {max(ratios):+.1%})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "controller_overhead_zero2.json").write_text(json.dumps(
        {"world_size": world, "rounds": args.rounds, "step_s": med, "rows": rows}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--zero2", action="store_true", help="per-test rows under DeepSpeed ZeRO-2 (launch with torchrun)")
    ap.add_argument("--layers", type=int, default=6, help="BERT layers (smaller: a quicker run)")
    ap.add_argument("--vocab", type=int, default=30522, help="vocabulary size (smaller: less memory per engine)")
    args = ap.parse_args()
    global LAYERS, VOCAB
    LAYERS, VOCAB = args.layers, args.vocab
    if args.zero2:
        zero2_rows(args)
        return
    batch = MICRO * ACCUM
    kw = dict(initial_batch_size=batch, max_batch_size=batch, micro_batch_size=MICRO, world_size=1)

    plain_m = Logits(make_model())
    plain = AdaGradNorm(plain_m.parameters(), lr=0.01)
    cheap_m = Logits(make_model())
    cheap = AdAdaGradNorm(cheap_m.parameters(), lr=0.01, **kw)
    exact_m = Logits(make_model())
    exact = AdaGradNorm(exact_m.parameters(), lr=0.01)
    exact_ctrl = BatchSizeController(**kw, estimator="per_sample")
    per_sample = PerSampleGradients(exact_m, nn.functional.cross_entropy, chunk_size=MICRO)

    def step_plain(t: int) -> None:
        ids, y = data(t)
        accumulate(plain_m, ids, y)
        plain.step()
        plain.zero_grad()

    def step_cheap(t: int) -> None:
        ids, y = data(t)
        accumulate(cheap_m, ids, y)
        cheap.step()  # the controller's test runs inside step()
        cheap.zero_grad()

    def step_exact(t: int) -> None:
        ids, y = data(t)
        accumulate(exact_m, ids, y)
        exact_ctrl.observe_samples(per_sample.samples(ids, y))
        exact_ctrl.step()
        exact.step()
        exact.zero_grad()

    variants = {"plain": step_plain, "cheap": step_cheap, "per_sample": step_exact}
    for fn in variants.values():  # warm-up: allocate state, compile nothing
        fn(0)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in tqdm(range(args.rounds), desc="rounds"):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn(r + 1)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_params = sum(p.numel() for p in plain_m.parameters())
    result = {
        "params": n_params,
        "step_s": med,
        "cheap_overhead": med["cheap"] / med["plain"] - 1,
        "per_sample_overhead": med["per_sample"] / med["plain"] - 1,
        "cheap_decision": cheap.batch_controller.last.as_dict(), "per_sample_decision": exact_ctrl.last.as_dict(),
    }
    print(f"\n{n_params / 1e6:.1f}M parameters, {ACCUM} x {MICRO} sequences x {SEQ} tokens per step, "
          f"median of {args.rounds} interleaved rounds")
    for k in variants:
        print(f"{k:<11} {med[k]:8.3f} s/step   {med[k] / med['plain'] - 1:+7.1%}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "controller_overhead.json").write_text(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
