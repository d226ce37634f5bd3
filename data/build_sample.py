#!/usr/bin/env python3
"""Build the embedded sample dataset used by SMOKE=1 and on machines without FineWeb or network.

The text is real English that every Python installation carries: the docstrings of the running
interpreter's standard library (each module, class and function docstring is one document), read with
`ast` from the source files (nothing is imported, nothing third-party is committed; test folders and
site-packages are skipped). About 1.8 MB of text; exact duplicates dropped (docstrings repeated across modules,
equal once normalized as the tokenizer normalizes text, the first in walk order kept), then shuffled with a fixed
seed; the first documents up to ~360k characters (about 120k tokens) form the validation split. prepare_text also
drops a training document whose tokens equal a validation document's (e.g. "Same as a & b." and "Same as a ^ b.",
whose operators the tokenizer maps to <unk>) and checks that no validation document occurs in training.

Outputs (git-ignored): data/tokenizers/stdlib_1024_bpe.model (+ .vocab; BPE vocab 1024 with the challenge
tokenizer's settings) and data/datasets/stdlib_sp1024/stdlib_{val,train}_NNNNNN.bin + manifest.json.
If they exist, verify and were built by this version of the script (SAMPLE_VERSION in the manifest), this only
prints "sample data ready: ..."; otherwise, or with --force, it rebuilds them.
Use from Python: `from data.build_sample import ensure_sample; data_path, tokenizer_path = ensure_sample(repo_root)`.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import os
import random
import sys
import sysconfig
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from data import prepare_text  # noqa: E402
from data.common import UserError, run_main  # noqa: E402

NAME, VOCAB, SEED = "stdlib", 1024, 1337
VAL_CHARS = 360_000
SHARD_TOKENS = 200_000  # small shards, so that smoke runs cross shard boundaries
# What the sample's manifest records; a sample built otherwise is rebuilt. 2: duplicates dropped, no overlap (version
# 1, unmarked, had 6 validation documents whose tokens also occurred in training).
SAMPLE_VERSION = 2
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def sample_paths(root: str | Path = REPO_ROOT) -> tuple[Path, Path]:
    data = Path(root) / "data"
    return data / "datasets" / f"{NAME}_sp{VOCAB}", data / "tokenizers" / f"{NAME}_{VOCAB}_bpe.model"


def stdlib_docstrings(stdlib: str | None = None) -> list[str]:
    """Docstrings of the standard library's .py files: sorted walk, source order, exact duplicates dropped (equal
    once normalized as the tokenizer normalizes text; the first kept: prepare_text.unique_documents)."""
    stdlib = stdlib or sysconfig.get_paths()["stdlib"]
    docs = []
    for folder, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                with open(os.path.join(folder, name), "rb") as f, warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tree = ast.parse(f.read())
            except (SyntaxError, ValueError, OSError):
                continue
            docs.extend(_docstrings(tree))
    return prepare_text.unique_documents(docs)


def _docstrings(node: ast.AST):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        if doc and doc.strip():
            yield doc
    for child in ast.iter_child_nodes(node):
        yield from _docstrings(child)


@contextlib.contextmanager
def _lock(path: Path):
    """Serialize concurrent builders (e.g. two test sessions); a no-op where fcntl is missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:
            pass
        yield


def _ready(data_path: Path, tok_path: Path) -> tuple[dict | None, str]:
    """(the manifest, "") when the sample is there, verifies and is of this SAMPLE_VERSION; else (None, why not)."""
    try:
        manifest = prepare_text.verify_dataset(data_path)
    except UserError as e:
        return None, str(e) if (data_path / "manifest.json").exists() else "not built yet"
    if (data_path / manifest["tokenizer"]["model"]).resolve() != tok_path.resolve():
        return None, f"its manifest names another tokenizer ({manifest['tokenizer']['model']})"
    version = (manifest.get("meta") or {}).get("sample_version")
    if version != SAMPLE_VERSION:
        return None, (f"built by an older build_sample.py (sample version {version or 1}, now {SAMPLE_VERSION}: "
                      "duplicates dropped, no validation document in training)")
    return manifest, ""


def ensure_sample(root: str | Path = REPO_ROOT, force: bool = False, progress: bool = False) -> tuple[Path, Path]:
    """Build the sample data under root/data unless it is already there and valid; return (data_path, tokenizer_path)."""
    data_path, tok_path = sample_paths(root)
    with _lock(data_path.parent / f".{data_path.name}.lock"):
        manifest, why = (None, "--force") if force else _ready(data_path, tok_path)
        if manifest is None:
            if progress and why != "not built yet":
                print(f"rebuilding the sample data in {data_path}: {why}", flush=True)
            stdlib = sysconfig.get_paths()["stdlib"]
            docs = stdlib_docstrings(stdlib)
            random.Random(SEED).shuffle(docs)
            val_docs, chars = 0, 0
            while chars < VAL_CHARS and val_docs < len(docs) // 2:
                chars += len(docs[val_docs])
                val_docs += 1
            manifest = prepare_text.build_dataset(
                lambda: iter(docs), data_path, prefix=NAME, vocab_size=VOCAB, tokenizer_out=tok_path, val_docs=val_docs,
                shard_tokens=SHARD_TOKENS, inputs=[f"docstrings of {stdlib} (Python {sys.version.split()[0]})"],
                meta={"sample_version": SAMPLE_VERSION}, progress=progress)
    if progress:
        print(f"sample data ready: {data_path} ({manifest['tokens']['train']:,} train + {manifest['tokens']['val']:,} "
              f"val tokens), tokenizer {tok_path}", flush=True)
    return data_path, tok_path


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--force", action="store_true", help="rebuild even if valid outputs exist")
    p.add_argument("--root", default=str(REPO_ROOT), help="repository root whose data/ receives the outputs (default: this repo)")
    args = p.parse_args(argv)
    ensure_sample(args.root, force=args.force, progress=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: exit status 0, 1 with one `error: ...` line on stderr, or 130 on Ctrl-C."""
    return run_main(_main, argv, interrupted="interrupted; nothing was replaced")


if __name__ == "__main__":
    sys.exit(main())
