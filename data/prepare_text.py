#!/usr/bin/env python3
"""Build a SentencePiece BPE tokenizer and challenge-format shards from your own text.

Inputs (files or directories, read in the order given; directories recursively, files sorted by path):
  *.jsonl / *.ndjson / *.json  one JSON object per line; the document is its "text" field (--text-field)
  *.txt / *.text / *.md / *.rst and any other file named explicitly: plain UTF-8 text; by default
                               documents are separated by one or more blank lines (--text-docs)
  Any file may be gzip-compressed (detected by content, usually named *.gz). Whitespace-only
  documents are skipped. Hidden files and unknown extensions inside directories are ignored.

Output in --out DIR: <prefix>_val_000000.bin, ..., <prefix>_train_000000.bin, ... (the shard format that
train_gpt.py reads, see data/common.py: 256 int32 header + uint16 tokens; every document is BOS (id 1) + its tokens, no EOS;
the first --val-docs documents go to validation), manifest.json with the counts and the tokenizer's
sha256, and, when a tokenizer is trained, DIR/tokenizer.model + .vocab (or --tokenizer-out).
The tokenizer is trained on training documents only, single-threaded with a fixed seed: reruns on
the same input give byte-identical files. Nothing is replaced until the whole build has succeeded.

No validation document may occur in training. Exact duplicates (documents whose texts are equal once normalized
as the tokenizer normalizes them, so their tokens are equal) are dropped before the split, the first of each kept;
a training document whose tokens equal a validation document's (different texts, e.g. characters the tokenizer
maps to <unk>) is dropped too; the summary line says how many (--keep-duplicates keeps them all). Then the overlap
check (data/overlap.py, as tools/check_data.py runs it) reads the written shards: if a validation document occurs
in training the build fails with one line naming it, and nothing is replaced.

--caseops: every document is first transformed by data/caseops.py (capitals lowered behind private-use case markers,
losslessly); the tokenizer is trained on the transformed text with the markers as user-defined symbols (one token
each), and validation also gets the byte sidecar <prefix>_val_bytes_NNNNNN.bin: the shard header, then one uint16 per
validation token, the ORIGINAL UTF-8 bytes that token stands for (0 for BOS and markers), cut like the token shards.
train_gpt.py charges val_bpb on those bytes.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from array import array
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from data.common import (BOS_ID, SHARD_MAGIC, SHARD_VERSION, UserError, read_shard_header, run_main,  # noqa: E402
                         write_atomic, write_shard)
from data.overlap import doc_hash, overlap  # noqa: E402
from data import caseops as caseops_mod  # noqa: E402

MAX_VOCAB = 1 << 16  # token ids are stored as uint16
# The settings the published challenge tokenizers were trained with; byte_fallback is an option.
SP_SETTINGS = dict(model_type="bpe", character_coverage=0.999, normalization_rule_name="nmt_nfkc",
                   add_dummy_prefix=False, split_digits=True, pad_id=0, bos_id=BOS_ID, eos_id=2, unk_id=3)
SP_SEED = 1337
TEXT_EXT = (".txt", ".text", ".md", ".rst")
JSONL_EXT = (".jsonl", ".ndjson", ".json")
CHUNK_CHARS = 1 << 20  # text per encoding task


# ----------------------------------------------------------------------------- reading documents
def _kind(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    return "jsonl" if name.endswith(JSONL_EXT) else "text" if name.endswith(TEXT_EXT) else None


def list_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Expand directories (recursively, sorted) into input files; keep explicit files as given."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _kind(f)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise UserError(f"{p}: no .txt/.jsonl (optionally .gz) files in this directory")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p}: no such file or directory")
    return files


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    buf: list[str] = []
    for line in lines:
        if line.strip():
            buf.append(line.rstrip("\n"))
        elif buf:
            yield "\n".join(buf)
            buf = []
    if buf:
        yield "\n".join(buf)


def _jsonl(lines: Iterable[str], path: Path, field: str) -> Iterator[str]:
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i}: invalid JSON ({e.msg})") from None
        text = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise UserError(f'{path}:{i}: no string field "{field}" (choose another with --text-field)')
        yield text


def iter_documents(files: Iterable[Path], text_docs: str = "blank-line", text_field: str = "text") -> Iterator[str]:
    """All non-empty documents of the input files, in order."""
    for path in files:
        try:
            with open(path, "rb") as f:
                gz = f.read(2) == b"\x1f\x8b"
            with io.TextIOWrapper(gzip.open(path) if gz else open(path, "rb"), encoding="utf-8") as f:
                if _kind(path) == "jsonl":
                    docs = _jsonl(f, path, text_field)
                else:
                    docs = {"file": lambda: iter([f.read()]), "line": lambda: (l.rstrip("\n") for l in f),
                            "blank-line": lambda: _paragraphs(f)}[text_docs]()
                yield from (d for d in docs if d.strip())
        except UnicodeDecodeError:
            raise UserError(f"{path}: not valid UTF-8 text") from None
        except (OSError, EOFError) as e:  # includes gzip.BadGzipFile and truncated gzip streams
            raise UserError(f"{path}: cannot read: {e}") from None


# ----------------------------------------------------------------------------- shards (written by data.common.write_shard)
class ShardWriter:
    """Cuts a split's token stream into shards of `shard_tokens` tokens (the last one shorter)."""

    def __init__(self, out_dir: Path, prefix: str, shard_tokens: int):
        self.out_dir, self.prefix = out_dir, prefix
        self.buf = np.empty(shard_tokens, dtype=np.uint16)  # pages are only committed when touched
        self.fill, self.split = 0, "val"
        self.shards: dict[str, list[dict]] = {"val": [], "train": []}

    def add(self, split: str, tokens: np.ndarray) -> None:
        if split != self.split:
            self.flush()
            self.split = split
        pos = 0
        while pos < len(tokens):
            take = min(len(self.buf) - self.fill, len(tokens) - pos)
            self.buf[self.fill:self.fill + take] = tokens[pos:pos + take]
            self.fill, pos = self.fill + take, pos + take
            if self.fill == len(self.buf):
                self.flush()

    def flush(self) -> None:
        if self.fill:
            name = f"{self.prefix}_{self.split}_{len(self.shards.get(self.split, [])):06d}.bin"
            write_shard(self.out_dir / name, self.buf[:self.fill])
            self.shards.setdefault(self.split, []).append({"file": name, "tokens": self.fill})
            self.fill = 0


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(docs: Iterable[str], vocab_size: int, *, byte_fallback: bool = False,
                    max_chars: int = 0, progress: bool = True, user_symbols: tuple[str, ...] = ()) -> bytes:
    """Train a BPE model with the challenge settings on the lines of `docs`; return the model bytes.
    `user_symbols` (the CaseOps markers) become pieces that are always one token each.

    Deterministic: one thread, fixed seed, no sampling (input is cut at `max_chars` in order).
    """
    check_vocab_size(vocab_size)
    failure: list[BaseException] = []
    stats = {"chars": 0}

    def sentences() -> Iterator[str]:
        try:
            for doc in tqdm(docs, desc="tokenizer input", unit=" doc", disable=None if progress else True, leave=False):
                for line in doc.split("\n"):
                    line = line.strip()
                    if line:
                        stats["chars"] += len(line)
                        yield line
                if max_chars and stats["chars"] >= max_chars:
                    return
        except BaseException as e:  # surfaced after training; never let the C++ side swallow it
            failure.append(e)

    spm.set_random_generator_seed(SP_SEED)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size, byte_fallback=byte_fallback,
            num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=1 << 14,
            minloglevel=2, **({"user_defined_symbols": list(user_symbols)} if user_symbols else {}), **SP_SETTINGS)
    except RuntimeError as e:
        if failure:
            raise failure[0]
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown error"
        raise UserError(f"sentencepiece training failed: {msg.split('] ')[-1]}") from None
    if failure:
        raise failure[0]
    if stats["chars"] == 0:
        raise UserError("no text to train the tokenizer on (all documents are validation documents?)")
    return model.getvalue()


