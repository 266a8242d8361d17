"""Engine adapters: one per engine, each binding that engine to lbopt's optimizers explicitly.

- :mod:`lbopt.integrations.deepspeed` — reads DeepSpeed ZeRO-1/2/3 (and bf16/fp16 wrapper)
  partitions and hands the optimizer a layout resolver for them; replaces, on the ZeRO
  optimizer *instance*, the per-group step (one ``step()`` over all groups where statistics
  span groups) and the universal-checkpoint loader; builds optimizers a DeepSpeed config
  names; converts checkpoints to the universal format; drives a growing batch. Nothing
  happens on ``import lbopt``: users bind with ``initialize``/``bind``, or opt in to the
  config route with ``install()`` (see the module and docs/deepspeed.md).
- :mod:`lbopt.integrations.fsdp` — FSDP2/HSDP need nothing (DTensor layouts are in the core);
  FSDP1 binding, ZeroRedundancyOptimizer checks, DCP checkpoints of lbopt's per-layer state.
- :mod:`lbopt.integrations.cpu_fsdp` — Accelerate's FSDP path on CPU ranks (gloo), where
  Accelerate itself would fall back to DDP: ``CPUFSDPAccelerator``, ``CPUFSDPTrainer``.
- :mod:`lbopt.integrations.adaptive_batch` — the batch-size controller's plumbing for
  Accelerate, the HF Trainer and DeepSpeed.

Most partition knowledge lives in the adapters, not all of it: the optimizer core reads
``ds_shape`` (the full shape of a parameter ZeRO-3 has already partitioned) and AdaGrad
notices when its accumulators live on engine partitions rather than on the parameters.

Launch configurations users copy live next to the adapters: ``deepspeed_configs/``
(DeepSpeed JSON), ``accelerate/`` (Accelerate YAML), ``slurm/``.

Importing this package imports no engine.
"""

__all__: list[str] = []
