"""Worker for the FSDP tests (one process per rank, launched by torchrun on gloo/CPU).

For every run of --runs (fsdp2: fully_shard on a 1-D mesh; fsdp2-swap: the optimizer built
on the full model, its param_groups entries then swapped for the DTensors, as Accelerate
does; hsdp: fully_shard on a 2 x W/2 mesh, replicate x shard; fsdp1: FullyShardedDataParallel
with use_orig_params=True, bound with bind_fsdp1; zero: DDP + torch's ZeroRedundancyOptimizer;
fsdp1-flat / fsdp1-late: refused set-ups) and every optimizer of
--optimizers: train STEPS steps on the local share of each global batch; record the full
final parameters and the number of collectives each optimizer step issued (CommDebugMode),
or the error a refused combination raised. With --resume-at K: also train K steps, save
each rank's model and optimizer state_dict, load them into fresh objects and train on; the
same through torch.distributed.checkpoint with LayerStateCheckpoint (and, for CBLR, without).
Rank 0 writes everything as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # tests.batch

import fsdp_common as C  # noqa: E402
from torch.distributed.tensor.debug import CommDebugMode  # noqa: E402


def shard(model: torch.nn.Module, run: str) -> torch.nn.Module:
    """``fsdp2`` (1-D mesh), ``hsdp`` (2 x W/2 mesh), ``fsdp1`` (use_orig_params=True) or ``ddp``."""
    world = dist.get_world_size()
    if run == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if run == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FSDP(model, use_orig_params=True, device_id=torch.device("cpu"),
                    auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if run == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def build(name: str, run: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = C.make_model()
    if run == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        model = shard(model, "ddp")
        cls_name, kwargs, grouping = C.OPTIMIZERS[name]
        kwargs = dict(kwargs)
        groups = C.param_groups(model.module, kwargs.pop("weight_decay"))
        for g in groups:  # ZeroRedundancyOptimizer hands each rank a subset: names would not line up
            del g["param_names"]
        opt = ZeroRedundancyOptimizer(groups, optimizer_class=getattr(C.lbopt, cls_name), **kwargs)
        return model, opt
    if run in ("fsdp1-flat", "fsdp1-late"):  # refused: FlatParameters / optimizer built on flat views
        from lbopt.integrations.fsdp import bind_fsdp1
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        model = FSDP(model, use_orig_params=run == "fsdp1-late", device_id=torch.device("cpu"))
        opt = C.build_optimizer(name, model)
        if run == "fsdp1-late":
            bind_fsdp1(opt, model)
        return model, opt
    if run == "fsdp1":  # FSDP1: build the optimizer on the unwrapped model, wrap, bind
        from lbopt.integrations.fsdp import bind_fsdp1

        opt = C.build_optimizer(name, model)
        model = shard(model, run)
        if name != C.NAIVE:
            bind_fsdp1(opt, model)
        return model, opt
    if run == "ddp":
        model = shard(model, "ddp")
        return model, C.build_optimizer(name, model.module)
    if run == "fsdp2-swap":  # Accelerate's route: optimizer on the full model, then entries swapped for DTensors
        opt = C.build_optimizer(name, model)
        model = shard(model, "fsdp2")
        sharded = dict(model.named_parameters())
        for group in opt.param_groups:
            group["params"] = [sharded[n] for n in group["param_names"]]
        return model, opt
    model = shard(model, run)
    return model, C.build_optimizer(name, model)


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


def full_params(model: torch.nn.Module, run: str) -> list[float]:
    if run == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model):
            return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()
    if run in ("ddp", "zero"):
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()
    return torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()]).tolist()


def resumed(name: str, run: str, at: int, ckpt: str) -> list[float]:
    """Train ``at`` steps, save each rank's state_dicts, then continue with fresh objects from the files."""
    model, opt = build(name, run)
    train(model, opt, 0, at)
    os.makedirs(ckpt, exist_ok=True)
    path = os.path.join(ckpt, f"{run}.{name}.rank{dist.get_rank()}.pt")
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
    del model, opt
    model, opt = build(name, run)
    saved = torch.load(path, weights_only=False)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optim"])
    train(model, opt, at, C.STEPS)
    return full_params(model, run)


