"""The adaptive-batch recipes (AdAdaGrad*), launched for real: 2 CPU processes, plain DDP over gloo."""

from __future__ import annotations

import math

import pytest

from tests.recipes.helpers import launch, summary_of

pytestmark = pytest.mark.distributed


def test_classification_adadagradnorm_batch_grows_ddp(tmp_path):
    out = tmp_path / "ada"
    args = [
        "--optimizer", "adadagradnorm", "--optimizer_args", '{"eta": 0.1}',  # small eta: grow at once
        "--global_batch_size", "16", "--per_device_batch_size", "4",  # 4 x 2 accumulation x 2 ranks
        "--max_global_batch_size", "48",
        "--max_train_samples", "256", "--max_eval_samples", "16", "--max_seq_length", "16",
        "--max_steps", "5", "--warmup_steps", "1", "--report_to", "tensorboard", "--no_final_checkpoint",
        "--output_dir", str(out),
    ]  # fmt: skip
    s = summary_of(launch("cpu.yaml", "classification.py", args), out)
    assert (s["deepspeed"], s["world_size"], s["steps"]) == (False, 2, 5)
    sizes = [b for _, b in s["batch_size_trajectory"]]
    assert [step for step, _ in s["batch_size_trajectory"]] == [1, 2, 3, 4, 5]
    assert sizes[0] == 16 and max(sizes) > 16, sizes  # the controller grew the global batch
    assert sizes == sorted(sizes) and all(b % 8 == 0 and b <= 48 for b in sizes)  # monotone, unit 4 x 2
    assert s["samples"] == sum(sizes) and s["final_global_batch_size"] == sizes[-1]
    assert s["max_global_batch_size"] == 48
    assert all(math.isfinite(loss) for _, loss in s["loss_curve"])
    assert (out / "training.png").stat().st_size > 10_000
    assert list(out.glob("classification-adadagradnorm/events.out.tfevents.*")), "TensorBoard logs missing"


def test_adaptive_batch_under_deepspeed_fails_with_one_line(tmp_path):
    proc = launch(
        "deepspeed_zero2.yaml",
        "classification.py",
        ["--optimizer", "adadagrad", "--global_batch_size", "64", "--per_device_batch_size", "16",
         "--output_dir", str(tmp_path)],
    )  # fmt: skip
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert lines and "not supported under DeepSpeed" in lines[0], proc.stderr[-3000:]
    assert 'common.py", line' not in proc.stderr


def test_adaptive_batch_arguments_are_checked_before_launch(monkeypatch):
    import classification  # on sys.path through tests.recipes.helpers
    import common

    env = ("WORLD_SIZE", "ACCELERATE_NUM_PROCESSES", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_USE_DEEPSPEED")
    for var in env:
        monkeypatch.delenv(var, raising=False)
    base = ["--world_size", "2", "--per_device_batch_size", "4", "--global_batch_size", "16"]
    base += ["--optimizer", "adadagrad"]
    with pytest.raises(SystemExit, match="--max_global_batch_size 12 must be >= --global_batch_size 16"):
        common.parse_args(classification.TASK, [*base, "--max_global_batch_size", "12"])
    with pytest.raises(SystemExit, match="a multiple of per_device_batch_size x world size = 8"):
        common.parse_args(classification.TASK, [*base, "--max_global_batch_size", "20"])
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(SystemExit, match="not supported under DeepSpeed"):
        common.parse_args(classification.TASK, base)
