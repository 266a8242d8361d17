"""Floating-point perturbation probe: how far does one ulp travel through training?

Sun et al. (2022) find that training at the edge of stability amplifies perturbations as small
as one unit in the last place (ulp) of one weight into test-accuracy differences as large as
those from SGD's own randomness (data order). This probe trains *twin* runs in lock step: the
same initial weights, the same batches, the same RNG stream (each twin keeps its own), except
for one perturbation —

- ``weights``: one element of one parameter moved by ``ulps`` ulps before the first step
  (``torch.nextafter``, so exactly one representable float per ulp), or
- ``gradient``: the same, applied to that element's *gradient* at one chosen step. (One ulp
  of a gradient usually moves ``w − ηg`` by less than one ulp of ``w`` and is rounded away —
  the twins stay identical; use more ulps to inject a difference through the update.)

After every step it records, per layer (parameter) and for the whole model, the relative
distance ``‖w_a − w_b‖ / ‖w_a‖``, and the training losses of both twins; at the end the held-out
accuracy of each twin. Optionally a third run with another data order (``baseline_seed``) gives
the accuracy difference SGD's randomness alone produces, for scale. With ``ulps = 0`` the twins
are bit-identical (a control of the probe itself).

Command line (writes ``report.json`` and ``divergence.png`` to ``--out``)::

    python -m lbopt.diagnostics.perturbation --optimizer sgd --lr 2.0 --steps 600 --out outputs/ulp
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["Perturbation", "TwinReport", "nudge_ulps", "run_twins", "main"]

Batch = tuple[torch.Tensor, torch.Tensor]
KINDS = ("weights", "gradient")


@dataclass
class Perturbation:
    """What differs between twin b and twin a.

    ``kind``: ``"weights"`` (before step 1) or ``"gradient"`` (at step ``step``, after backward).
    ``ulps``: signed number of ulps (0: no perturbation). ``layer``: a parameter name (default:
    the last parameter with ``ndim > 1``, the output layer, whose weights every sample's gradient
    reaches). ``index``: the element, in the parameter's flattened order.
    """

    kind: str = "weights"
    ulps: int = 1
    layer: str | None = None
    index: int = 0
    step: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Invalid perturbation kind: {self.kind!r}; expected one of {', '.join(KINDS)}")
        if not isinstance(self.ulps, int):
            raise ValueError(f"Invalid ulps: {self.ulps!r}; expected an integer (0 = no perturbation)")
        if self.step < 1:
            raise ValueError(f"Invalid perturbation step: {self.step!r}; steps count from 1")


@dataclass
class TwinReport:
    """Per step ``t`` (0 = after the perturbation, before training): distances and losses.

    ``layer_distance[name][t] = ‖w_a − w_b‖/‖w_a‖`` of that parameter, ``distance[t]`` over all
    parameters; ``loss_a[t]``/``loss_b[t]`` the training loss of step t's batch (NaN at t = 0).
    """

    steps: list[int] = field(default_factory=list)
    distance: list[float] = field(default_factory=list)
    layer_distance: dict[str, list[float]] = field(default_factory=dict)
    loss_a: list[float] = field(default_factory=list)
    loss_b: list[float] = field(default_factory=list)
    accuracy_a: float | None = None
    accuracy_b: float | None = None
    baseline_accuracy: float | None = None
    perturbation: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def accuracy_difference(self) -> float | None:
        if self.accuracy_a is None or self.accuracy_b is None:
            return None
        return abs(self.accuracy_a - self.accuracy_b)

    @property
    def baseline_difference(self) -> float | None:
        if self.baseline_accuracy is None or self.accuracy_a is None:
            return None
        return abs(self.accuracy_a - self.baseline_accuracy)

    def growth(self) -> float:
        """Final over first non-zero whole-model distance (how many times the ulp was amplified)."""
        first = next((d for d in self.distance if d > 0), 0.0)
        return self.distance[-1] / first if first > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            accuracy_difference=self.accuracy_difference,
            baseline_difference=self.baseline_difference,
            growth=self.growth(),
            loss_difference=[abs(a - b) if a == a else None for a, b in zip(self.loss_a, self.loss_b)],
        )
        out["loss_a"] = [x if x == x else None for x in self.loss_a]  # NaN is not JSON
        out["loss_b"] = [x if x == x else None for x in self.loss_b]
        return out


def nudge_ulps(t: torch.Tensor, index: int, ulps: int) -> None:
    """Move element ``index`` (flattened) of ``t`` by ``ulps`` representable values, in place."""
    if not 0 <= index < t.numel():
        raise ValueError(f"Invalid index {index} for a tensor of {t.numel()} elements")
    flat = t.view(-1)
    with torch.no_grad():
        target = torch.tensor(math.inf if ulps > 0 else -math.inf, dtype=t.dtype, device=t.device)
        for _ in range(abs(ulps)):
            flat[index] = torch.nextafter(flat[index], target)


def relative_distances(a: nn.Module, b: nn.Module) -> tuple[float, dict[str, float]]:
    """``‖w_a − w_b‖/‖w_a‖`` over all parameters and per parameter (float64 arithmetic)."""
    num_total = den_total = 0.0
    per: dict[str, float] = {}
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        wa, wb = pa.detach().double(), pb.detach().double()
        num, den = float((wa - wb).square().sum()), float(wa.square().sum())
        per[name] = math.sqrt(num / den) if den > 0 else math.sqrt(num)
        num_total, den_total = num_total + num, den_total + den
    return math.sqrt(num_total / den_total) if den_total > 0 else 0.0, per


class _Twin:
    """One run: model, optimizer and its own RNG state (so twins draw identical random numbers)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, rng: torch.Tensor) -> None:
        self.model, self.optimizer, self.rng = model, optimizer, rng

    def step(self, batch: Batch, loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
             before_step: Callable[[nn.Module], None] | None = None) -> float:
        torch.set_rng_state(self.rng)
        self.model.train()
        self.optimizer.zero_grad()
        loss = loss_fn(self.model, batch)
        loss.backward()
        if before_step is not None:
            before_step(self.model)
        self.optimizer.step()
        self.rng = torch.get_rng_state()
        return float(loss.detach())


