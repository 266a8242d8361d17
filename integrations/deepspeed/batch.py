"""Batch-size plumbing for DeepSpeed: a global batch that changes through ``engine.set_train_batch_size``.

:func:`attach_deepspeed` keeps the engine's global batch equal to a batch-size policy's (the
adaptive :class:`lbopt.BatchSizeController` or a :class:`lbopt.BatchSizeSchedule`), and
checks before training what would make an adaptive run silently wrong (a controller outside
the engine's optimizer, DeepSpeed's own clipping). :func:`deepspeed_steps` is the training
loop that marks accumulation boundaries explicitly (DeepSpeed's own boundary test counts
micro-steps modulo the *current* accumulation count, which would misalign after a change).
:class:`lbopt.integrations.adaptive_batch.AdaptiveBatchLoop` uses both when the model is a
DeepSpeed engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from lbopt.integrations.adaptive_batch import _owns, adaptive_steps, batch_len, controller_of, step_policy

from lbopt.batch.policy import BatchSizePolicy

__all__ = ["attach_deepspeed", "bind_and_attach", "deepspeed_steps", "take_gradient_clipping"]


def take_gradient_clipping(*configs: dict[str, Any]) -> float:
    """Switch DeepSpeed's gradient clipping off in ``configs`` (before the engine is built from
    them) and return the threshold they had (0.0: none).

    For an adaptive batch the lbopt optimizer clips the applied gradient instead (pass the
    returned value as its ``max_grad_norm``): DeepSpeed would clip the mean gradient that the
    batch-size test compares with unclipped micro-batch gradients. ``configs`` are the dicts
    the engine will be built from (one object may be listed twice); a value still ``"auto"``
    is refused, as nothing would say which threshold was meant.
    """
    values = {float(c.get("gradient_clipping") or 0.0) if c.get("gradient_clipping") != "auto" else None
              for c in configs}
    if None in values or len(values) != 1:
        raise ValueError(
            f"Invalid DeepSpeed config: gradient_clipping is {sorted(map(str, values))} before the engine is built; "
            "give it a number (or let TrainingArguments.max_grad_norm fill \"auto\")"
        )
    for c in configs:
        c["gradient_clipping"] = 0.0
    return values.pop()


def bind_and_attach(engine: Any, controller: BatchSizePolicy | None = None) -> BatchSizePolicy:
    """:func:`lbopt.integrations.deepspeed.bind` the engine when its optimizer is lbopt's (idempotent;
    a no-op after ``install()`` bound it), then :func:`attach_deepspeed`.

    For code where someone else called ``deepspeed.initialize`` (Accelerate, the HF Trainer):
    the binding is explicit, on this engine only; nothing in DeepSpeed is patched.
    """
    from .binding import bind
    from .config import is_lbopt

    if is_lbopt(getattr(engine, "basic_optimizer", None)):
        bind(engine)
    return attach_deepspeed(engine, controller)


def attach_deepspeed(engine: Any, controller: BatchSizePolicy | None = None) -> BatchSizePolicy:
    """Keep ``engine``'s global batch equal to the policy's: ``set_train_batch_size`` on change.

    Checks, before any step, that the policy's micro-batch and world size are the engine's;
    that a gradient-noise controller belongs to the engine's (lbopt) optimizer, the only
    place that sees the reduced gradient on ZeRO partitions; and that DeepSpeed does not clip
    (it would clip the gradient the test compares with unclipped micro-batch samples: use
    the optimizer's ``max_grad_norm``). Returns the policy (the lbopt optimizer's own
    controller by default).
    """
    basic = getattr(engine, "basic_optimizer", None)
    ctrl = controller_of(basic or engine.optimizer, controller)
    micro, world = engine.train_micro_batch_size_per_gpu(), engine.dp_world_size
    if ctrl.config.micro_batch_size != micro or ctrl.config.world_size != world:
        raise ValueError(
            f"Invalid controller: micro_batch_size={ctrl.config.micro_batch_size}, world_size="
            f"{ctrl.config.world_size}, but the engine has train_micro_batch_size_per_gpu={micro} and "
            f"dp_world_size={world}; build the controller with those"
        )
    if ctrl.owns_gradients and not _owns(basic, ctrl):
        raise ValueError(
            "Invalid controller: under DeepSpeed the controller must belong to the engine's optimizer "
            "(lbopt.AdAdaGrad / AdAdaGradNorm, e.g. \"optimizer\": {\"type\": \"AdAdaGradNorm\"}): only the "
            "optimizer sees the reduced gradient's global norm on ZeRO partitions"
        )
    clipping = float(engine.gradient_clipping() or 0.0)
    if ctrl.owns_gradients and clipping > 0:
        raise ValueError(
            f"Invalid DeepSpeed config: gradient_clipping={clipping} with an adaptive batch: DeepSpeed would clip "
            "the mean gradient that the batch-size test compares with unclipped micro-batch gradients; set "
            f"\"gradient_clipping\": 0.0 and pass max_grad_norm={clipping} to the optimizer instead"
        )
    if getattr(engine, "_lbopt_policy", None) is not ctrl:
        engine._lbopt_policy = ctrl
        ctrl.on_change(lambda new, _old: engine.set_train_batch_size(new))
    engine.set_train_batch_size(ctrl.batch_size)
    return ctrl


def deepspeed_steps(engine: Any, micro_batches: Iterable[Any], controller: BatchSizePolicy,
                    ) -> Iterator[tuple[list[Any], Any]]:
    """Yield ``(micro_batches_of_step, backward)``; call ``backward(loss)`` per micro-batch.

    Marks the accumulation boundary on the last micro-batch of each step explicitly, scales
    each loss by ``1/len(step)`` (so a short last step is averaged right) and calls
    ``engine.step()`` after every backward, as DeepSpeed expects. A policy the optimizer does
    not own (a :class:`BatchSizeSchedule`) is stepped after the step's last micro-batch.
    """
    owned = _owns(getattr(engine, "basic_optimizer", None), controller)
    world = engine.dp_world_size
    for micro in adaptive_steps(micro_batches, controller):
        n = len(micro)
        state = {"i": 0}
        samples = sum(batch_len(b) for b in micro) * world

        def backward(loss: torch.Tensor, _n: int = n, _state: dict = state, _samples: int = samples) -> None:
            i = _state["i"]
            engine.set_gradient_accumulation_boundary(i == _n - 1)
            engine.backward(loss / _n, scale_wrt_gas=False)
            engine.step()
            _state["i"] = i + 1
            if i == _n - 1 and not owned:
                step_policy(controller, _samples)

        yield micro, backward
