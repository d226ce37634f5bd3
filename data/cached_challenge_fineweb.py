#!/usr/bin/env python3
"""Download the published challenge data (tokenized FineWeb shards + tokenizer) from Hugging Face.

  python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 10
  python3 data/cached_challenge_fineweb.py --variant sp8192 --train-shards 10

Where each variant comes from: sp4096 and sp8192 (the byte-fallback tokenizers of the later records) from the
Hugging Face dataset kevclark/parameter-golf, every other variant (sp1024, byte260, ...) from
willdepueoai/parameter-golf, and sp8192_lossless_caps_caseops_v1_reserved (CaseOps: lower-cased text with case markers,
sp8192; the tokenizer of the 1.0611 record) from romeerp/parameter-golf-caseops-v1, with its validation byte sidecar
fineweb_val_bytes_NNNNNN.bin (one uint16 per validation token: the original UTF-8 bytes it stands for; train_gpt.py
charges val_bpb on them). --repo OWNER/NAME (or PG_DATA_REPO) takes every variant from that dataset instead.
All publish the same layout (below).

writes data/datasets/fineweb10B_<variant>/fineweb_{val,train}_NNNNNN.bin (all validation shards and the
first N training shards), the tokenizer files into data/tokenizers/, and the repository's manifest.json
into data/datasets/. Files are fetched over plain HTTPS into <name>.part (an interrupted download
resumes there with an HTTP Range request on the next try or rerun) and renamed once complete; files
already present are skipped after a size check. Every shard's header and size are checked (the reader of
data/common.py, which gives the same answers as train_gpt.py's) and its token count against the manifest.

Environment: HF_ENDPOINT (default https://huggingface.co), PG_DATA_REPO (default for --repo), PG_DATA_ROOT
(folder in the repository, default "datasets"), PG_DATA_REVISION (default main).

Manifest layout this reads (ROOT/manifest.json, the one the published export writes): {"shard_size": S,
"datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": T, "stats": {"files_train", "files_val", "tokens_train",
"tokens_val", ...}}], "tokenizers": [{"name": T, "model_path" / "vocab_path" / "path": "tokenizers/..."}]}.
Only the dataset names and file counts are required; shard token counts are checked where the stats
and shard_size determine them (every shard but the last of a split holds shard_size tokens). Files: shards at
ROOT/datasets/<name>/fineweb_{val,train}_NNNNNN.bin, tokenizer files at ROOT/<model_path> etc. A dataset entry with
"val_bytes_glob" (CaseOps) also has ROOT/datasets/<name>/fineweb_val_bytes_NNNNNN.bin beside each validation shard,
with as many values as that shard has tokens.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from data.common import SHARD_HEADER_INTS, UserError, read_shard_header, run_main, write_atomic  # noqa: E402

DATASET_PREFIX = "fineweb10B_"
DEFAULT_REPO = "willdepueoai/parameter-golf"
VARIANT_REPOS = {"sp4096": "kevclark/parameter-golf", "sp8192": "kevclark/parameter-golf",  # not in DEFAULT_REPO
                 "sp8192_lossless_caps_caseops_v1_reserved": "romeerp/parameter-golf-caseops-v1"}
RETRY_WAIT = 1.0  # seconds before the first retry; doubles each time (tests set 0)
TIMEOUT = 60
BLOCK = 1 << 20


@dataclass
class Remote:
    endpoint: str
    repo: str
    root: str
    revision: str

    @classmethod
    def from_env(cls, variant: str, repo: str | None = None) -> "Remote":
        e = os.environ
        repo = repo or e.get("PG_DATA_REPO") or VARIANT_REPOS.get(variant, DEFAULT_REPO)
        return cls(e.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/"), repo,
                   e.get("PG_DATA_ROOT", "datasets").strip("/"), e.get("PG_DATA_REVISION", "main"))

    def url(self, rel: str) -> str:
        path = "/".join(p for p in (self.root, rel) if p)
        return f"{self.endpoint}/datasets/{self.repo}/resolve/{urllib.parse.quote(self.revision, safe='')}/{urllib.parse.quote(path)}"


@dataclass
class Item:
    rel: str  # path below the remote root
    dest: Path
    size: int | None = None  # expected bytes, when the manifest determines them
    tokens: int | None = None  # expected shard tokens, likewise
    shard: bool = False


# ----------------------------------------------------------------------------- HTTP
def _open(url: str, offset: int = 0, method: str = "GET"):
    headers = {"User-Agent": "parameter-golf-data/1.0"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers, method=method), timeout=TIMEOUT)


def _http_error(e: urllib.error.HTTPError, url: str) -> UserError:
    if e.code == 404:
        return UserError(f"not found on the server (HTTP 404): {url}; check --repo / PG_DATA_ROOT and the manifest")
    if e.code in (401, 403):
        return UserError(f"access denied (HTTP {e.code}): {url}")
    return UserError(f"HTTP {e.code} {e.reason} for {url}")


def _net_reason(e: BaseException) -> str:
    if isinstance(e, http.client.IncompleteRead):
        return "connection closed mid-file"
    r = getattr(e, "reason", e)
    if isinstance(r, socket.gaierror):
        return "host name lookup failed (no network?)"
    if isinstance(r, ConnectionRefusedError):
        return "connection refused"
    if isinstance(r, (socket.timeout, TimeoutError)):
        return "timed out"
    return str(r) or type(r).__name__


def _retryable(e: BaseException) -> bool:
    if isinstance(e, urllib.error.HTTPError):
        return e.code in (408, 429) or e.code >= 500
    return isinstance(e, (urllib.error.URLError, OSError, http.client.HTTPException))


def fetch_bytes(url: str, retries: int) -> bytes:
    for attempt in range(1, retries + 1):
        try:
            with _open(url) as r:
                return r.read()
        except Exception as e:  # noqa: BLE001 - classified below
            if isinstance(e, urllib.error.HTTPError) and not _retryable(e):
                raise _http_error(e, url) from None
            if not _retryable(e):
                raise
            if attempt == retries:
                host = urllib.parse.urlsplit(url).netloc
                raise UserError(f"cannot download {url}: {_net_reason(e)}; check the network or HF_ENDPOINT (host {host})") from None
            time.sleep(RETRY_WAIT * 2 ** (attempt - 1))
    raise AssertionError


def remote_size(url: str) -> int | None:
    try:
        with _open(url, method="HEAD") as r:
            n = r.headers.get("X-Linked-Size") or r.headers.get("Content-Length")
            return int(n) if n else None
    except urllib.error.HTTPError as e:
        raise _http_error(e, url) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise UserError(f"cannot reach {url}: {_net_reason(e)}") from None


def download(url: str, item: Item, retries: int, total: tqdm) -> None:
    """Fetch url into item.dest via item.dest.part, resuming a partial .part with a Range request."""
    part = item.dest.with_name(item.dest.name + ".part")
    item.dest.parent.mkdir(parents=True, exist_ok=True)
    total.update(part.stat().st_size if part.exists() else 0)  # bytes a previous run left
    for attempt in range(1, retries + 1):
        offset = part.stat().st_size if part.exists() else 0
        if item.size is not None and offset > item.size:
            _restart(part, total)
            offset = 0
        try:
            if item.size is None or offset < item.size:
                _fetch_into(url, part, offset, item, total)
            break
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - classified below
            if isinstance(e, urllib.error.HTTPError) and e.code == 416 and offset:
                _restart(part, total)  # our partial file is longer than theirs: start over
                continue
            if isinstance(e, urllib.error.HTTPError) and not _retryable(e):
                raise _http_error(e, url) from None
            if not _retryable(e):
                raise
            have = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                raise UserError(f"download of {item.rel} failed ({_net_reason(e)}); {have:,} bytes kept in {part}, "
                                f"rerun to resume") from None
            tqdm.write(f"retrying {item.rel} ({_net_reason(e)}) from byte {have:,}", file=sys.stderr)
            time.sleep(RETRY_WAIT * 2 ** (attempt - 1))
    got = part.stat().st_size
    if item.size is not None and got != item.size:
        raise UserError(f"download of {item.rel} ended at {got:,} of {item.size:,} bytes; rerun to resume")
    if item.shard:
        try:
            verify_shard(part, item)
        except UserError:
            part.unlink()
            raise
    os.replace(part, item.dest)


def _restart(part: Path, total: tqdm) -> None:
    total.update(-part.stat().st_size)
    part.unlink()


def _fetch_into(url: str, part: Path, offset: int, item: Item, total: tqdm) -> None:
    with _open(url, offset) as r:
        if offset and r.status != 206:  # the server ignored the Range header: start over
            total.update(-offset)
            offset = 0
        length = r.headers.get("Content-Length")
        size = offset + int(length) if length is not None else None
        if item.size is None and size is not None:
            item.size = size
            total.total = (total.total or 0) + size
            total.refresh()
        elif item.size is not None and size is not None and size != item.size:
            raise UserError(f"{item.rel}: the server has {size:,} bytes but the manifest implies {item.size:,}; refusing it")
        with open(part, "ab" if offset else "wb") as f, \
                tqdm(total=item.size, initial=offset, desc=item.dest.name, unit="B", unit_scale=True,
                     leave=False, disable=total.disable) as bar:
            while block := r.read(BLOCK):
                f.write(block)
                bar.update(len(block))
                total.update(len(block))
        if size is not None and part.stat().st_size < size:
            raise http.client.IncompleteRead(b"", size - part.stat().st_size)


def verify_shard(path: Path, item: Item) -> None:
    try:
        n = read_shard_header(path)
    except UserError as e:
        raise UserError(f"{item.rel}: refused, {e}") from None
    if item.tokens is not None and n != item.tokens:
        raise UserError(f"{item.rel}: refused, it holds {n:,} tokens but the manifest implies {item.tokens:,}")


# ----------------------------------------------------------------------------- manifest -> plan
def _shard_tokens(i: int, n_files: int, total, shard_size) -> int | None:
    if not isinstance(total, int):
        return None
    if n_files == 1:
        return total
    if not isinstance(shard_size, int) or shard_size <= 0:
        return None
    last = total - (n_files - 1) * shard_size
    return (shard_size if i < n_files - 1 else last) if 0 < last <= shard_size else None


def plan(manifest: dict, variant: str, train_shards: int, with_docs: bool, data_dir: Path, repo: str = "") -> list[Item]:
    try:
        datasets = {d["name"]: d for d in manifest["datasets"]}
        tokenizers = {t["name"]: t for t in manifest.get("tokenizers", [])}
    except (KeyError, TypeError):
        raise UserError("the manifest has an unexpected layout (no list of named datasets)") from None
    variants = {n[len(DATASET_PREFIX):]: n for n in datasets if n.startswith(DATASET_PREFIX)}
    if variant not in variants:
        where = f" in {repo}" if repo else ""
        raise UserError(f"unknown variant {variant!r}{where}; published variants{where and ' there'}: "
                        f"{', '.join(sorted(variants)) or 'none'}")
    name = variants[variant]
    entry = datasets[name]
    stats = entry.get("stats") or {}
    try:
        n_train, n_val = int(stats["files_train"]), int(stats["files_val"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"the manifest gives no shard counts (stats.files_train/files_val) for {name}") from None
    if train_shards > n_train:
        raise UserError(f"{variant} has {n_train} training shards; you asked for {train_shards}")
    tok = tokenizers.get(entry.get("tokenizer_name"))
    tok_files = [tok[k] for k in ("model_path", "vocab_path", "path") if tok and tok.get(k)]
    if not tok_files:
        raise UserError(f"the manifest names no tokenizer files for {name}")

    shard_size = manifest.get("shard_size", entry.get("shard_size"))
    items = []
    kinds = (("val", n_val, n_val), ("train", n_train, train_shards))
    if entry.get("val_bytes_glob"):  # CaseOps: the byte sidecar, cut like the validation shards
        kinds = (("val", n_val, n_val), ("val_bytes", n_val, n_val), ("train", n_train, train_shards))
    for split, n_files, count in kinds:
        for i in range(count):
            tokens = _shard_tokens(i, n_files, stats.get(f"tokens_{split.split('_')[0]}"), shard_size)
            size = None if tokens is None else 4 * SHARD_HEADER_INTS + 2 * tokens
            rel = f"datasets/{name}/fineweb_{split}_{i:06d}.bin"
            items.append(Item(rel, data_dir / "datasets" / name / Path(rel).name, size, tokens, shard=True))
    items += [Item(f, data_dir / "tokenizers" / Path(f).name) for f in tok_files]
    if with_docs:
        items += [Item(f, data_dir / "datasets" / f) for f in ("docs_selected.jsonl", "docs_selected.source_manifest.json")]
    return items


# ----------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> None:
    remote = Remote.from_env(args.variant, args.repo)
    data_dir = Path(args.data_dir)
    raw = fetch_bytes(remote.url("manifest.json"), args.retries)
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise UserError(f"{remote.url('manifest.json')} is not valid JSON") from None
    items = plan(manifest, args.variant, args.train_shards, args.with_docs, data_dir, remote.repo)
    (data_dir / "datasets").mkdir(parents=True, exist_ok=True)
    write_atomic(data_dir / "datasets" / "manifest.json", raw, what="manifest")

    known = sum(it.size for it in items if it.size is not None)
    fetched = 0
    with tqdm(total=known, desc=f"{args.variant} total", unit="B", unit_scale=True, disable=args.quiet or None) as total:
        for n, it in enumerate(items, 1):
            url = remote.url(it.rel)
            if it.dest.exists():
                size = it.size if it.size is not None else remote_size(url)
                reason = present_ok(it, size)
                if reason is None:
                    total.update(it.dest.stat().st_size)
                    continue
                tqdm.write(f"{it.dest}: {reason}; downloading it again", file=sys.stderr)
                it.dest.unlink()
            download(url, it, args.retries, total)
            fetched += 1
            if args.quiet is False and total.disable:
                print(f"[{n}/{len(items)}] {it.dest}", flush=True)
    if not args.quiet:
        print(f"{args.variant}: {len(items)} files ready ({fetched} downloaded) in {data_dir / 'datasets'} and "
              f"{data_dir / 'tokenizers'}", flush=True)


def present_ok(it: Item, size: int | None) -> str | None:
    """None when the file already on disk is complete, else why not."""
    have = it.dest.stat().st_size
    if size is not None and have != size:
        return f"{have:,} bytes, expected {size:,}"
    if it.shard:
        try:
            verify_shard(it.dest, it)
        except UserError as e:
            return str(e)
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="sp1024", help="tokenizer family, e.g. sp1024 (default), sp4096, sp8192, "
                                                       "byte260, sp8192_lossless_caps_caseops_v1_reserved (CaseOps, "
                                                       "with the validation byte sidecar); the manifest lists what is "
                                                       "published")
    p.add_argument("--repo", metavar="OWNER/NAME", help=f"Hugging Face dataset to read (default: PG_DATA_REPO, else "
                   f"{VARIANT_REPOS['sp8192']} for {' and '.join(VARIANT_REPOS)}, {DEFAULT_REPO} for the others)")
    p.add_argument("--train-shards", type=_nonneg, default=80, metavar="N",
                   help="download the first N training shards (default 80; each sp1024 shard is 100M tokens, 200 MB)")
    p.add_argument("--with-docs", action="store_true",
                   help="also download docs_selected.jsonl (the raw documents, large) and its sidecar into data/datasets/")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parent), metavar="DIR",
                   help="where datasets/ and tokenizers/ go (default: this script's folder)")
    p.add_argument("--retries", type=_positive, default=5, help="attempts per file before giving up (default 5)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    return p


def _nonneg(s: str) -> int:
    if not s.isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {s!r}")
    return int(s)


def _positive(s: str) -> int:
    if not s.isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return int(s)


def main(argv: list[str] | None = None) -> int:
    """The command line: exit status 0, 1 with one `error: ...` line on stderr (network problems, refused files, local
    disk problems such as permissions or a full disk), or 130 on Ctrl-C."""
    return run_main(lambda a: run(build_parser().parse_args(a)), argv, interrupted="interrupted; rerun to resume")


if __name__ == "__main__":
    sys.exit(main())
