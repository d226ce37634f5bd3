#!/usr/bin/env python3
"""Validation documents that also occur in training: a data leak check, by exact token-sequence hash.

    python tools/check_data.py data/datasets/fineweb10B_sp1024 [--tokenizer data/tokenizers/fineweb_1024_bpe.model]
    python tools/check_data.py --train 'DIR/*_train_*.bin' --val 'DIR/*_val_*.bin'

Documents are split at BOS tokens (every document starts with one; a document cut by the end of a shard continues in
the next). Each validation document's tokens are hashed (blake2b) and kept in memory; the training shards are then
streamed one at a time through a memory map and each training document is hashed and looked up, so a training set of
many GB needs memory only for the validation hashes. A progress bar shows each phase on a terminal.

Reports every validation document whose exact tokens are also a training document: its index in the validation
stream, its length, where it occurs in training and (with --tokenizer, a SentencePiece model) the start of its text.
Exit status 1 when any validation document occurs in training (a leak: validation data would influence training),
0 when none does. Documents shorter than --min-tokens are not compared (default 1: every non-empty document).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.common import UserError, cli  # noqa: E402
from data.overlap import overlap  # noqa: E402


def shards(patterns: list[str], what: str) -> list[str]:
    out = sorted({p for pat in patterns for p in glob.glob(pat)})
    if not out:
        raise UserError(f"no {what} shard matches {' '.join(patterns)}; give the data folder or --{what[:5]} GLOB")
    return out


def progress(phase: str, n_shards: int, n_tokens: int):
    """A tqdm bar over the tokens of a phase (shown on a terminal only); returns the per-shard update."""
    from tqdm import tqdm
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc=f"hashing {phase} ({n_shards} shard(s))", disable=None,
               file=sys.stderr, leave=False)

    def update(n):
        bar.update(n)
        if bar.n >= n_tokens:
            bar.close()
    return update


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="?", help="a folder with *_train_*.bin and *_val_*.bin shards")
    ap.add_argument("--train", nargs="+", metavar="GLOB", help="training shards (instead of the folder's *_train_*.bin)")
    ap.add_argument("--val", nargs="+", metavar="GLOB", help="validation shards (instead of the folder's *_val_*.bin)")
    ap.add_argument("--tokenizer", help="SentencePiece model: show the start of each leaked document's text")
    ap.add_argument("--min-tokens", type=int, default=1, help="compare only documents of at least this many tokens (default 1)")
    ap.add_argument("--show", type=int, default=20, help="list at most this many leaked documents (default 20)")
    a = ap.parse_args(argv)
    if a.data is None and not (a.train and a.val):
        ap.error("give the data folder, or --train GLOB... and --val GLOB...")
    if a.data is not None and not os.path.isdir(a.data):
        raise UserError(f"{a.data} is not a folder; give the folder that holds the *_train_*.bin and *_val_*.bin shards")
    if a.min_tokens < 1:
        ap.error("--min-tokens must be at least 1")
    train = shards(a.train or [os.path.join(glob.escape(a.data), "*_train_*.bin")], "training")
    val = shards(a.val or [os.path.join(glob.escape(a.data), "*_val_*.bin")], "validation")
    if not a.val:  # not the CaseOps byte sidecar (*_val_bytes_*.bin): it holds byte counts, not tokens
        val = [v for v in val if "_val_bytes_" not in os.path.basename(v)]
    if set(train) & set(val):
        raise UserError(f"{sorted(set(train) & set(val))[0]} is given as both training and validation data")
    sp = None
    if a.tokenizer:
        if not os.path.isfile(a.tokenizer):
            raise UserError(f"tokenizer {a.tokenizer} not found")
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=a.tokenizer)
    r = overlap(train, val, a.min_tokens, progress=progress)
    hits = r["hits"]
    print(f"validation: {r['val_docs']:,} documents, {r['val_tokens']:,} tokens in {len(val)} shard(s); "
          f"training: {r['train_docs']:,} documents, {r['train_tokens']:,} tokens in {len(train)} shard(s)")
    for h in hits[:a.show]:
        text = ""
        if sp is not None:
            s = sp.decode(h["ids"]).replace("\n", " ")
            text = f": {s[:80]!r}" + ("..." if h["tokens"] > len(h["ids"]) or len(s) > 80 else "")
        print(f"leak: validation document {h['index']:,} ({h['tokens']:,} tokens, {os.path.basename(h['shard'])}) is training "
              f"document {h['train_index']:,} ({os.path.basename(h['train_shard'])}){text}")
    if len(hits) > a.show:
        print(f"... and {len(hits) - a.show:,} more (--show N lists more)")
    leaked = sum(h["tokens"] for h in hits)
    print(f"{len(hits):,} of {r['val_docs']:,} validation documents ({leaked:,} tokens, "
          f"{100 * leaked / max(r['val_tokens'], 1):.2f}% of validation tokens) also occur in training"
          + (" (documents shorter than {} tokens not compared)".format(a.min_tokens) if a.min_tokens > 1 else "")
          + (": LEAK" if hits else ": no overlap"))
    return 1 if hits else 0


if __name__ == "__main__":
    cli(main)
