"""--discard_small_loss and --sharpness_every in the recipes, launched for real (2 processes, gloo)."""

from __future__ import annotations

import glob

import pytest

from tests.recipes.helpers import launch, summary_of

pytestmark = pytest.mark.distributed

TINY = [
    "--global_batch_size", "64", "--per_device_batch_size", "16",  # 16 x 2 accumulation x 2 ranks
    "--max_train_samples", "256", "--max_eval_samples", "32", "--max_seq_length", "32",
    "--lr", "1e-3", "--warmup_steps", "1", "--max_steps", "2", "--report_to", "tensorboard",
    "--no_final_model", "--no_final_checkpoint",
]  # fmt: skip


def _scalars(folder, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = []
    for path in glob.glob(str(folder / "*" / "events.out.tfevents.*")):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out += [(e.step, e.value) for e in acc.Scalars(tag)]
    return sorted(out)


def test_classification_ddp_discards_a_quarter_of_each_global_batch_and_probes_sharpness(tmp_path):
    args = [*TINY, "--optimizer", "lamb", "--discard_small_loss", "0.25", "--sharpness_every", "2",
            "--sharpness_iters", "3", "--output_dir", str(tmp_path)]
    s = summary_of(launch("cpu.yaml", "classification.py", args), tmp_path)
    assert s["steps"] == 2 and s["samples"] == 128
    assert _scalars(tmp_path, "discard/kept") == [(1, 48.0), (2, 48.0)]  # 64 − ⌊0.25·64⌋, over both ranks
    assert _scalars(tmp_path, "discard/total") == [(1, 64.0), (2, 64.0)]
    (step, lam), = _scalars(tmp_path, "sharpness/lambda_max")
    assert step == 2 and lam > 0
    assert (tmp_path / "sharpness.png").stat().st_size > 5_000


def test_causal_lm_zero2_discards_with_accumulation(tmp_path):
    args = [*TINY, "--optimizer", "adamw", "--discard_small_loss", "0.5", "--output_dir", str(tmp_path)]
    s = summary_of(launch("deepspeed_zero2.yaml", "causal_lm.py", args), tmp_path)
    assert s["steps"] == 2 and s["zero_stage"] == 2
    assert _scalars(tmp_path, "discard/kept") == [(1, 32.0), (2, 32.0)]


def test_bad_fraction_is_a_one_line_error(tmp_path):
    proc = launch("cpu.yaml", "classification.py", [*TINY, "--discard_small_loss", "1.0", "--output_dir",
                                                     str(tmp_path)], timeout=120)
    assert proc.returncode != 0
    assert "error: --discard_small_loss must be in [0, 1)" in proc.stderr
