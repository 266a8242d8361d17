"""Checkpoints: DeepSpeed universal checkpoints of lbopt optimizers (save on N ranks, resume on M).

``deepspeed.checkpoint.ds_to_universal`` only knows Adam's two moment buffers; :func:`to_universal`
converts an lbopt optimizer's per-element state pair by pair and keeps its per-layer state, and
:func:`install_universal_load` (run by the binding) restores that per-layer state when the
engine loads the universal checkpoint.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import tempfile
from typing import Any

import torch

from .compat import UnsupportedDeepSpeedConfig, check_deepspeed

__all__ = ["install_universal_load", "to_universal"]


def _converter_args(src: str, dst: str, num_workers: int) -> argparse.Namespace:
    """The options ``ds_to_universal.main`` reads (its command line's, as attributes)."""
    return argparse.Namespace(
        input_folder=src, output_folder=dst, num_extract_workers=num_workers, num_merge_workers=num_workers,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    )


_ADAM_KEYS = ("exp_avg", "exp_avg_sq")
_LBOPT_KEY = "lbopt_optimizer_state"


def _base_state(sd: dict[str, Any]) -> dict[str, Any]:
    """The base optimizer's ``state_dict()`` inside one ``*_optim_states.pt`` file."""
    osd = sd["optimizer_state_dict"]
    return osd["base_optimizer_state"] if "base_optimizer_state" in osd else osd["optimizer_state_dict"]


def _flat_groups(sd: dict[str, Any]) -> list[torch.Tensor]:
    osd = sd["optimizer_state_dict"]
    return osd["single_partition_of_fp32_groups"] if "base_optimizer_state" in osd else osd["fp32_flat_groups"]


def to_universal(input_folder: str, output_folder: str, *, num_workers: int = 1) -> None:
    """Convert a ZeRO checkpoint of an lbopt optimizer to DeepSpeed's universal format.

    ``deepspeed.checkpoint.ds_to_universal`` only knows Adam's two moment buffers. lbopt's
    per-element state has other names (``momentum_buffer``, ``prev_param``, ``prev_grad``,
    ...), so the conversion runs once per pair of state keys, each time presenting that
    pair under Adam's names, and renames the per-parameter files back. The per-layer state
    (``layer_state``: curvature EMAs, identical on every rank) and ``skipped_steps`` are
    stored in ``zero/optimizer_state.pt`` and restored by the adapter when the universal
    checkpoint is loaded (``"checkpoint": {"load_universal": true}``). Loading into ZeRO-1/2
    and the bf16 optimizer is supported; DeepSpeed's ZeRO-3 universal loader only knows Adam.

    Also usable as ``python -m lbopt.integrations.deepspeed INPUT_FOLDER OUTPUT_FOLDER``.
    """
    from deepspeed.checkpoint import ds_to_universal as conv

    check_deepspeed()
    files = sorted(glob.glob(os.path.join(input_folder, "*_optim_states.pt")))
    if not files:
        raise FileNotFoundError(f"no *_optim_states.pt files in {input_folder!r}")
    states = {f: torch.load(f, map_location="cpu", weights_only=False) for f in files}
    first = states[files[0]]
    base = _base_state(first)
    keys: list[str] = []
    for entry in base["state"].values():
        for k, v in entry.items():
            if torch.is_tensor(v) and v.dim() == 1 and k not in keys and k != "step":
                keys.append(k)
    passes: list[tuple[str | None, str | None]] = [
        (keys[i], keys[i + 1] if i + 1 < len(keys) else None) for i in range(0, len(keys), 2)
    ] or [(None, None)]

    def convert(src: str, dst: str) -> None:
        conv.main(_converter_args(src, dst, num_workers))

    os.makedirs(output_folder, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lbopt_universal_") as tmp:
        for n, pair in enumerate(passes):
            src = os.path.join(tmp, f"in{n}")
            os.makedirs(src)
            for name in os.listdir(input_folder):
                if not name.endswith("_optim_states.pt"):
                    os.symlink(os.path.join(os.path.abspath(input_folder), name), os.path.join(src, name))
            for f, sd in states.items():
                sd = dict(sd)
                sd["optimizer_state_dict"] = _presented(sd, pair)
                torch.save(sd, os.path.join(src, os.path.basename(f)))
            dst = output_folder if n == 0 else os.path.join(tmp, f"out{n}")
            convert(src, dst)
            zero_out = os.path.join(output_folder, "zero")
            zero_dst = os.path.join(dst, "zero")
            for param in os.listdir(zero_dst):
                folder = os.path.join(zero_dst, param)
                if not os.path.isdir(folder):
                    continue
                for slot, key in zip(_ADAM_KEYS, pair):
                    path = os.path.join(folder, f"{slot}.pt")
                    if key is None:
                        os.remove(path)
                    else:
                        shutil.move(path, os.path.join(zero_out, param, f"{key}.pt.lbopt"))
        for param in os.listdir(os.path.join(output_folder, "zero")):
            folder = os.path.join(output_folder, "zero", param)
            if os.path.isdir(folder):
                for name in os.listdir(folder):
                    if name.endswith(".pt.lbopt"):
                        os.replace(os.path.join(folder, name), os.path.join(folder, name[: -len(".lbopt")]))
    global_path = os.path.join(output_folder, "zero", "optimizer_state.pt")
    global_sd = torch.load(global_path, map_location="cpu", weights_only=False)
    global_sd[_LBOPT_KEY] = {
        "layer_state": base.get("layer_state", {}),
        "skipped_steps": base.get("skipped_steps", 0),
        "state_keys": keys,
    }
    torch.save(global_sd, global_path)


def _presented(sd: dict[str, Any], pair: tuple[str | None, str | None]) -> dict[str, Any]:
    """A copy of one rank's ZeRO state whose base state shows ``pair`` as Adam's two moments."""
    osd = dict(sd["optimizer_state_dict"])
    inner_key = "base_optimizer_state" if "base_optimizer_state" in osd else "optimizer_state_dict"
    inner = dict(osd[inner_key])
    flats = _flat_groups(sd)
    state = {}
    for gid, entry in inner["state"].items():
        new = {k: v for k, v in entry.items() if k == "step"}
        tensors = [entry[k] for k in pair if k is not None and k in entry]
        for slot, key in zip(_ADAM_KEYS, pair):
            # A missing slot repeats the other one (same shape); its output file is deleted.
            new[slot] = entry[key] if key is not None and key in entry else (
                tensors[0] if tensors else torch.zeros_like(flats[gid])
            )
        state[gid] = new
    for gid in range(len(flats)):
        state.setdefault(gid, {slot: torch.zeros_like(flats[gid]) for slot in _ADAM_KEYS})
    inner["state"] = state
    osd[inner_key] = inner
    return osd


def install_universal_load(zo: Any, optimizer: Any) -> list[str]:
    """Restore lbopt's per-layer state when ``zo`` (the wrapper instance) loads a universal checkpoint.

    Returns the names of the instance members replaced.
    """
    replaced = []
    if hasattr(zo, "load_hp_checkpoint_state_from_checkpoint_dir"):
        orig = zo.load_hp_checkpoint_state_from_checkpoint_dir

        def load_hp_checkpoint_state_from_checkpoint_dir(lp_groups_name: str, checkpoint_dir: str) -> None:
            orig(lp_groups_name, checkpoint_dir)
            path = os.path.join(checkpoint_dir, "zero", "optimizer_state.pt")
            extra = torch.load(path, map_location="cpu", weights_only=False).get(_LBOPT_KEY)
            if extra is None:
                raise RuntimeError(
                    f"lbopt: {checkpoint_dir!r} was converted by deepspeed.checkpoint.ds_to_universal, which drops "
                    "lbopt's optimizer state; convert with lbopt.integrations.deepspeed.to_universal "
                    "(python -m lbopt.integrations.deepspeed IN OUT)"
                )
            optimizer.layer_state = {k: v.clone() for k, v in extra["layer_state"].items()}
            optimizer.skipped_steps = int(extra["skipped_steps"])
            optimizer._plans.clear()

        zo.load_hp_checkpoint_state_from_checkpoint_dir = load_hp_checkpoint_state_from_checkpoint_dir
        replaced.append("load_hp_checkpoint_state_from_checkpoint_dir")
    if hasattr(zo, "load_hp_checkpoint_state_from_checkpoint_dir_stage3"):

        def refuse(*_args: Any, **_kwargs: Any) -> None:
            raise UnsupportedDeepSpeedConfig(
                "lbopt: loading a universal checkpoint into ZeRO-3 is not supported (DeepSpeed's ZeRO-3 universal "
                "loader only restores Adam's exp_avg/exp_avg_sq); resume under ZeRO-1/2 or from a regular "
                "checkpoint with the same world size"
            )

        zo.load_hp_checkpoint_state_from_checkpoint_dir_stage3 = refuse
        replaced.append("load_hp_checkpoint_state_from_checkpoint_dir_stage3")
    return replaced