def check_vocab_size(n: int) -> None:
    if n > MAX_VOCAB:
        raise UserError(f"vocab size {n} does not fit uint16 token storage (at most {MAX_VOCAB})")
    if n < 8:
        raise UserError(f"vocab size {n} is too small")


def vocab_text(model: bytes) -> str:
    """The .vocab file SentencePiece writes beside a model: piece<TAB>score per line."""
    sp = spm.SentencePieceProcessor(model_proto=model)
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))


# ----------------------------------------------------------------------------- duplicate documents
def normalizer(model: bytes | None = None) -> Callable[[str], str]:
    """The text normalization of a tokenizer: the given model's, else the one a tokenizer trained with SP_SETTINGS
    gets (nmt_nfkc, runs of whitespace collapsed, no dummy prefix). SentencePiece encodes the normalized text, so two
    documents with equal normalized texts get equal tokens whatever the vocabulary."""
    if model is not None:
        return spm.SentencePieceProcessor(model_proto=model).normalize
    return spm.SentencePieceNormalizer(rule_name=SP_SETTINGS["normalization_rule_name"],
                                       add_dummy_prefix=SP_SETTINGS["add_dummy_prefix"],
                                       remove_extra_whitespaces=True).normalize


def text_key(doc: str, normalize: Callable[[str], str]) -> int:
    """A document's identity as the tokenizer sees it: the blake2b hash (8 bytes) of its normalized text."""
    return int.from_bytes(hashlib.blake2b(normalize(doc).encode("utf-8"), digest_size=8).digest(), "little")


