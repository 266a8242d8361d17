"""Two machines x one process (two ``accelerate launch`` on loopback) train exactly like one machine x two.

Both runs are DeepSpeed ZeRO-2 on CPU (gloo) with world size 2, so every rank sees the same data
shard, seed and collectives; only the launch topology differs (torchrun ``--nnodes 2`` with the
``standard`` multi-node launcher instead of ``--nnodes 1``). The two-machine run uses the shipped
``deepspeed_multinode.yaml`` (its pdsh launcher and hostfile overridden: one host here). The final
fp32 weights come from the final checkpoint (``checkpoints/step_N/pytorch_model/mp_rank_00_model_states.pt``:
under ZeRO-2 the module's parameters are not partitioned, so rank 0 writes all of them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.recipes.helpers import ACCELERATE_CONFIGS, RECIPES, REPO, free_port, launch, launch_env, summary_of

pytestmark = pytest.mark.distributed

STEPS = 3
TINY = [
    "--optimizer", "lamb", "--global_batch_size", "16", "--per_device_batch_size", "4",  # 4 x 2 accum x 2 ranks
    "--max_train_samples", "64", "--max_eval_samples", "16", "--max_seq_length", "16",
    "--max_steps", str(STEPS), "--warmup_steps", "1", "--lr", "1e-3", "--report_to", "none", "--no_final_model",
]  # fmt: skip
# Measured: bitwise equal (relative L2 0.0). The bound leaves room for a reordered fp32 reduction
# (~1e-7 relative per step) without letting a different data split or rank layout pass.
REL_TOL = 1e-5


def launch_two_machines(config: str, recipe: str, args: list[str], logs: Path, timeout: float = 240) -> list[str]:
    """Start machine 0 and machine 1 of a 2-node job on 127.0.0.1; return their stderr (rc 0 asserted)."""
    port = str(free_port())
    env = launch_env()
    env["LOGLEVEL"] = "INFO"  # torchrun's agent then logs its rendezvous result (group_rank, ...)
    procs = []
    for rank in (0, 1):
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(ACCELERATE_CONFIGS / config),
            "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", port,
            "--deepspeed_multinode_launcher", "standard",  # torchrun on each "node", not pdsh/ssh
            str(RECIPES / recipe), *args,
        ]  # fmt: skip
        with open(logs / f"machine{rank}.out", "w") as out, open(logs / f"machine{rank}.err", "w") as err:
            # the child keeps its own copies of the log descriptors; own session so a hang can be killed whole
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True))
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    stderr = [(logs / f"machine{rank}.err").read_text() for rank in (0, 1)]
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"machine {rank} failed (rc {proc.returncode}):\n{stderr[rank][-6000:]}"
    return stderr


def final_params(output_dir: Path) -> dict:
    import torch

    path = output_dir / "checkpoints" / f"step_{STEPS}" / "pytorch_model" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def relative_l2(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    norm = sum(float(a[k].double().pow(2).sum()) for k in a)
    return (diff / norm) ** 0.5


@pytest.mark.slow  # ~52 s quiet: two concurrent 2-machine launches plus a reference launch
def test_two_machines_match_one_machine_zero2(tmp_path):
    one = tmp_path / "one_machine"
    s1 = summary_of(launch("deepspeed_zero2.yaml", "classification.py", [*TINY, "--output_dir", str(one)]), one)

    two = tmp_path / "two_machines"
    two.mkdir()
    # the shipped multi-node file (ZeRO-2 via zero2.json), on loopback with the standard launcher instead of pdsh
    args = [*TINY, "--output_dir", str(two)]
    stderr = launch_two_machines("deepspeed_multinode.yaml", "classification.py", args, two)
    s2 = json.loads((two / "summary.json").read_text())
    # really two nodes: machine 1's torchrun agent joined as node (group) 1 of 2 and ran global rank 1
    assert "group_rank=1" in stderr[1] and "group_world_size=2" in stderr[1], stderr[1][-4000:]
    assert "global_ranks=[1]" in stderr[1] and "global_ranks=[0]" in stderr[0]

    for s in (s1, s2):
        assert (s["deepspeed"], s["zero_stage"], s["world_size"], s["steps"]) == (True, 2, 2, STEPS)
        assert s["gradient_accumulation_steps"] == 2
    assert [loss for _, loss in s2["loss_curve"]] == pytest.approx([loss for _, loss in s1["loss_curve"]], rel=1e-5)

    p1, p2 = final_params(one), final_params(two)
    assert relative_l2(p1, p2) <= REL_TOL

    # and the comparison is not vacuous: training moved the pretrained encoder
    import classification
    from safetensors.torch import load_file

    pretrained = Path(classification.default_model()) / "model.safetensors"
    if pretrained.is_file():
        name = "encoder.layer.0.attention.self.query.weight"
        before = load_file(str(pretrained))[name]
        assert relative_l2({name: before}, {name: p1[f"bert.{name}"]}) > 1e-6
