"""``python -m lbopt.integrations.deepspeed INPUT_FOLDER OUTPUT_FOLDER``: universal-checkpoint conversion."""

from __future__ import annotations

import argparse

from .checkpoint import to_universal


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m lbopt.integrations.deepspeed",
        description="Convert a ZeRO checkpoint of an lbopt optimizer to DeepSpeed's universal format",
    )
    ap.add_argument("input_folder")
    ap.add_argument("output_folder")
    ap.add_argument("--num_workers", type=int, default=1)
    args = ap.parse_args(argv)
    to_universal(args.input_folder, args.output_folder, num_workers=args.num_workers)


if __name__ == "__main__":
    main()
