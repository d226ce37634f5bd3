"""Validation documents that also occur in training: exact token-sequence hashes, streamed shard by shard.

The one implementation of the train/validation overlap check (tools/check_data.py is its command line;
data/prepare_text.py runs it on the shards of every build and fails the build on a leak). A document is BOS_ID followed by its tokens up to the next
BOS_ID (data/common.py's shard format); a document cut by the end of a shard continues at the start of the next one.
Its identity is the blake2b hash (8 bytes) of its tokens (BOS excluded) as little-endian uint16. Only the validation
hashes are kept in memory; the training shards are read through a memory map, one at a time, and hashed document by
document, so training sets of many GB need little memory.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

from data.common import BOS_ID, SHARD_HEADER_INTS, read_shard_header


def doc_hash(tokens) -> bytes:
    """The identity of a document's tokens (a uint16 array without its BOS)."""
    return hashlib.blake2b(tokens.astype("<u2", copy=False).tobytes(), digest_size=8).digest()


def documents(shards: Iterable[str | Path], bos: int = BOS_ID, progress: Callable[[int], None] | None = None
              ) -> Iterator[tuple[str, int, "object"]]:
    """(shard, index of the document in the stream, its tokens without BOS) for every document of the shards in order;
    tokens before the first BOS of the first shard are not a document. `progress(n)` is called with each shard's token
    count once it is read."""
    import numpy as np
    carry, carry_shard, index, started = None, None, 0, False
    for shard in shards:
        n = read_shard_header(shard)
        toks = np.memmap(shard, dtype="<u2", mode="r", offset=4 * SHARD_HEADER_INTS, shape=(n,))
        starts = np.flatnonzero(toks == bos)
        head_end = int(starts[0]) if len(starts) else n
        if carry is not None:  # the document cut at the end of the previous shard continues here
            piece = np.concatenate([carry, toks[:head_end]])
            if len(starts):
                yield carry_shard, index, piece
                index += 1
                carry = None
            else:
                carry = piece
        for a, b in zip(starts[:-1], starts[1:]):
            yield str(shard), index, toks[a + 1:b]
            index += 1
        if len(starts):
            carry, carry_shard, started = np.array(toks[starts[-1] + 1:]), str(shard), True
        elif not started:
            carry = None  # no document has begun yet
        if progress:
            progress(n)
        del toks
    if carry is not None:
        yield carry_shard, index, carry


def overlap(train: list[str | Path], val: list[str | Path], min_tokens: int = 1, bos: int = BOS_ID,
            progress: Callable[[str, int, int], Callable[[int], None]] | None = None) -> dict:
    """Validation documents whose exact tokens are also a training document.

    Returns dict(val_docs, val_tokens, train_docs, train_tokens, hits=[dict(index, tokens, shard, train_shard,
    train_index, ids)]) with one hit per leaked validation document (with its first training occurrence), in
    validation order. Documents shorter than `min_tokens` are not compared. `progress(phase, shards, tokens)` may return a
    per-shard callback (a progress bar)."""
    def bar(phase, shards):
        return progress(phase, len(shards), sum(read_shard_header(s) for s in shards)) if progress else None

    val_docs, val_tokens, by_hash = 0, 0, {}
    for shard, i, toks in documents(val, bos, bar("validation", val)):
        val_docs, val_tokens = val_docs + 1, val_tokens + len(toks)
        if len(toks) >= min_tokens:
            by_hash.setdefault(doc_hash(toks), []).append((i, shard, len(toks)))
    found, train_docs, train_tokens = {}, 0, 0
    for shard, i, toks in documents(train, bos, bar("training", train)):
        train_docs, train_tokens = train_docs + 1, train_tokens + len(toks)
        if len(toks) >= min_tokens:
            h = doc_hash(toks)
            if h in by_hash and h not in found:
                found[h] = dict(train_shard=shard, train_index=i, ids=[int(t) for t in toks[:64]])
    hits = sorted((dict(index=i, shard=shard, tokens=n, **v) for h, v in found.items() for i, shard, n in by_hash[h]),
                  key=lambda d: d["index"])
    return dict(val_docs=val_docs, val_tokens=val_tokens, train_docs=train_docs, train_tokens=train_tokens, hits=hits)
