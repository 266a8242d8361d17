"""PyTorch FSDP: every lbopt optimizer follows the dense single-process trajectory.

Three torchrun launches (gloo, CPU) train every optimizer on a model whose widths make
uneven shards (``fsdp_common``): world 1 and 2 and 4 under FSDP2 (``fully_shard``), world 4
under HSDP (2 replicas x 2 shards), world 2 under FSDP1 with ``use_orig_params=True`` and
under torch's ZeroRedundancyOptimizer. The dense reference runs in this process on the
same global batches. A LAMB that computes its norms on the local shards runs in the same
launches and must *fail* the tolerance, so the comparison can tell right from wrong. Each
optimizer step's collectives are counted (CommDebugMode): one all-reduce per statistics
round, whatever the number of parameters.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integrations import fsdp_common as C
from tests.support import free_port, launch_env

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TOL = 1e-5
PORT_ERRORS = ("EADDRINUSE", "Address already in use", "DistNetworkError")
ALL = [*C.OPTIMIZERS, C.NAIVE]


def worker(tmp: Path, nproc: int, *args: str) -> dict:
    out, log = tmp / "run.json", tmp / "run.log"
    for attempt in range(3):  # a free port can be taken by a concurrent job before torchrun binds it
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            str(HERE / "fsdp_worker.py"), "--out", str(out), "--ckpt", str(tmp / "ckpt"), *args,
        ]
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), stdout=f, stderr=subprocess.STDOUT, timeout=600)
        if proc.returncode == 0:
            return json.loads(out.read_text())
        text = log.read_text()
        if attempt == 2 or not any(e in text for e in PORT_ERRORS):
            tail = "\n".join(text.splitlines()[-40:])
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    raise AssertionError("unreachable")


@functools.cache
def dense(name: str) -> torch.Tensor:
    return C.dense_run(name)


def err(values: list[float], name: str) -> float:
    return C.rel_l2(torch.tensor(values), dense(name))


def check_run(res: dict, label: str, sharded: bool) -> None:
    """Every lbopt optimizer within TOL of dense with one all-reduce per round; the control fails."""
    names = [n for n in res if n != C.NAIVE]
    moved = {n: C.rel_l2(dense(n), C.initial_params()) for n in names}
    assert all(m > 1e-2 for m in moved.values()), f"every optimizer must move the weights: {moved}"
    errors = {n: err(res[n]["params"], n) for n in names}
    assert all(e <= TOL for e in errors.values()), f"{label}: relative L2 vs dense {errors}"
    comms = {n: set(res[n]["comms"]) for n in names}
    expected = {n: {C.ALL_REDUCES[n] if sharded else 0} for n in names}
    assert comms == expected, f"{label}: collectives per optimizer step {comms}, expected {expected}"
    naive = err(res[C.NAIVE]["params"], C.NAIVE)
    if sharded:  # local shards are not layers: a sharding-unaware LAMB must be caught
        assert naive > 100 * TOL, f"{label}: the shard-local LAMB should fail the tolerance, got {naive}"
    else:
        assert naive <= TOL


@pytest.fixture(scope="module")
def world2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """FSDP2 (+ save at step 6 and resume), FSDP1, ZeroRedundancyOptimizer and the refusals: one launch."""
    tmp = tmp_path_factory.mktemp("fsdp_w2")
    runs = "fsdp2,fsdp1,zero,fsdp2-swap:LAMB+MCLR+AdaGradNorm,fsdp1-flat:LAMB,fsdp1-late:LAMB,controller:norm"
    return worker(tmp, 2, "--runs", runs, "--resume-at", "6")


def test_fsdp2_world1_matches_dense(tmp_path: Path) -> None:
    res = worker(tmp_path, 1, "--runs", "fsdp2")
    check_run(res["fsdp2"], "fsdp2-w1", sharded=False)


def test_fsdp2_world2_matches_dense(world2: dict) -> None:
    assert set(world2["fsdp2"]) == set(ALL)
    check_run(world2["fsdp2"], "fsdp2-w2", sharded=True)


def test_fsdp2_and_hsdp_world4_uneven_shards_match_dense(tmp_path: Path) -> None:
    """4 ranks: 3-row layer leaves one rank an empty shard; HSDP reduces over its 2-rank shard dimension."""
    res = worker(tmp_path, 4, "--runs", "fsdp2,hsdp")
    check_run(res["fsdp2"], "fsdp2-w4", sharded=True)
    check_run(res["hsdp"], "hsdp-2x2", sharded=True)


def test_fsdp2_resume_from_state_dict_continues_the_trajectory(world2: dict) -> None:
    """Saved at step 6, loaded into fresh model and optimizer, trained to the end: the same end point.

    Two routes: each rank's ``state_dict()`` (torch.save), and torch.distributed.checkpoint with
    ``LayerStateCheckpoint``. DCP's get/set_state_dict alone drops CBLR's curvature EMA: that
    resume must differ (the control).
    """
    for name in C.RESUMED:
        r = world2["fsdp2"][name]
        end = torch.tensor(r["params"])
        assert C.rel_l2(torch.tensor(r["resumed"]), end) <= 1e-6, name
        assert C.rel_l2(torch.tensor(r["resumed_dcp"]), end) <= 1e-6, name
    cblr = world2["fsdp2"]["CBLR"]
    assert C.rel_l2(torch.tensor(cblr["resumed_dcp_without_extra"]), torch.tensor(cblr["params"])) > 1e-6


def test_fsdp2_follows_accelerates_parameter_swap(world2: dict) -> None:
    """Optimizer built on the full model, its param_groups entries then replaced by the DTensors."""
    for name, r in world2["fsdp2-swap"].items():
        assert err(r["params"], name) <= TOL, name
        assert set(r["comms"]) == {C.ALL_REDUCES[name]}, name


def test_batch_size_controller_under_fsdp2_matches_dense(world2: dict) -> None:
    """AdAdaGradNorm's norm test fed by hooks on FSDP2's unsharded parameters (watch_unsharded)."""
    from tests.batch import problem as P
    from tests.batch import test_distributed as T

    ref, ref_sizes, ref_b = T._dense("norm")
    got = world2["controller"]
    assert ref_sizes[-1] > ref_sizes[0], ref_sizes
    assert got["sizes"] == ref_sizes
    assert P.rel(torch.tensor(got["params"]), ref) <= TOL
    assert abs(got["b_sq"] - ref_b) <= 1e-6 * ref_b


def test_fsdp1_use_orig_params_matches_dense(world2: dict) -> None:
    check_run(world2["fsdp1"], "fsdp1-w2", sharded=True)


def test_fsdp1_flat_parameters_are_refused_with_the_fix(world2: dict) -> None:
    flat = world2["fsdp1-flat"]["LAMB"]["error"]
    assert "use_orig_params=True" in flat and "FlatParameter" in flat
    late = world2["fsdp1-late"]["LAMB"]["error"]
    assert "before wrapping" in late


def test_zero_redundancy_exact_or_refused(world2: dict) -> None:
    """Per-tensor methods are exact under ZeroRedundancyOptimizer; cross-layer ones are refused.

    (CBLR's model step couples layers: run under ZeroRedundancyOptimizer it ended 1.2e-2 from
    dense, so it is refused.)
    """
    res = world2["zero"]
    exact = [n for n, r in res.items() if "params" in r]
    refused = [n for n, r in res.items() if "error" in r]
    assert sorted(exact) == ["AdaGrad", "LAMB", "LARS"]
    assert sorted(refused) == ["AdAdaGrad", "AdAdaGradNorm", "AdaGradNorm", "CBLR", "MCLR"]
    for n in exact:
        assert err(res[n]["params"], n) <= TOL, n
    for n in refused:
        assert "ZeroRedundancyOptimizer" in res[n]["error"] and "FSDP2" in res[n]["error"], res[n]["error"]


def test_trainer_with_fsdp2_arguments_on_cpu_matches_the_dense_trainer_and_resumes(tmp_path: Path) -> None:
    """``CPUFSDPTrainer`` + ``TrainingArguments(fsdp="full_shard", fsdp_config={"fsdp_version": 2})`` +
    ``trainer_optimizer(lbopt.CBLR)`` on 2 CPU ranks (DTensor parameters, half the rows each) ends
    where the plain Trainer in one process does on the same global batches. Resumed from its
    step-5 checkpoint it ends at the same point; resumed as the plain Trainer does under FSDP
    (DCP only, CBLR's per-layer state lost) it does not (the control)."""
    from tests.integrations import fsdp_trainer_worker as W

    out = str(tmp_path / "fsdp")
    for attempt in range(3):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(HERE / "fsdp_trainer_worker.py"), out]
        proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=400)
        if proc.returncode == 0 or attempt == 2 or not any(e in proc.stderr for e in PORT_ERRORS):
            break
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert (r["cpu_fsdp"], r["distributed_type"], r["optimizer"]) == (True, "DistributedType.FSDP", "CBLR")
        assert all(kind == "DTensor" for kind, _, _ in r["local"].values())
    rows = {n: [ranks[0]["local"][n][1][0], ranks[1]["local"][n][1][0]] for n in ranks[0]["local"]}
    assert rows["transformer.h.0.mlp.c_fc.weight"] == [12, 12] and rows["transformer.wte.weight"] == [48, 48]

    W.train(str(tmp_path / "dense"), sharded=False)
    vec = lambda d: torch.cat([d[k].reshape(-1) for k in sorted(d)])  # noqa: E731
    sharded, dense_ = torch.load(out + ".pt"), torch.load(str(tmp_path / "dense.pt"))
    assert sharded.keys() == dense_.keys()
    start = {n: p.detach() for n, p in W.model().named_parameters()}
    assert C.rel_l2(vec(dense_), vec(start)) > 1e-3, "CBLR must move the weights for the comparison to mean anything"
    assert C.rel_l2(vec(sharded), vec(dense_)) <= TOL
    dense_losses = json.loads((tmp_path / "dense.rank0.json").read_text())["losses"]
    assert len(dense_losses) == W.STEPS
    assert torch.allclose(torch.tensor(ranks[0]["losses"]), torch.tensor(dense_losses), rtol=1e-5)

    assert (tmp_path / "trainer" / "checkpoint-5" / "lbopt_layer_state.pt").is_file()
    resumed = torch.load(out + "-resumed.pt")
    assert C.rel_l2(vec(resumed), vec(sharded)) <= 1e-7
    lost = torch.load(out + "-resumed-without-layer-state.pt")
    assert C.rel_l2(vec(lost), vec(sharded)) > 1e-5


def test_cpu_fsdp_refusals_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """One CPU process has no process group to shard over; FSDP1's module-state sync needs an accelerator."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import FullyShardedDataParallelPlugin
    from lbopt.integrations.cpu_fsdp import enable_cpu_fsdp, launch_config_plugin

    if torch.accelerator.is_available():
        pytest.skip("accelerator ranks: Accelerate's own FSDP path applies")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    try:
        accelerator = Accelerator(cpu=True)
        assert enable_cpu_fsdp(accelerator) is False  # FSDP not asked for: nothing changes
        with pytest.raises(ValueError, match="CPU process group.*num_processes >= 2"):
            enable_cpu_fsdp(accelerator, FullyShardedDataParallelPlugin(fsdp_version=2))
    finally:
        AcceleratorState._reset_state(True)
    monkeypatch.setenv("FSDP_VERSION", "1")
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "true")
    with pytest.raises(ValueError, match="fsdp_sync_module_states: false"):
        launch_config_plugin()