def _param(model: nn.Module, name: str | None) -> tuple[str, torch.Tensor]:
    named = dict(model.named_parameters())
    if name is None:
        matrices = [(n, p) for n, p in named.items() if p.ndim > 1]
        return matrices[-1] if matrices else next(iter(named.items()))
    if name not in named:
        raise ValueError(f"Invalid perturbation layer {name!r}; parameters are: {', '.join(named)}")
    return name, named[name]


def run_twins(
    make_model: Callable[[], nn.Module],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    batch_for: Callable[[int, int], Batch],
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
    steps: int,
    perturbation: Perturbation,
    *,
    evaluate: Callable[[nn.Module], float] | None = None,
    seed: int = 0,
    baseline_seed: int | None = None,
    save_every: int = 0,
    save_dir: str | Path | None = None,
    progress: bool = True,
) -> TwinReport:
    """Train twins a and b in lock step; return the divergence report.

    ``batch_for(step, order_seed)`` gives step's batch (step ≥ 1) for a data order; both twins use
    ``seed``, the optional baseline run ``baseline_seed``. ``evaluate(model)`` returns held-out
    accuracy. With ``save_every`` the twins' parameters are saved to
    ``save_dir/step_{t:05d}.pt`` (``{"a": state_dict, "b": state_dict}``) every that many steps
    and at the last step.
    """
    twins = []
    for _ in range(2):
        torch.manual_seed(seed)
        model = make_model()
        twins.append(_Twin(model, make_optimizer(model), torch.get_rng_state()))
    a, b = twins
    name, target = _param(b.model, perturbation.layer)
    perturbation.layer = name
    if perturbation.kind == "weights" and perturbation.ulps:
        nudge_ulps(target.data, perturbation.index, perturbation.ulps)

    def nudge_gradient(model: nn.Module) -> None:
        nudge_ulps(_param(model, name)[1].grad, perturbation.index, perturbation.ulps)

    report = TwinReport(perturbation=asdict(perturbation))
    save_dir = Path(save_dir) if save_dir is not None else None

    def record(t: int, loss_a: float, loss_b: float) -> None:
        total, per = relative_distances(a.model, b.model)
        report.steps.append(t)
        report.distance.append(total)
        for key, value in per.items():
            report.layer_distance.setdefault(key, []).append(value)
        report.loss_a.append(loss_a)
        report.loss_b.append(loss_b)
        if save_dir is not None and save_every and (t % save_every == 0 or t == steps):
            save_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"a": a.model.state_dict(), "b": b.model.state_dict()}, save_dir / f"step_{t:05d}.pt")

    t0 = time.perf_counter()
    record(0, math.nan, math.nan)
    bar = _progress(steps, progress)
    for t in range(1, steps + 1):
        batch = batch_for(t, seed)
        loss_a = a.step(batch, loss_fn)
        nudge_now = perturbation.kind == "gradient" and t == perturbation.step and perturbation.ulps
        hook = nudge_gradient if nudge_now else None
        loss_b = b.step(batch, loss_fn, hook)
        record(t, loss_a, loss_b)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(distance=f"{report.distance[-1]:.2e}")
    if bar is not None:
        bar.close()
    if evaluate is not None:
        report.accuracy_a, report.accuracy_b = evaluate(a.model), evaluate(b.model)
        if baseline_seed is not None:
            torch.manual_seed(seed)
            model = make_model()
            c = _Twin(model, make_optimizer(model), torch.get_rng_state())
            for t in range(1, steps + 1):
                c.step(batch_for(t, baseline_seed), loss_fn)
            report.baseline_accuracy = evaluate(c.model)
    report.seconds = time.perf_counter() - t0
    return report


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc="twin runs", leave=False, disable=None)  # None: off when not a terminal


