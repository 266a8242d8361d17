"""Worker for the FSDP tests (one process per rank, launched by torchrun on gloo/CPU).

Modes:
  matrix   train each optimizer of --optimizers for --steps steps on a model sharded with
           FSDP2 (--mesh fsdp: 1-D mesh; hsdp: 2 x W/2, replicate x shard) or FSDP1
           (--engine fsdp1, use_orig_params=True); write the full final parameters and the
           number of collectives each optimizer step issued (CommDebugMode) as JSON;
  save     train --steps steps, save each rank's model and optimizer state_dict to --ckpt;
  resume   build fresh model and optimizer, load --ckpt, train to STEPS, write JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fsdp_common as C  # noqa: E402
from torch.distributed.tensor.debug import CommDebugMode  # noqa: E402


def shard(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    world = dist.get_world_size()
    if args.engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FSDP(model, use_orig_params=True, device_id=torch.device("cpu"),
                    auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if args.mesh == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def build(name: str, args: argparse.Namespace) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = shard(C.make_model(), args)
    opt = C.build_optimizer(name, model)
    if args.engine == "fsdp1" and name != C.NAIVE:
        from lbopt.integrations.fsdp import bind_fsdp1

        bind_fsdp1(opt, model)
    return model, opt


def local_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = C.data(step)
    rank, world = dist.get_rank(), dist.get_world_size()
    n = C.GLOBAL_BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def train(model, opt, start: int, stop: int) -> list[int]:
    comms = []
    for step in range(start, stop):
        x, y = local_batch(step)
        opt.zero_grad()
        C.loss_fn(model, x, y).backward()
        with CommDebugMode() as mode:
            opt.step()
        comms.append(mode.get_total_counts())
    return comms


def full_params(model: torch.nn.Module, args: argparse.Namespace) -> list[float]:
    if args.engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model):
            return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()
    return torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()]).tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", default="matrix", choices=["matrix", "save", "resume"])
    ap.add_argument("--engine", default="fsdp2", choices=["fsdp2", "fsdp1"])
    ap.add_argument("--mesh", default="fsdp", choices=["fsdp", "hsdp"])
    ap.add_argument("--optimizers", default=",".join([*C.OPTIMIZERS, C.NAIVE]))
    ap.add_argument("--steps", type=int, default=C.STEPS)
    ap.add_argument("--ckpt", default="")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results: dict = {}
    for name in args.optimizers.split(","):
        model, opt = build(name, args)
        if args.mode == "resume":
            saved = torch.load(os.path.join(args.ckpt, f"{name}.rank{rank}.pt"), weights_only=False)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optim"])
            comms = train(model, opt, saved["step"], C.STEPS)
        else:
            comms = train(model, opt, 0, args.steps)
        if args.mode == "save":
            os.makedirs(args.ckpt, exist_ok=True)
            torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": args.steps},
                       os.path.join(args.ckpt, f"{name}.rank{rank}.pt"))
        results[name] = {"params": full_params(model, args), "comms": comms}
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
