"""Worker processes for the 2-rank gloo tests (launched with torch.multiprocessing.spawn)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import lbopt
from lbopt.layout import Layout, Segment, register_layout_resolver
from tests.optim.problem import batch, flat, loss_fn, make_model

STEPS = 12
OPTIMIZERS = {
    "lars": lambda ps: lbopt.LARS(ps, lr=0.5, weight_decay=1e-3),
    "lamb": lambda ps: lbopt.LAMB(ps, lr=1e-2),
    "cblr": lambda ps: lbopt.CBLR(ps, lr=0.5, weight_decay=1e-3),
    "mclr": lambda ps: lbopt.MCLR(ps, lr=0.5, weight_decay=1e-3),
}


def _init(rank: int, world: int, rendezvous: str) -> None:
    """File rendezvous: no port to race for with other jobs on the machine."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)


def ddp_worker(rank: int, world: int, rendezvous: str, out: str) -> None:
    """DDP: each rank takes its share of the global batch; DDP averages the gradients."""
    _init(rank, world, rendezvous)
    results = {}
    for name, make in OPTIMIZERS.items():
        model = torch.nn.parallel.DistributedDataParallel(make_model())
        opt = make(model.parameters())
        for t in range(STEPS):
            x, y = batch(t)
            share = x.shape[0] // world
            sl = slice(rank * share, (rank + 1) * share)
            opt.zero_grad()
            loss_fn(model, x[sl], y[sl]).backward()
            opt.step()
        results[name] = flat(model.module)
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


class FlatPartition:
    """A miniature ZeRO-2: each group's parameters flattened, padded, cut into equal parts."""

    def __init__(self, groups: list[list[torch.Tensor]], rank: int, world: int, offset: int) -> None:
        self.groups, self.rank, self.world = groups, rank, world
        self.sizes, self.parts = [], []
        for params in groups:
            total = sum(p.numel() for p in params) + offset  # offset shifts cut points
            size = -(-total // world)
            self.sizes.append(size)
            full = torch.zeros(size * world)
            full[offset : offset + sum(p.numel() for p in params)] = torch.cat([p.detach().reshape(-1) for p in params])
            self.parts.append(full[rank * size : (rank + 1) * size].clone())
        self.offset = offset

    def scatter_grads(self) -> None:
        for params, part, size in zip(self.groups, self.parts, self.sizes):
            full = torch.zeros(size * self.world)
            full[self.offset : self.offset + sum(p.numel() for p in params)] = torch.cat(
                [p.grad.reshape(-1) for p in params]
            )
            part.grad = full[self.rank * size : (self.rank + 1) * size].clone()

    def gather_params(self) -> None:
        for params, part, size in zip(self.groups, self.parts, self.sizes):
            chunks = [torch.zeros(size) for _ in range(self.world)]
            dist.all_gather(chunks, part.detach())
            full = torch.cat(chunks)[self.offset :]
            torch.nn.utils.vector_to_parameters(full[: sum(p.numel() for p in params)], params)


def _partition_resolver(partition: FlatPartition, aware: bool = True):
    def resolve(table, tensors):
        if not all(any(t is p for p in partition.parts) for t in tensors):
            return None
        segments = []
        for ti, t in enumerate(tensors):
            g = next(i for i, p in enumerate(partition.parts) if p is t)
            lo, hi = partition.rank * partition.sizes[g], (partition.rank + 1) * partition.sizes[g]
            pos = partition.offset
            for p in partition.groups[g]:
                rec = next(r for r, o in zip(table.params, table.originals) if o is p)
                a, b = max(pos, lo), min(pos + p.numel(), hi)
                if a < b:
                    segments.append(Segment(ti, a - lo, b - a, rec.layer, rec.index, a - pos))
                pos += p.numel()
        return Layout(list(tensors), segments, table.num_layers, process_group=None, sharded=aware)

    return resolve


def sharded_worker(rank: int, world: int, rendezvous: str, out: str, offset: int, aware: bool = True) -> None:
    """Every rank computes the global-batch gradient; the optimizer sees only flat slices."""
    _init(rank, world, rendezvous)
    results = {}
    for name, make in OPTIMIZERS.items():
        model = make_model()
        params = list(model.parameters())
        groups = [[p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]]
        opt = make([{"params": groups[0]}, {"params": groups[1]}])
        partition = FlatPartition(groups, rank, world, offset)
        register_layout_resolver(_partition_resolver(partition, aware))
        for group, part in zip(opt.param_groups, partition.parts):
            group["params"] = [part]  # what DeepSpeed ZeRO-1/2 does to a client optimizer
        for t in range(STEPS):
            x, y = batch(t)
            model.zero_grad()
            loss_fn(model, x, y).backward()
            partition.scatter_grads()
            opt.step()
            partition.gather_params()
        results[name] = flat(model)
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()
