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
- under DeepSpeed, :class:`AdaptiveBatchLoop` drives the engine itself and
  :class:`AdaptiveBatchTrainer` lets the Trainer drive it (explicit boundaries, no ``gas``
  scaling) with the engine's global batch following the policy; the bare-DeepSpeed
  pieces :func:`attach_deepspeed` / :func:`deepspeed_steps` live in DeepSpeed's adapter
  (:mod:`lbopt.integrations.deepspeed.batch`) and are re-exported here.

LR schedules: with ``lr_schedule="samples"`` (default) the scheduler advances by
``samples_seen / initial_batch_size`` (one tick per initial batch worth of data), so a
schedule written for the initial batch spans the same data whatever the batch grows to;
``"steps"`` ticks once per optimizer step.

Every route takes any batch-size *policy*: the adaptive :class:`lbopt.BatchSizeController` or
the planned :class:`lbopt.BatchSizeSchedule` (``--batch_schedule`` in the recipes).

Engines are imported lazily: importing this module imports neither Accelerate,
Transformers nor DeepSpeed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from lbopt.batch.controller import BatchSizeController
from lbopt.batch.policy import BatchSizePolicy
from lbopt.batch.schedule import BatchSizeSchedule

__all__ = [
    "AdaptiveBatchLoop",
    "AdaptiveBatchTrainer",  # noqa: F822 (built lazily by __getattr__: imports transformers)
    "AdaptiveStep",
    "adaptive_steps",
    "attach_deepspeed",
    "batch_len",
    "controller_of",
    "deepspeed_steps",  # noqa: F822 (from lbopt.integrations.deepspeed.batch, by __getattr__)
    "set_max_grad_norm",
    "step_policy",
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


def controller_of(optimizer: Any, controller: BatchSizePolicy | None = None) -> BatchSizePolicy:
    """``controller`` (any batch-size policy) or the optimizer's own ``batch_controller`` (unwrapping wrappers)."""
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
        "controller=BatchSizeController(...) / BatchSizeSchedule(...), or use lbopt.AdAdaGrad/AdAdaGradNorm"
    )


def _owns(optimizer: Any, controller: BatchSizePolicy) -> bool:
    """True when ``optimizer.step()`` already runs ``controller.step()`` (lbopt AdAdaGrad*)."""
    opt = optimizer
    for _ in range(4):
        if getattr(opt, "batch_controller", None) is controller:
            return True
        opt = getattr(opt, "optimizer", None)
        if opt is None:
            return False
    return False


def _base_optimizer(optimizer: Any, controller: BatchSizePolicy) -> Any:
    """The (possibly wrapped) optimizer that owns ``controller``, or None."""
    opt = optimizer
    for _ in range(4):
        if opt is None:
            return None
        if getattr(opt, "batch_controller", None) is controller:
            return opt
        opt = getattr(opt, "optimizer", None)
    return None


def set_max_grad_norm(optimizer: Any, controller: BatchSizePolicy, max_grad_norm: float | None) -> None:
    """Hand clipping to the lbopt optimizer that owns ``controller`` (it clips the applied gradient
    and feeds the controller the unclipped norm); refuses a conflicting value."""
    if max_grad_norm is None or max_grad_norm <= 0:
        return
    base = _base_optimizer(optimizer, controller)
    if base is None:
        raise ValueError("Invalid max_grad_norm: the optimizer does not own the controller; clip in the loop instead")
    if base.max_grad_norm is not None and base.max_grad_norm != max_grad_norm:
        raise ValueError(
            f"Invalid max_grad_norm: {max_grad_norm}, but the optimizer was built with max_grad_norm="
            f"{base.max_grad_norm}; pass one of them"
        )
    base.max_grad_norm = float(max_grad_norm)


def step_policy(controller: BatchSizePolicy, samples: int, grad_sq_norm: float | None = None) -> None:
    """Close one optimizer step for a policy the optimizer does not step itself."""
    if isinstance(controller, BatchSizeSchedule):
        controller.step(samples=samples)
    else:
        controller.step(grad_sq_norm=grad_sq_norm)  # type: ignore[call-arg]


