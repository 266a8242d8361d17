"""Large-batch training of a GPT/Llama-family decoder on a causal language-modelling objective.

    accelerate launch --config_file integrations/accelerate/deepspeed_zero3.yaml \\
        recipes/causal_lm.py --model meta-llama/Llama-3.2-1B --dataset my_corpus.jsonl \\
        --optimizer lamb --global_batch_size 4096 --max_seq_length 1024

Real runs pass ``--model`` (a hub name or local checkpoint). The default, ``tiny-llama``, is a
randomly initialised two-layer Llama with the local MiniLM WordPiece tokenizer: it exists so the
recipe runs offline in tests and smoke checks, not to produce a useful model. The default data
is the shipped ``stdlib-topics`` text (CPython docstrings), concatenated and cut into blocks of
``--max_seq_length`` tokens. Metrics: loss, perplexity and next-token accuracy.
"""

from __future__ import annotations

import argparse
import math
import sys
from itertools import chain
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TINY = "tiny-llama"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer name or folder (None: the model's; the local MiniLM one for tiny-llama)",
    )
    p.add_argument("--tiny_hidden_size", type=int, default=128, help="width of the tiny-llama test model")
    p.add_argument("--tiny_layers", type=int, default=2, help="layers of the tiny-llama test model")


def load_data(args: argparse.Namespace):
    """The corpus, checked: the text column present and no example without text (empty strings are fine)."""
    from lbopt.data import STDLIB_TOPICS, check_columns, load_stdlib_corpus, load_text_dataset

    def check(ds) -> None:
        check_columns(ds, args.text_column)
        for split, part in ds.items():
            rows = [i + 1 for i, v in enumerate(part[args.text_column]) if not isinstance(v, str)]
            if rows:
                raise ValueError(
                    f"text column {args.text_column!r} is empty in {len(rows)} {split!r} examples "
                    f"(rows {', '.join(map(str, rows[:5]))}{' ...' if len(rows) > 5 else ''}): fill or remove them"
                )

    if args.dataset == STDLIB_TOPICS:
        ds = load_stdlib_corpus()
    else:
        ds = load_text_dataset(args.dataset, validation_file=args.validation_file, seed=args.seed, check=check)
    check(ds)
    return ds


def _tiny_model(args: argparse.Namespace, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.tiny_hidden_size,
        intermediate_size=4 * args.tiny_hidden_size,
        num_hidden_layers=args.tiny_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max(args.max_seq_length, 128),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def build(args: argparse.Namespace, raw):
    from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator

    if args.model == TINY:
        from classification import default_model

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or default_model())
        model = _tiny_model(args, tokenizer)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
    block = args.max_seq_length

    def tokenize(batch):
        return tokenizer(batch[args.text_column], add_special_tokens=False)

    def group(batch):
        # concatenate the documents (separated by EOS/SEP) and cut into full blocks
        sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        ids = list(chain.from_iterable(x + ([sep] if sep is not None else []) for x in batch["input_ids"]))
        n = len(ids) // block * block
        blocks = [ids[i : i + block] for i in range(0, n, block)]
        return {"input_ids": blocks, "attention_mask": [[1] * block for _ in blocks], "labels": blocks}

    def prepare(ds, limit):
        ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names)
        ds = ds.map(group, batched=True, batch_size=1000, remove_columns=ds.column_names)
        return ds.select(range(min(limit, len(ds)))) if limit else ds

    train = prepare(raw["train"], args.max_train_samples)
    evals = prepare(raw["validation"], args.max_eval_samples)
    return model, tokenizer, train, evals, default_data_collator


def predictions(outputs, batch):
    # next-token accuracy: the logit at position t predicts the token at t + 1
    return outputs.logits[:, :-1].argmax(dim=-1).flatten(), batch["labels"][:, 1:].flatten()


def perplexity(mean_loss: float) -> dict:
    return {"eval_perplexity": math.exp(min(mean_loss, 50.0))}


TASK = common.Task(
    name="causal_lm",
    default_model=TINY,
    default_dataset="stdlib-topics",
    add_arguments=add_arguments,
    load_data=load_data,
    build=build,
    predictions=predictions,
    metrics=("accuracy",),
    extra_eval=perplexity,
    builtin_models=(TINY,),
)

if __name__ == "__main__":
    common.main(TASK)
