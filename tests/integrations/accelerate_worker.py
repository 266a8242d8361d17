"""Worker for the Accelerate route: `accelerate launch` with a DeepSpeed config naming an lbopt optimizer.

The DeepSpeed JSON (written by the test) says ``"optimizer": {"type": <name>}``; the script
only imports lbopt and hands Accelerate a ``DummyOptim``, as Accelerate documents for
optimizers defined in the DeepSpeed config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lbopt.integrations import deepspeed as adapter  # noqa: E402

# Accelerate calls deepspeed.initialize itself: the config route needs the explicit opt-in.
adapter.install()

import ds_common as C  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DummyOptim  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="CBLR")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    accelerator = Accelerator()
    model = C.make_model()
    groups = C.param_groups(model, C.group_weight_decay(args.name))
    optimizer = DummyOptim(groups, lr=C.OPTIMIZERS[args.name]["lr"])
    model, optimizer = accelerator.prepare(model, optimizer)
    rank, world = accelerator.process_index, accelerator.num_processes
    mb = C.GLOBAL_BATCH // world
    for step in range(C.STEPS):
        x, y = C.data(step)
        loss = C.loss_fn(model, x[rank * mb:(rank + 1) * mb], y[rank * mb:(rank + 1) * mb])
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    engine = model
    info = {"basic": type(engine.basic_optimizer).__name__, "params": C.flat_params(engine.module).tolist()}
    if accelerator.is_main_process:
        with open(args.out, "w") as f:
            json.dump(info, f)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