# ---------------------------------------------------------------------------------------------
# tasks for the command line: the shipped stdlib-topics text set (hashed bag of words), or blobs
# ---------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z_]+")


def _hashed_bag(texts: Sequence[str], dim: int) -> torch.Tensor:
    """log(1 + count) of each word hashed (crc32) into ``dim`` buckets, rows L2-normalised."""
    out = torch.zeros(len(texts), dim)
    for i, text in enumerate(texts):
        for word in _WORD.findall(text.lower()):
            out[i, zlib.crc32(word.encode()) % dim] += 1.0
    out = out.log1p()
    return out / out.norm(dim=1, keepdim=True).clamp(min=1e-12)


def load_task(task: str, features: int = 1024) -> tuple[Batch, Batch, int]:
    """(train, validation, classes) tensors for ``stdlib-topics`` or ``blobs``."""
    if task == "stdlib-topics":
        from lbopt.data import STDLIB_TOPICS_LABELS, _read_shipped

        index = {name: i for i, name in enumerate(STDLIB_TOPICS_LABELS)}
        splits = []
        for split in ("train", "validation"):
            rows = _read_shipped(split)
            x = _hashed_bag([r["text"] for r in rows], features)
            y = torch.tensor([r["label"] if isinstance(r["label"], int) else index[r["label"]] for r in rows])
            splits.append((x, y))
        return splits[0], splits[1], len(STDLIB_TOPICS_LABELS)
    if task == "blobs":
        g = torch.Generator().manual_seed(1234)
        classes, dim = 4, 16
        centres = 0.5 * torch.randn(classes, dim, generator=g)  # overlapping: never fitted exactly
        y = torch.randint(0, classes, (1200,), generator=g)
        x = centres[y] + torch.randn(1200, dim, generator=g)
        return (x[:1000], y[:1000]), (x[1000:], y[1000:]), classes
    raise ValueError(f"Invalid task {task!r}; expected 'stdlib-topics' or 'blobs'")


def _make_optimizer(name: str, lr: float, momentum: float) -> Callable[[nn.Module], torch.optim.Optimizer]:
    def build(model: nn.Module) -> torch.optim.Optimizer:
        if name == "sgd":
            return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        import lbopt

        return lbopt.get_optimizer_class(name)(model.named_parameters(), lr=lr)

    return build


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lbopt.diagnostics.perturbation",
        description="Twin runs differing by a few ulps: how the difference grows through training.",
    )
    p.add_argument("--task", default="stdlib-topics", choices=("stdlib-topics", "blobs"))
    p.add_argument("--hidden", type=int, default=128, help="width of the MLP's hidden layer")
    p.add_argument("--features", type=int, default=1024, help="stdlib-topics: hashed bag-of-words size")
    p.add_argument("--optimizer", default="sgd", type=str.lower, help="sgd, or an lbopt optimizer name")
    p.add_argument("--lr", type=float, default=2.0)
    p.add_argument("--momentum", type=float, default=0.0, help="sgd only")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--perturb", default="weights", choices=KINDS)
    p.add_argument("--ulps", type=int, default=1, help="0: no perturbation (the twins stay bit-identical)")
    p.add_argument("--layer", default=None, help="parameter name to perturb (default: the output layer's weight)")
    p.add_argument("--index", type=int, default=0, help="flattened element index in that parameter")
    p.add_argument("--perturb_step", type=int, default=1, help="--perturb gradient: at this step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline_seed", type=int, default=None,
                   help="also train a run with this data-order seed: SGD's own accuracy noise, for scale")
    p.add_argument("--save_every", type=int, default=0, help="save both twins' parameters every N steps")
    p.add_argument("--out", default="outputs/perturbation")
    return p


