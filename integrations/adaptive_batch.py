"""Engine plumbing for :class:`lbopt.BatchSizeController`: make the global batch really change.

All three routes keep the *micro-batch* fixed and change the number of micro-batches per
optimizer step (gradient accumulation), so memory per forward stays the same and the data
loader is never rebuilt:

- :func:`adaptive_steps`: splits any iterable of micro-batches into optimizer steps of the
  controller's current size. Micro-batches are consumed in order, each exactly once; the
  last step of an epoch takes what is left (no sample dropped or repeated).
- :class:`AdaptiveBatchLoop`: an Accelerate training loop (works with a bare model too):
  ``no_sync`` on all but the last micro-batch, loss divided by the step's micro-batch
  count, optimizer/scheduler step, controller step for optimizers that do not own one.
- :class:`AdaptiveBatchTrainer`: a ``transformers.Trainer`` whose gradient-accumulation
  count follows the controller (a callback alone cannot: the Trainer's inner loop decides
  when to step from ``step % gradient_accumulation_steps``; the subclass changes the count
  only where that stays aligned with the micro-batches actually fetched).
- :func:`attach_deepspeed` / :func:`deepspeed_steps`: ``engine.set_train_batch_size`` on
  every change, and a loop that marks accumulation boundaries explicitly (DeepSpeed's own
  boundary test counts micro-steps modulo the *current* accumulation count, which would
  misalign after a change).

LR schedules: with ``lr_schedule="samples"`` (default) the scheduler advances by
``samples_seen / initial_batch_size`` (one tick per initial batch worth of data), so a
schedule written for the initial batch spans the same data whatever the batch grows to;
``"steps"`` ticks once per optimizer step.

Engines are imported lazily: importing this module imports neither Accelerate,
Transformers nor DeepSpeed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from lbopt.batch.controller import BatchSizeController

__all__ = [
    "AdaptiveBatchLoop",
    "AdaptiveBatchTrainer",  # noqa: F822 (built lazily by __getattr__: imports transformers)
    "AdaptiveStep",
    "adaptive_steps",
    "attach_deepspeed",
    "batch_len",
    "controller_of",
    "deepspeed_steps",
]

LR_SCHEDULES = ("samples", "steps")


def batch_len(batch: Any) -> int:
    """Number of samples in a collated batch (first tensor's leading dimension)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        return batch_len(next(iter(batch.values())))
    if isinstance(batch, list | tuple):
        return batch_len(batch[0])
    if hasattr(batch, "keys"):
        return batch_len(batch[next(iter(batch.keys()))])
    raise TypeError(f"cannot tell the number of samples of a batch of type {type(batch).__name__}")


def controller_of(optimizer: Any, controller: BatchSizeController | None = None) -> BatchSizeController:
    """``controller`` or the optimizer's own ``batch_controller`` (unwrapping engine wrappers)."""
    if controller is not None:
        return controller
    opt = optimizer
    for _ in range(4):
        ctrl = getattr(opt, "batch_controller", None)
        if isinstance(ctrl, BatchSizeController):
            return ctrl
        opt = getattr(opt, "optimizer", None)
        if opt is None:
            break
    raise ValueError(
        "Invalid controller: None and the optimizer has no batch_controller; pass "
        "controller=BatchSizeController(...) or use lbopt.AdAdaGrad/AdAdaGradNorm"
    )


def _owns(optimizer: Any, controller: BatchSizeController) -> bool:
    """True when ``optimizer.step()`` already runs ``controller.step()`` (lbopt AdAdaGrad*)."""
    opt = optimizer
    for _ in range(4):
        if getattr(opt, "batch_controller", None) is controller:
            return True
        opt = getattr(opt, "optimizer", None)
        if opt is None:
            return False
    return False


def adaptive_steps(micro_batches: Iterable[Any], controller: BatchSizeController) -> Iterator[list[Any]]:
    """Group ``micro_batches`` into optimizer steps of ``controller.accumulation_steps`` each.

    The count is read when a step starts, so a change made by the previous optimizer step
    applies to the next one. The final list may be shorter (end of data).
    """
    it = iter(micro_batches)
    while True:
        step: list[Any] = []
        want = controller.accumulation_steps
        for _ in range(want):
            try:
                step.append(next(it))
            except StopIteration:
                break
        if not step:
            return
        yield step
        if len(step) < want:
            return


class _SampleSchedule:
    """Advance an LR scheduler by data seen (``"samples"``) or by optimizer steps."""

    def __init__(self, scheduler: Any, mode: str, initial_batch: int) -> None:
        if mode not in LR_SCHEDULES:
            raise ValueError(f"Invalid lr_schedule: {mode!r}; expected one of {LR_SCHEDULES}")
        self.scheduler, self.mode, self.initial_batch = scheduler, mode, initial_batch
        self.ticks = 0

    def after_step(self, samples_seen: int, already_ticked: int = 0) -> None:
        if self.scheduler is None:
            return
        target = self.ticks + 1 if self.mode == "steps" else max(self.ticks + 1, samples_seen // self.initial_batch)
        n = target - self.ticks
        for _ in range(max(0, n - already_ticked)):
            self.scheduler.step()
        self.ticks = target


class AdaptiveStep:
    """The micro-batches of one optimizer step; iterate to get them (inside ``no_sync`` but the last)."""

    def __init__(self, loop: AdaptiveBatchLoop, micro: list[Any]) -> None:
        self.loop, self.micro = loop, micro
        self.samples = sum(batch_len(b) for b in micro)
        self.finished = False

    def __len__(self) -> int:
        return len(self.micro)

    def __iter__(self) -> Iterator[Any]:
        n = len(self.micro)
        for i, mb in enumerate(self.micro):
            ctx = contextlib.nullcontext() if i == n - 1 else self.loop._no_sync()
            with ctx:
                yield mb

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss, divided by this step's micro-batch count."""
        scaled = loss / len(self.micro)
        if self.loop.accelerator is not None:
            self.loop.accelerator.backward(scaled)
        else:
            scaled.backward()

    def finish(self) -> None:
        """Optimizer step (LR scaled by the controller's ``lr_factor``), scheduler, zero_grad."""
        if not self.finished:
            self.finished = True
            self.loop._finish(self)


class AdaptiveBatchLoop:
    """Accelerate (or plain / DDP) training loop whose global batch follows a controller.

    ::

        loop = AdaptiveBatchLoop(model, optimizer, controller, accelerator=accelerator,
                                 lr_scheduler=scheduler)
        for epoch in range(epochs):
            for step in loop.steps(train_dataloader):      # one optimizer step each
                for batch in step:                          # its micro-batches
                    step.backward(loss_fn(model(batch)))
                step.finish()                               # optional: done automatically

    ``train_dataloader`` yields micro-batches of ``controller.config.micro_batch_size`` per
    rank (under Accelerate: the prepared loader). The accelerator must not accumulate by
    itself (``gradient_accumulation_steps=1``): the loop does. Counters
    ``optimizer_steps``, ``samples_seen`` (global), ``epoch_samples`` and ``batch_sizes``
    (global samples of every step) are for logging and tests.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        controller: BatchSizeController | None = None,
        *,
        accelerator: Any = None,
        lr_scheduler: Any = None,
        lr_schedule: str = "samples",
    ) -> None:
        self.model, self.optimizer, self.accelerator = model, optimizer, accelerator
        self.controller = controller_of(optimizer, controller)
        self.owned = _owns(optimizer, self.controller)
        if not self.owned:
            self.controller.attach(model)
        if accelerator is not None and getattr(accelerator, "gradient_accumulation_steps", 1) != 1:
            raise ValueError(
                f"Invalid accelerator: gradient_accumulation_steps={accelerator.gradient_accumulation_steps}; "
                "AdaptiveBatchLoop accumulates itself, create the Accelerator with gradient_accumulation_steps=1"
            )
        world = accelerator.num_processes if accelerator is not None else (
            torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        )
        if world != self.controller.config.world_size:
            raise ValueError(
                f"Invalid controller: world_size={self.controller.config.world_size} but the run has {world} "
                f"data-parallel processes; build the controller with world_size={world}"
            )
        self.schedule = _SampleSchedule(lr_scheduler, lr_schedule, self.controller.config.initial_batch_size)
        self.world = world
        self.optimizer_steps = 0
        self.samples_seen = 0
        self.epoch_samples = 0
        self.batch_sizes: list[int] = []
        self._open: AdaptiveStep | None = None

    def _no_sync(self) -> contextlib.AbstractContextManager:
        if self.accelerator is not None:
            return self.accelerator.no_sync(self.model)
        if hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def steps(self, train_dataloader: Iterable[Any]) -> Iterator[AdaptiveStep]:
        """One epoch: :class:`AdaptiveStep` s over ``train_dataloader``'s micro-batches."""
        self.epoch_samples = 0
        for micro in adaptive_steps(train_dataloader, self.controller):
            step = AdaptiveStep(self, micro)
            self._open = step
            yield step
            step.finish()
        self._open = None

    def _finish(self, step: AdaptiveStep) -> None:
        ctrl = self.controller
        with ctrl.scaled_lr(self.optimizer) if not self.owned else contextlib.nullcontext():
            self.optimizer.step()
        if not self.owned:
            ctrl.step()
        samples = step.samples * self.world
        self.samples_seen += samples
        self.epoch_samples += samples
        self.batch_sizes.append(samples)
        self.optimizer_steps += 1
        self.schedule.after_step(self.samples_seen)
        self.optimizer.zero_grad()


# --------------------------------------------------------------------------- HF Trainer
def _make_trainer_class() -> type:
    from transformers import Trainer, TrainerCallback

    class _Callback(TrainerCallback):
        def __init__(self, trainer: Any) -> None:
            self.trainer = trainer

        def on_epoch_begin(self, args, state, control, **kwargs):  # noqa: D102
            self.trainer._micro_in_epoch = 0

        def on_pre_optimizer_step(self, args, state, control, **kwargs):  # noqa: D102
            t = self.trainer
            t._step_samples.append(t._pending_samples)
            t._pending_samples = 0

        def on_step_end(self, args, state, control, **kwargs):  # noqa: D102
            t = self.trainer
            if not _owns(t.optimizer, t.batch_controller):
                t.batch_controller.step()
            samples = t._step_samples[-1] if t._step_samples else 0
            t.samples_seen += samples
            if t.lr_schedule == "samples" and t.lr_scheduler is not None:
                # The Trainer already ticked once; catch up to samples / initial batch.
                t._schedule.after_step(t.samples_seen, already_ticked=1)
            else:
                t._schedule.ticks += 1

    class AdaptiveBatchTrainer(Trainer):
        """``transformers.Trainer`` with a global batch that follows a :class:`BatchSizeController`.

        Pass ``batch_controller=`` or an lbopt AdAdaGrad* optimizer in ``optimizers=``. The
        micro-batch is ``per_device_train_batch_size``; the gradient-accumulation count is
        set from the controller before each optimizer step, at the first step where the
        Trainer's ``step % gradient_accumulation_steps`` bookkeeping stays aligned (at most
        a few steps' delay, none at epoch starts). ``samples_seen`` and ``step_samples``
        (global samples of every optimizer step) are recorded; the controller's figures go
        into the Trainer's logs (``batch/size``, ``batch/required``, ``batch/variance``...).

        Limits: resuming from a checkpoint *mid-epoch* restores the controller (it is in the
        AdAdaGrad optimizer's state) but the Trainer skips ``global_step × accumulation``
        micro-batches of the epoch as if the count had been constant; resume at epoch
        boundaries for an exact data order. Under DeepSpeed use :func:`deepspeed_steps`.
        """

        def __init__(self, *args: Any, batch_controller: BatchSizeController | None = None,
                     lr_schedule: str = "samples", **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._given_controller = batch_controller
            self.lr_schedule = lr_schedule
            if lr_schedule not in LR_SCHEDULES:
                raise ValueError(f"Invalid lr_schedule: {lr_schedule!r}; expected one of {LR_SCHEDULES}")
            self._micro_in_epoch = 0
            self._pending_samples = 0
            self._step_samples: list[int] = []
            self.samples_seen = 0
            self._world = self.args.world_size
            self.add_callback(_Callback(self))
            if self.optimizer is not None or batch_controller is not None:
                # Before train() sizes the epoch: the first steps use the initial batch.
                self.args.gradient_accumulation_steps = self.batch_controller.accumulation_steps

        @property
        def step_samples(self) -> list[int]:
            return self._step_samples

        @property
        def batch_controller(self) -> BatchSizeController:
            return controller_of(self.optimizer, self._given_controller)

        def create_scheduler(self, *args: Any, **kwargs: Any):  # noqa: D102
            out = super().create_scheduler(*args, **kwargs)
            self._bind_controller()
            return out

        def _bind_controller(self) -> None:
            ctrl = self.batch_controller
            cfg = ctrl.config
            world = self.args.world_size
            if cfg.micro_batch_size != self.args.per_device_train_batch_size or cfg.world_size != world:
                raise ValueError(
                    f"Invalid batch_controller: micro_batch_size={cfg.micro_batch_size}, world_size="
                    f"{cfg.world_size}, but the Trainer runs per_device_train_batch_size="
                    f"{self.args.per_device_train_batch_size} on {world} process(es); make them equal"
                )
            if self.args.gradient_accumulation_steps != ctrl.accumulation_steps:
                self.args.gradient_accumulation_steps = ctrl.accumulation_steps
            if not _owns(self.optimizer, ctrl):
                ctrl.attach(self.model)
            self._schedule = _SampleSchedule(self.lr_scheduler, self.lr_schedule, cfg.initial_batch_size)
            self._world = world

        def _aligned_accumulation(self) -> int:
            """The accumulation count closest to the controller's that the Trainer can take now.

            The Trainer steps when ``(micro-batches so far in the epoch) % count == 0``, so a
            new count ``g`` keeps steps aligned with fetched micro-batches only if it divides
            the micro-batches consumed so far; take the one nearest the wanted count between
            the current and the wanted one (the wanted one itself at epoch starts).
            """
            want = self.batch_controller.accumulation_steps
            have = self.args.gradient_accumulation_steps
            done = self._micro_in_epoch
            lo, hi = min(want, have), max(want, have)
            candidates = [g for g in range(lo, hi + 1) if done % g == 0]
            return min(candidates, key=lambda g: abs(g - want)) if candidates else have

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:  # noqa: D102
            if "loss" in logs:  # training logs: add the controller's last decision
                logs = {**logs, **self.batch_controller.last.as_dict(), "batch/samples_seen": self.samples_seen}
            super().log(logs, *args, **kwargs)

        def get_batch_samples(self, epoch_iterator, num_batches, device):  # noqa: D102
            self.args.gradient_accumulation_steps = self._aligned_accumulation()
            n = self.args.gradient_accumulation_steps
            batch_samples, num_items = super().get_batch_samples(epoch_iterator, n, device)
            self._micro_in_epoch += len(batch_samples)
            self._pending_samples += sum(batch_len(b) for b in batch_samples) * self._world
            return batch_samples, num_items

    return AdaptiveBatchTrainer


_TRAINER_CLASS: type | None = None


def __getattr__(name: str) -> Any:
    global _TRAINER_CLASS
    if name == "AdaptiveBatchTrainer":
        if _TRAINER_CLASS is None:
            _TRAINER_CLASS = _make_trainer_class()
        return _TRAINER_CLASS
    raise AttributeError(name)


# --------------------------------------------------------------------------- DeepSpeed
def attach_deepspeed(engine: Any, controller: BatchSizeController | None = None) -> BatchSizeController:
    """Keep ``engine``'s global batch equal to the controller's: ``set_train_batch_size`` on change.

    Checks that the controller's micro-batch and world size are the engine's. Returns the
    controller (the lbopt optimizer's own by default).
    """
    ctrl = controller_of(getattr(engine, "basic_optimizer", None) or engine.optimizer, controller)
    micro, world = engine.train_micro_batch_size_per_gpu(), engine.dp_world_size
    if ctrl.config.micro_batch_size != micro or ctrl.config.world_size != world:
        raise ValueError(
            f"Invalid controller: micro_batch_size={ctrl.config.micro_batch_size}, world_size="
            f"{ctrl.config.world_size}, but the engine has train_micro_batch_size_per_gpu={micro} and "
            f"dp_world_size={world}; build the controller with those"
        )
    if not _owns(getattr(engine, "basic_optimizer", None), ctrl):
        raise ValueError(
            "Invalid controller: under DeepSpeed the controller must belong to the engine's optimizer "
            "(lbopt.AdAdaGrad / AdAdaGradNorm, e.g. \"optimizer\": {\"type\": \"AdAdaGradNorm\"}): only the "
            "optimizer sees the reduced gradient's global norm on ZeRO partitions"
        )
    engine.set_train_batch_size(ctrl.batch_size)
    ctrl.on_change(lambda new, _old: engine.set_train_batch_size(new))
    return ctrl


def deepspeed_steps(engine: Any, micro_batches: Iterable[Any], controller: BatchSizeController,
                    ) -> Iterator[tuple[list[Any], Any]]:
    """Yield ``(micro_batches_of_step, backward)``; call ``backward(loss)`` per micro-batch.

    Marks the accumulation boundary on the last micro-batch of each step explicitly, scales
    each loss by ``1/len(step)`` (so a short last step is averaged right) and calls
    ``engine.step()`` after every backward, as DeepSpeed expects.
    """
    for micro in adaptive_steps(micro_batches, controller):
        n = len(micro)
        state = {"i": 0}

        def backward(loss: torch.Tensor, _n: int = n, _state: dict = state) -> None:
            i = _state["i"]
            engine.set_gradient_accumulation_boundary(i == _n - 1)
            engine.backward(loss / _n, scale_wrt_gas=False)
            engine.step()
            _state["i"] = i + 1

        yield micro, backward
