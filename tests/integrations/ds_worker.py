"""Worker for the DeepSpeed tests (one process per rank, launched by torchrun).

Modes:
  matrix      train every optimizer in ds_common.OPTIMIZERS (+ the naive LAMB) for STEPS
              steps through deepspeed.initialize, write the final parameters as JSON;
  save        train `--steps` steps, save a DeepSpeed checkpoint to --ckpt;
  resume      load --ckpt (--universal: a universal checkpoint), train to STEPS, write JSON;
  overflow    bf16/fp16: poison one step's gradient with NaN, write lbopt state before/after;
  install-twice  install() twice before `import deepspeed`, then the config route (--dtype bf16
              --stage 0: FP16_UnfusedOptimizer); parameters after 2 and STEPS steps, step counts.

Routes (--route), how the engine gets bound to the lbopt optimizer:
  initialize  lbopt.integrations.deepspeed.initialize (builds a config-named optimizer itself);
  install     install() once, then plain deepspeed.initialize with the config naming it;
  bind        plain deepspeed.initialize with an lbopt optimizer object, then bind(engine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lbopt.integrations import deepspeed as adapter  # noqa: E402

from tests.support import end_worker  # noqa: E402

if "install-twice" in sys.argv:  # the opt-in config route, installed before DeepSpeed is imported, twice
    assert adapter.install() and adapter.install()

import deepspeed  # noqa: E402, I001
import ds_common as C  # noqa: E402


def ds_config(args: argparse.Namespace, world: int, name: str) -> dict:
    zero: dict = {"stage": args.stage}
    if args.stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
        if args.sub_group_size:
            zero["sub_group_size"] = args.sub_group_size
    if args.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if args.stage == 3:  # as integrations/deepspeed_configs/zero3_offload.json: parameters too
            zero["offload_param"] = {"device": "cpu"}
    cfg: dict = {
        "train_micro_batch_size_per_gpu": C.GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,
    }
    if args.dtype == "bf16":
        # --no-ds-check: DeepSpeed does not look for inf/NaN, so lbopt's own guard must skip.
        cfg["bf16"] = {"enabled": True, "check_grad_overflow": not args.no_ds_check}
        if args.fp32_grad_accum:  # ZeRO-1 then uses DeepSpeed's BF16_Optimizer
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    elif args.dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    if args.universal:
        cfg["checkpoint"] = {"load_universal": True}
    if name == C.NAIVE or args.route == "bind":  # a client optimizer object
        cfg["zero_allow_untested_optimizer"] = True
    else:
        # "LAMB" alone is DeepSpeed's name (its Lamb's parameter meaning): lbopt's is "lbopt.LAMB"
        cfg["optimizer"] = {"type": "lbopt.LAMB" if name == "LAMB" else name, "params": C.hparams(name)}
    return cfg


def make_engine(args: argparse.Namespace, name: str):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.zero_init:  # parameters partitioned at construction, as HF from_pretrained does under ZeRO-3
        with deepspeed.zero.Init(config_dict_or_path=ds_config(args, world, name)):
            model = C.make_model()
    else:
        model = C.make_model()
    groups = C.param_groups(model, C.group_weight_decay(name))
    client = C.build_optimizer(name, groups) if name == C.NAIVE or args.route == "bind" else None
    init = adapter.initialize if args.route == "initialize" else deepspeed.initialize
    engine, _, _, _ = init(
        model=model, model_parameters=groups if client is None else None, optimizer=client,
        config=ds_config(args, world, name),
    )
    if args.route == "bind" and name != C.NAIVE:
        adapter.bind(engine)
    return engine


def train(engine, steps: range, world: int, rank: int, poison: int | None = None) -> None:
    mb = C.GLOBAL_BATCH // world
    dtype = next(engine.module.parameters()).dtype
    for step in steps:
        x, y = C.data(step)
        x, y = x[rank * mb:(rank + 1) * mb].to(dtype), y[rank * mb:(rank + 1) * mb].to(dtype)
        loss = torch.nn.functional.mse_loss(engine(x).float(), y.float())
        if poison == step:
            loss = loss * float("nan")
        engine.backward(loss)
        engine.step()


def full_params(engine) -> list[float]:
    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(params):
            return C.flat_params(engine.module).tolist()
    return C.flat_params(engine.module).tolist()


def config_errors(args: argparse.Namespace, world: int) -> dict:
    """What the config route says about a misspelt type, and which classes names resolve to."""
    out: dict = {}
    cases = {
        "CLBR": {"lr": 0.01}, "lbopt.LAMB": {"lr": 0.01}, "Lamb": {"lr": 0.01}, "lbopt.Nope": {"lr": 0.01},
        "LAMB": {"lr": 0.01, "max_coeff": 5.0, "min_coeff": 0.1},  # a DeepSpeed Lamb config with its clip bounds
        "lamb": {"lr": 0.01, "trust_clip": [0.1, 5.0]},  # lbopt's parameter under DeepSpeed's name: refused
        "CBLR": {"lr": 0.01},
    }
    for typ, params in cases.items():
        cfg = ds_config(args, world, "LAMB")
        cfg["optimizer"] = {"type": typ, "params": params}
        model = C.make_model()
        init = adapter.initialize if args.route == "initialize" else deepspeed.initialize
        try:
            engine, _, _, _ = init(model=model, model_parameters=model.parameters(), config=cfg)
            opt = engine.basic_optimizer
            out[typ] = f"{type(opt).__module__}.{type(opt).__name__}"
            if hasattr(opt, "defaults"):  # what the name meant: the hyperparameters that run
                out[typ + ":defaults"] = {k: opt.defaults.get(k) for k in ("eps", "weight_decay", "trust_clip")}
        except Exception as exc:  # noqa: BLE001  (the message is the result)
            out[typ] = f"{type(exc).__name__}: {exc}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="matrix")
    ap.add_argument("--stage", default="2", help="ZeRO stage; matrix mode: a comma list, one launch for all")
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--sub-group-size", type=int, default=0)
    ap.add_argument("--optimizers", default=",".join([*C.OPTIMIZERS, C.NAIVE]))
    ap.add_argument("--steps", type=int, default=C.STEPS)
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--universal", action="store_true")
    ap.add_argument("--no-ds-check", action="store_true")
    ap.add_argument("--zero-init", action="store_true")
    ap.add_argument("--fp32-grad-accum", action="store_true")
    ap.add_argument("--route", choices=["initialize", "install", "bind"], default="initialize")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.mode == "install-twice":
        args.route = "install"
    if args.route == "install":
        assert adapter.install(), "install() refused (LBOPT_DEEPSPEED=off?)"
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    stages = [int(s) for s in args.stage.split(",")]
    if len(stages) > 1:  # matrix mode over several stages in one launch: {stage: {name: params}}
        assert args.mode == "matrix", "several stages only in matrix mode"
        out = {}
        for stage in stages:
            args.stage = stage
            out[str(stage)] = run_mode(args, rank, world)
        results = out
    else:
        args.stage = stages[0]
        results = run_mode(args, rank, world)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    end_worker()


def run_mode(args: argparse.Namespace, rank: int, world: int) -> dict:
    results: dict = {}
    for name in args.optimizers.split(","):
        engine = make_engine(args, name)
        if rank == 0:
            binding = adapter.binding_of(engine)
            print(f"lbopt-test: {name} runs in {type(engine.optimizer).__name__}; "
                  f"bound: {binding.describe() if binding else None}", flush=True)
        if args.mode == "matrix":
            train(engine, range(args.steps), world, rank)
            results[name] = full_params(engine)
        elif args.mode == "save":  # save after --steps, then go on: the uninterrupted run
            train(engine, range(args.steps), world, rank)
            engine.save_checkpoint(os.path.join(args.ckpt, name), tag="t")
            train(engine, range(args.steps, C.STEPS), world, rank)
            results[name] = full_params(engine)
        elif args.mode == "install-twice":
            train(engine, range(2), world, rank)
            at_2 = full_params(engine)
            steps = [g["step"] for g in engine.basic_optimizer.param_groups]
            train(engine, range(2, args.steps), world, rank)
            results[name] = {"wrapper": type(engine.optimizer).__name__, "params_at_2": at_2, "steps": steps,
                             "params": full_params(engine)}
        elif args.mode == "config-errors":
            results = config_errors(args, world)
            break
        elif args.mode == "resume":
            tag = "t_universal" if args.universal else "t"
            path, _ = engine.load_checkpoint(os.path.join(args.ckpt, name), tag=tag)
            assert path is not None, f"no checkpoint loaded from {args.ckpt}/{name}/{tag}"
            train(engine, range(args.steps, C.STEPS), world, rank)
            results[name] = full_params(engine)
        elif args.mode == "overflow":
            train(engine, range(2), world, rank)
            before = _snapshot(engine.basic_optimizer)
            skipped = engine.basic_optimizer.skipped_steps
            train(engine, range(2, 3), world, rank, poison=2)
            same = _same(before, _snapshot(engine.basic_optimizer))
            flags = torch.tensor([1.0 if same else 0.0])
            torch.distributed.all_reduce(flags)
            results[name] = {"unchanged_on_ranks": flags.item(), "world": world,
                             "skipped": engine.basic_optimizer.skipped_steps - skipped,
                             "ds_skipped": int(engine.skipped_steps)}
    return results


def _snapshot(opt) -> dict:
    """Everything lbopt keeps (works under ZeRO-3, whose param_groups are emptied between steps)."""
    return {
        "state": [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()} for st in opt.state.values()],
        "layer_state": {k: v.clone() for k, v in opt.layer_state.items()},
        "steps": [g.get("step") for g in opt.param_groups],
    }


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


if __name__ == "__main__":
    main()
