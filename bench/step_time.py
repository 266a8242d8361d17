"""Optimizer step time of each lbopt optimizer vs torch.optim.AdamW(foreach=True), with a roofline.

Same ~49M-parameter set (the tensor shapes of a 10-block transformer, d=640, ff=2560),
same fixed gradients, fp32, CPU.

How the timing is made trustworthy
    Each optimizer lives in **its own worker process** (and a STREAM-like bandwidth probe in
    another); the parent interleaves them round by round (every worker runs a few steps per
    round, in alternating order), so machine noise hits all of them alike while no
    optimizer's allocations disturb another's heap. Earlier versions kept all optimizers
    in one process. AdamW(foreach=True) allocates a model-sized temporary every step
    (``_foreach_sqrt``); whether glibc keeps that memory or returns it to the kernel (and the
    next step faults 48k pages in again) depends on the heap's layout, i.e. on what else the
    process allocated — that made the in-process AdamW 2-3x slower than AdamW alone, and it
    still varies from process to process. ``--malloc pinned`` (default) sets glibc's mmap and
    trim thresholds to 1 GiB in every worker, so no optimizer faults memory in per step
    (AdamW's best case); the minor page faults per step are printed to show it. After
    the interleaved rounds every optimizer is timed once more **alone in a fresh process**
    (``--fresh-steps``) and both figures are printed side by side.

Roofline
    * ``impl GB``: bytes the implementation's kernels read and write per step, counted by a
      ``TorchDispatchMode`` over one step (every tensor argument of every aten op: inputs
      read, outputs and in-place arguments written; views move nothing). ``GB/s`` =
      ``impl GB / step time``: whether the kernels run at memory speed.
    * ``min GB``: bytes a step *must* move with fused kernels: every parameter, gradient
      and state element read once and written once if it changes, plus the extra sweep
      that a per-layer norm forces before the update (LAMB's ``‖u‖``; the curvature
      statistics of CBLR/MCLR; the non-finite guard). ``roofline`` = time those bytes take
      at the attainable bandwidth / measured step time.
    * The attainable bandwidth is measured in the same run by the probe worker, with the
      same thread count: STREAM copy ``b ← a`` (counted, as STREAM does, as 2 words/elt),
      STREAM triad ``a ← b + s·c`` (3 words) and an in-place update ``a ← a + s·b``
      (3 words), over 128 MiB arrays (4x the 32 MiB L3). ``attainable`` is the best of the
      three. Why: an optimizer step is a chain of in-place elementwise updates; stores into
      arrays that are also read carry no hidden write-allocate traffic, whereas copy and
      triad store into arrays they do not read, and the cache line fill STREAM does not
      count makes them look 1.5x slower than the bus. A plain ``copy_`` therefore
      under-states the bandwidth an optimizer can reach; the best kernel is the honest
      ceiling. The table prints the fraction of both (attainable and copy).
    * ``mem/param``: persistent optimizer memory (state + kept work buffers) per parameter
      byte (:func:`lbopt.optim.memory.persistent_bytes`).

    python bench/step_time.py [--rounds 7] [--steps 3] [--fresh-steps 5] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

import lbopt
from lbopt.optim.memory import persistent_bytes


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
    "LAMB": lambda ps: lbopt.LAMB(ps, lr=1e-3, weight_decay=0.01),  # decay as LAMB is used (BERT: 0.01)
    "CBLR": lambda ps: lbopt.CBLR(ps, lr=1.0, weight_decay=1e-4),
    "MCLR": lambda ps: lbopt.MCLR(ps, lr=1.0, weight_decay=1e-4),
}

# Words (4-byte elements) per parameter element a step must move with fused kernels.
#   AdamW: read p, g, m, v; write p, m, v                                  = 7
#   LARS : sweep 1 reads g, w (‖g‖, ‖w‖); sweep 2 reads g, w, v, writes v, w = 2 + 5 = 7
#   LAMB : guard reads g; sweep 1 reads g, w, m, v, writes m, v, u (‖w‖, ‖u‖);
#          sweep 2 reads w, u, writes w                                    = 1 + 7 + 3 = 11
#   CBLR/MCLR (default: Rayleigh secant, model step along momentum; the last move is a multiple
#          of the buffer, so no copies of w_{t-1}, h_{t-1}): sweep 1 reads g, w, m (‖w‖², ‖g‖²,
#          ⟨g,m⟩, ‖m‖², ⟨g,w⟩, ⟨w,m⟩); sweep 2 reads g, w, m, writes m, w       = 3 + 5 = 8
MIN_WORDS = {"AdamW": 7, "LARS": 7, "LAMB": 11, "CBLR": 8, "MCLR": 8}

STREAM_ELEMS = 32 * 1024 * 1024  # 128 MiB per fp32 array, 4x the L3


# ---------------------------------------------------------------------------- byte counting
class ByteCounter(TorchDispatchMode):
    """Bytes read and written by every aten op: tensor inputs read, outputs / mutated args written.

    Views (outputs aliasing an input without writing) move nothing. ``copy_``, ``zero_``
    and ``fill_`` do not read their destination.
    """

    _WRITE_ONLY = ("copy_", "zero_", "fill_")

    def __init__(self) -> None:
        super().__init__()
        self.read = 0
        self.written = 0

    @staticmethod
    def _flat(args: Any) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for a in args:
            if isinstance(a, torch.Tensor):
                out.append(a)
            elif isinstance(a, list | tuple):
                out += [x for x in a if isinstance(x, torch.Tensor)]
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        schema = func._schema
        returns_view = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
        if returns_view:
            return result
        name = schema.name.split("::")[-1]
        write_only = name.endswith(self._WRITE_ONLY)
        mutated: list[torch.Tensor] = []
        read: list[torch.Tensor] = []
        arg_schemas = list(schema.arguments)
        values = list(args) + [kwargs.get(a.name) for a in arg_schemas[len(args):]]
        for spec, value in zip(arg_schemas, values):
            tensors = self._flat([value])
            if spec.alias_info is not None and spec.alias_info.is_write:
                mutated += tensors
                is_out = spec.kwarg_only and spec.name.startswith("out")
                if not (write_only and spec.name == "self") and not is_out:
                    read += tensors
            else:
                read += tensors
        self.read += sum(t.numel() * t.element_size() for t in read)
        outputs = result if isinstance(result, list | tuple) else [result]
        written = mutated or self._flat(outputs)
        self.written += sum(t.numel() * t.element_size() for t in written)
        return result


def count_step_bytes(opt: torch.optim.Optimizer) -> tuple[int, int]:
    with ByteCounter() as counter:
        opt.step()
    return counter.read, counter.written


# ---------------------------------------------------------------------------- workers
def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _optimizer_worker(conn, threads: int, name: str, count: bool = True) -> None:  # noqa: ANN001
    torch.set_num_threads(threads)
    params = make_params(transformer_shapes())
    opt = OPTIMIZERS[name](params)
    opt.step()  # state allocated outside the timing
    opt.step()
    n = sum(p.numel() for p in params)
    read, written = count_step_bytes(opt) if count else (0, 0)
    conn.send({"params": n, "tensors": len(params), "state_bytes": persistent_bytes(opt),
               "impl_read": read, "impl_written": written})
    while True:
        cmd, steps = conn.recv()
        if cmd == "stop":
            break
        times, faults = [], []
        for _ in range(steps):
            f0, t0 = _faults(), time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
            faults.append(_faults() - f0)
        conn.send((times, faults))


def _stream_kernels(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> dict[str, tuple[Any, int]]:
    """name -> (kernel, bytes it moves by STREAM's counting)."""
    word = a.element_size() * a.numel()
    return {
        "copy": (lambda: b.copy_(a), 2 * word),
        "triad": (lambda: torch.add(b, c, alpha=0.5, out=a), 3 * word),
        "update": (lambda: a.add_(b, alpha=1e-3), 3 * word),
    }


def _stream_worker(conn, threads: int) -> None:  # noqa: ANN001
    torch.set_num_threads(threads)
    a, b, c = (torch.rand(STREAM_ELEMS) for _ in range(3))
    kernels = _stream_kernels(a, b, c)
    for kernel, _ in kernels.values():
        kernel()
    conn.send({"elements": STREAM_ELEMS})
    while True:
        cmd, steps = conn.recv()
        if cmd == "stop":
            break
        out: dict[str, list[float]] = {k: [] for k in kernels}
        for _ in range(steps):
            for key, (kernel, nbytes) in kernels.items():
                t0 = time.perf_counter()
                kernel()
                out[key].append(nbytes / (time.perf_counter() - t0) / 1e9)
        conn.send(out)


def _start(target, threads: int, *extra) -> tuple[Any, Any]:  # noqa: ANN001
    """Start ``target(conn, threads, *extra)`` in a fresh (spawned) process."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, threads, *extra))
    proc.start()
    return proc, parent


def _stop(workers: dict[str, tuple[Any, Any]]) -> None:
    for proc, conn in workers.values():
        conn.send(("stop", 0))
        proc.join()


def fresh_alone(name: str, steps: int, threads: int) -> list[float]:
    """Time ``name`` alone in a new process (2 warm-up steps, then ``steps`` steps)."""
    proc, conn = _start(_optimizer_worker, threads, name, False)
    conn.recv()
    conn.send(("run", steps))
    times, _ = conn.recv()
    conn.send(("stop", 0))
    proc.join()
    return times


# ---------------------------------------------------------------------------- report
def _q(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summarise(info: dict, times: dict, faults: dict, stream: dict, fresh: dict) -> dict[str, Any]:
    bw = {k: statistics.median(v) for k, v in stream.items()}
    attainable = max(bw.values())
    rows = []
    rounds = len(next(iter(times.values())))
    for name, per_round in times.items():
        flat = [t for r in per_round for t in r]
        med = statistics.median(flat)
        ratios = [statistics.median(r) / statistics.median(a) for r, a in zip(per_round, times["AdamW"])]
        i = info[name]
        impl = i["impl_read"] + i["impl_written"]
        min_bytes = MIN_WORDS[name] * 4 * i["params"]
        rows.append({
            "optimizer": name,
            "step_ms": med * 1e3,
            "step_ms_q25": _q(flat, 0.25) * 1e3,
            "step_ms_q75": _q(flat, 0.75) * 1e3,
            "ratio_vs_adamw": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "fresh_alone_ms": statistics.median(fresh[name]) * 1e3 if name in fresh else None,
            "faults_per_step": statistics.median([f for r in faults[name] for f in r]),
            "impl_bytes": impl,
            "achieved_GBps": impl / med / 1e9,
            "frac_attainable": impl / med / 1e9 / attainable,
            "frac_copy": impl / med / 1e9 / bw["copy"],
            "min_bytes": min_bytes,
            "roofline_fraction": min_bytes / attainable / 1e9 / med,
            "mem_per_param_byte": i["state_bytes"] / (4 * i["params"]),
        })
    return {"params": info["AdamW"]["params"], "tensors": info["AdamW"]["tensors"], "rounds": rounds,
            "bandwidth_GBps": bw, "attainable_GBps": attainable, "rows": rows}


def print_table(res: dict[str, Any], threads: int, steps: int) -> None:
    bw = res["bandwidth_GBps"]
    print(f"\n{res['params'] / 1e6:.1f}M fp32 parameters in {res['tensors']} tensors, torch {torch.__version__}, "
          f"{threads} threads; {res['rounds']} interleaved rounds x {steps} steps, one process per optimizer")
    print("bandwidth probe (median over rounds): " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bw.items())
          + f"; attainable = {res['attainable_GBps']:.1f} GB/s")
    head = (f"{'optimizer':<8} {'step ms':>8} {'q25-q75':>13} {'alone ms':>9} {'vs AdamW':>9} {'(min-max)':>11} "
            f"{'faults':>7} {'impl GB':>8} {'GB/s':>6} {'%attain':>8} {'%copy':>6} {'min GB':>7} "
            f"{'roofline':>8} {'mem/param':>9}")
    print(head)
    for r in res["rows"]:
        alone = f"{r['fresh_alone_ms']:9.1f}" if r["fresh_alone_ms"] is not None else f"{'-':>9}"
        print(f"{r['optimizer']:<8} {r['step_ms']:8.1f} {r['step_ms_q25']:6.1f}-{r['step_ms_q75']:<6.1f} {alone} "
              f"{r['ratio_vs_adamw']:8.2f}x {r['ratio_min']:5.2f}-{r['ratio_max']:<5.2f} {r['faults_per_step']:7.0f} "
              f"{r['impl_bytes'] / 1e9:8.2f} {r['achieved_GBps']:6.1f} {100 * r['frac_attainable']:7.0f}% "
              f"{100 * r['frac_copy']:5.0f}% {r['min_bytes'] / 1e9:7.2f} {100 * r['roofline_fraction']:7.0f}% "
              f"{r['mem_per_param_byte']:8.2f}x")


def plot(res: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    names = [r["optimizer"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    ratio = [r["ratio_vs_adamw"] for r in rows]
    err = [[r["ratio_vs_adamw"] - r["ratio_min"] for r in rows], [r["ratio_max"] - r["ratio_vs_adamw"] for r in rows]]
    ax1.bar(names, ratio, yerr=err, capsize=4, color="tab:blue")
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.axhline(1.1, color="tab:red", lw=0.8, ls="--", label="target 1.10x")
    ax1.set_ylabel("step time / AdamW (per round)")
    ax1.set_title(f"Optimizer step, {res['params'] / 1e6:.0f}M params, CPU")
    ax1.legend(fontsize=8)
    ax2.bar(names, [r["achieved_GBps"] for r in rows], color="tab:green", label="kernel traffic / step time")
    ax2.bar(names, [r["min_bytes"] / 1e9 / (r["step_ms"] / 1e3) for r in rows], color="tab:olive",
            label="must-move bytes / step time")
    ax2.axhline(res["attainable_GBps"], color="k", lw=0.8, label="attainable (probe)")
    ax2.axhline(0.7 * res["bandwidth_GBps"]["copy"], color="tab:red", lw=0.8, ls="--", label="70% of copy")
    ax2.set_ylabel("GB/s")
    ax2.set_title("Memory bandwidth")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per optimizer per round")
    ap.add_argument("--fresh-steps", type=int, default=5, help="steps timed alone in a fresh process (0: skip)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--only", nargs="*", default=list(OPTIMIZERS), help="optimizers to run (AdamW always runs)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--malloc", choices=["pinned", "default"], default="pinned",
                    help="pinned: workers keep freed memory (no per-step page faults for anyone; AdamW's "
                         "best case); default: glibc's own trimming, which may or may not fault AdamW's "
                         "temporaries in again every step")
    args = ap.parse_args()
    names = ["AdamW"] + [n for n in args.only if n != "AdamW"]
    if args.malloc == "pinned":  # read by glibc when each spawned worker starts
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 30))
        os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(1 << 30))

    load_before = os.getloadavg()
    workers = {name: _start(_optimizer_worker, args.threads, name) for name in names}
    workers["stream"] = _start(_stream_worker, args.threads)
    info = {name: conn.recv() for name, (_, conn) in workers.items()}
    times: dict[str, list[list[float]]] = {n: [] for n in names}
    faults: dict[str, list[list[int]]] = {n: [] for n in names}
    stream: dict[str, list[float]] = {}
    for r in tqdm(range(args.rounds), desc="interleaved rounds"):
        order = list(workers) if r % 2 == 0 else list(reversed(workers))
        for name in order:
            _, conn = workers[name]
            conn.send(("run", args.steps))
            got = conn.recv()
            if name == "stream":
                for k, v in got.items():
                    stream.setdefault(k, []).append(statistics.median(v))
            else:
                times[name].append(got[0])
                faults[name].append(got[1])
    _stop(workers)
    fresh = {}
    if args.fresh_steps:
        for name in tqdm(names, desc="alone, fresh process"):
            fresh[name] = fresh_alone(name, args.fresh_steps, args.threads)
    load_after = os.getloadavg()

    res = summarise(info, times, faults, stream, fresh)
    res.update({"torch": torch.__version__, "threads": args.threads, "steps_per_round": args.steps,
                "malloc": args.malloc,
                "loadavg_before": load_before, "loadavg_after": load_after, "cpus": os.cpu_count()})
    print_table(res, args.threads, args.steps)
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} on {os.cpu_count()} CPUs")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_time.json").write_text(json.dumps(res, indent=2))
    plot(res, out)
    print(f"wrote {out / 'step_time.json'} and {out / 'step_time.png'}")


if __name__ == "__main__":
    main()