def first_occurrences(keys) -> np.ndarray:
    """A boolean mask over the documents: True for the first document of each key, False for its later duplicates."""
    keys = np.frombuffer(keys, dtype=np.uint64) if isinstance(keys, array) else np.asarray(keys, dtype=np.uint64)
    keep = np.zeros(len(keys), dtype=bool)
    keep[np.unique(keys, return_index=True)[1]] = True
    return keep


def unique_documents(docs: Iterable[str], model: bytes | None = None) -> list[str]:
    """The documents without exact duplicates (equal text once normalized by the tokenizer, see `normalizer`),
    the first of each kept, in order: what build_dataset keeps by default."""
    normalize, seen, out = normalizer(model), set(), []
    for d in docs:
        k = text_key(d, normalize)
        if k not in seen:
            seen.add(k)
            out.append(d)
    return out


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- encoding
_SP: spm.SentencePieceProcessor | None = None


def _init_worker(model: bytes) -> None:
    global _SP
    _SP = spm.SentencePieceProcessor(model_proto=model)


def _init_pool_worker(model: bytes) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the parent
    _init_worker(model)


def _encode_chunk(texts: list[str], n_bytes: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """BOS + tokens of each text, concatenated; each document's length in tokens (with its BOS); each document's
    token hash as a uint64 (data/overlap.py's doc_hash, the identity the overlap check compares); and for the first
    `n_bytes` texts (CaseOps-transformed) the original UTF-8 bytes of each of their tokens, 0 for BOS (uint16)."""
    nbytes = np.zeros(0, dtype=np.uint16)
    if n_bytes:
        maps = _SP.encode(texts[:n_bytes], out_type="offset_mapping", num_threads=1)
        ids = [m["ids"] for m in maps] + _SP.encode(texts[n_bytes:], num_threads=1)
        counts = np.concatenate([c for t, m in zip(texts, maps) for c in ([0], caseops_mod.token_bytes(t, m["offsets"]))])
        if counts.max(initial=0) > np.iinfo(np.uint16).max:
            raise UserError(f"a validation token stands for {counts.max():,} bytes, more than the byte sidecar's "
                            "uint16 holds (a run of characters the tokenizer drops?)")
        nbytes = counts.astype(np.uint16)
    else:
        ids = _SP.encode(texts, num_threads=1)
    lens = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(itertools.chain((BOS_ID,), x) for x in ids),
                       dtype=np.int32, count=int(lens.sum())).astype(np.uint16)
    ends = np.cumsum(lens)
    hashes = np.frombuffer(b"".join(doc_hash(flat[e - n + 1:e]) for e, n in zip(ends.tolist(), lens.tolist())),
                           dtype="<u8")
    return flat, lens, hashes, nbytes


