"""DeepSpeed adapter: every lbopt optimizer under ZeRO 0-3 follows the dense single-process trajectory.

Each configuration is one real multi-process launch (torchrun, gloo, DeepSpeed on CPU) that
trains all optimizers through ``deepspeed.initialize`` with ``"optimizer": {"type": NAME}``
and writes the final parameters; the dense reference runs in this process on the same
global batch. A sharding-unaware LAMB run in the same launches must *fail* the tolerance,
so the comparison can tell right from wrong.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from tests.integrations import ds_common as C
from tests.support import free_port, launch_env

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TOL = 1e-5

pytest.importorskip("deepspeed")


def run(cmd: list[str], log: Path, timeout: int = 300) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")


PORT_ERRORS = ("EADDRINUSE", "Address already in use", "DistNetworkError")


def worker(tmp: Path, nproc: int, *args: str, tag: str = "run") -> dict:
    out = tmp / f"{tag}.json"
    for attempt in range(3):  # a free port can be taken by a concurrent job before torchrun binds it
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            str(HERE / "ds_worker.py"), "--out", str(out), *args,
        ]
        try:
            run(cmd, tmp / f"{tag}.log")
            break
        except AssertionError:
            log = (tmp / f"{tag}.log").read_text()
            if attempt == 2 or not any(e in log for e in PORT_ERRORS):
                raise
    return json.loads(out.read_text())


@functools.cache
def dense(name: str) -> torch.Tensor:
    return C.dense_run(name)


def err(values: list[float], name: str) -> float:
    return C.rel_l2(torch.tensor(values), dense(name))


# --------------------------------------------------------------------------- the matrix
# (stage, world size, offload_optimizer to CPU, ZeRO-3 sub_group_size, zero.Init, route). With 2
# ranks the ZeRO-1/2 partition of the matrices' group cuts through the middle weight matrix;
# with sub_group_size=100 ZeRO-3 splits each parameter group into several sub-groups;
# zero.Init hands the optimizer parameters that are already partitioned (HF under ZeRO-3).
# The route is how the engine is bound (ds_worker.py): lbopt's initialize, install() + the
# config route, or bind() after a plain deepspeed.initialize with an optimizer object.
MATRIX = [
    (0, 2, False, 0, False, "bind"), (1, 2, False, 0, False, "bind"),
    (2, 2, False, 0, False, "install"), (2, 2, True, 0, False, "initialize"),
    (3, 2, False, 0, True, "initialize"), (3, 2, True, 0, False, "install"),
    (3, 4, False, 100, False, "initialize"),
]


def _id(case: tuple) -> str:
    stage, world, offload, sub, zero_init, route = case
    return (f"zero{stage}-w{world}" + ("-offload" if offload else "") + (f"-sub{sub}" if sub else "")
            + ("-zeroinit" if zero_init else "") + f"-{route}")


def check(res: dict, names: list[str], stage: int, label: str) -> None:
    errors = {name: err(res[name], name) for name in names}
    assert all(e <= TOL for e in errors.values()), f"{label}: relative L2 vs dense {errors}"
    naive = err(res[C.NAIVE], C.NAIVE)
    if stage == 0:
        assert naive <= TOL, f"plain data parallel: even a naive LAMB is exact ({naive})"
    else:  # the flat partitions are not layers: a sharding-unaware LAMB must be caught
        assert not naive <= 100 * TOL, f"{label}: the naive LAMB should fail the tolerance, got {naive}"


def bound_lines(log: Path) -> dict[str, str]:
    """``{optimizer name: what the binding says}`` from a worker log (rank 0's lines)."""
    out = {}
    for line in log.read_text().splitlines():
        if line.startswith("lbopt-test: "):
            name, _, rest = line[len("lbopt-test: "):].partition(" runs in ")
            out.setdefault(name, rest)
    return out


@pytest.mark.parametrize("case", MATRIX, ids=_id)
def test_zero_matches_dense(case: tuple, tmp_path: Path) -> None:
    stage, world, offload, sub, zero_init, route = case
    args = ["--stage", str(stage), "--route", route] + (["--offload"] if offload else [])
    args += (["--zero-init"] if zero_init else []) + (["--sub-group-size", str(sub)] if sub else [])
    names = list(C.OPTIMIZERS)
    if (stage, offload) in [(2, False), (3, True)]:  # the AdaGrad family: two configurations
        names += list(C.EXTRA_OPTIMIZERS)
        args += ["--optimizers", ",".join([*names, C.NAIVE])]
    check(worker(tmp_path, world, *args), names, stage, _id(case))
    bound = bound_lines(tmp_path / "run.log")
    if stage == 0:
        assert "steps the parameters directly" in bound["LAMB"], bound
        return
    for name in names:  # every engine bound, and the binding says to what
        assert f"lbopt.{name} bound to DeepSpeed" in bound[name] and f"ZeRO stage {stage}" in bound[name], bound
    # MCLR's median spans both parameter groups: one step over all groups, on the wrapper instance
    assert "one step over all groups" in bound["MCLR"] and "_optimizer_step" in bound["MCLR"], bound


def test_zero_single_rank_matches_dense(tmp_path: Path) -> None:
    """World size 1, ZeRO stages 0-3 in one launch: one flat partition holds a whole group."""
    res = worker(tmp_path, 1, "--stage", "0,1,2,3")
    for stage in range(4):
        check(res[str(stage)], list(C.OPTIMIZERS), stage, f"zero{stage}-w1")


def test_bf16_optimizer_close_to_dense(tmp_path: Path) -> None:
    """bf16 with fp32 gradient accumulation: ZeRO-1 runs DeepSpeed's BF16_Optimizer partitions.

    (bf16 under ZeRO-2/3 runs in the non-finite tests.) Only bf16 rounding separates it from
    the dense fp32 run: about 3e-3 here, against 1e-2 to 1 for layer-wise maths on slices.
    """
    res = worker(tmp_path, 2, "--stage", "1", "--dtype", "bf16", "--fp32-grad-accum", "--optimizers", "LAMB,MCLR")
    for name in ("LAMB", "MCLR"):
        assert err(res[name], name) < 5e-3
    assert "runs in BF16_Optimizer" in (tmp_path / "run.log").read_text()


# --------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def saved_zero2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("ckpt2")
    res = worker(tmp, 2, "--mode", "save", "--stage", "2", "--steps", "6", "--ckpt", str(tmp / "ckpt"),
                 "--optimizers", ",".join(C.OPTIMIZERS), tag="save")
    return tmp, res


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoint_resume_same_world(stage: int, tmp_path: Path, saved_zero2) -> None:
    names = list(C.OPTIMIZERS) if stage == 2 else ["LAMB", "MCLR"]  # ZeRO-3: Adam state, all-groups step
    if stage == 2:
        tmp, uninterrupted = saved_zero2
    else:
        tmp = tmp_path
        uninterrupted = worker(tmp, 2, "--mode", "save", "--stage", "3", "--steps", "6", "--ckpt",
                               str(tmp / "ckpt"), "--optimizers", ",".join(names), tag="save")
    resumed = worker(tmp, 2, "--mode", "resume", "--stage", str(stage), "--steps", "6", "--ckpt",
                     str(tmp / "ckpt"), "--optimizers", ",".join(names), tag="resume")
    for name in names:
        diff = C.rel_l2(torch.tensor(resumed[name]), torch.tensor(uninterrupted[name]))
        assert diff <= 1e-6, f"{name}: resumed run left the uninterrupted trajectory ({diff})"
        assert err(resumed[name], name) <= TOL


def test_universal_checkpoint_other_world_size(saved_zero2) -> None:
    """Save on 2 ranks (ZeRO-2), convert with lbopt's converter, resume on 1 rank."""
    tmp, _ = saved_zero2
    first, *rest = C.OPTIMIZERS
    src = tmp / "ckpt" / first / "t"
    run([sys.executable, "-m", "lbopt.integrations.deepspeed", str(src), str(src.parent / "t_universal")],
        tmp / "convert_cli.log")
    # ds_to_universal is called as a function: its command-line parser is never consulted
    script = ("import sys\nimport deepspeed.checkpoint.ds_to_universal as conv\n"
              "conv.parse_arguments = lambda: sys.exit('lbopt must not drive ds_to_universal through sys.argv')\n"
              "sys.argv = ['not', 'a', 'converter', 'command', 'line']\n"
              "from lbopt.integrations.deepspeed import to_universal\n") + "".join(
        f"to_universal({str(tmp / 'ckpt' / n / 't')!r}, {str(tmp / 'ckpt' / n / 't_universal')!r})\n" for n in rest
    )
    run([sys.executable, "-c", script], tmp / "convert.log")
    resumed = worker(tmp, 1, "--mode", "resume", "--universal", "--stage", "2", "--steps", "6", "--ckpt",
                     str(tmp / "ckpt"), "--optimizers", ",".join(C.OPTIMIZERS), tag="universal")
    errors = {name: err(resumed[name], name) for name in C.OPTIMIZERS}
    assert all(e <= TOL for e in errors.values()), errors


# --------------------------------------------------------------------------- non-finite steps
@pytest.mark.parametrize("stage,who", [(2, "lbopt"), (3, "deepspeed")])
def test_nonfinite_step_leaves_state_untouched(stage: int, who: str, tmp_path: Path) -> None:
    """A NaN gradient (bf16; fp16 does not run on CPU) changes no lbopt state on any rank.

    ZeRO-2 with ``check_grad_overflow: false``: DeepSpeed steps, lbopt's guard must skip on
    every rank (it sees the all-reduced norms). ZeRO-3: DeepSpeed skips the step itself.
    """
    extra = ["--no-ds-check"] if who == "lbopt" else []
    res = worker(tmp_path, 2, "--mode", "overflow", "--dtype", "bf16", "--stage", str(stage),
                 "--optimizers", ",".join(C.OPTIMIZERS), *extra)
    for name, r in res.items():
        assert r["unchanged_on_ranks"] == r["world"], f"{name}: state changed on some rank: {r}"
        if who == "lbopt":
            assert r["skipped"] >= 1 and r["ds_skipped"] == 0, r
        else:
            assert r["ds_skipped"] == 1, r


# --------------------------------------------------------------------------- config routes
@pytest.mark.parametrize("route", ["initialize", "install"])
def test_config_names_and_errors(route: str, tmp_path: Path) -> None:
    res = worker(tmp_path, 1, "--mode", "config-errors", "--stage", "2", "--route", route)
    assert res["lbopt.LAMB"] == "lbopt.optim.lamb.LAMB"
    assert res["lbopt.LAMB:defaults"] == {"eps": 1e-6, "weight_decay": 0.01, "trust_clip": None}
    # DeepSpeed's own "Lamb" keeps DeepSpeed's meaning: its defaults, max_coeff/min_coeff as the clip bounds
    assert res["Lamb"] == "lbopt.optim.lamb.LAMB"
    assert res["Lamb:defaults"] == {"eps": 1e-8, "weight_decay": 0.0, "trust_clip": [0.01, 10.0]}
    assert res["LAMB:defaults"] == {"eps": 1e-8, "weight_decay": 0.0, "trust_clip": [0.1, 5.0]}
    assert res["lamb"].startswith("UnsupportedDeepSpeedConfig") and "lbopt.LAMB" in res["lamb"], res["lamb"]
    assert res["CBLR"] == "lbopt.optim.curvature.CBLR"
    msg = res["CLBR"]
    assert msg.startswith("ValueError") and "'CLBR'" in msg
    for valid in ("CBLR", "LARS", "LAMB", "MCLR", "adamw", "FusedLamb"):
        assert valid in msg, msg
    assert res["lbopt.Nope"].startswith("ValueError") and "CBLR" in res["lbopt.Nope"]
    log = (tmp_path / "run.log").read_text()  # a log line always says which implementation runs
    assert "is DeepSpeed's LAMB; it runs as lbopt.LAMB" in log, log[-3000:]
    assert "config optimizer 'CBLR' runs as lbopt.CBLR" in log
    assert "lbopt: lbopt.CBLR bound to DeepSpeed" in log


def test_install_before_deepspeed_then_bf16_without_zero(tmp_path: Path) -> None:
    """install() twice before ``import deepspeed``, then bf16 without ZeRO (FP16_UnfusedOptimizer).

    Used to install twice re-entrantly and fail in deepspeed.initialize with
    ``AttributeError: 'LAMB' object has no attribute 'step'``.
    """
    res = worker(tmp_path, 1, "--mode", "install-twice", "--dtype", "bf16", "--stage", "0",
                 "--optimizers", "LAMB,MCLR")
    for name in ("LAMB", "MCLR"):
        assert res[name]["wrapper"] == "FP16_UnfusedOptimizer", res
        # the wrapper's eager zero-gradient step at construction did not count (2 real steps)
        assert res[name]["steps"] == [2, 2], res
        assert err(res[name]["params"], name) > 0 and err(res[name]["params_at_2"], name) > 0
        assert C.rel_l2(torch.tensor(res[name]["params_at_2"]), C.dense_run(name, steps=2)) < 5e-3, res[name]


def test_accelerate_launch_with_deepspeed_config(tmp_path: Path) -> None:
    """`accelerate launch` + a DeepSpeed JSON naming CBLR; the script only hands over a DummyOptim."""
    pytest.importorskip("accelerate")
    ds = {
        "train_micro_batch_size_per_gpu": C.GLOBAL_BATCH // 2,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "CBLR", "params": C.OPTIMIZERS["CBLR"]},
    }
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    (tmp_path / "accelerate.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\ndeepspeed_config:\n"
        f"  deepspeed_config_file: {tmp_path / 'ds.json'}\n  zero3_init_flag: false\n"
        "num_machines: 1\nnum_processes: 2\nmachine_rank: 0\nmain_training_function: main\n"
        "rdzv_backend: static\nsame_network: true\nuse_cpu: false\n"
    )
    out = tmp_path / "out.json"
    run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "accelerate.yaml"),
         "--main_process_port", str(free_port()), str(HERE / "accelerate_worker.py"), "--name", "CBLR",
         "--out", str(out)], tmp_path / "accelerate.log")
    res = json.loads(out.read_text())
    assert res["basic"] == "CBLR"
    assert err(res["params"], "CBLR") <= TOL


