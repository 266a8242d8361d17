"""Small-loss discarding in the Hugging Face ``Trainer`` (see :mod:`lbopt.discard` for the exact rule).

``SmallLossDiscardTrainer(..., discard_small_loss=ρ)`` (or :class:`SmallLossDiscardMixin` in front of
another ``Trainer`` subclass): the Trainer already collects the micro-batches of each optimizer step
before the first forward (``get_batch_samples``); the mixin forwards them once without gradients,
all-gathers the per-sample losses, picks the global kept set, and ``compute_loss`` then returns
``(A·W/K) Σ_{kept} ℓ_i`` for each micro-batch. The Trainer divides every micro-batch loss by the
accumulation A (``loss_is_scaled_for_ga = False`` is set) and DDP/ZeRO average over the W ranks,
so the step's gradient is the mean over the K kept samples. Per-sample losses are the
cross-entropy of each example (sequence classification) or each sequence's mean token
cross-entropy (causal LM, ``logits`` of rank 3).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from lbopt.discard import DiscardPlan, SmallLossDiscard, per_sample_cross_entropy

__all__ = ["SmallLossDiscardMixin", "SmallLossDiscardTrainer", "per_sample_loss"]


def per_sample_loss(model: Any, inputs: dict) -> tuple[torch.Tensor, Any]:
    """(per-sample losses, model outputs) of one micro-batch with a ``labels`` entry."""
    outputs = model(**inputs)
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    return per_sample_cross_entropy(logits, inputs["labels"], causal=logits.ndim == 3), outputs


class SmallLossDiscardMixin:
    """Put in front of a ``Trainer`` class; adds the ``discard_small_loss`` keyword (ρ ∈ [0, 1))."""

    def __init__(self, *args: Any, discard_small_loss: float = 0.0, **kwargs: Any) -> None:
        self.discard = SmallLossDiscard(discard_small_loss)  # validates ρ before the Trainer starts anything
        super().__init__(*args, **kwargs)
        self.discard_plan: DiscardPlan | None = None
        self._micro_index = 0
        if self.discard.enabled:
            self.loss_is_scaled_for_ga = False  # the Trainer divides each micro-batch loss by the accumulation

    def get_batch_samples(self, epoch_iterator, num_batches, device):  # noqa: D102 - Trainer's hook
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.discard.enabled and batches:
            model = self.model_wrapped
            with torch.random.fork_rng(devices=_cuda_devices()), torch.no_grad():
                losses = [per_sample_loss(model, self._prepare_inputs(dict(b)))[0] for b in batches]
            self.discard_plan = self.discard.select(losses)
            self._micro_index = 0
        return batches, num_items

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        plan = self.discard_plan
        if not self.discard.enabled or plan is None or not model.training:  # evaluation: the plain loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        losses, outputs = per_sample_loss(model, inputs)
        loss = plan.micro_batch_loss(self._micro_index, losses)
        self._micro_index += 1
        if self._micro_index == len(plan.masks):  # the step's last micro-batch: the plan is used up
            self.discard_plan = None
        return (loss, outputs) if return_outputs else loss


class SmallLossDiscardTrainer(SmallLossDiscardMixin, Trainer):
    """``transformers.Trainer`` with small-loss discarding (``discard_small_loss=ρ``)."""


def _cuda_devices() -> list[int]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return [torch.cuda.current_device()]
    return []