def resumed_dcp(name: str, run: str, at: int, ckpt: str, extra: bool) -> list[float]:
    """As :func:`resumed`, through torch.distributed.checkpoint (what Accelerate's FSDP save_state uses).

    ``extra``: through lbopt's LayerStateCheckpoint; without it (get/set_state_dict alone) the
    optimizer entries DCP drops are lost.
    """
    import torch.distributed.checkpoint as dcp
    from lbopt.integrations.fsdp import LayerStateCheckpoint
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = os.path.join(ckpt, f"dcp.{run}.{name}.{extra}")
    model, opt = build(name, run)
    train(model, opt, 0, at)
    if extra:
        dcp.save({"train": LayerStateCheckpoint(opt, model)}, checkpoint_id=path)
    else:
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    model, opt = build(name, run)
    if extra:
        dcp.load({"train": LayerStateCheckpoint(opt, model)}, checkpoint_id=path)
    else:
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(model, opt, at, C.STEPS)
    return full_params(model, run)


def controller_run(test: str) -> dict:
    """AdAdaGradNorm + its controller (norm test) under FSDP2, the stream of tests/batch/dist_worker.py."""
    from lbopt.integrations.fsdp import watch_unsharded

    from tests.batch import dist_worker as D
    from tests.batch import problem as P

    rank, world = dist.get_rank(), dist.get_world_size()
    model = shard(P.make_model(), "fsdp2")
    opt = C.lbopt.AdAdaGradNorm(model.parameters(), lr=0.3, world_size=world, test=test, **D.CTRL, **D.TEST_KW[test])
    ctrl = watch_unsharded(opt.batch_controller, model)
    j, sizes = 0, []
    for _ in range(D.STEPS):
        k_total = ctrl.batch_size // P.MICRO
        mine = [j + k for k in range(k_total) if k % world == rank]
        opt.zero_grad()
        for i, idx in enumerate(mine):
            model.set_requires_gradient_sync(i == len(mine) - 1)  # reduce-scatter once per step
            x, y = P.micro_batch(idx)
            (P.loss_fn(model, x, y) / len(mine)).backward()
        sizes.append(ctrl.batch_size)
        opt.step()
        j += k_total
    return {"params": full_params(model, "fsdp2"), "sizes": sizes, "b_sq": opt.accumulator}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", default="fsdp2", help="RUN[:OPT+OPT],... (see above)")
    ap.add_argument("--optimizers", default=",".join([*C.OPTIMIZERS, C.NAIVE]))
    ap.add_argument("--resume-at", type=int, default=0, help="also save at this step and resume (fsdp2 runs)")
    ap.add_argument("--ckpt", default="")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    results: dict = {}
    for spec in args.runs.split(","):
        run, _, only = spec.partition(":")
        results[run] = {}
        if run == "controller":
            results[run] = controller_run(only or "norm")
            continue
        for name in only.split("+") if only else args.optimizers.split(","):
            if run == "zero" and name in ("CBLR-module", C.NAIVE):
                continue  # ZeroRedundancyOptimizer's per-rank groups carry no names
            try:
                model, opt = build(name, run)
                comms = train(model, opt, 0, C.STEPS)
            except Exception as exc:  # a refusal the test checks
                results[run][name] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            results[run][name] = {"params": full_params(model, run), "comms": comms}
            if args.resume_at and run == "fsdp2" and name in C.RESUMED:
                results[run][name]["resumed"] = resumed(name, run, args.resume_at, args.ckpt)
                results[run][name]["resumed_dcp"] = resumed_dcp(name, run, args.resume_at, args.ckpt, True)
                if name == "CBLR":  # the control: DCP alone loses the curvature EMA
                    results[run][name]["resumed_dcp_without_extra"] = resumed_dcp(
                        name, run, args.resume_at, args.ckpt, False)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
