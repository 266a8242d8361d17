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
# (stage, world size, offload_optimizer to CPU, ZeRO-3 sub_group_size, zero.Init). With 2
# ranks the ZeRO-1/2 partition of the matrices' group cuts through the middle weight matrix;
# with sub_group_size=100 ZeRO-3 splits each parameter group into several sub-groups;
# zero.Init hands the optimizer parameters that are already partitioned (HF under ZeRO-3).
MATRIX = [
    (0, 2, False, 0, False), (1, 2, False, 0, False),
    (2, 2, False, 0, False), (2, 2, True, 0, False),
    (3, 2, False, 0, True), (3, 2, True, 0, False),
    (3, 4, False, 100, False),
]


def _id(case: tuple) -> str:
    stage, world, offload, sub, zero_init = case
    return (f"zero{stage}-w{world}" + ("-offload" if offload else "") + (f"-sub{sub}" if sub else "")
            + ("-zeroinit" if zero_init else ""))


def check(res: dict, names: list[str], stage: int, label: str) -> None:
    errors = {name: err(res[name], name) for name in names}
    assert all(e <= TOL for e in errors.values()), f"{label}: relative L2 vs dense {errors}"
    naive = err(res[C.NAIVE], C.NAIVE)
    if stage == 0:
        assert naive <= TOL, f"plain data parallel: even a naive LAMB is exact ({naive})"
    else:  # the flat partitions are not layers: a sharding-unaware LAMB must be caught
        assert not naive <= 100 * TOL, f"{label}: the naive LAMB should fail the tolerance, got {naive}"


@pytest.mark.parametrize("case", MATRIX, ids=_id)
def test_zero_matches_dense(case: tuple, tmp_path: Path) -> None:
    stage, world, offload, sub, zero_init = case
    args = ["--stage", str(stage)] + (["--offload"] if offload else []) + (["--zero-init"] if zero_init else [])
    args += ["--sub-group-size", str(sub)] if sub else []
    names = list(C.OPTIMIZERS)
    if (stage, offload) in [(2, False), (3, True)]:  # the AdaGrad family: two configurations
        names += list(C.EXTRA_OPTIMIZERS)
        args += ["--optimizers", ",".join([*names, C.NAIVE])]
    check(worker(tmp_path, world, *args), names, stage, _id(case))


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
    script = "from lbopt.integrations.deepspeed import to_universal\n" + "".join(
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
def test_config_names_and_errors(tmp_path: Path) -> None:
    res = worker(tmp_path, 1, "--mode", "config-errors", "--stage", "2")
    assert res["lbopt.LAMB"] == "lbopt.optim.lamb.LAMB"
    assert res["Lamb"] == "lbopt.optim.lamb.LAMB"  # DeepSpeed's own is "FusedLamb"
    msg = res["CLBR"]
    assert msg.startswith("ValueError") and "'CLBR'" in msg
    for valid in ("CBLR", "LARS", "LAMB", "MCLR", "adamw", "FusedLamb"):
        assert valid in msg, msg
    assert res["lbopt.Nope"].startswith("ValueError") and "CBLR" in res["lbopt.Nope"]


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


def test_import_lbopt_installs_adapter_without_importing_deepspeed() -> None:
    code = (
        "import sys, lbopt\n"
        "assert 'deepspeed' not in sys.modules, 'import lbopt imported deepspeed'\n"
        "import deepspeed.runtime.engine as e\n"
        "print(e.is_zero_supported_optimizer.__module__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=launch_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "lbopt.integrations.deepspeed", (
        "deepspeed imported after lbopt should carry the adapter; lbopt/__init__.py must call "
        "lbopt._post_import.install_integration_hooks()"
    )


# --------------------------------------------------------------------------- in-process units
def test_post_import_hook_runs_after_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lbopt import _post_import

    (tmp_path / "lbopt_fake_engine.py").write_text("READY = True\n")
    (tmp_path / "lbopt_fake_hook.py").write_text(
        "import sys\nSEEN = []\ndef install():\n    SEEN.append(sys.modules['lbopt_fake_engine'].READY)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    _post_import.when_imported("lbopt_fake_engine", "lbopt_fake_hook:install")
    import lbopt_fake_engine  # noqa: F401
    import lbopt_fake_hook

    assert lbopt_fake_hook.SEEN == [True]
    _post_import.when_imported("lbopt_fake_engine", "lbopt_fake_hook:install")  # already imported: runs now
    assert lbopt_fake_hook.SEEN == [True, True]
    for mod in ("lbopt_fake_engine", "lbopt_fake_hook"):
        sys.modules.pop(mod, None)


def test_unsupported_configurations_are_refused() -> None:
    from lbopt.integrations.deepspeed import UnsupportedDeepSpeedConfig, _check_supported

    def engine(**kw) -> types.SimpleNamespace:
        base = dict(pipeline_parallelism=False, has_moe_layers=False, mpu=None, zenflow=False,
                    zero_optimization_stage=lambda: 2, zero_hpz_partition_size=lambda: 1, autotp_size=lambda: 0)
        base.update(kw)
        return types.SimpleNamespace(**base)

    _check_supported(engine())
    for kw, word in [
        (dict(pipeline_parallelism=True), "pipeline"),
        (dict(has_moe_layers=True), "Mixture-of-Experts"),
        (dict(mpu=types.SimpleNamespace(get_model_parallel_world_size=lambda: 2)), "tensor/model parallel"),
        (dict(zero_optimization_stage=lambda: 3, zero_hpz_partition_size=lambda: 2), "hierarchical"),
    ]:
        with pytest.raises(UnsupportedDeepSpeedConfig, match=word):
            _check_supported(engine(**kw))


def test_unknown_tensors_are_not_claimed() -> None:
    from lbopt.integrations.deepspeed import zero_layout

    import lbopt

    model = C.make_model()
    opt = lbopt.LAMB(model.parameters())
    assert zero_layout(opt.table, [torch.zeros(10)]) is None
