"""The launch files users copy: accelerate YAMLs, DeepSpeed JSONs, hostfile, SLURM script."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.recipes.helpers import ACCELERATE_CONFIGS, REPO, free_port, launch_env

EXPECTED = {
    "cpu": "MULTI_GPU",  # torchrun-started ranks; the recipe picks CPU + gloo
    "single_gpu": "NO",
    "multi_gpu": "MULTI_GPU",
    "multi_node": "MULTI_GPU",
    "deepspeed_zero1": "DEEPSPEED",
    "deepspeed_zero2": "DEEPSPEED",
    "deepspeed_zero2_offload": "DEEPSPEED",
    "deepspeed_zero3": "DEEPSPEED",
    "deepspeed_zero3_offload": "DEEPSPEED",
    "deepspeed_multinode": "DEEPSPEED",
}


def test_accelerate_yamls_are_complete_and_point_at_real_files():
    found = {p.stem: yaml.safe_load(p.read_text()) for p in ACCELERATE_CONFIGS.glob("*.yaml")}
    assert set(found) == set(EXPECTED)
    for name, cfg in found.items():
        assert cfg["distributed_type"] == EXPECTED[name], name
        assert cfg["num_processes"] >= 1 and cfg["num_machines"] >= 1
        ds = cfg.get("deepspeed_config")
        if ds:
            path = REPO / ds["deepspeed_config_file"]
            stage = json.loads(path.read_text())["zero_optimization"]["stage"]
            assert ds["zero3_init_flag"] == (stage == 3), name
            if "deepspeed_hostfile" in ds:
                assert (REPO / ds["deepspeed_hostfile"]).is_file()
        if cfg["num_machines"] > 1:
            assert cfg["main_process_ip"] and cfg["main_process_port"]


def test_offload_configs_offload():
    for name, params in (("zero2_offload", False), ("zero3_offload", True)):
        path = REPO / "integrations" / "deepspeed_configs" / f"{name}.json"
        zero = json.loads(path.read_text())["zero_optimization"]
        assert zero["offload_optimizer"]["device"] == "cpu"
        assert ("offload_param" in zero) == params


def test_hostfile_example_format():
    lines = [ln for ln in (REPO / "integrations/deepspeed_configs/hostfile.example").read_text().splitlines()]
    hosts = [ln.split() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert hosts and all(len(h) == 2 and h[1].startswith("slots=") for h in hosts)


@pytest.mark.distributed
def test_slurm_script_runs_under_a_fake_slurm(tmp_path):
    """srun/scontrol stand-ins: one 'node' with 2 CPU ranks runs the real sbatch script end to end."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")
    (bin_dir / "srun").write_text('#!/bin/sh\nshift  # --kill-on-bad-exit=1\nSLURM_NODEID=0 exec "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    env = launch_env()
    env.update(
        PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:{env['PATH']}",
        SLURM_JOB_NODELIST="localhost",
        SLURM_NNODES="1",
        SLURM_JOB_ID="1",
        GPUS_PER_NODE="2",
        MASTER_PORT=str(free_port()),
        OUTPUT_DIR=str(tmp_path / "out"),
    )
    args = [
        "--optimizer", "adamw", "--global_batch_size", "32", "--per_device_batch_size", "16",
        "--max_train_samples", "64", "--max_eval_samples", "32", "--max_seq_length", "16",
        "--max_steps", "1", "--report_to", "none", "--no_final_checkpoint", "--run_name", "a b",
    ]  # fmt: skip
    proc = subprocess.run(
        ["bash", "integrations/slurm/multinode.sbatch", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["world_size"], summary["zero_stage"], summary["steps"]) == (2, 2, 1)


CHECKS = {"launched", "GPU only", "multi-host only"}


def launch_table() -> dict[str, tuple[str, str]]:
    """recipes/README.md's launch-file table: path under integrations/ -> (check, evidence)."""
    text = (REPO / "recipes" / "README.md").read_text()
    section = text.split("## How each launch file was checked", 1)[1]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            assert cells[0].strip("`") not in rows, f"{cells[0]} listed twice"
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


def test_launch_table_matches_the_folder():
    """Every launch file under integrations/ has one row; a 'launched' row names tests that mention it."""
    import re

    folder = REPO / "integrations"
    files = {
        str(p.relative_to(folder))
        for sub in ("accelerate", "deepspeed_configs", "slurm")
        for p in (folder / sub).iterdir()
        if p.is_file()
    }
    table = launch_table()
    assert set(table) == files, f"missing rows: {sorted(files - set(table))}; stale rows: {sorted(set(table) - files)}"
    for path, (check, evidence) in table.items():
        assert check in CHECKS, (path, check)
        tests = re.findall(r"`(test_\w+\.py)::(test_\w+)`", evidence)
        if check != "launched":
            assert "not launched" in evidence or "only by" in evidence, path
            continue
        assert tests, f"{path}: a launched file must name its test"
        for module, name in tests:
            source = (REPO / "tests" / "recipes" / module).read_text()
            body = source.split(f"def {name}(", 1)
            assert len(body) == 2, f"{module}::{name} does not exist"
            # the test (up to the next test) names the launch file, or the accelerate file that points at this JSON
            code = body[1].split("\ndef test_", 1)[0]
            stem = Path(path).stem if path.endswith(".json") else Path(path).name
            assert stem in code or Path(path).name in source, (path, module, name)
