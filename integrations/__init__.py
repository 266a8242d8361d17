"""Engine adapters: the only lbopt code that knows how an engine partitions parameters.

- :mod:`lbopt.integrations.deepspeed` — layouts of DeepSpeed ZeRO-1/2/3 (and bf16/fp16
  wrapper) partitions, one ``step()`` over all groups for cross-group statistics, and the
  ``"optimizer": {"type": "CBLR", ...}`` config route. Installed automatically when
  ``deepspeed`` is imported after ``lbopt`` (see :mod:`lbopt._post_import`).

Launch configurations users copy live next to the adapters: ``deepspeed_configs/``
(DeepSpeed JSON), ``accelerate/`` (Accelerate YAML), ``slurm/``.

Importing this package imports no engine.
"""

__all__: list[str] = []
