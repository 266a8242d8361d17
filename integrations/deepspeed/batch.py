"""Batch-size plumbing for DeepSpeed: a growing global batch through ``engine.set_train_batch_size``.

:func:`attach_deepspeed` keeps the engine's global batch equal to the
:class:`lbopt.BatchSizeController`'s; :func:`deepspeed_steps` is the training loop that marks
accumulation boundaries explicitly (DeepSpeed's own boundary test counts micro-steps modulo
the *current* accumulation count, which would misalign after a change).

This is DeepSpeed's place for them (one adapter per engine); the implementation still lives in
:mod:`lbopt.integrations.adaptive_batch`, which re-uses the engine-independent
:func:`~lbopt.integrations.adaptive_batch.adaptive_steps`.
"""

from __future__ import annotations

from lbopt.integrations.adaptive_batch import attach_deepspeed, deepspeed_steps

__all__ = ["attach_deepspeed", "deepspeed_steps"]
