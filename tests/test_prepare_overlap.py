"""prepare_text.py and validation/training overlap: exact duplicates dropped before the split, the overlap check
(data/overlap.py) run on every build, a leak failing the build with one line that names the document, and a check
that streams. Torch-free, like the module: nothing here imports torch or train_gpt."""
from __future__ import annotations

import json
import random
import time
import tracemalloc

import numpy as np
import pytest
import sentencepiece as spm

from conftest import ROOT
from data import prepare_text
from data.common import BOS_ID, load_data_shard, write_shard
from data.overlap import overlap
from test_layering import run_without_torch

WORDS = ("the of and to in is was for on that with as by at from his her an which were are this be has had it not "
         "first new two one after year time city people world river house music school game season team war").split()
VAL = 10  # --val-docs


def corpus(n: int = 120, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))).capitalize() + f" {i}." for i in range(n)]


def write(tmp_path, docs: list[str], name: str = "docs.txt"):
    src = tmp_path / name
    src.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return src


def prepare(capsys, src, out, *flags) -> tuple[int, str, str]:
    rc = prepare_text.main([str(src), "--out", str(out), "--vocab-size", "200", "--val-docs", str(VAL), "--workers", "1",
                            *flags])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def docs_of(out, split: str) -> list[tuple]:
    toks = np.concatenate([load_data_shard(p) for p in sorted(out.glob(f"*_{split}_*.bin"))]).tolist()
    starts = [i for i, t in enumerate(toks) if t == BOS_ID] + [len(toks)]
    return [tuple(toks[a + 1:b]) for a, b in zip(starts, starts[1:])]


def test_a_planted_duplicate_fails_the_build_with_one_line(tmp_path, capsys):
    docs = corpus()
    src, out = write(tmp_path, docs + [docs[3]]), tmp_path / "toy_sp200"  # validation document 3, again in training
    rc, _, err = prepare(capsys, src, out, "--keep-duplicates", "-q")
    assert rc == 1 and err.count("\n") == 1, err
    assert err.startswith("error: overlap check failed: validation document 3 (") and "tokens, " in err
    assert repr(docs[3][:30])[:-1] in err  # the start of its text
    assert f"is also training document {len(docs) - VAL:,}" in err  # the last one: the planted copy
    assert "build without --keep-duplicates" in err
    assert not out.exists() or not any(out.iterdir()), "a failed build left files behind"

    # a complete earlier build is left as it was: nothing half-written replaces it
    assert prepare(capsys, write(tmp_path, docs, "clean.txt"), out, "-q")[0] == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    rc, _, err = prepare(capsys, src, out, "--keep-duplicates", "-q")
    assert rc == 1 and "validation document 3 (" in err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before

    # the real command line, where torch cannot be imported: exit status 1, one line
    p = run_without_torch("data/prepare_text.py", src, "--out", tmp_path / "cli_sp200", "--vocab-size", 200,
                          "--val-docs", VAL, "--workers", 1, "--keep-duplicates", "-q")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "validation document 3 (" in p.stderr, p.stderr


def test_by_default_duplicates_are_dropped_and_the_check_passes(tmp_path, capsys):
    docs = corpus()
    planted = [docs[3], docs[50], "  " + docs[7].replace(" ", "   \n", 2) + "\t"]  # the last: spacing differs only
    # different texts, equal tokens: characters that occur once are not in the vocabulary (<unk>)
    docs[5] += " \u2603"
    planted.append(docs[5][:-1] + "\u265e")
    src, out = write(tmp_path, docs + planted), tmp_path / "toy_sp200"
    rc, summary, err = prepare(capsys, src, out)
    assert rc == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["input_docs"] == len(docs) + len(planted)
    assert m["duplicates"] == {"kept": False, "dropped_text": 3, "dropped_train_tokens": 1}
    assert m["docs"] == {"val": VAL, "train": len(docs) - VAL} and m["overlap"]["val_docs_in_train"] == 0
    assert "dropped 4 duplicate documents (3 exact, 1 training with a validation document's tokens)" in summary
    line = summary.strip().splitlines()[-1]
    seconds = float(line.split("overlap check: no validation document in training (")[1].split(" s)")[0])
    total = float(line.rsplit("; ", 1)[1].removesuffix(" s"))
    assert seconds <= max(0.5, total / 4), line  # streamed over the written shards: a small part of the build
    val, train = docs_of(out, "val"), set(docs_of(out, "train"))
    assert len(val) == VAL and not [d for d in val if d in train]
    assert overlap(sorted(out.glob("*_train_*.bin")), sorted(out.glob("*_val_*.bin")))["hits"] == []
    # what was dropped is exactly the later copies: the first VAL documents are the validation split, the rest train
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert val == [tuple(sp.encode(d)) for d in docs[:VAL]]
    assert docs_of(out, "train") == [tuple(sp.encode(d)) for d in docs[VAL:]]


def test_the_dedup_key_is_the_trained_tokenizers_normalization(tmp_path, capsys):
    """Texts with equal keys get equal tokens: the key normalizes as the tokenizer prepare_text trains does."""
    src, out = write(tmp_path, corpus(60, seed=1)), tmp_path / "toy_sp200"
    assert prepare(capsys, src, out, "-q")[0] == 0
    trained = prepare_text.normalizer((out / "tokenizer.model").read_bytes())
    default = prepare_text.normalizer()
    for text in ["a  b\n\nc", " x\t", "ﬁne ①  Ｆｕｌｌ", "line\r\nbreak", "\u200bzero width"]:
        assert default(text) == trained(text), text
    assert prepare_text.unique_documents(["a b", "a  b ", "a\nb", "A b", "a b"]) == ["a b", "A b"]


def test_the_overlap_check_streams(tmp_path):
    """8 training shards (2M tokens, 4 MB): the check holds one shard's documents at a time, not the training set."""
    rng = np.random.default_rng(0)

    def stream(n_docs):
        lens = rng.integers(20, 200, n_docs)
        toks = rng.integers(2, 1024, int(lens.sum()) + n_docs).astype(np.uint16)
        toks[np.concatenate([[0], np.cumsum(lens + 1)[:-1]])] = BOS_ID
        return toks
    val, train = stream(300), stream(18_000)
    write_shard(tmp_path / "x_val_000000.bin", val)
    for i, part in enumerate(np.array_split(train, 8)):  # cut mid-document
        write_shard(tmp_path / f"x_train_{i:06d}.bin", part)
    shards = sorted(tmp_path.glob("x_train_*.bin"))
    t = time.perf_counter()
    r = overlap(shards, [tmp_path / "x_val_000000.bin"])
    seconds = time.perf_counter() - t
    assert r["train_docs"] == 18_000 and r["train_tokens"] == len(train) - 18_000 and r["hits"] == []
    assert seconds < 3, seconds  # about 0.05 s here
    tracemalloc.start()
    try:
        overlap(shards, [tmp_path / "x_val_000000.bin"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < train.nbytes / 4, (peak, train.nbytes)  # loading the training set would take all of it
