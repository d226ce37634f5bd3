"""Tests of data/: shard building (prepare_text), the downloader (against a local HTTP server), the sample."""
from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared"
CHALLENGE_TOKENIZER = SHARED / "tokenizers" / "fineweb_1024_bpe.model"
sys.path.insert(0, str(REPO))

import train_gpt  # noqa: E402
from data import build_sample, prepare_text  # noqa: E402
from data import cached_challenge_fineweb as dl  # noqa: E402

WORDS = ("the of and to in is was for on that with as by at from his her an which were are this be has had it not "
         "first new two one after year time city people world river house music school game season team war "
         "government church village family film album station party state history north south small large "
         "language number water light between during under while where when because although however").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + rng.choice(".!?")
                     for _ in range(rng.randint(1, 6))]
        docs.append(" ".join(sentences) + (f" In {rng.randint(1800, 2024)}, {rng.randint(2, 999)} more." if rng.random() < 0.5 else ""))
    return docs


def write_inputs(root: Path, docs: list[str]) -> Path:
    """docs[:20] as a blank-line separated .txt, the rest as gzip JSONL, in a directory (sorted: a.txt, b.jsonl.gz)."""
    src = root / "src"
    src.mkdir()
    (src / "a.txt").write_text("\n\n\n".join(d.replace(". ", ".\n", 1) for d in docs[:20]) + "\n", encoding="utf-8")
    with gzip.open(src / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in docs[20:]:
            f.write(json.dumps({"id": 0, "text": d}) + "\n")
    (src / ".hidden.txt").write_text("ignored\n")
    return src


def expected_docs(docs: list[str]) -> list[str]:
    return [d.replace(". ", ".\n", 1) for d in docs[:20]] + docs[20:]


def read_split(out: Path, split: str) -> np.ndarray:
    files = sorted(out.glob(f"*_{split}_*.bin"))  # the globs train_gpt.py uses
    return np.concatenate([train_gpt.load_data_shard(str(f)) for f in files])


def stream(sp: spm.SentencePieceProcessor, docs: list[str]) -> np.ndarray:
    return np.array([t for d in docs for t in [1] + sp.encode(d)], dtype=np.uint16)


def run_prepare(capsys, *argv) -> tuple[int, str]:
    rc = prepare_text.main([*map(str, argv), "-q"])
    return rc, capsys.readouterr().err


# ----------------------------------------------------------------------------- prepare_text
def test_shards_equal_direct_encoding_and_split(tmp_path, capsys):
    docs = make_docs(120)
    src, out = write_inputs(tmp_path, docs), tmp_path / "toy_sp300"
    rc, err = run_prepare(capsys, src, "--out", out, "--vocab-size", 300, "--val-docs", 25, "--shard-tokens", 1000,
                          "--workers", 2)
    assert rc == 0, err
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.vocab_size() == 300 and sp.bos_id() == 1 and sp.pad_id() == 0 and sp.unk_id() == 3
    want = expected_docs(docs)
    val, train = read_split(out, "val"), read_split(out, "train")
    np.testing.assert_array_equal(val, stream(sp, want[:25]))  # split exactly after document 25
    np.testing.assert_array_equal(train, stream(sp, want[25:]))
    m = json.loads((out / "manifest.json").read_text())
    assert m["docs"] == {"val": 25, "train": 95} and m["tokens"] == {"val": len(val), "train": len(train)}
    assert len(m["shards"]["train"]) > 1 and all(s["tokens"] <= 1000 for s in m["shards"]["train"])
    assert [s["file"] for s in m["shards"]["train"]][0] == "toy_train_000000.bin"
    assert m["tokenizer"]["sha256"] == prepare_text.sha256_file(out / "tokenizer.model")
    assert not list(out.glob(".*")), "staging or temp files left behind"


def test_rerun_is_byte_identical(tmp_path, capsys):
    src, out = write_inputs(tmp_path, make_docs(80, seed=1)), tmp_path / "out"
    args = (src, "--out", out, "--vocab-size", 280, "--val-docs", 10, "--shard-tokens", 700)
    assert run_prepare(capsys, *args, "--workers", 1)[0] == 0
    first = {f.name: f.read_bytes() for f in out.iterdir()}
    assert {"tokenizer.model", "tokenizer.vocab", "manifest.json", "out_val_000000.bin", "out_train_000001.bin"} <= set(first)
    assert run_prepare(capsys, *args, "--workers", 2)[0] == 0
    assert {f.name: f.read_bytes() for f in out.iterdir()} == first


def test_text_document_rules(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("one\nstill one\n\n  \n\ntwo\r\n\r\nthree", encoding="utf-8")
    assert list(prepare_text.iter_documents([f])) == ["one\nstill one", "two", "three"]
    assert list(prepare_text.iter_documents([f], "file")) == ["one\nstill one\n\n  \n\ntwo\n\nthree"]
    assert list(prepare_text.iter_documents([f], "line")) == ["one", "still one", "two", "three"]


@pytest.mark.skipif(not CHALLENGE_TOKENIZER.is_file(), reason="challenge tokenizer not available")
def test_reuse_challenge_tokenizer(tmp_path, capsys):
    docs = make_docs(40, seed=2)
    src, out = write_inputs(tmp_path, docs), tmp_path / "out"
    rc, err = run_prepare(capsys, src, "--out", out, "--tokenizer", CHALLENGE_TOKENIZER, "--val-docs", 5)
    assert rc == 0, err
    sp = spm.SentencePieceProcessor(model_file=str(CHALLENGE_TOKENIZER))
    want = expected_docs(docs)
    np.testing.assert_array_equal(read_split(out, "val"), stream(sp, want[:5]))
    np.testing.assert_array_equal(read_split(out, "train"), stream(sp, want[5:]))
    m = json.loads((out / "manifest.json").read_text())
    assert m["tokenizer"]["sha256"] == "849ea920119b5135ace5016137e82ab397738fc29d723d5f9a6b74c4e31af191"
    assert not (out / "tokenizer.model").exists()


def test_refusals(tmp_path, capsys):
    src = write_inputs(tmp_path, make_docs(30))
    rc, err = run_prepare(capsys, src, "--out", tmp_path / "o", "--vocab-size", 70000)
    assert rc == 1 and err == "error: vocab size 70000 does not fit uint16 token storage (at most 65536)\n"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("\n \n\n")
    rc, err = run_prepare(capsys, tmp_path / "empty", "--out", tmp_path / "o")
    assert rc == 1 and err == "error: the input has no documents (all files empty or whitespace-only)\n"
    rc, err = run_prepare(capsys, src, "--out", tmp_path / "o", "--val-docs", 30)
    assert rc == 1 and "leaves no training documents" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    rc, err = run_prepare(capsys, bad, "--out", tmp_path / "o")
    assert rc == 1 and err == f'error: {bad}:2: no string field "text" (choose another with --text-field)\n'
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    # the real command line: one line on stderr, no traceback
    r = subprocess.run([sys.executable, str(REPO / "data" / "prepare_text.py"), str(tmp_path / "empty"), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "no documents" in r.stderr


@pytest.mark.parametrize("module", [prepare_text, dl, build_sample])
def test_help(module, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


# ----------------------------------------------------------------------------- downloader against a local server
class FakeHub:
    """Serves files over HTTP/1.1 like HF's resolve/ endpoint: HEAD, GET, Range; can cut a transfer short."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.drop, self.log = dict(files), {}, []  # drop: path -> (bytes to send, times)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_HEAD(self):
                self.do_GET(body=False)

            def do_GET(self, body=True):
                rng = self.headers.get("Range")
                hub.log.append((self.command, self.path, rng))
                data = hub.files.get(self.path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = int(rng.split("=")[1].rstrip("-")) if rng else 0
                if start >= len(data) and rng:
                    self.send_response(416)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if not body:
                    return
                cut, times = hub.drop.get(self.path, (None, 0))
                if cut is not None and times > 0 and cut > start:
                    hub.drop[self.path] = (cut, times - 1)
                    self.wfile.write(data[start:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def gets(self, suffix: str) -> list:
        return [(m, r) for m, p, r in self.log if p.endswith(suffix)]


BASE = "/datasets/test/golf/resolve/main/datasets"


def shard_bytes(tmp: Path, n: int, seed: int, vocab: int = 1024) -> bytes:
    prepare_text.write_shard(tmp / "s.bin", np.random.default_rng(seed).integers(0, vocab, n, dtype=np.uint16))
    return (tmp / "s.bin").read_bytes()


@pytest.fixture
def hub(tmp_path_factory, monkeypatch):
    tmp = tmp_path_factory.mktemp("hub")
    manifest = {
        "version": "10B", "shard_size": 1000,
        "datasets": [
            {"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
             "stats": {"files_train": 3, "files_val": 1, "tokens_train": 2300, "tokens_val": 700}},
            {"name": "fineweb10B_byte260", "tokenizer_name": "pure_byte_260", "stats": {"files_train": 1, "files_val": 1}},
        ],
        "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                        "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}],
    }
    d = f"{BASE}/datasets/fineweb10B_sp1024"
    files = {f"{BASE}/manifest.json": json.dumps(manifest).encode(),
             f"{d}/fineweb_val_000000.bin": shard_bytes(tmp, 700, 0),
             f"{d}/fineweb_train_000000.bin": shard_bytes(tmp, 1000, 1),
             f"{d}/fineweb_train_000001.bin": shard_bytes(tmp, 1000, 2),
             f"{d}/fineweb_train_000002.bin": shard_bytes(tmp, 300, 3),
             f"{BASE}/tokenizers/fineweb_1024_bpe.model": b"model bytes " * 100,
             f"{BASE}/tokenizers/fineweb_1024_bpe.vocab": b"vocab\t0\n" * 50}
    h = FakeHub(files)
    monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
    monkeypatch.setenv("PG_DATA_REPO", "test/golf")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr(dl, "RETRY_WAIT", 0.0)
    yield h
    h.server.shutdown()


def download(capsys, out: Path, *argv) -> tuple[int, str]:
    rc = dl.main(["--data-dir", str(out), "-q", *map(str, argv)])
    return rc, capsys.readouterr().err


def served(hub: FakeHub, name: str) -> bytes:
    return hub.files[f"{BASE}/datasets/fineweb10B_sp1024/{name}"]


def test_download_fresh_then_skip(hub, tmp_path, capsys):
    rc, err = download(capsys, tmp_path, "--variant", "sp1024", "--train-shards", 2)
    assert rc == 0, err
    ds = tmp_path / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in ds.iterdir()) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                                    "fineweb_val_000000.bin"]
    for f in ds.iterdir():
        assert f.read_bytes() == served(hub, f.name)
    assert len(train_gpt.load_data_shard(str(ds / "fineweb_val_000000.bin"))) == 700
    assert (tmp_path / "tokenizers" / "fineweb_1024_bpe.vocab").read_bytes() == hub.files[f"{BASE}/tokenizers/fineweb_1024_bpe.vocab"]
    assert json.loads((tmp_path / "datasets" / "manifest.json").read_text())["shard_size"] == 1000
    hub.log.clear()
    hub.files[f"{BASE}/docs_selected.jsonl"] = b'{"text": "a document"}\n'
    hub.files[f"{BASE}/docs_selected.source_manifest.json"] = b'{"num_docs": 1}'
    rc, err = download(capsys, tmp_path, "--variant", "sp1024", "--train-shards", 3, "--with-docs")
    assert rc == 0, err
    gets = [p.rsplit("/", 1)[1] for m, p, _ in hub.log if m == "GET"]  # present files are not fetched again
    assert gets == ["manifest.json", "fineweb_train_000002.bin", "docs_selected.jsonl", "docs_selected.source_manifest.json"]
    assert (tmp_path / "datasets" / "docs_selected.jsonl").read_bytes() == b'{"text": "a document"}\n'
    


def test_download_interrupted_then_resumed(hub, tmp_path, capsys):
    name = "fineweb_train_000001.bin"
    hub.drop[f"{BASE}/datasets/fineweb10B_sp1024/{name}"] = (700, 1)
    rc, err = download(capsys, tmp_path, "--train-shards", 2, "--retries", 1)
    part = tmp_path / "datasets" / "fineweb10B_sp1024" / (name + ".part")
    assert rc == 1 and "rerun to resume" in err and err.count("\n") == 1
    assert part.stat().st_size == 700 and not part.with_suffix("").exists()
    rc, err = download(capsys, tmp_path, "--train-shards", 2)
    assert rc == 0, err
    assert hub.gets(name)[-1] == ("GET", "bytes=700-")
    assert (tmp_path / "datasets" / "fineweb10B_sp1024" / name).read_bytes() == served(hub, name)
    assert not part.exists()


def test_download_retries_within_one_run(hub, tmp_path, capsys):
    name = "fineweb_val_000000.bin"
    hub.drop[f"{BASE}/datasets/fineweb10B_sp1024/{name}"] = (300, 1)
    rc, err = download(capsys, tmp_path, "--train-shards", 0)
    assert rc == 0, err
    assert hub.gets(name) == [("GET", None), ("GET", "bytes=300-")]
    assert (tmp_path / "datasets" / "fineweb10B_sp1024" / name).read_bytes() == served(hub, name)


def test_download_refuses_corrupt_shards(hub, tmp_path, capsys):
    key = f"{BASE}/datasets/fineweb10B_sp1024/fineweb_train_000000.bin"
    good = hub.files[key]
    hub.files[key] = b"\0" * 4 + good[4:]  # wrong magic, right size
    rc, err = download(capsys, tmp_path, "--train-shards", 1)
    assert rc == 1 and err.startswith("error: datasets/fineweb10B_sp1024/fineweb_train_000000.bin: refused, corrupt shard")
    ds = tmp_path / "datasets" / "fineweb10B_sp1024"
    assert not (ds / "fineweb_train_000000.bin").exists() and not (ds / "fineweb_train_000000.bin.part").exists()
    hub.files[key] = shard_bytes(tmp_path, 999, 7)  # a valid shard, but not the one the manifest describes
    rc, err = download(capsys, tmp_path, "--train-shards", 1)
    assert rc == 1 and "the server has 3,022 bytes but the manifest implies 3,024" in err
    hub.files[key] = good
    (ds / "fineweb_train_000000.bin").write_bytes(good[:-2] + b"\1\2")  # same size, damaged payload: not detectable
    (ds / "fineweb_val_000000.bin").write_bytes(b"\0" * 4 + served(hub, "fineweb_val_000000.bin")[4:])  # bad header
    rc, err = download(capsys, tmp_path, "--train-shards", 1)
    assert rc == 0, err
    assert (ds / "fineweb_val_000000.bin").read_bytes() == served(hub, "fineweb_val_000000.bin")  # replaced


def test_download_user_errors(hub, tmp_path, capsys, monkeypatch):
    rc, err = download(capsys, tmp_path, "--variant", "sp999")
    assert rc == 1 and err == "error: unknown variant 'sp999' in test/golf; published variants there: byte260, sp1024\n"
    rc, err = download(capsys, tmp_path, "--train-shards", 5)
    assert rc == 1 and err == "error: sp1024 has 3 training shards; you asked for 5\n"
    del hub.files[f"{BASE}/tokenizers/fineweb_1024_bpe.vocab"]
    rc, err = download(capsys, tmp_path, "--train-shards", 0)
    assert rc == 1 and err.startswith("error: not found on the server (HTTP 404): ") and "fineweb_1024_bpe.vocab" in err
    assert not list((tmp_path / "tokenizers").glob("*.vocab*"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    rc, err = download(capsys, tmp_path, "--retries", 2)
    assert rc == 1 and err.startswith("error: cannot download http://127.0.0.1:9/") and "connection refused" in err
    # the real command line: exit status 1, one line, no traceback
    r = subprocess.run([sys.executable, str(REPO / "data" / "cached_challenge_fineweb.py"), "--variant", "sp1",
                        "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_ENDPOINT": hub.endpoint})
    assert r.returncode == 1 and r.stderr == "error: unknown variant 'sp1' in test/golf; published variants there: byte260, sp1024\n"


def published(tmp: Path, repo: str, vocabs: list[int]) -> dict[str, bytes]:
    """What the fake hub serves for one dataset repository publishing fineweb10B_sp<V> for each V: the manifest,
    one validation and two training shards each (1000 + 1000 + 400 tokens), fineweb_<V>_bpe.model/.vocab."""
    base = f"/datasets/{repo}/resolve/main/datasets"
    manifest = {"shard_size": 1000, "datasets": [], "tokenizers": []}
    files = {}
    for v in vocabs:
        name, tok = f"fineweb10B_sp{v}", f"tokenizers/fineweb_{v}_bpe"
        manifest["datasets"].append({"name": name, "tokenizer_name": f"sp_bpe_{v}", "stats": {
            "files_train": 2, "files_val": 1, "tokens_train": 1400, "tokens_val": 600}})
        manifest["tokenizers"].append({"name": f"sp_bpe_{v}", "model_path": f"{tok}.model", "vocab_path": f"{tok}.vocab"})
        for i, (rel, n) in enumerate((("fineweb_val_000000.bin", 600), ("fineweb_train_000000.bin", 1000),
                                      ("fineweb_train_000001.bin", 400))):
            files[f"{base}/datasets/{name}/{rel}"] = shard_bytes(tmp, n, v + i, vocab=v)
        files[f"{base}/{tok}.model"] = f"{repo} model {v}".encode()
        files[f"{base}/{tok}.vocab"] = f"{repo} vocab {v}".encode()
    files[f"{base}/manifest.json"] = json.dumps(manifest).encode()
    return files


def test_download_larger_vocabularies_from_their_own_repository(tmp_path, capsys, monkeypatch):
    h = FakeHub({**published(tmp_path, "willdepueoai/parameter-golf", [1024]),
                 **published(tmp_path, "kevclark/parameter-golf", [4096, 8192])})
    monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("PG_DATA_REPO", raising=False)
    monkeypatch.setattr(dl, "RETRY_WAIT", 0.0)
    try:
        for variant, repo, vocab in (("sp8192", "kevclark", 8192), ("sp4096", "kevclark", 4096), ("sp1024", "willdepueoai", 1024)):
            h.log.clear()
            rc, err = download(capsys, tmp_path, "--variant", variant, "--train-shards", 1)
            assert rc == 0, err
            assert {p.split("/")[2] for _, p, _ in h.log} == {repo}, h.log  # every request went to that repository
            ds = tmp_path / "datasets" / f"fineweb10B_{variant}"
            assert sorted(p.name for p in ds.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
            base = f"/datasets/{repo}/parameter-golf/resolve/main/datasets"
            for f in ds.iterdir():
                assert f.read_bytes() == h.files[f"{base}/datasets/fineweb10B_{variant}/{f.name}"]
            assert train_gpt.load_data_shard(str(ds / "fineweb_val_000000.bin")).max() >= vocab // 2
            for ext in ("model", "vocab"):
                got = (tmp_path / "tokenizers" / f"fineweb_{vocab}_bpe.{ext}").read_bytes()
                assert got == f"{repo}/parameter-golf {ext} {vocab}".encode()
        # --repo (or PG_DATA_REPO) takes every variant from one repository; one line names it and what it has
        rc, err = download(capsys, tmp_path, "--variant", "sp1024", "--repo", "kevclark/parameter-golf")
        assert rc == 1 and err == ("error: unknown variant 'sp1024' in kevclark/parameter-golf; "
                                   "published variants there: sp4096, sp8192\n")
        monkeypatch.setenv("PG_DATA_REPO", "willdepueoai/parameter-golf")
        rc, err = download(capsys, tmp_path / "other", "--variant", "sp8192")
        assert rc == 1 and err == "error: unknown variant 'sp8192' in willdepueoai/parameter-golf; published variants there: sp1024\n"
        rc, err = download(capsys, tmp_path / "other", "--variant", "sp8192", "--repo", "kevclark/parameter-golf",
                           "--train-shards", 0)
        assert rc == 0, err
        assert not (tmp_path / "other" / "datasets" / "fineweb10B_sp1024").exists()
        del h.files["/datasets/kevclark/parameter-golf/resolve/main/datasets/tokenizers/fineweb_4096_bpe.model"]
        rc, err = download(capsys, tmp_path / "third", "--variant", "sp4096", "--repo", "kevclark/parameter-golf",
                           "--train-shards", 0)
        assert rc == 1 and err.startswith("error: not found on the server (HTTP 404): ") and err.count("\n") == 1
        assert "kevclark/parameter-golf/resolve/main/datasets/tokenizers/fineweb_4096_bpe.model; check --repo" in err
        assert not list((tmp_path / "third" / "tokenizers").glob("fineweb_4096_bpe.model*"))
    finally:
        h.server.shutdown()


# ----------------------------------------------------------------------------- embedded sample
def test_build_sample_is_readable():
    data_path, tok_path = build_sample.ensure_sample(REPO)
    assert data_path == REPO / "data" / "datasets" / "stdlib_sp1024"
    assert tok_path == REPO / "data" / "tokenizers" / "stdlib_1024_bpe.model"
    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    assert sp.vocab_size() == 1024
    val, train = read_split(data_path, "val"), read_split(data_path, "train")
    assert len(val) >= 100_000 and len(train) > 3 * len(val) and val.max() < 1024 and train.max() < 1024
    assert val[0] == 1 and train[0] == 1 and sorted(data_path.glob("stdlib_train_*.bin"))[0].name == "stdlib_train_000000.bin"
    text = sp.decode(val[1:200].tolist())
    assert sum(c.isalpha() for c in text) > len(text) / 2  # English prose, not noise
    t = time.time()
    assert build_sample.ensure_sample(REPO) == (data_path, tok_path)  # valid outputs are reused, not rebuilt
    assert time.time() - t < 5


def test_a_sample_of_an_older_version_is_rebuilt(tmp_path, monkeypatch, capsys):
    """A cached sample built before duplicates were dropped (no sample_version in its manifest) is not reused."""
    data_path, tok_path = build_sample.ensure_sample(REPO)
    new_data, new_tok = build_sample.sample_paths(tmp_path)
    shutil.copytree(data_path, new_data)
    new_tok.parent.mkdir(parents=True)
    shutil.copy(tok_path, new_tok)
    manifest = json.loads((new_data / "manifest.json").read_text())
    assert manifest["meta"] == {"sample_version": build_sample.SAMPLE_VERSION} and build_sample.SAMPLE_VERSION >= 2
    assert build_sample._ready(new_data, new_tok) == (manifest, "")
    del manifest["meta"]  # as version 1 wrote it
    (new_data / "manifest.json").write_text(json.dumps(manifest))
    ready, why = build_sample._ready(new_data, new_tok)
    assert ready is None and why.startswith("built by an older build_sample.py (sample version 1, now ")
    calls = []
    monkeypatch.setattr(build_sample.prepare_text, "build_dataset", lambda *a, **k: calls.append(k) or {
        "tokens": {"train": 0, "val": 0}})
    assert build_sample.ensure_sample(tmp_path, progress=True) == (new_data, new_tok)
    assert len(calls) == 1 and calls[0]["meta"] == {"sample_version": build_sample.SAMPLE_VERSION}
    assert capsys.readouterr().out.startswith(f"rebuilding the sample data in {new_data}: built by an older")
