"""``minilora merge BASE ADAPTER OUT``: fold a peft-format adapter into a safetensors checkpoint.

The command line over :func:`minilora.offline_merge.merge_checkpoint` (the streaming merge,
bit-identical to ``merge_and_unload``): arguments, a progress bar, the summary printed.
"""

from __future__ import annotations

import argparse
import sys
import time

from minilora.offline_merge import MergeSummary, merge_checkpoint

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE", help="checkpoint folder (model.safetensors or shards + index.json)")
    parser.add_argument("adapter", metavar="ADAPTER", help="peft-format adapter folder")
    parser.add_argument("out", metavar="OUT", help="new folder to write the merged checkpoint to (must not exist)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _merge_with_bar(args: argparse.Namespace) -> MergeSummary:
    from tqdm.auto import tqdm

    bar = None

    def progress(done: int, total: int, shard: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="tensor", desc="merging", file=sys.stderr)
        bar.set_postfix_str(shard, refresh=False)
        bar.update(done - bar.n)

    try:
        return merge_checkpoint(args.base, args.adapter, args.out, progress=progress)
    finally:
        if bar is not None:
            bar.close()


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    s = merge_checkpoint(args.base, args.adapter, args.out) if args.no_progress else _merge_with_bar(args)
    dora = f" ({s.dora_modules} of them DoRA)" if s.dora_modules else ""
    print(f"merged {s.lora_modules} LoRA modules{dora} and replaced {s.replaced} tensors (modules_to_save / biases): "
          f"{s.tensors} tensors in {s.shards} shard(s), {s.bytes_written / 2**20:.1f} MiB, "
          f"{time.perf_counter() - start:.1f} s -> {s.out}")
    if s.token_weights:
        print(f"wrote trained token rows (trainable_token_indices) into {s.token_weights} weight(s)")
    if s.vocab_size:
        print(f"the adapter was trained on a vocabulary of {s.vocab_size} tokens: the token embedding and output head "
              "have that many rows, and config.json says so (vocab_size)")
    if s.untied:
        print(f"tied weights {s.untied} now differ from the embedding they were tied to: written separately, "
              "tie_word_embeddings set to false in config.json")
    if s.renamed:
        old, new = s.renamed
        print(f"the adapter's module names start with {old or '(nothing)'!r} where the checkpoint's start with "
              f"{new or '(nothing)'!r} (trained on the backbone vs the model with a head): mapped accordingly")
    if s.skipped_files:
        print(f"not copied (weight files other than the merged ones would hold unmerged weights): {s.skipped_files}")
    return 0
