"""The recipes' side of lbopt's training tools: small-loss discarding and the sharpness monitor.

``--discard_small_loss ρ``: each optimizer step drops the fraction ρ of its global batch (all
micro-batches, all ranks) with the smallest per-sample loss; the gradient is the mean over the
kept samples (:class:`lbopt.SmallLossDiscard`; with accumulation a no-grad scouting forward of the
step's micro-batches comes first). ρ = 0 (the default) is the plain step runner, untouched.
Per-sample losses: classification, the cross-entropy of each example; causal LM, each
sequence's mean token cross-entropy (labels shifted by one, ``-100`` ignored).

``--sharpness_every k``: every k steps :class:`lbopt.SharpnessMonitor` measures λ_max (and, with
``--sharpness_layers``, each weight matrix's curvature along its gradient) on a fixed probe
batch — this rank's slice of the first training examples — logs ``sharpness/*`` to the
trackers and writes ``sharpness.png`` (λ_max against 2/η) next to ``summary.json``.
"""

from __future__ import annotations

import argparse
from typing import Any

DISCARD_REFUSED = ("adadagrad", "adadagradnorm")  # adaptive batch: the controller tests plain micro-batch gradients


def add_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("training tools")
    group.add_argument(
        "--discard_small_loss",
        type=float,
        default=0.0,
        metavar="RHO",
        help="drop the fraction RHO in [0, 1) of each step's global batch with the smallest per-sample loss "
        "(threshold over all micro-batches and ranks; 0: off)",
    )
    group.add_argument(
        "--sharpness_every",
        type=int,
        default=0,
        metavar="K",
        help="every K steps log the top Hessian eigenvalue of the training loss (lbopt.SharpnessMonitor) "
        "and write sharpness.png (lambda_max vs 2/lr); 0: off",
    )
    group.add_argument("--sharpness_iters", type=int, default=20, help="power iterations per sharpness probe")
    group.add_argument(
        "--sharpness_layers",
        action="store_true",
        help="also each weight matrix's curvature along its gradient (one extra backward per matrix per probe)",
    )


def check_args(args: argparse.Namespace, die) -> None:
    """One-line errors before any process group exists."""
    rho = args.discard_small_loss
    if not 0.0 <= rho < 1.0:
        die(f"--discard_small_loss must be in [0, 1) (the fraction of each step's samples dropped), got {rho}")
    if rho > 0 and args.optimizer in DISCARD_REFUSED:
        die(f"--discard_small_loss is not supported with --optimizer {args.optimizer} (adaptive batch) yet")
    if rho > 0 and getattr(args, "batch_schedule", None):
        die("--discard_small_loss is not supported together with --batch_schedule yet")
    if args.sharpness_every < 0 or args.sharpness_iters < 1:
        die(f"--sharpness_every must be >= 0 and --sharpness_iters >= 1, got {args.sharpness_every}, "
            f"{args.sharpness_iters}")
    zero = ((getattr(args, "deepspeed_settings", None) or {}).get("zero_optimization") or {}).get("stage")
    if args.sharpness_every and zero == 3:
        die("--sharpness_every needs whole parameters on every rank, but ZeRO-3 partitions them; "
            "use a ZeRO-1/2 or plain DDP config")


def per_sample_loss(model, batch: dict):
    """One loss per sample of the micro-batch (see the module docstring)."""
    from lbopt.discard import per_sample_cross_entropy

    logits = model(**batch).logits
    return per_sample_cross_entropy(logits, batch["labels"], causal=logits.ndim == 3)


def discard_runner_class(base: type) -> type:
    """A step runner like ``base`` (the fixed-batch runner) whose steps discard small losses."""
    import torch

    from lbopt.discard import SmallLossDiscard

    class DiscardRunner(base):
        """Each step: the step's micro-batches, :meth:`lbopt.SmallLossDiscard.accumulate`, clip, step."""

        def __init__(self, run) -> None:
            super().__init__(run)
            self.discard = SmallLossDiscard(run.args.discard_small_loss)

        def step(self):
            import common  # the recipes' shared module (loaded: it imports this one)

            run, args, accelerator = self.run, self.run.args, self.run.accelerator
            batches = [next(self.stream) for _ in range(args.gradient_accumulation_steps)]
            skips = common.lbopt_skips(run)

            def backward(loss, _j):
                accelerator.backward(loss)  # divides by the accumulation, like any micro-batch loss
                if accelerator.sync_gradients and self.clip:
                    accelerator.clip_grad_norm_(run.model.parameters(), args.max_grad_norm)
                run.optimizer.step()
                run.optimizer.zero_grad()

            plan = self.discard.accumulate(
                batches, lambda b: per_sample_loss(run.model, b), backward,
                context=lambda _j: accelerator.accumulate(run.model),
            )
            loss = torch.tensor(plan.mean_loss, device=accelerator.device)  # all B samples, as without discarding
            return common.StepResult(loss, args.global_batch_size, common.step_was_skipped(run, skips))

        def log_extras(self) -> dict[str, float]:
            return self.discard.last.as_dict() if self.discard.last is not None else {}

    return DiscardRunner


def probe_batch(run) -> dict:
    """This rank's slice of the first training examples, collated, on the device: a fixed probe batch."""
    from torch.utils.data import Subset

    m, rank = run.args.per_device_batch_size, run.accelerator.process_index
    dataset = run.train_dl.dataset
    rows = Subset(dataset, range(rank * m, min(len(dataset), (rank + 1) * m)))
    batch = run.train_dl.collate_fn([rows[i] for i in range(len(rows))])
    return {k: v.to(run.accelerator.device) if hasattr(v, "to") else v for k, v in batch.items()}


def attach_sharpness(run) -> Any:
    """Add the sharpness probe to ``run.step_hooks`` when --sharpness_every is set; return the monitor."""
    if not run.args.sharpness_every:
        return None
    from lbopt.sharpness import SharpnessMonitor

    monitor = SharpnessMonitor(
        run.model, lambda model, batch: model(**batch).loss, probe_batch(run), every=run.args.sharpness_every,
        iters=run.args.sharpness_iters, optimizer=run.client_optimizer, log=run.accelerator.log,
        layers=None if run.args.sharpness_layers else False,
    )

    def hook(run, record: dict) -> None:
        report = monitor.maybe_probe(record["step"])
        if report is not None and run.accelerator.is_main_process:
            monitor.plot(run.output_dir / "sharpness.png", title=f"{run.task.name}/{run.args.optimizer}, "
                         f"global batch {run.args.global_batch_size}")

    run.step_hooks.append(hook)
    return monitor