def adaptive_steps(micro_batches: Iterable[Any], controller: BatchSizePolicy) -> Iterator[list[Any]]:
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
        self.index = 0

    def __len__(self) -> int:
        return len(self.micro)

    def __iter__(self) -> Iterator[Any]:
        n = len(self.micro)
        for i, mb in enumerate(self.micro):
            self.index = i
            last = i == n - 1
            ctx = contextlib.nullcontext() if last or self.loop.engine is not None else self.loop._no_sync()
            with ctx:
                yield mb

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss, divided by this step's micro-batch count.

        Under DeepSpeed: the engine's backward with the accumulation boundary marked on the
        step's last micro-batch, then ``engine.step()`` (which steps the optimizer there).
        """
        scaled = loss / len(self.micro)
        engine = self.loop.engine
        if engine is not None:
            engine.set_gradient_accumulation_boundary(self.index == len(self.micro) - 1)
            engine.backward(scaled, scale_wrt_gas=False)
            engine.step()
            return
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

    ``controller``: any batch-size policy — a :class:`BatchSizeController` (default: the
    optimizer's own, lbopt AdAdaGrad*) or a :class:`BatchSizeSchedule`.
    ``train_dataloader`` yields micro-batches of ``controller.config.micro_batch_size`` per
    rank (under Accelerate: the prepared loader). The accelerator must not accumulate by
    itself (``gradient_accumulation_steps=1``): the loop does. Under DeepSpeed (the model is
    a ``DeepSpeedEngine``, e.g. from ``accelerator.prepare``) the loop drives the engine:
    ``set_train_batch_size`` on every change, explicit accumulation boundaries.

    ``max_grad_norm``: with an optimizer that owns the controller it is handed to the
    optimizer (clip the applied gradient, measure noise unclipped); otherwise the loop clips
    and passes the pre-clip norm to the controller. Engine clipping must stay off.
    Counters ``optimizer_steps``, ``samples_seen`` (global), ``epoch_samples`` and
    ``batch_sizes`` (global samples of every step) are for logging and tests;
    :meth:`state_dict` / :meth:`load_state_dict` carry them (the policy's own state travels
    with it or with the optimizer).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        controller: BatchSizePolicy | None = None,
        *,
        accelerator: Any = None,
        lr_scheduler: Any = None,
        lr_schedule: str = "samples",
        max_grad_norm: float | None = None,
    ) -> None:
        self.model, self.optimizer, self.accelerator = model, optimizer, accelerator
        self.engine = _deepspeed_engine(model)
        base = self.engine.basic_optimizer if self.engine is not None else optimizer
        self.controller = controller_of(base, controller)
        self.owned = _owns(base, self.controller)
        self.max_grad_norm = max_grad_norm if max_grad_norm and max_grad_norm > 0 else None
        if self.owned:
            set_max_grad_norm(base, self.controller, self.max_grad_norm)
        elif self.controller.owns_gradients:
            self.controller.attach(model)
        if self.engine is not None:
            attach_deepspeed(self.engine, self.controller)
        accumulating = getattr(accelerator, "gradient_accumulation_steps", 1) != 1
        if self.engine is None and accelerator is not None and accumulating:  # (the DeepSpeed route ignores it)
            raise ValueError(
                f"Invalid accelerator: gradient_accumulation_steps={accelerator.gradient_accumulation_steps}; "
                "AdaptiveBatchLoop accumulates itself, create the Accelerator with gradient_accumulation_steps=1"
            )
        world = accelerator.num_processes if accelerator is not None else (
            self.engine.dp_world_size if self.engine is not None else
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
        samples = step.samples * self.world
        if self.engine is None:
            grad_sq_norm = self._clip() if not self.owned else None
            with ctrl.scaled_lr(self.optimizer) if not self.owned else contextlib.nullcontext():
                self.optimizer.step()
            if not self.owned:
                step_policy(ctrl, samples, grad_sq_norm)
            self.optimizer.zero_grad()
        elif not self.owned:  # the engine stepped in the last backward; a schedule follows the data
            step_policy(ctrl, samples)
        self.samples_seen += samples
        self.epoch_samples += samples
        self.batch_sizes.append(samples)
        self.optimizer_steps += 1
        self.schedule.after_step(self.samples_seen)

    def _clip(self) -> float | None:
        """Clip for optimizers that do not own the controller; return the pre-clip ``‖g‖²``."""
        if self.max_grad_norm is None:
            return None
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.accelerator is not None:
            total = self.accelerator.clip_grad_norm_(params, self.max_grad_norm)
        else:
            total = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        return float(total) ** 2

    def state_dict(self) -> dict[str, Any]:
        """Counters and the LR-schedule ticks (for ``accelerator.register_for_checkpointing``)."""
        return {"optimizer_steps": self.optimizer_steps, "samples_seen": self.samples_seen,
                "batch_sizes": list(self.batch_sizes), "ticks": self.schedule.ticks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer_steps = int(state["optimizer_steps"])
        self.samples_seen = int(state["samples_seen"])
        self.batch_sizes = list(state["batch_sizes"])
        self.schedule.ticks = int(state["ticks"])


def _deepspeed_engine(model: Any) -> Any:
    """The DeepSpeed engine when ``model`` is one (Accelerate's prepared model under DeepSpeed), else None."""
    cls = type(model)
    if any(c.__name__ == "DeepSpeedEngine" and c.__module__.startswith("deepspeed.") for c in cls.__mro__):
        return model
    return None


# --------------------------------------------------------------------------- HF Trainer
def _make_trainer_class() -> type:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import ExportableState

    class _AdaptiveBatchState(TrainerCallback, ExportableState):
        """Counts samples, steps policies the optimizer does not own, and saves the data position."""

        def __init__(self, trainer: Any) -> None:
            self.trainer = trainer

        def state(self) -> dict:  # saved in trainer_state.json with every checkpoint
            t = self.trainer
            schedule = getattr(t, "_schedule", None)
            return {"args": {}, "attributes": {
                "epoch_index": t._epoch_index, "micro_in_epoch": t._micro_in_epoch, "samples_seen": t.samples_seen,
                "accumulation": t.args.gradient_accumulation_steps, "ticks": schedule.ticks if schedule else 0,
                "policy": None if t._policy_pending() or t._owned() else _jsonable(t.batch_controller.state_dict()),
            }}

        def on_epoch_begin(self, args, state, control, **kwargs):  # noqa: D102
            t = self.trainer
            t._epoch_index += 1
            t._micro_in_epoch, t._resume_micro = t._resume_micro or 0, None

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: D102
            t = self.trainer
            if t._deepspeed_engine() is not None:  # the engine steps inside the step's last backward
                t._scale_lr()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):  # noqa: D102
            t = self.trainer
            t._step_samples.append(t._pending_samples)
            t._pending_samples = 0
            if t._deepspeed_engine() is None:
                t._scale_lr()

        def on_optimizer_step(self, args, state, control, **kwargs):  # noqa: D102
            t = self.trainer
            t._restore_lr()
            if not t._owned():  # gradients are still there (zero_grad comes later); the norm is pre-clip
                sq = None if t._pre_clip_norm is None else float(t._pre_clip_norm) ** 2
                step_policy(t.batch_controller, t._step_samples[-1], sq)

        def on_step_end(self, args, state, control, **kwargs):  # noqa: D102
            t = self.trainer
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

        ``batch_controller`` may be any policy (a :class:`BatchSizeSchedule` too); one the
        optimizer does not own is stepped after each optimizer step with the pre-clip
        gradient norm, and its ``lr_factor`` scales the groups' LR during the step.
        ``args.max_grad_norm`` with an lbopt AdAdaGrad* optimizer moves into the optimizer
        (clip the applied gradient, measure noise unclipped) and the Trainer stops clipping.

        Under DeepSpeed (``TrainingArguments(deepspeed=...)``, ZeRO 1-3): the optimizer comes
        from ``optimizer_cls_and_kwargs`` (e.g. ``trainer_optimizer(lbopt.AdAdaGradNorm, ...)``)
        or from the config's ``"optimizer"`` section (after ``lbopt.integrations.deepspeed.install()``).
        The config's ``gradient_clipping`` (``"auto"``: ``max_grad_norm``) moves into the
        optimizer and the engine's is set to 0 before the engine is built; the engine is then
        bound to the lbopt optimizer (:func:`lbopt.integrations.deepspeed.batch.bind_and_attach`)
        and its global batch is set to each step's (``engine.set_train_batch_size``). The Trainer
        already marks the accumulation boundary on the step's last micro-batch and divides each
        loss by the step's micro-batch count (DeepSpeed's own ``gas`` scaling is off), so only
        the count changes. A DeepSpeed ``"scheduler"`` section is ticked by data as well.

        Resume (also mid-epoch, also under DeepSpeed) reproduces the uninterrupted run: the
        micro-batches consumed in the epoch, the accumulation count, the sample counters and a
        non-owned policy's state are saved in ``trainer_state.json`` and restored (the owned
        controller travels in the optimizer's state, also in DeepSpeed's checkpoint); the
        Trainer then skips exactly those micro-batches (not ``global_step × accumulation``).
        """

        def __init__(self, *args: Any, batch_controller: BatchSizePolicy | None = None,
                     lr_schedule: str = "samples", **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._engine_clip: float | None = None
            if self.is_deepspeed_enabled and self.optimizer is not None:
                raise ValueError(
                    "Invalid optimizers=: under DeepSpeed the Trainer builds the optimizer again when training starts "
                    "(transformers' deepspeed_init drops a ready-made one); pass optimizer_cls_and_kwargs="
                    "lbopt.integrations.trainer.trainer_optimizer(lbopt.AdAdaGradNorm, ...) instead, or name the "
                    "optimizer in the DeepSpeed config after lbopt.integrations.deepspeed.install()"
                )
            if self.is_deepspeed_enabled and (batch_controller is None or batch_controller.owns_gradients):
                # Before the engine exists: the optimizer clips, DeepSpeed must not (see take_gradient_clipping).
                from lbopt.integrations.deepspeed.batch import take_gradient_clipping

                plugin = self.accelerator.state.deepspeed_plugin
                self._engine_clip = take_gradient_clipping(
                    *{id(c): c for c in (plugin.deepspeed_config, plugin.hf_ds_config.config)}.values())
            self._saved_lrs: list[float] | None = None
            self._resuming = False
            self._resume_micro: int | None = None
            self._pre_clip_norm: float | None = None
            self._given_controller = batch_controller
            self.lr_schedule = lr_schedule
            if lr_schedule not in LR_SCHEDULES:
                raise ValueError(f"Invalid lr_schedule: {lr_schedule!r}; expected one of {LR_SCHEDULES}")
            self._micro_in_epoch = 0
            self._resume_micro = None
            self._pending_samples = 0
            self._step_samples: list[int] = []
            self.samples_seen = 0
            self._world = self.args.world_size
            self._epoch_index = -1
            self._pending_ticks: int | None = None
            self.add_callback(_AdaptiveBatchState(self))
            if self.optimizer is not None or batch_controller is not None:
                # Before train() sizes the epoch: the first steps use the initial batch.
                self.args.gradient_accumulation_steps = self.batch_controller.accumulation_steps

        @property
        def step_samples(self) -> list[int]:
            return self._step_samples

        @property
        def batch_controller(self) -> BatchSizePolicy:
            return controller_of(self.optimizer, self._given_controller)

        def _owned(self) -> bool:
            return _owns(self.optimizer, self.batch_controller)

        def _deepspeed_engine(self) -> Any:
            """The DeepSpeed engine Accelerate built for this Trainer (None before that, or without DeepSpeed)."""
            wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None) if self.is_deepspeed_enabled else None
            return None if wrapped is None else wrapped.engine

        def _scale_lr(self) -> None:
            """LR coupling (``lr_factor``) of a policy the optimizer does not apply itself, for one step."""
            if self._owned() or self._saved_lrs is not None:
                return
            self._saved_lrs = [g["lr"] for g in self.optimizer.param_groups]
            for g in self.optimizer.param_groups:
                g["lr"] = g["lr"] * self.batch_controller.lr_factor

        def _restore_lr(self) -> None:
            if self._saved_lrs is not None:
                for g, lr in zip(self.optimizer.param_groups, self._saved_lrs):
                    g["lr"] = lr
                self._saved_lrs = None

        def _policy_pending(self) -> bool:
            """No policy yet: the optimizer comes from ``optimizer_cls_and_kwargs`` and is not built yet
            (the Trainer asks its callbacks for their state before it creates the optimizer)."""
            return self.optimizer is None and self._given_controller is None

        def _get_grad_norm(self, model, grad_norm=None):  # noqa: D102 - remember the pre-clip norm
            out = super()._get_grad_norm(model, grad_norm=grad_norm)
            self._pre_clip_norm = None if out is None else float(out)
            return out

        def _load_callback_state(self) -> None:  # noqa: D102 - ours is restored by _init_training_state
            saved = self.state.stateful_callbacks.pop(_STATE_KEY, None)
            try:
                super()._load_callback_state()
            finally:
                if saved is not None:
                    self.state.stateful_callbacks[_STATE_KEY] = saved

        def _init_training_state(self, *args: Any, **kwargs: Any):  # noqa: D102
            epochs, micro = super()._init_training_state(*args, **kwargs)
            saved = self.state.stateful_callbacks.get(_STATE_KEY) if self.state.global_step > 0 else None
            if isinstance(saved, list):
                saved = saved[0] if saved else None
            if not saved:
                return epochs, micro
            attrs = saved["attributes"]
            # The Trainer would skip global_step × accumulation micro-batches (a constant count); the
            # exact position is what this trainer saved.
            self.samples_seen = int(attrs["samples_seen"])
            self._resuming = True  # the saved count stands (a policy loaded later must not reset it)
            self.args.gradient_accumulation_steps = int(attrs["accumulation"])
            self._pending_ticks = int(attrs["ticks"])
            if getattr(self, "_schedule", None) is not None:
                self._schedule.ticks, self._pending_ticks = self._pending_ticks, None
            if attrs.get("policy") is not None:
                self.batch_controller.load_state_dict(attrs["policy"])
            epoch, done = int(attrs["epoch_index"]), int(attrs["micro_in_epoch"])
            if done >= len(self.get_train_dataloader()):
                epoch, done = epoch + 1, 0
            self._epoch_index, self._resume_micro = epoch - 1, done
            return epoch, done

        def create_scheduler(self, *args: Any, **kwargs: Any):  # noqa: D102
            out = super().create_scheduler(*args, **kwargs)
            if kwargs.get("optimizer") is None and len(args) < 2:
                # (DeepSpeed's DummyScheduler calls this on a copy of the trainer, with the optimizer
                # it is building: the engine does not exist yet; bind on the Trainer's own call.)
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
            if self.args.gradient_accumulation_steps != ctrl.accumulation_steps and not self._resuming:
                self.args.gradient_accumulation_steps = ctrl.accumulation_steps
            engine = self._deepspeed_engine()
            clip = self._engine_clip if engine is not None else self.args.max_grad_norm
            if not _owns(self.optimizer, ctrl):
                if ctrl.owns_gradients and engine is None:
                    ctrl.attach(self.model)
            elif clip and clip > 0:
                set_max_grad_norm(self.optimizer, ctrl, clip)
                self.args.max_grad_norm = 0.0  # the optimizer clips; the Trainer must not
            scheduler = self.lr_scheduler
            if engine is not None:
                from lbopt.integrations.deepspeed.batch import bind_and_attach

                bind_and_attach(engine, ctrl)  # refuses a gradient-noise policy outside the engine's optimizer
                # A scheduler the engine owns is stepped by the engine (the Trainer's wrapper does nothing).
                scheduler = engine.lr_scheduler if engine.lr_scheduler is not None else scheduler
            self._schedule = _SampleSchedule(scheduler, self.lr_schedule, cfg.initial_batch_size)
            if self._pending_ticks is not None:
                self._schedule.ticks, self._pending_ticks = self._pending_ticks, None
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
            engine = self._deepspeed_engine()
            if engine is not None:  # the engine's batch is the step it runs (its counters, its logs)
                engine.set_train_batch_size(n * self.args.per_device_train_batch_size * self._world)
            batch_samples, num_items = super().get_batch_samples(epoch_iterator, n, device)
            self._micro_in_epoch += len(batch_samples)
            self._pending_samples += sum(batch_len(b) for b in batch_samples) * self._world
            return batch_samples, num_items

    return AdaptiveBatchTrainer


_STATE_KEY = "_AdaptiveBatchState"


def _jsonable(state: dict[str, Any]) -> dict[str, Any]:
    """A policy's state for trainer_state.json (schedules: plain numbers and lists only)."""
    return {k: [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, list) else v
            for k, v in state.items()}


_TRAINER_CLASS: type | None = None


def __getattr__(name: str) -> Any:
    global _TRAINER_CLASS
    if name == "AdaptiveBatchTrainer":
        if _TRAINER_CLASS is None:
            _TRAINER_CLASS = _make_trainer_class()
        return _TRAINER_CLASS
    if name in ("attach_deepspeed", "deepspeed_steps"):  # DeepSpeed's adapter owns them
        from lbopt.integrations.deepspeed import batch

        return getattr(batch, name)
    raise AttributeError(name)


def attach_deepspeed(engine: Any, controller: BatchSizePolicy | None = None) -> BatchSizePolicy:
    """See :func:`lbopt.integrations.deepspeed.batch.attach_deepspeed` (kept here for imports)."""
    from lbopt.integrations.deepspeed.batch import attach_deepspeed as attach

    return attach(engine, controller)
