"""The recipes, launched for real: 2 processes, DeepSpeed ZeRO on CPU (gloo), a few steps each."""

from __future__ import annotations

import math
import re

import pytest

from tests.recipes.helpers import launch, strict_json, summary_of

pytestmark = pytest.mark.distributed

TINY_CLS = [
    "--global_batch_size", "64", "--per_device_batch_size", "16",  # 16 x 2 accumulation x 2 ranks
    "--max_train_samples", "256", "--max_eval_samples", "64", "--max_seq_length", "32",
    "--lr", "1e-3", "--warmup_steps", "1", "--report_to", "tensorboard",
]  # fmt: skip


@pytest.mark.slow  # ~95 s quiet: three launches (uninterrupted, killed in a save, resumed)
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
    """LAMB at lr 1e4 under ZeRO-2 (the loss-ratio check off, so the NaN / overflow-skip path is the one hit):
    before, it ran on with DeepSpeed skipping every step, exit 0, bare NaN in summary.json, diverged checkpoints."""
    out = tmp_path / "diverged"
    args = [*TINY_CLS, "--optimizer", "lamb", "--lr", "1e4", "--lr_scaling", "none", "--max_steps", "8"]
    args += ["--divergence_loss_ratio", "0"]
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
    # DeepSpeed's overflow check skipped the NaN step, and the recipe counted it
    assert s["skipped_steps"] >= 1 and s["steps"] in s["skipped_at_steps"], s
    assert "the training loss is nan" in s["diverged"] or "steps were skipped" in s["diverged"]
    assert any(loss is None for _, loss in s["loss_curve"])  # NaN written as null
    assert not (out / "model").exists()
    saved = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    assert saved == list(range(1, s["steps"])), saved  # every step before the divergence, not the diverged one
    assert s["latest_checkpoint"] == (str(out / "checkpoints" / f"step_{saved[-1]}") if saved else None)


def test_causal_lm_cblr_zero1(tmp_path):
    out = tmp_path / "lm"
    args = [
        "--optimizer", "cblr", "--global_batch_size", "32", "--per_device_batch_size", "8",
        "--max_seq_length", "64", "--max_train_samples", "128", "--max_eval_samples", "32",
        "--max_steps", "3", "--report_to", "none", "--no_final_checkpoint",
        "--output_dir", str(out),
    ]  # fmt: skip
    s = summary_of(launch("deepspeed_zero1.yaml", "causal_lm.py", args), out)
    assert (s["task"], s["model"], s["zero_stage"], s["steps"], s["samples"]) == ("causal_lm", "tiny-llama", 1, 3, 96)
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


def test_classification_plain_ddp_multi_gpu_yaml_on_cpu(tmp_path):
    """multi_gpu.yaml (8 GPUs, bf16) on this CPU machine: 2 processes, gloo DDP (bf16 autocast is a GPU
    matter and crawls on this CPU: --mixed_precision no overrides the yaml)."""
    out = tmp_path / "ddp"
    args = [*TINY_CLS, "--optimizer", "adamw", "--max_steps", "3", "--stop_after_steps", "2", "--report_to", "none"]
    args += ["--no_final_checkpoint", "--no_final_model", "--mixed_precision", "no", "--output_dir", str(out)]
    s = summary_of(launch("multi_gpu.yaml", "classification.py", args, launcher_args=("--num_processes", "2")), out)
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
    proc = launch("deepspeed_zero2.yaml", "classification.py", ["--lr", "nan", "--output_dir", str(tmp_path)])
    assert "error: --lr must be a finite number > 0, got nan" in proc.stderr.splitlines()
    assert "[start-up" not in proc.stderr  # refused before the process group


def test_zero3_offload_runs_on_cpu(tmp_path):
    """The issue's command: it hung after the op build (rank 0 in zero.Init's broadcast, rank 1 in the
    main-process-first barrier). Now it trains, reports its start-up stages and saves the gathered model."""
    out = tmp_path / "z3o"
    args = [
        "--global_batch_size", "64", "--per_device_batch_size", "16", "--max_train_samples", "256",
        "--max_eval_samples", "16", "--max_seq_length", "16", "--max_steps", "2", "--no_final_checkpoint",
        "--report_to", "none", "--output_dir", str(out), "--startup_timeout_s", "240",
    ]  # fmt: skip
    proc = launch("deepspeed_zero3_offload.yaml", "classification.py", args, timeout=420)
    s = summary_of(proc, out)
    assert (s["zero_stage"], s["steps"], s["optimizer_updates"], s["status"]) == (3, 2, 2, "completed")
    assert all(math.isfinite(loss) for _, loss in s["loss_curve"])
    stages = re.findall(r"\[start-up +[0-9.]+s\] ([^\r\n]*)", proc.stderr)  # rank 0's; tqdm may share the line
    assert [st.split(" (")[0] for st in stages] == [
        "process group", "model and data", "engine set-up", "first step", "first step done"
    ]  # fmt: skip
    assert (out / "model" / "model.safetensors").stat().st_size > 1_000_000  # gathered from the partitions


def test_zero2_offload_causal_lm(tmp_path):
    out = tmp_path / "z2o"
    args = [
        "--optimizer", "mclr", "--global_batch_size", "16", "--per_device_batch_size", "8",
        "--max_seq_length", "32", "--max_train_samples", "64", "--max_eval_samples", "16",
        "--max_steps", "2", "--report_to", "none", "--no_final_checkpoint", "--no_final_model",
        "--output_dir", str(out),
    ]  # fmt: skip
    s = summary_of(launch("deepspeed_zero2_offload.yaml", "causal_lm.py", args), out)
    assert (s["zero_stage"], s["steps"], s["optimizer_updates"]) == (2, 2, 2)
    assert {k.split("/")[0] for k in s["last_layer_stats"]} == {"lr", "curvature", "rate"}


def test_a_stale_extension_lock_ends_the_launch_naming_it(tmp_path):
    """A lock left by a killed build: before, every DeepSpeed launch waited forever without a word."""
    ext = tmp_path / "torch_extensions"
    lock = ext / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    args = [*TINY_CLS, "--max_steps", "1", "--output_dir", str(tmp_path / "out"), "--extension_lock_timeout_s", "3"]
    env = {"TORCH_EXTENSIONS_DIR": str(ext)}
    proc = launch("deepspeed_zero2.yaml", "classification.py", args, env=env, timeout=180)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: rank ")]  # whichever rank saw it first
    assert errors, proc.stderr[-3000:]
    assert f"torch-extensions build lock {lock}" in errors[0] and f"rm {lock}" in errors[0]
    assert "stage 'process group" in errors[0] and lock.exists()  # named, not silently removed