@pytest.mark.slow
def test_hf_trainer_deepspeed_config(tmp_path: Path) -> None:
    """HF Trainer with ``deepspeed=<config naming CBLR>`` under ZeRO-3: the engine runs lbopt's CBLR."""
    pytest.importorskip("transformers")
    out = tmp_path / "hf.json"
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(HERE / "hf_trainer_worker.py"), str(out)], tmp_path / "hf.log")
    res = json.loads(out.read_text())
    assert res["basic"] == "CBLR" and res["adapted"] == 10 and res["layers"] == 28, res
    assert res["loss"] == res["loss"]  # finite


UNTOUCHED = """
import os, sys
import lbopt
from lbopt.integrations import deepspeed as adapter
assert "deepspeed" not in sys.modules, "importing lbopt (or its DeepSpeed adapter) imported deepspeed"
import deepspeed.runtime.engine as e
E = e.DeepSpeedEngine
names = ("_configure_basic_optimizer", "_is_supported_optimizer", "_configure_optimizer")
before = {n: E.__dict__[n] for n in names}
assert all(f.__module__ == "deepspeed.runtime.engine" for f in before.values()), "import lbopt patched DeepSpeed"
os.environ["LBOPT_DEEPSPEED"] = "off"
assert adapter.install() is False and not adapter.installed()
assert {n: E.__dict__[n] for n in names} == before, "LBOPT_DEEPSPEED=off must leave DeepSpeed untouched"
del os.environ["LBOPT_DEEPSPEED"]
assert adapter.install() is True and adapter.install() is True and adapter.installed()
wrapped = {n: E.__dict__[n] for n in names}
assert all(wrapped[n].__lbopt_original__ is before[n] for n in names), "wrapped twice or not at all"
adapter.uninstall()
assert {n: E.__dict__[n] for n in names} == before and not adapter.installed()
print("UNTOUCHED-OK")
"""