def _chunks(docs: Iterable[str]) -> Iterator[list[str]]:
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def encode_documents(docs: Iterable[str], model: bytes, workers: int, bytes_docs: int = 0
                     ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Encode in a process pool, results in input order, with a bounded number of chunks in flight; the first
    `bytes_docs` documents also get their tokens' original byte counts (_encode_chunk)."""
    def jobs() -> Iterator[tuple[list[str], int]]:
        seen = 0
        for chunk in _chunks(docs):
            yield chunk, min(max(bytes_docs - seen, 0), len(chunk))
            seen += len(chunk)

    if workers <= 1:
        _init_worker(model)
        yield from itertools.starmap(_encode_chunk, jobs())
        return
    with multiprocessing.Pool(workers, initializer=_init_pool_worker, initargs=(model,)) as pool:
        pending: deque = deque()
        for job in jobs():
            pending.append(pool.apply_async(_encode_chunk, job))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------- the build
def build_dataset(docs: Callable[[], Iterable[str]], out_dir: str | Path, *, prefix: str,
                  tokenizer: str | Path | None = None, vocab_size: int = 1024, tokenizer_out: str | Path | None = None,
                  byte_fallback: bool = False, val_docs: int | None = None, shard_tokens: int = 100_000_000,
                  train_chars: int = 100_000_000, workers: int | None = None, inputs: list[str] | None = None,
                  keep_duplicates: bool = False, meta: dict | None = None, progress: bool = True,
                  caseops: bool = False) -> dict:
    """Tokenizer (trained or given) + shards + manifest.json in out_dir; returns the manifest.

    `docs` is called once per pass over the documents and must yield the same documents each time. Unless
    `keep_duplicates`, exact duplicates (equal text once normalized by the tokenizer) are dropped before the split,
    the first of each kept, and so is a training document whose tokens equal a validation document's (different
    texts with equal tokens: characters the tokenizer maps to <unk>). The overlap check (data/overlap.py) then runs
    on the written shards; a validation document that occurs in training fails the build (a UserError naming it) and
    nothing is replaced. `meta` is stored in the manifest as is. `caseops`: the documents are CaseOps-transformed
    (data/caseops.py) before everything else, the markers are user-defined symbols of a trained tokenizer (a given one
    must have them), and validation gets the byte sidecar <prefix>_val_bytes_NNNNNN.bin.
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    if shard_tokens < 1 or shard_tokens >= 1 << 31:
        raise UserError(f"--shard-tokens must be between 1 and {(1 << 31) - 1}")
    if tokenizer is None:
        check_vocab_size(vocab_size)
        model = None
    else:
        model = Path(tokenizer).read_bytes()
        try:
            sp = spm.SentencePieceProcessor(model_proto=model)
        except RuntimeError:
            raise UserError(f"{tokenizer}: not a SentencePiece model") from None
        n_vocab = sp.vocab_size()
        check_vocab_size(n_vocab)
        if sp.bos_id() != BOS_ID:
            raise UserError(f"{tokenizer}: BOS id is {sp.bos_id()}, but challenge shards start documents with id {BOS_ID}")
        if caseops and any(len(sp.encode(m)) != 1 or sp.encode(m)[0] == sp.unk_id() for m in caseops_mod.MARKERS):
            raise UserError(f"{tokenizer}: the CaseOps markers (U+E010..U+E012) are not pieces of this tokenizer; "
                            "train one with --caseops (omit --tokenizer)")
        tok_path = Path(tokenizer)

    if caseops:
        source = docs
        docs = lambda: map(caseops_mod.encode, source())  # noqa: E731 - every pass reads the transformed text
    # scan: count the documents and, unless duplicates are kept, find them (one 8-byte hash per document in memory)
    keys, normalize = array("Q"), normalizer(model)
    n_input = 0
    for d in tqdm(docs(), desc="scan", unit=" doc", disable=None if progress else True, leave=False):
        n_input += 1
        if not keep_duplicates:
            keys.append(text_key(d, normalize))
    if n_input == 0:
        raise UserError("the input has no documents (all files empty or whitespace-only)")
    keep = None if keep_duplicates else first_occurrences(keys)
    del keys
    n_docs = n_input if keep is None else int(keep.sum())
    dropped = {"text": n_input - n_docs, "tokens": 0}  # exact duplicates; training documents with a validation's tokens

    def kept() -> Iterator[str]:
        """The documents that are built, in order (the duplicates dropped); refuses an input that grew."""
        i = -1
        for i, d in enumerate(docs()):
            if i >= n_input:
                raise UserError(f"the input changed while it was read ({n_input} documents, then more)")
            if keep is None or keep[i]:
                yield d
        if i + 1 != n_input:
            raise UserError(f"the input changed while it was read ({n_input} documents, then {i + 1})")

    if val_docs is None:
        val_docs = min(50_000, max(1, n_docs // 10))
    if not 0 <= val_docs < n_docs:
        raise UserError(f"--val-docs {val_docs} leaves no training documents (the input has {n_docs} documents"
                        + (f" once {dropped['text']:,} duplicates are dropped" if dropped["text"] else "") + ")")

    if tokenizer is None:
        log(progress, f"training BPE tokenizer, vocab {vocab_size}, on the {n_docs - val_docs} training documents")
        model = train_tokenizer(itertools.islice(kept(), val_docs, None), vocab_size, byte_fallback=byte_fallback,
                                max_chars=train_chars, progress=progress,
                                user_symbols=caseops_mod.MARKERS if caseops else ())
        n_vocab = vocab_size
        tok_path = Path(tokenizer_out) if tokenizer_out else out_dir / "tokenizer.model"

    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(os.path.join(out_dir, f".staging-{os.getpid()}"))
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        writer = ShardWriter(stage, prefix, shard_tokens)
        sidecar = ShardWriter(stage, prefix, shard_tokens)  # CaseOps: <prefix>_val_bytes_*, cut like the val shards
        orig_bytes = 0
        counts = {"docs": {"val": 0, "train": 0}, "tokens": {"val": 0, "train": 0}}
        val_hashes: set[int] = set()
        done = 0
        bar = tqdm(total=n_docs, desc="encode", unit=" doc", disable=None if progress else True, leave=False)
        for toks, lens, hashes, nbytes in encode_documents(kept(), model, workers or available_cpus(),
                                                           bytes_docs=val_docs if caseops else 0):
            k = min(max(val_docs - done, 0), len(lens))  # documents of this chunk that go to validation
            cut = int(lens[:k].sum())
            if k:
                val_hashes.update(hashes[:k].tolist())
                if caseops:
                    sidecar.add("val_bytes", nbytes)  # exactly the tokens of these k documents
                    orig_bytes += int(nbytes.sum(dtype=np.int64))
            train, train_lens = toks[cut:], lens[k:]
            if not keep_duplicates and val_hashes and len(train_lens):
                # equal tokens, different text (the exact duplicates are gone): the training copy goes
                same = np.fromiter((h in val_hashes for h in hashes[k:].tolist()), dtype=bool, count=len(train_lens))
                if same.any():
                    dropped["tokens"] += int(same.sum())
                    train, train_lens = train[np.repeat(~same, train_lens)], train_lens[~same]
            for split, part, nd in (("val", toks[:cut], k), ("train", train, len(train_lens))):
                if nd:
                    writer.add(split, part)
                    counts["docs"][split] += nd
                    counts["tokens"][split] += len(part)
            done += len(lens)
            bar.update(len(lens))
        bar.close()
        writer.flush()
        sidecar.flush()
        if done != n_docs:
            raise UserError(f"the input changed while it was read ({n_docs} documents, then {done})")

        # the overlap check on what was written, before anything is replaced
        t_check = time.time()
        check = overlap([stage / s["file"] for s in writer.shards["train"]],
                        [stage / s["file"] for s in writer.shards["val"]], progress=_progress if progress else None)
        t_check = time.time() - t_check
        if check["hits"]:
            raise UserError(_leak_message(check["hits"], model, keep_duplicates))

        # commit: drop the old manifest first, so a crash below leaves no manifest rather than a wrong one
        (out_dir / "manifest.json").unlink(missing_ok=True)
        if tokenizer is None:
            tok_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(tok_path.with_suffix(".vocab"), vocab_text(model), what="tokenizer vocabulary")
            write_atomic(tok_path, model, what="tokenizer")
        for old in itertools.chain(out_dir.glob(f"{prefix}_train_*.bin"), out_dir.glob(f"{prefix}_val_*.bin")):
            old.unlink()
        for f in sorted(stage.iterdir()):
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)

    manifest = {
        "format": f"parameter-golf shards: 256 x int32 header (magic {SHARD_MAGIC}, version {SHARD_VERSION}, token "
                  f"count), then uint16 tokens; each document is BOS ({BOS_ID}) + its tokens, no EOS",
        "prefix": prefix,
        "inputs": list(inputs or []),
        "tokenizer": {"model": os.path.relpath(tok_path, out_dir), "sha256": hashlib.sha256(model).hexdigest(),
                      "vocab_size": n_vocab, "trained": tokenizer is None,
                      **({"byte_fallback": byte_fallback, "train_chars_max": train_chars} if tokenizer is None else {})},
        "input_docs": n_input,
        "duplicates": ({"kept": True} if keep_duplicates else
                       {"kept": False, "dropped_text": dropped["text"], "dropped_train_tokens": dropped["tokens"]}),
        "overlap": {"val_docs_in_train": 0, "checked": "data/overlap.py: exact token-sequence hashes"},
        "val_docs": val_docs,
        "shard_tokens": shard_tokens,
        **counts,
        "shards": writer.shards | ({"val_bytes": sidecar.shards.get("val_bytes", [])} if caseops else {}),
        **({"caseops": {"transform": "data/caseops.py", "markers": {"cap": "U+E010", "run": "U+E011", "esc": "U+E012"},
                        "unicode": caseops_mod.UNICODE_VERSION, "val_original_bytes": orig_bytes,
                        "val_bytes": "<prefix>_val_bytes_NNNNNN.bin: the shard header, then one uint16 per validation "
                                     "token, the original UTF-8 bytes it stands for (0 for BOS and markers)"}}
           if caseops else {}),
        **({"meta": meta} if meta else {}),
    }
    write_atomic(out_dir / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", what="manifest")
    n_dropped = dropped["text"] + dropped["tokens"]
    dups = ("duplicates kept (--keep-duplicates)" if keep_duplicates else
            f"dropped {n_dropped:,} duplicate document{'' if n_dropped == 1 else 's'}" + (
                f" ({dropped['text']:,} exact, {dropped['tokens']:,} training with a validation document's tokens)"
                if n_dropped else ""))
    log(progress, f"{out_dir}: {counts['docs']['train']:,} train docs / {counts['tokens']['train']:,} tokens in "
                  f"{len(writer.shards['train'])} shard(s), {counts['docs']['val']:,} val docs / "
                  f"{counts['tokens']['val']:,} tokens in {len(writer.shards['val'])} shard(s)"
                  + (f" + byte sidecar (CaseOps; {orig_bytes:,} original UTF-8 bytes)" if caseops else "")
                  + f"; {dups}; overlap check: "
                  f"no validation document in training ({t_check:.1f} s); tokenizer {tok_path} (vocab {n_vocab}); "
                  f"{time.time() - t0:.1f} s")
    return manifest


def _leak_message(hits: list[dict], model: bytes, keep_duplicates: bool) -> str:
    """One line: the first validation document that occurs in training (index, tokens, the start of its text), how
    many more do, and what to do."""
    h = hits[0]
    text = " ".join(spm.SentencePieceProcessor(model_proto=model).decode(h["ids"]).split())
    preview = repr(text[:60]) + ("..." if len(text) > 60 or h["tokens"] > len(h["ids"]) else "")
    n = len(hits) - 1
    more = f" (and {n:,} more validation document{'s' if n > 1 else ''})" if n else ""
    fix = ("remove the duplicate from the input, or build without --keep-duplicates (which drops duplicates)"
           if keep_duplicates else "duplicates should have been dropped: this is a bug in prepare_text.py, please report it")
    return (f"overlap check failed: validation document {h['index']:,} ({h['tokens']:,} tokens, {preview}) is also "
            f"training document {h['train_index']:,}{more}; nothing was written; {fix}")


def _progress(phase: str, n_shards: int, n_tokens: int) -> Callable[[int], None]:
    """A tqdm bar over the tokens of one phase of the overlap check (on a terminal only)."""
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc=f"overlap check: {phase}", disable=None, leave=False)

    def update(n: int) -> None:
        bar.update(n)
        if bar.n >= n_tokens:
            bar.close()
    return update


def verify_dataset(out_dir: str | Path) -> dict:
    """Check a built directory against its manifest (shard headers and sizes, tokenizer sha256)."""
    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
        tok = out_dir / manifest["tokenizer"]["model"]
        shards = [(s, out_dir / s["file"]) for split in ("val", "train", "val_bytes")
                  for s in manifest["shards"].get(split, [])]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{out_dir}: no valid manifest.json ({e})") from None
    if not tok.is_file() or sha256_file(tok) != manifest["tokenizer"]["sha256"]:
        raise UserError(f"{out_dir}: tokenizer {tok} is missing or differs from the one the shards were built with")
    for s, path in shards:
        if read_shard_header(path) != s["tokens"]:
            raise UserError(f"{path}: token count differs from manifest.json")
    return manifest


# ----------------------------------------------------------------------------- helpers and CLI
def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def log(enabled: bool, msg: str) -> None:
    if enabled:
        print(msg, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="text/JSONL files (optionally gzip) or directories")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for shards and manifest.json")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="MODEL", help="reuse this SentencePiece .model instead of training one")
    tok.add_argument("--vocab-size", type=int, default=1024, help="vocab size of the trained tokenizer (default 1024)")
    p.add_argument("--tokenizer-out", metavar="PATH", help="where the trained model goes (default DIR/tokenizer.model)")
    p.add_argument("--byte-fallback", action="store_true", help="train with byte fallback (no <unk>; 256 byte pieces)")
    p.add_argument("--train-chars", type=int, default=100_000_000,
                   help="train the tokenizer on at most this many characters, the first ones of the training "
                        "documents (default 100M; 0 = all)")
    p.add_argument("--val-docs", type=int, metavar="K",
                   help="the first K documents (duplicates dropped) form the validation split (default 10%% of them, "
                        "at most 50,000)")
    p.add_argument("--keep-duplicates", action="store_true",
                   help="keep exact-duplicate documents (by default the later copies are dropped before the split); "
                        "the build still fails if a validation document then occurs in training")
    p.add_argument("--caseops", action="store_true",
                   help="CaseOps: lower-case the text losslessly behind private-use case markers (data/caseops.py) "
                        "before training the tokenizer and encoding, and write the validation byte sidecar "
                        "<prefix>_val_bytes_NNNNNN.bin so val_bpb counts the original bytes")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default 100M, as published)")
    p.add_argument("--prefix", help="shard name prefix (default: DIR's name up to its first '_', e.g. corpus_sp1024 -> corpus)")
    p.add_argument("--text-docs", choices=["blank-line", "file", "line"], default="blank-line",
                   help="how plain-text files split into documents: at blank lines (default), one per file, one per line")
    p.add_argument("--text-field", default="text", help='JSON field that holds the document (default "text")')
    p.add_argument("--workers", type=int, default=0, help="encoding processes (default: all CPUs)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    return p


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tokenizer and (args.tokenizer_out or args.byte_fallback):
        parser.error("--tokenizer-out and --byte-fallback apply only when training a tokenizer (not with --tokenizer)")
    files = list_inputs(args.inputs)
    out = Path(args.out)
    build_dataset(lambda: iter_documents(files, args.text_docs, args.text_field), out,
                  prefix=args.prefix or out.resolve().name.split("_")[0], tokenizer=args.tokenizer,
                  vocab_size=args.vocab_size, tokenizer_out=args.tokenizer_out, byte_fallback=args.byte_fallback,
                  val_docs=args.val_docs, shard_tokens=args.shard_tokens, train_chars=args.train_chars,
                  workers=args.workers, inputs=[str(f) for f in files], keep_duplicates=args.keep_duplicates,
                  progress=not args.quiet, caseops=args.caseops)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: exit status 0, 1 with one `error: ...` line on stderr, or 130 on Ctrl-C."""
    return run_main(_main, argv, interrupted="interrupted; nothing was replaced")


if __name__ == "__main__":
    sys.exit(main())
