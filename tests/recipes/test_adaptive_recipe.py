"""The adaptive-batch (AdAdaGrad*) and scheduled-batch (--batch_schedule) recipes, launched for real:
2 CPU processes, plain DDP over gloo and DeepSpeed ZeRO 1/2/3 on CPU."""

from __future__ import annotations

import math

import pytest

from tests.recipes.helpers import launch, summary_of

pytestmark = pytest.mark.distributed

TINY = [
    "--global_batch_size", "16", "--per_device_batch_size", "4",  # 4 x 2 accumulation x 2 ranks
    "--max_train_samples", "256", "--max_eval_samples", "16", "--max_seq_length", "16",
    "--warmup_steps", "1", "--report_to", "none", "--no_final_model",
]  # fmt: skip
ADA = ["--optimizer_args", '{"eta": 0.1}', "--max_global_batch_size", "48"]  # small eta: grow at once


def _sizes(s: dict) -> list[int]:
    return [b for _, b in s["batch_size_trajectory"]]


def test_classification_adadagradnorm_batch_grows_ddp(tmp_path):
    out = tmp_path / "ada"
    args = [*TINY, *ADA, "--optimizer", "adadagradnorm", "--max_steps", "5", "--report_to", "tensorboard",
            "--no_final_checkpoint", "--output_dir", str(out)]
    s = summary_of(launch("cpu.yaml", "classification.py", args, timeout=900), out)
    assert (s["deepspeed"], s["world_size"], s["steps"]) == (False, 2, 5)
    sizes = _sizes(s)
    assert [step for step, _ in s["batch_size_trajectory"]] == [1, 2, 3, 4, 5]
    assert sizes[0] == 16 and max(sizes) > 16, sizes  # the controller grew the global batch
    assert sizes == sorted(sizes) and all(b % 8 == 0 and b <= 48 for b in sizes)  # monotone, unit 4 x 2
    assert s["samples"] == sum(sizes) and s["final_global_batch_size"] == sizes[-1]
    assert s["max_global_batch_size"] == 48
    assert all(math.isfinite(loss) for _, loss in s["loss_curve"])
    assert (out / "training.png").stat().st_size > 10_000
    assert list(out.glob("classification-adadagradnorm/events.out.tfevents.*")), "TensorBoard logs missing"


@pytest.mark.parametrize("config, stage, optimizer", [
    ("deepspeed_zero1.yaml", 1, "adadagradnorm"),
    # ~37 s, slow; ZeRO-3 exactness of the batch-size tests stays in tests/batch
    pytest.param("deepspeed_zero3.yaml", 3, "adadagrad", marks=pytest.mark.slow),
])
def test_adaptive_batch_grows_under_deepspeed(tmp_path, config, stage, optimizer):
    out = tmp_path / "ds"
    args = [*TINY, *ADA, "--optimizer", optimizer, "--max_steps", "4", "--no_final_checkpoint"]
    args += ["--output_dir", str(out)]
    s = summary_of(launch(config, "classification.py", args, timeout=900), out)
    assert (s["deepspeed"], s["zero_stage"], s["world_size"], s["steps"]) == (True, stage, 2, 4)
    sizes = _sizes(s)
    assert sizes[0] == 16 and max(sizes) > 16 and all(b % 8 == 0 and b <= 48 for b in sizes), sizes
    assert s["samples"] == sum(sizes)
    assert all(math.isfinite(loss) for _, loss in s["loss_curve"])