def test_deepspeed_untouched_unless_installed() -> None:
    """``import lbopt`` patches nothing; install() wraps once, uninstall() restores; LBOPT_DEEPSPEED=off opts out."""
    proc = subprocess.run([sys.executable, "-c", UNTOUCHED], cwd=ROOT, env=launch_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "UNTOUCHED-OK" in proc.stdout, proc.stderr[-3000:]


VERSION_CHECK = """
import pytest
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from lbopt.integrations.deepspeed import compat
assert compat.check_deepspeed() == compat.deepspeed_version()
del DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state  # as if a DeepSpeed release renamed it
compat.check_deepspeed.cache_clear()
with pytest.raises(compat.DeepSpeedVersionError) as info:
    compat.check_deepspeed()
msg = str(info.value)
assert f"DeepSpeed {compat.deepspeed_version()}" in msg, msg
assert "DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state" in msg, msg
with pytest.raises(compat.DeepSpeedVersionError, match="BF16_Optimizer.fp32_groups_flat_partition"):
    compat.require(object(), compat.WRAPPERS["BF16_Optimizer"])
print("VERSION-OK")
"""


def test_missing_deepspeed_internal_is_named_with_the_version() -> None:
    proc = subprocess.run([sys.executable, "-c", VERSION_CHECK], cwd=ROOT, env=launch_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "VERSION-OK" in proc.stdout, proc.stderr[-3000:]


# --------------------------------------------------------------------------- in-process units
def test_unsupported_configurations_are_refused() -> None:
    from lbopt.integrations.deepspeed import UnsupportedDeepSpeedConfig
    from lbopt.integrations.deepspeed.binding import check_supported

    def engine(**kw) -> types.SimpleNamespace:
        base = dict(pipeline_parallelism=False, has_moe_layers=False, mpu=None, zenflow=False,
                    zero_optimization_stage=lambda: 2, zero_hpz_partition_size=lambda: 1, autotp_size=lambda: 0)
        base.update(kw)
        return types.SimpleNamespace(**base)

    check_supported(engine())
    for kw, word in [
        (dict(pipeline_parallelism=True), "pipeline"),
        (dict(has_moe_layers=True), "Mixture-of-Experts"),
        (dict(mpu=types.SimpleNamespace(get_model_parallel_world_size=lambda: 2)), "tensor/model parallel"),
        (dict(zero_optimization_stage=lambda: 3, zero_hpz_partition_size=lambda: 2), "hierarchical"),
    ]:
        with pytest.raises(UnsupportedDeepSpeedConfig, match=word):
            check_supported(engine(**kw))


def test_layouts_claim_only_their_own_partitions() -> None:
    """The resolver an engine's binding hands its optimizer knows that engine's tensors, no others."""
    import copy

    from lbopt.integrations.deepspeed import DeepSpeedLayouts
    from lbopt.integrations.deepspeed.partitions import Partition

    import lbopt

    model = C.make_model()
    opt = lbopt.LAMB(model.parameters())
    flat = torch.zeros(sum(p.numel() for p in model.parameters()))
    pieces, start = [], 0
    for p in model.parameters():
        pieces.append((start, p.numel(), p, 0))
        start += p.numel()
    layouts = DeepSpeedLayouts([Partition(flat, lambda: pieces, None, "test partition")])
    assert layouts(opt.table, [torch.zeros(10)]) is None
    layout = layouts(opt.table, [flat])
    assert layout is not None and not layout.sharded and len(layout.segments) == len(pieces)
    assert DeepSpeedLayouts([])(opt.table, [flat]) is None  # another engine's resolver: not its tensors
    opt.layout_resolver = layouts
    assert getattr(copy.deepcopy(opt), "layout_resolver", None) is None  # a copy is bound to no engine
