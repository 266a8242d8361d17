"""The recipes, launched for real: 2 processes, DeepSpeed ZeRO on CPU (gloo), a few steps each."""

from __future__ import annotations

import math

import pytest

from tests.recipes.helpers import launch, strict_json, summary_of

pytestmark = pytest.mark.distributed

TINY_CLS = [
    "--global_batch_size", "64", "--per_device_batch_size", "16",  # 16 x 2 accumulation x 2 ranks
    "--max_train_samples", "256", "--max_eval_samples", "64", "--max_seq_length", "32",
    "--lr", "1e-3", "--warmup_steps", "1", "--report_to", "tensorboard",
]  # fmt: skip


def test_classification_lamb_zero2_atomic_checkpoints_survive_a_kill_during_save(tmp_path):
    """Uninterrupted run vs. a run killed while saving step 4 and resumed from 'latest' (= step 2)."""
    first = tmp_path / "first"
    args = [*TINY_CLS, "--optimizer", "lamb", "--max_steps", "4", "--eval_steps", "2", "--checkpoint_steps", "2"]
    args += ["--save_total_limit", "1"]
    s = summary_of(launch("deepspeed_zero2.yaml", "classification.py", [*args, "--output_dir", str(first)]), first)
    assert strict_json(first / "summary.json") == s
    assert (s["deepspeed"], s["zero_stage"], s["world_size"], s["status"]) == (True, 2, 2, "completed")
    assert (s["steps"], s["optimizer_updates"], s["skipped_steps"], s["samples"]) == (4, 4, 0, 256)
    assert s["gradient_accumulation_steps"] == 2
    assert s["batch_size_trajectory"] == [[step, 64] for step in range(1, 5)]
    assert [e["step"] for e in s["evals"]] == [2, 4]
    assert 0.0 <= s["final_eval"]["eval_accuracy"] <= 1.0 and 0.0 <= s["final_eval"]["eval_f1"] <= 1.0
    assert all(math.isfinite(loss) for _, loss in s["loss_curve"])
    assert s["last_layer_stats"], "LAMB exposes per-layer rates; the recipe should report them"
    assert {k.split("/")[0] for k in s["layer_curves"]} == {"lr", "trust_ratio"}
    assert all(len(points) == 4 for points in s["layer_curves"].values())
    assert (first / "training.png").stat().st_size > 10_000
    assert list(first.glob("classification-lamb/events.out.tfevents.*")), "TensorBoard logs missing"
    # --save_total_limit 1: step_2 was pruned once step_4 was complete; nothing incomplete is left
    assert sorted(p.name for p in (first / "checkpoints").iterdir()) == ["step_4"]
    assert s["latest_checkpoint"] == str(first / "checkpoints" / "step_4")
    model = first / "model"  # the final save_pretrained folder loads as a model
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in model.iterdir()}

    killed = tmp_path / "killed"
    proc = launch(
        "deepspeed_zero2.yaml",
        "classification.py",
        [*args, "--output_dir", str(killed)],
        env={"LBOPT_RECIPES_KILL_DURING_SAVE": "4"},  # SIGKILL of rank 0 with step 4's shards half written
    )
    assert proc.returncode != 0
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert names == [".incomplete-step_4", "step_2"], names  # the torn save is not a checkpoint

    proc = launch(
        "deepspeed_zero2.yaml",
        "classification.py",
        [*args, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"],
    )
    r = summary_of(proc, killed)
    assert f"resumed from {killed / 'checkpoints' / 'step_2'} at step 2" in proc.stdout
    assert (r["steps"], r["samples"], r["optimizer_updates"]) == (4, 256, 4)
    # same data order, optimizer state and schedule: the resumed run retraces the uninterrupted one
    for (step, a), (_, b) in zip(s["loss_curve"], r["loss_curve"]):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), step
    assert r["final_eval"]["eval_loss"] == pytest.approx(s["final_eval"]["eval_loss"], rel=1e-4)
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_4"]


def test_divergence_stops_the_run_and_saves_nothing_of_it(tmp_path):
    """LAMB at lr 1e4 under ZeRO-2: NaN loss / skipped steps -> non-zero exit, strict JSON, no diverged checkpoint."""
    out = tmp_path / "diverged"
    args = [*TINY_CLS, "--optimizer", "lamb", "--lr", "1e4", "--lr_scaling", "none", "--max_steps", "8"]
    args += ["--checkpoint_steps", "1", "--report_to", "none", "--output_dir", str(out)]
    proc = launch("deepspeed_zero2.yaml", "classification.py", args)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: the run diverged")]
    assert errors and "nothing of it was saved" in errors[0] and "--on_divergence continue" in errors[0], proc.stderr[
        -3000:
    ]
    s = strict_json(out / "summary.json")  # bare NaN would fail here
    assert s["status"] == "diverged" and s["diverged"] and s["diverged_at_step"] == s["steps"] < 8
    assert s["optimizer_updates"] + s["skipped_steps"] == s["steps"]
    assert not (out / "model").exists()
    saved = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    assert saved == list(range(1, s["steps"])), saved  # every step before the divergence, not the diverged one
    assert s["latest_checkpoint"] == (str(out / "checkpoints" / f"step_{saved[-1]}") if saved else None)


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