def main(argv: Sequence[str] | None = None) -> TwinReport:
    args = build_parser().parse_args(argv)
    for key in ("lr", "batch_size", "steps", "hidden"):
        if getattr(args, key) <= 0:
            raise SystemExit(f"error: --{key} must be positive, got {getattr(args, key)}")
    if args.perturb == "gradient" and not 1 <= args.perturb_step <= args.steps:
        raise SystemExit(f"error: --perturb_step {args.perturb_step} must be in [1, --steps {args.steps}]")
    if args.optimizer != "sgd":
        import lbopt

        if args.optimizer not in lbopt.optimizer_names():
            names = ", ".join(lbopt.optimizer_names())
            raise SystemExit(f"error: --optimizer {args.optimizer!r} is unknown: choose sgd or one of {names}")
    train, val, classes = load_task(args.task, args.features)
    n = train[0].shape[0]
    if args.batch_size > n:
        raise SystemExit(f"error: --batch_size {args.batch_size} exceeds the {n} training examples")

    def make_model() -> nn.Module:
        return nn.Sequential(nn.Linear(train[0].shape[1], args.hidden), nn.ReLU(), nn.Linear(args.hidden, classes))

    per_epoch = n // args.batch_size

    def batch_for(step: int, order_seed: int) -> Batch:
        epoch, k = divmod(step - 1, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(order_seed * 100_003 + epoch))
        idx = perm[k * args.batch_size : (k + 1) * args.batch_size]
        return train[0][idx], train[1][idx]

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    def evaluate(model: nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            return float((model(val[0]).argmax(-1) == val[1]).float().mean())

    perturbation = Perturbation(args.perturb, args.ulps, args.layer, args.index, args.perturb_step)
    out = Path(args.out)
    report = run_twins(
        make_model, _make_optimizer(args.optimizer, args.lr, args.momentum), batch_for, loss_fn, args.steps,
        perturbation, evaluate=evaluate, seed=args.seed, baseline_seed=args.baseline_seed,
        save_every=args.save_every, save_dir=out / "params",
    )
    report.config = {k: v for k, v in vars(args).items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report.to_json(), indent=1))
    plot_divergence(report, out / "divergence.png")
    acc = f"accuracy a {report.accuracy_a:.4f}, b {report.accuracy_b:.4f} (|Δ| {report.accuracy_difference:.4f})"
    if report.baseline_difference is not None:
        acc += f"; other data order: |Δ| {report.baseline_difference:.4f}"
    print(f"relative distance {report.distance[0]:.2e} at the start, {max(report.distance):.2e} at most, "
          f"{report.distance[-1]:.2e} after step {report.steps[-1]}; {acc}")
    print(f"wrote {out / 'report.json'} and {out / 'divergence.png'}")
    return report


def plot_divergence(report: TwinReport, path: str | Path) -> Path:
    """Two panels: per-layer and whole-model relative distance, and the loss difference (log scales)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    floor = 1e-16  # zero distances (before a gradient perturbation) drawn at the floor of a log scale
    for k, (name, values) in enumerate(report.layer_distance.items()):
        left.plot(report.steps, [max(v, floor) for v in values], color=f"C{k % 10}", lw=1, label=name)
    left.plot(report.steps, [max(v, floor) for v in report.distance], color="black", lw=2, label="all parameters")
    left.set_yscale("log")
    left.set_xlabel("optimizer step")
    left.set_ylabel("‖w_a − w_b‖ / ‖w_a‖")
    left.legend(fontsize=7)
    p = report.perturbation
    left.set_title(f"{p.get('ulps')} ulp on {p.get('layer')}[{p.get('index')}] ({p.get('kind')})")
    diffs = [abs(x - y) for x, y in zip(report.loss_a, report.loss_b)]
    right.plot(report.steps[1:], [max(d, floor) for d in diffs[1:]], color="C3")
    right.set_yscale("log")
    right.set_xlabel("optimizer step")
    right.set_ylabel("|loss_a − loss_b| (training batch)")
    title = "loss difference"
    if report.accuracy_difference is not None:
        title += f"; final accuracy {report.accuracy_a:.3f} vs {report.accuracy_b:.3f}"
    if report.baseline_difference is not None:
        title += f"\n(other data order: |Δacc| = {report.baseline_difference:.3f})"
    right.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
