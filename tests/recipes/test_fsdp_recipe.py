"""The recipes under the FSDP launch files on CPU ranks: real sharding (gloo), exact resume."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.recipes.helpers import launch, summary_of

pytestmark = pytest.mark.distributed

RECIPE_TINY = [
    "--global_batch_size", "16", "--per_device_batch_size", "4",  # 4 x 2 accumulation x 2 ranks
    "--max_train_samples", "128", "--max_eval_samples", "16", "--max_seq_length", "16",
    "--warmup_steps", "1", "--report_to", "none", "--optimizer", "cblr",
    "--max_steps", "3", "--eval_steps", "3", "--checkpoint_steps", "2",
]  # fmt: skip


def dcp_chunks(folder: Path) -> dict[str, list[tuple[list[int], list[int]]]]:
    """Each tensor of a torch.distributed.checkpoint folder: (offsets, sizes) of the pieces the ranks wrote."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {k: [(list(c.offsets), list(c.sizes)) for c in v.chunks] for k, v in meta.items() if hasattr(v, "chunks")}


def test_recipe_trains_sharded_under_fsdp2_yaml_on_cpu_and_resumes_exactly(tmp_path: Path) -> None:
    """``accelerate launch --config_file integrations/accelerate/fsdp2.yaml recipes/classification.py
    --optimizer cblr`` on 2 CPU ranks: real FSDP2 (every weight written as two row shards by the two
    ranks), lbopt's per-layer state in the checkpoint, and a run resumed from step 2 ends where the
    uninterrupted one does (losses, evaluation, final weights)."""
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    a = summary_of(launch("fsdp2.yaml", "classification.py", [*RECIPE_TINY, "--output_dir", str(first)]), first)
    assert (a["fsdp_version"], a["deepspeed"], a["world_size"], a["status"]) == (2, False, 2, "completed")
    assert (a["steps"], a["gradient_accumulation_steps"]) == (3, 2)
    step2 = first / "checkpoints" / "step_2"
    weights = dcp_chunks(step2 / "pytorch_model_fsdp_0")
    query = weights["model.bert.encoder.layer.0.attention.self.query.weight"]
    assert query == [([0, 0], [192, 384]), ([192, 0], [192, 384])], query  # rank r holds rows [192 r, 192 (r+1))
    assert all(len(pieces) == 2 for pieces in weights.values()), "every parameter is sharded over both ranks"
    moments = [k for k, v in dcp_chunks(step2 / "optimizer_0").items() if len(v) == 2]
    assert moments, "the optimizer state is sharded too"
    extras = [torch.load(f, weights_only=False) for f in sorted(step2.glob("custom_checkpoint_*.pkl"))]
    lbopt_state = [e for e in extras if "lbopt_extra_state" in e]  # LayerStateCheckpoint
    assert len(lbopt_state) == 1
    layer_state = torch.load(io.BytesIO(lbopt_state[0]["lbopt_extra_state"]), weights_only=False)["layer_state"]
    assert "curvature" in layer_state and torch.as_tensor(layer_state["has_curvature"]).any()

    args = [*RECIPE_TINY, "--output_dir", str(resumed), "--resume_from_checkpoint", str(step2), "--no_final_checkpoint"]
    b = summary_of(launch("fsdp2.yaml", "classification.py", args), resumed)
    assert b["loss_curve"] == a["loss_curve"] and b["final_eval"] == a["final_eval"]
    x, y = load_file(first / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_recipe_trains_sharded_under_fsdp1_yaml_on_cpu(tmp_path: Path) -> None:
    """``fsdp1.yaml`` on 2 CPU ranks: FullyShardedDataParallel(use_orig_params=True) with bind_fsdp1, 2 steps,
    sharded DCP checkpoint, final model gathered on rank 0."""
    out = tmp_path / "fsdp1"
    args = [*RECIPE_TINY[:-6], "--max_steps", "2", "--eval_steps", "2", "--output_dir", str(out)]
    s = summary_of(launch("fsdp1.yaml", "classification.py", args), out)
    assert (s["fsdp_version"], s["world_size"], s["status"], s["steps"]) == (1, 2, "completed", 2)
    assert s["last_layer_stats"], "CBLR's per-layer rates, from the bound FSDP1 layouts"
    flat = dcp_chunks(out / "checkpoints" / "step_2" / "pytorch_model_fsdp_0")
    assert flat and all(len(pieces) == 2 for pieces in flat.values()), "each rank wrote its own shard"
    final = load_file(out / "model" / "model.safetensors")
    assert final["bert.encoder.layer.0.attention.self.query.weight"].shape == (384, 384)  # gathered whole


def test_recipe_refuses_fsdp1_resume_on_cpu_before_any_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Accelerate's FSDP1 sharded load did not reproduce the trajectory on CPU ranks (torch AdamW too)."""
    import argparse
    import importlib

    common = importlib.import_module("common")  # tests.recipes.helpers put recipes/ on sys.path
    if torch.accelerator.is_available():
        pytest.skip("accelerator ranks: Accelerate's own FSDP path applies")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    args = argparse.Namespace(deepspeed_config=None, optimizer="cblr", resume_from_checkpoint="/ckpt/step_2")
    with pytest.raises(SystemExit) as exc:
        common.create_accelerator(args)
    message = str(exc.value)
    assert message.startswith("error: ") and "FSDP1 checkpoint on CPU ranks is refused" in message
    assert "fsdp2.yaml" in message
