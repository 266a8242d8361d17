"""The recipes, launched for real: 2 processes, DeepSpeed ZeRO on CPU (gloo), a few steps each."""

from __future__ import annotations

import math

import pytest

from tests.recipes.helpers import launch, summary_of

pytestmark = pytest.mark.distributed

TINY_CLS = [
    "--global_batch_size", "64", "--per_device_batch_size", "16",  # 16 x 2 accumulation x 2 ranks
    "--max_train_samples", "256", "--max_eval_samples", "64", "--max_seq_length", "32",
    "--lr", "1e-3", "--warmup_steps", "1", "--report_to", "tensorboard",
]  # fmt: skip


def test_classification_lamb_zero2_checkpoint_and_resume(tmp_path):
    first = tmp_path / "first"
    args = [*TINY_CLS, "--optimizer", "lamb", "--max_steps", "4", "--eval_steps", "2", "--checkpoint_steps", "2"]
    s = summary_of(launch("deepspeed_zero2.yaml", "classification.py", [*args, "--output_dir", str(first)]), first)
    assert (s["deepspeed"], s["zero_stage"], s["world_size"]) == (True, 2, 2)
    assert (s["steps"], s["samples"], s["gradient_accumulation_steps"]) == (4, 256, 2)
    assert s["batch_size_trajectory"] == [[step, 64] for step in range(1, 5)]
    assert [e["step"] for e in s["evals"]] == [2, 4]
    assert 0.0 <= s["final_eval"]["eval_accuracy"] <= 1.0 and 0.0 <= s["final_eval"]["eval_f1"] <= 1.0
    assert all(math.isfinite(loss) for _, loss in s["loss_curve"])
    assert s["last_layer_stats"], "LAMB exposes per-layer rates; the recipe should report them"
    assert (first / "training.png").stat().st_size > 10_000
    assert list(first.glob("classification-lamb/events.out.tfevents.*")), "TensorBoard logs missing"
    assert {p.name for p in (first / "checkpoints").iterdir()} == {"step_2", "step_4"}

    resumed = tmp_path / "resumed"
    proc = launch(
        "deepspeed_zero2.yaml",
        "classification.py",
        [*args, "--output_dir", str(resumed), "--resume_from_checkpoint", str(first / "checkpoints" / "step_2")],
    )
    r = summary_of(proc, resumed)
    assert "resumed from" in proc.stdout and r["steps"] == 4 and r["samples"] == 256
    # same data order, optimizer state and schedule: the resumed run retraces the original
    for (step, a), (_, b) in zip(s["loss_curve"], r["loss_curve"]):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), step
    assert r["final_eval"]["eval_loss"] == pytest.approx(s["final_eval"]["eval_loss"], rel=1e-4)


def test_causal_lm_cblr_zero2(tmp_path):
    out = tmp_path / "lm"
    args = [
        "--optimizer", "cblr", "--global_batch_size", "32", "--per_device_batch_size", "8",
        "--max_seq_length", "64", "--max_train_samples", "128", "--max_eval_samples", "32",
        "--max_steps", "3", "--report_to", "none", "--no_final_checkpoint",
        "--output_dir", str(out),
    ]  # fmt: skip
    s = summary_of(launch("deepspeed_zero2.yaml", "causal_lm.py", args), out)
    assert (s["task"], s["model"], s["zero_stage"], s["steps"], s["samples"]) == ("causal_lm", "tiny-llama", 2, 3, 96)
    final = s["final_eval"]
    assert final["eval_perplexity"] == pytest.approx(math.exp(final["eval_loss"]), rel=1e-6)
    assert 0.0 <= final["eval_accuracy"] <= 1.0
    assert s["loss_curve"][-1][1] < s["loss_curve"][0][1]  # a random LM learns token frequencies fast


def test_causal_lm_adamw_zero3_exits_cleanly(tmp_path):
    out = tmp_path / "lm3"
    args = [
        "--optimizer", "adamw", "--global_batch_size", "32", "--per_device_batch_size", "8",
        "--max_seq_length", "32", "--max_train_samples", "64", "--max_eval_samples", "16",
        "--max_steps", "2", "--lr", "1e-3", "--report_to", "none", "--no_final_checkpoint",
        "--output_dir", str(out),
    ]  # fmt: skip
    s = summary_of(launch("deepspeed_zero3.yaml", "causal_lm.py", args, timeout=240), out)
    assert (s["zero_stage"], s["steps"]) == (3, 2)


def test_classification_plain_ddp_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    args = [*TINY_CLS, "--optimizer", "adamw", "--max_steps", "3", "--stop_after_steps", "2", "--report_to", "none"]
    args += ["--no_final_checkpoint", "--output_dir", str(out)]
    s = summary_of(launch("cpu.yaml", "classification.py", args), out)
    assert (s["deepspeed"], s["world_size"], s["steps"], s["samples"]) == (False, 2, 2, 128)
    assert (s["planned_steps"], s["stopped_early"], [e["step"] for e in s["evals"]]) == (3, True, [2])


def test_bad_input_fails_with_one_line_before_any_process_group(tmp_path):
    proc = launch("deepspeed_zero2.yaml", "classification.py", ["--optimizer", "sgdx", "--output_dir", str(tmp_path)])
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert lines and "--optimizer 'sgdx' is unknown" in lines[0]
    assert 'common.py", line' not in proc.stderr  # no traceback from the recipe itself
    bad_batch = ["--global_batch_size", "100", "--output_dir", str(tmp_path)]
    proc = launch("deepspeed_zero2.yaml", "classification.py", bad_batch)
    assert any("not divisible" in ln for ln in proc.stderr.splitlines() if ln.startswith("error: "))