def _resume_pair(tmp_path, config: str, args: list[str], at: int) -> tuple[dict, dict]:
    """An uninterrupted run (checkpoint every ``at`` steps) and one resumed from its step ``at``."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    s = summary_of(launch(config, "classification.py", [*args, "--checkpoint_steps", str(at),
                                                        "--output_dir", str(full)], timeout=900), full)
    ckpt = full / "checkpoints" / f"step_{at}"
    proc = launch(config, "classification.py", [*args, "--output_dir", str(resumed),
                                               "--resume_from_checkpoint", str(ckpt)], timeout=900)
    r = summary_of(proc, resumed)
    assert f"at step {at}" in proc.stdout
    return s, r


def _same_run(s: dict, r: dict) -> None:
    assert r["batch_size_trajectory"] == s["batch_size_trajectory"]
    assert (r["steps"], r["samples"]) == (s["steps"], s["samples"])
    for (step, a), (_, b) in zip(s["loss_curve"], r["loss_curve"]):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), step
    assert r["final_eval"]["eval_loss"] == pytest.approx(s["final_eval"]["eval_loss"], rel=1e-4)


def test_adaptive_zero2_resume_reproduces_the_run(tmp_path):
    """AdAdaGrad under ZeRO-2 with clipping: the controller (in the optimizer state) and the data position
    come back, so the resumed run retraces the uninterrupted one, batch sizes included."""
    args = [*TINY, *ADA, "--optimizer", "adadagrad", "--max_steps", "6", "--max_grad_norm", "0.5"]
    s, r = _resume_pair(tmp_path, "deepspeed_zero2.yaml", args, 3)
    assert max(_sizes(s)[:3]) < max(_sizes(s)) or _sizes(s)[3] > 16, _sizes(s)  # still growing after step 3
    _same_run(s, r)


def test_batch_schedule_by_step_ddp_resume_reproduces_the_run(tmp_path):
    args = [*TINY, "--optimizer", "lamb", "--lr", "1e-3", "--batch_schedule", "step:0:16,2:32,4:48",
            "--max_steps", "6"]
    s, r = _resume_pair(tmp_path, "cpu.yaml", args, 3)
    assert _sizes(s) == [16, 16, 32, 32, 48, 48]
    assert s["max_global_batch_size"] == 48
    _same_run(s, r)


@pytest.mark.slow  # ~35 s quiet; by-step schedules and resume stay in the default run
def test_batch_schedule_by_epoch_zero2(tmp_path):
    """64 training samples: epoch 0 in 4 steps of 16, epoch 1 in 2 of 32; the LR schedule is laid out for
    exactly those 6 steps (linear decay to 0 at the last one)."""
    out = tmp_path / "sched"
    args = [*TINY, "--optimizer", "lamb", "--lr", "1e-3", "--lr_scaling", "linear", "--max_train_samples", "64",
            "--batch_schedule", "0:16,1:32", "--num_epochs", "2", "--no_final_checkpoint", "--output_dir", str(out)]
    s = summary_of(launch("deepspeed_zero2.yaml", "classification.py", args, timeout=900), out)
    assert (s["deepspeed"], s["zero_stage"]) == (True, 2)
    assert _sizes(s) == [16, 16, 16, 16, 32, 32]
    assert (s["steps"], s["planned_steps"], s["samples"]) == (6, 6, 128)
    lrs = [lr for _, lr in s["lr_curve"]]
    # linear rule at every batch: 1e-3 * B/256, times the warm-up/decay factor of each step
    assert lrs[4] / lrs[3] == pytest.approx(2 * (1 - 3 / 5) / (1 - 2 / 5), rel=1e-6)


def test_adaptive_and_schedule_arguments_are_checked_before_launch(monkeypatch):
    import classification  # on sys.path through tests.recipes.helpers
    import common

    env = ("WORLD_SIZE", "ACCELERATE_NUM_PROCESSES", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_USE_DEEPSPEED")
    for var in env:
        monkeypatch.delenv(var, raising=False)
    base = ["--world_size", "2", "--per_device_batch_size", "4", "--global_batch_size", "16"]
    ada = [*base, "--optimizer", "adadagrad"]
    with pytest.raises(SystemExit, match="--max_global_batch_size 12 must be >= --global_batch_size 16"):
        common.parse_args(classification.TASK, [*ada, "--max_global_batch_size", "12"])
    with pytest.raises(SystemExit, match="a multiple of per_device_batch_size x world size = 8"):
        common.parse_args(classification.TASK, [*ada, "--max_global_batch_size", "20"])
    with pytest.raises(SystemExit, match="both set the batch"):
        common.parse_args(classification.TASK, [*ada, "--batch_schedule", "0:16,1:32"])
    lamb = [*base, "--optimizer", "lamb"]
    with pytest.raises(SystemExit, match="entry 1:20: the batch must be a positive multiple of .* = 8"):
        common.parse_args(classification.TASK, [*lamb, "--batch_schedule", "0:16,1:20"])
    with pytest.raises(SystemExit, match="must start at 0"):
        common.parse_args(classification.TASK, [*lamb, "--batch_schedule", "1:16"])
    args, _ = common.parse_args(classification.TASK, [*lamb, "--batch_schedule", "0:8,2:32"])
    assert (args.global_batch_size, args.max_global_batch_size, args.gradient_accumulation_steps) == (8, 32, 1)
