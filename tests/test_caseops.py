"""Issue 25 (1): the CaseOps transform (data/caseops.py), prepare_text --caseops and its validation byte sidecar, and
val_bpb charged on the original UTF-8 bytes through that sidecar in train_gpt.py."""
import gzip
import json
import math
import random

import numpy as np
import pytest
import torch

import train_gpt as T
from conftest import SHARED, metric, run_script
from data import caseops as C
from data import prepare_text
from data.common import SHARD_HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, load_data_shard, write_shard

CAP, RUN, ESC = C.CAP, C.RUN, C.ESC

# Documents built to break a case transform: capitals in every position and mix, letters whose case mapping is not a
# single round-tripping code point, context-dependent lower-casing (final sigma), whitespace before capitals, the
# marker characters themselves and other private-use and edge code points, astral scripts with case.
HARD = [
    "", " ", "\n", "A", "a", "I", "Hello", "hello", "HELLO", "Hello World", "HELLO WORLD", "hello WORLD",
    "HeLLo WoRLD", "iPhone", "eBay", "McDonald's", "O'NEILL", "HTTPServer", "XMLHttpRequest", "ABCdef", "abcDEF",
    "aBcDeF", "NASA's 2nd LAUNCH", "U.S.A.", "A.B.C. D-E-F", "ABC123DEF", "A1B2C3", "R2-D2 C-3PO", "I/O", "CO2 H2O",
    "CamelCaseStringWITHAcronym", "SNAKE_CASE_CONSTANT", "WWW.EXAMPLE.COM/Path?Q=1",
    "Straße", "STRASSE", "STRAẞE", "ß", "ẞ", "ﬁ", "ﬁLE", "ǅ", "Ǆ", "ǆ", "ǅemal ǄEMAL", "İstanbul", "İ", "ı",
    "ISTANBUL ıstanbul", "I\u0307", "ΟΔΟΣ", "οδος", "ΟΔΟς", "Σ", "σ", "ς", "ΣΑΣ σας", "Ἀθῆναι ἈΘΗΝΑΙ", "ᾼ ᾳ ΑΙ",
    "K Kelvin K", "Å Ångström", "µ Μ μ", "ſ S s", "Ⅻ ⅻ", "Ⓐⓑ", "Ꭰꭰ Cherokee", "ᲠᲔ ა", "𐐀𐐨 Deseret 𐐀𐐀",
    "𞤀𞤢 Adlam", "Ⱥⱥ Ⱦⱦ", "ȺȺȺ", "ɐ Ɐ", "Ĳssel ĲSSEL", "ÆSIR Æsir", "Œuvre ŒUVRE", "Ñandú ÑANDÚ", "e\u0301 E\u0301 É",
    "\ue010", "\ue011", "\ue012", "\ue010\ue011\ue012", "\ue012\ue012", "\ue010Hello", "HELLO\ue011", "a\ue012",
    "\ue012A", "\ue012 A", "\ue011 ABC", "\ue000\uf8ff\ue013 PUA", "\U000F0000\U0010FFFD planes 15 and 16",
    "\ud7ff\ue000\uf8ff\ufffd\uffff", "  leading spaces Hello", "trailing Hello  ", "a\t\tB\n\nC\r\nD", "\x0b\x0cX",
    "tab\tCAPS\tRUN", "line\nStart", "\u00a0Nbsp", "\u2003Em space", "\u200bZero width", "ʻOkina", "x\u0345",
    "😀 Emoji CAPS 👍🏽", "中文 English 日本語", "Ελληνικά ΕΛΛΗΝΙΚΆ", "РУССКИЙ Русский", "עברית", "العربية",
    "A" + " " * 3000 + "B", "X" * 1000, "Ab" * 500, " \n\t" * 200 + "Z",
]


def test_hard_cases_round_trip_and_keep_their_bytes():
    assert len(HARD) >= 60
    for t in HARD:
        e = C.encode(t)
        assert C.decode(e) == t, t
        assert int(C.char_bytes(e).sum()) == len(t.encode("utf-8")), t
        assert not set(e) & set(C.LOWER), t  # every lowerable capital is lowered


def test_the_transform_as_designed():
    assert C.encode("Hello World") == CAP + "hello" + CAP + " world"  # the marker goes before the space
    assert C.encode("NASA launched") == RUN + "nasa launched"
    assert C.encode("NASA's") == RUN + "nasa's"
    assert C.encode("HTTPServer") == "".join(CAP + c for c in "http") + CAP + "server"  # caps that do not end the run
    assert C.encode("iPhone") == "i" + CAP + "phone"
    assert C.encode("a\n\n  B") == "a" + CAP + "\n\n  b"
    assert C.encode("ΟΔΟΣ οδος") == RUN + "οδοσ οδος"  # capital sigma is always σ; ς stays
    assert C.encode("Straße ß İ ı ǅ ﬁ") == CAP + "straße ß İ ı ǅ ﬁ"  # no single round-tripping lower case: kept
    assert C.encode("ÀÉ Ⱥ") == RUN + "àé" + CAP + " ⱥ"
    assert C.encode(CAP + RUN + ESC + "\ue013") == ESC + CAP + ESC + RUN + ESC + ESC + "\ue013"  # only markers escaped
    for c in "ßİıǅſµ\u212a\u212bᾼ":
        assert c not in C.LOWER and c not in C.UPPER
    assert all(u.lower() == l and l.upper() == u and len(u) == len(l) == 1 for u, l in C.LOWER.items())
    # a lowered letter may have another UTF-8 length than its capital: charged the capital's
    assert C.char_bytes(C.encode("Ⱥ")).tolist() == [0, 2] and len("ⱥ".encode()) == 3


def random_text(rng: random.Random, n: int) -> str:
    pools = [
        lambda: rng.choice("abcxyzABCXYZ"),
        lambda: rng.choice(" \t\n\r\x0b\x0c"),
        lambda: rng.choice(C.MARKERS),
        lambda: rng.choice(".,'-0123456789"),
        lambda: chr(rng.randrange(0xE000, 0xF900)),  # private use
        lambda: rng.choice("\ud7ff\ue000\uf8ff\ufffd\ufffe\uffff\u0000\u200b\u00a0\u0301\u0345"),  # edges; surrogates excluded
        lambda: chr(rng.randrange(0x10000, 0x110000)),  # astral planes (including plane 15/16 private use)
        lambda: rng.choice(UPPERS),
        lambda: rng.choice(LOWERS),
        lambda: rng.choice("ßẞİıǅǄǆſµ\u212a\u212bΣσςᾼᾳ𐐀𐐨Ⱥⱥﬁ"),
        lambda: chr(rng.randrange(0x80, 0xD800)),
    ]
    return "".join(rng.choice(pools)() for _ in range(n))


UPPERS, LOWERS = sorted(C.LOWER), sorted(C.UPPER)


def test_random_unicode_round_trips():
    rng = random.Random(25)
    for _ in range(3000):
        t = random_text(rng, rng.randrange(0, 40))
        e = C.encode(t)
        assert C.decode(e) == t, ascii(t)
        assert int(C.char_bytes(e).sum()) == len(t.encode("utf-8")), ascii(t)


def test_decode_takes_any_text_and_char_bytes_follow_it():
    """decode() of arbitrary text (dangling markers, ESC at the end) never fails, and char_bytes always sums to the
    UTF-8 length of what decode() returns: the two read the text the same way."""
    rng = random.Random(7)
    for _ in range(2000):
        s = "".join(rng.choice([CAP, RUN, ESC, " ", "\n", "a", "b", "ⱥ", "ß", "A", "\ue013"]) for _ in range(rng.randrange(12)))
        assert int(C.char_bytes(s).sum()) == len(C.decode(s).encode("utf-8")), ascii(s)
    assert C.decode(CAP) == C.decode(ESC) == "" and C.decode(RUN + " ") == " " and C.decode(CAP + "1") == "1"


@pytest.fixture(scope="module")
def stdlib_docs():
    from data.build_sample import stdlib_docstrings
    return stdlib_docstrings()


def test_embedded_sample_round_trips(stdlib_docs):
    assert len(stdlib_docs) > 1000
    enc = [C.encode(d) for d in stdlib_docs]
    assert [C.decode(e) for e in enc] == stdlib_docs
    assert [int(C.char_bytes(e).sum()) for e in enc] == [len(d.encode("utf-8")) for d in stdlib_docs]
    assert sum(e.count(CAP) + e.count(RUN) for e in enc) > 10_000  # the sample has capitals to lower


def test_shared_corpus_round_trips():
    corpus = SHARED / "corpus" / "nlp_corpus_docs.jsonl.gz"
    if not corpus.exists():
        pytest.skip("../shared corpus not present")
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    enc = [C.encode(d) for d in docs]
    assert [C.decode(e) for e in enc] == docs
    assert [int(C.char_bytes(e).sum()) for e in enc] == [len(d.encode("utf-8")) for d in docs]


# ---------------------------------------------------------------- a --caseops build and its byte sidecar
@pytest.fixture(scope="module")
def build(stdlib_docs, tmp_path_factory):
    """prepare_text --caseops on the HARD documents (validation) + 1,500 sample docstrings (training)."""
    tmp = tmp_path_factory.mktemp("caseops")
    val = [d for d in HARD if d.strip()]
    normalize = prepare_text.normalizer()
    seen, val_docs = set(), []  # what the build keeps: duplicates (as the tokenizer normalizes) dropped
    for d in val:
        k = prepare_text.text_key(C.encode(d), normalize)
        if k not in seen:
            seen.add(k)
            val_docs.append(d)
    inp = tmp / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": d}) + "\n" for d in val + stdlib_docs[:1500]), encoding="utf-8")
    out = tmp / "co_sp512"
    assert prepare_text.main([str(inp), "--out", str(out), "--caseops", "--vocab-size", "512", "--val-docs",
                              str(len(val_docs)), "--shard-tokens", "1000", "--workers", "1", "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    return dict(out=out, manifest=manifest, val_docs=val_docs, tok=out / "tokenizer.model")


def test_sidecar_layout_and_per_document_bytes(build):
    out, manifest, docs = build["out"], build["manifest"], build["val_docs"]
    vals, sides = manifest["shards"]["val"], manifest["shards"]["val_bytes"]
    assert len(vals) == len(sides) > 1  # several shards, cut alike
    assert [s["file"] for s in sides] == [v["file"].replace("_val_", "_val_bytes_") for v in vals]
    for v, s in zip(vals, sides):
        raw = (out / s["file"]).read_bytes()
        header = np.frombuffer(raw[:4 * SHARD_HEADER_INTS], dtype="<i4")
        assert header[:3].tolist() == [SHARD_MAGIC, SHARD_VERSION, v["tokens"]] and not header[3:].any()
        assert len(raw) == 4 * SHARD_HEADER_INTS + 2 * v["tokens"] == s["tokens"] * 2 + 1024
    toks = np.concatenate([load_data_shard(out / v["file"]) for v in vals]).astype(np.int64)
    nbytes = np.concatenate([load_data_shard(out / s["file"]) for s in sides]).astype(np.int64)
    starts = np.flatnonzero(toks == T.BOS_ID).tolist()
    assert len(starts) == len(docs) == manifest["docs"]["val"] and starts[0] == 0
    per_doc = [int(nbytes[a:b].sum()) for a, b in zip(starts, starts[1:] + [len(toks)])]
    assert per_doc == [len(d.encode("utf-8")) for d in docs]
    assert manifest["caseops"]["val_original_bytes"] == sum(per_doc)
    assert not nbytes[starts].any()  # BOS: 0
    # markers: 0 bytes, except a marker character that was in the text (escaped): its own 3
    ids = {m: i for i, m in zip((4, 5, 6), C.MARKERS)}
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(build["tok"]))
    assert [sp.piece_to_id(m) for m in C.MARKERS] == list(ids.values())
    is_marker = np.isin(toks, list(ids.values()))
    escaped = sum(d.count(m) for d in docs for m in C.MARKERS)
    assert is_marker.sum() > 100 and set(nbytes[is_marker].tolist()) == {0, 3}
    assert int((nbytes[is_marker] == 3).sum()) == escaped > 0
    assert prepare_text.verify_dataset(out)["caseops"]["unicode"] == C.UNICODE_VERSION


def test_token_bytes_sum_to_the_original_bytes(build, stdlib_docs):
    """Through the tokenizer's offsets, for the HARD documents, random text and sample documents, with and without
    byte fallback: every document with a token sums to its original UTF-8 length, and markers count 0."""
    import sentencepiece as spm
    plain = spm.SentencePieceProcessor(model_file=str(build["tok"]))
    bf = spm.SentencePieceProcessor(model_proto=prepare_text.train_tokenizer(
        (C.encode(d) for d in stdlib_docs[:300]), 400, byte_fallback=True, progress=False, user_symbols=C.MARKERS))
    rng = random.Random(3)
    docs = [d for d in HARD if d.strip()] + [random_text(rng, 30) for _ in range(300)] + stdlib_docs[-200:]
    for sp in (plain, bf):
        checked = 0
        for d in docs:
            e = C.encode(d)
            m = sp.encode(e, out_type="offset_mapping")
            got = C.token_bytes(e, m["offsets"])
            assert len(got) == len(m["ids"]) and (got >= 0).all()
            if len(got):
                checked += 1
                assert int(got.sum()) == len(d.encode("utf-8")), ascii(d)
                w = C.char_bytes(e)
                starts_marker = [b < len(e) and w[b] == 0 for b, _ in m["offsets"]]
                assert not got[starts_marker].any(), ascii(d)
        assert checked > len(docs) - 20


def test_caseops_needs_a_tokenizer_with_the_markers(sample_data, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("One doc\n\nTwo Doc\n\nThree\n", encoding="utf-8")
    rc = prepare_text.main([str(tmp_path / "a.txt"), "--out", str(tmp_path / "x_sp"), "--caseops", "--tokenizer",
                            str(sample_data[1]), "--val-docs", "1", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "CaseOps markers" in err[0] and "--caseops" in err[0]
    assert not (tmp_path / "x_sp").exists()


# ---------------------------------------------------------------- val_bpb through the sidecar
def dyadic_forward(x, y):
    """Per-target "losses" that are multiples of 1/8: float64 sums of them are exact in any order."""
    return ((y * 7 + x * 3) % 13 + 1).double() / 8


def test_bpb_through_the_sidecar_is_the_loss_over_the_original_bytes_per_document(build):
    hp = T.resolve_config({"SMOKE": "1", "DATA_PATH": str(build["out"]), "TOKENIZER_PATH": str(build["tok"])})
    val = T.load_validation(hp, torch.device("cpu"))
    assert val.sidecar is not None and len(val.sidecar) == len(val.tokens)
    toks, n = val.tokens.long(), len(val.tokens)
    starts = (toks == T.BOS_ID).nonzero().flatten().tolist()
    ends = starts[1:] + [n]
    L = max(b - a for a, b in zip(starts, ends)) + 1
    assert L < n - 1
    nll = dyadic_forward(toks[:-1], toks[1:])  # the loss of target p is nll[p - 1]
    for k, (a, b, doc) in enumerate(zip(starts, ends, build["val_docs"])):
        if b - a < 2:
            continue
        s = min(a, n - 1 - L)  # one window holding the document's targets a+1 .. b-1
        windows = (torch.tensor([s]), torch.tensor([a - s]), torch.tensor([b - 1 - s]))
        sums = T.eval_sums(T.Context(), dyadic_forward, val, L, L, 1, windows=windows)
        loss, bpb, count = T.metrics(T.Context(), sums)
        want_loss = float(nll[a:b - 1].sum())  # exact: dyadic values
        assert count == b - a - 1 and sums[0].item() == want_loss
        assert sums[1].item() == len(doc.encode("utf-8")), k  # the document's original bytes, exactly
        assert bpb == want_loss / math.log(2) / len(doc.encode("utf-8")), k
    # the whole split: the same
    _, bpb, _ = T.evaluate(T.Context(), dyadic_forward, val, 64, 16, 4)
    assert bpb == float(nll.sum()) / math.log(2) / sum(len(d.encode("utf-8")) for d in build["val_docs"])
    # the tables would have charged the normalized transformed pieces instead (markers 3 bytes each, whitespace runs
    # collapsed): another number
    _, bpb_luts, _ = T.evaluate(T.Context(), dyadic_forward, T.Validation(val.tokens, val.luts, n), 64, 16, 4)
    assert abs(bpb_luts / bpb - 1) > 0.01


@pytest.fixture(scope="module")
def sample_val(sample_data):
    hp = T.resolve_config({"SMOKE": "1"})
    val = T.load_validation(hp, torch.device("cpu"))
    assert val.sidecar is None  # the sample has no sidecar: the tables count
    v = val.tokens[:500]
    base, lead, bound = val.luts
    side = torch.zeros(len(v), dtype=torch.int32)
    side[1:] = (base[v[1:]] + (lead[v[1:]] & ~bound[v[:-1]])).int()  # what the tables give, per position
    return hp, v, val.luts, side


def test_sidecar_positions_line_up_in_sliding_eval_and_doc_ttt(sample_val):
    """A sidecar holding exactly what the tables give reproduces the table scores bit for bit, in the sliding eval
    and in TTT=doc (whose windows index targets differently); shifted by one position it does not."""
    from test_ttt import doc_hp, noisy_model
    hp, v, luts, side = sample_val
    plain, with_side = T.Validation(v, luts, len(v)), T.Validation(v, luts, len(v), side)
    shifted = T.Validation(v, luts, len(v), torch.roll(side, 1))
    fwd = lambda x, y: dyadic_forward(x, y).float()  # noqa: E731
    ref = T.eval_sums(T.Context(), fwd, plain, 128, 32, 3)
    assert torch.equal(T.eval_sums(T.Context(), fwd, with_side, 128, 32, 3), ref)
    assert not torch.equal(T.eval_sums(T.Context(), fwd, shifted, 128, 32, 3), ref)
    dhp = doc_hp()
    ref = T.ttt_doc(dhp, T.Context(), noisy_model(dhp), plain)
    assert T.ttt_doc(dhp, T.Context(), noisy_model(dhp), with_side) == ref
    assert T.ttt_doc(dhp, T.Context(), noisy_model(dhp), shifted)[1] != ref[1]


def test_sidecar_must_match_the_shards(tmp_path):
    toks = [np.array([1, 5, 6, 7], dtype=np.uint16), np.array([1, 9], dtype=np.uint16)]
    for i, t in enumerate(toks):
        write_shard(tmp_path / f"x_val_{i:06d}.bin", t)
    files = [str(tmp_path / f"x_val_{i:06d}.bin") for i in range(2)]
    assert T.val_byte_sidecar(files) is None
    write_shard(tmp_path / "x_val_bytes_000000.bin", np.array([0, 1, 2, 3], dtype=np.uint16))
    with pytest.raises(T.UserError, match=r"x_val_000001.bin has no byte sidecar .*x_val_bytes_000001.bin"):
        T.val_byte_sidecar(files)
    write_shard(tmp_path / "x_val_bytes_000001.bin", np.array([0, 1, 2], dtype=np.uint16))
    with pytest.raises(T.UserError, match=r"x_val_bytes_000001.bin has 3 values but .*x_val_000001.bin has 2 tokens"):
        T.val_byte_sidecar(files)
    write_shard(tmp_path / "x_val_bytes_000001.bin", np.array([0, 4], dtype=np.uint16))
    assert T.val_byte_sidecar(files) == [f.replace("_val_", "_val_bytes_") for f in files]
    hp = {"DATA_PATH": str(tmp_path), "SMOKE": 0}
    assert T.shard_files(hp, "val") == files  # the sidecar is not a token shard


def test_train_gpt_uses_the_sidecar_end_to_end(build, tmp_path):
    rc, out, err, log = run_script({"DATA_PATH": build["out"], "TOKENIZER_PATH": build["tok"], "ITERATIONS": 3,
                                    "VAL_MAX_TOKENS": 2048, "EVAL_STRIDE": 0}, tmp_path)
    assert rc == 0, err[-2000:]
    assert " val_bytes:sidecar " in log and "val_bytes:sidecar" in out
    assert math.isfinite(metric(log, "final_roundtrip_exact"))


# ---------------------------------------------------------------- the published CaseOps dataset
def test_download_fetches_the_caseops_dataset_with_its_sidecar(tmp_path, capsys, monkeypatch):
    """--variant sp8192_lossless_caps_caseops_v1_reserved reads romeerp/parameter-golf-caseops-v1 (a fake hub here) and
    fetches fineweb_val_bytes_NNNNNN.bin beside each validation shard, checked like a shard."""
    from data import cached_challenge_fineweb as dl
    from test_data import FakeHub, shard_bytes
    variant, repo = "sp8192_lossless_caps_caseops_v1_reserved", "romeerp/parameter-golf-caseops-v1"
    name, base = f"fineweb10B_{variant}", f"/datasets/{repo}/resolve/main/datasets"
    manifest = {"shard_size": 1000, "tokenizers": [{"name": "t", "model_path": "tokenizers/caseops.model"}],
                "datasets": [{"name": name, "tokenizer_name": "t", "val_bytes_glob": "/x/fineweb_val_bytes_*.bin",
                              "stats": {"files_train": 1, "files_val": 2, "tokens_train": 500, "tokens_val": 1600}}]}
    d = f"{base}/datasets/{name}"
    files = {f"{base}/manifest.json": json.dumps(manifest).encode(), f"{base}/tokenizers/caseops.model": b"m" * 50,
             f"{d}/fineweb_val_000000.bin": shard_bytes(tmp_path, 1000, 0, 8192),
             f"{d}/fineweb_val_000001.bin": shard_bytes(tmp_path, 600, 1, 8192),
             f"{d}/fineweb_val_bytes_000000.bin": shard_bytes(tmp_path, 1000, 2, 9),
             f"{d}/fineweb_val_bytes_000001.bin": shard_bytes(tmp_path, 600, 3, 9),
             f"{d}/fineweb_train_000000.bin": shard_bytes(tmp_path, 500, 4, 8192)}
    h = FakeHub(files)
    monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("PG_DATA_REPO", raising=False)
    monkeypatch.setattr(dl, "RETRY_WAIT", 0.0)
    try:
        assert dl.main(["--data-dir", str(tmp_path / "a"), "-q", "--variant", variant, "--train-shards", "1"]) == 0
        got = tmp_path / "a" / "datasets" / name
        assert sorted(p.name for p in got.iterdir()) == sorted(f.rsplit("/", 1)[1] for f in files if f.startswith(d))
        for f in got.iterdir():
            assert f.read_bytes() == files[f"{d}/{f.name}"]
        assert T.val_byte_sidecar(T.shard_files({"DATA_PATH": str(got), "SMOKE": 0}, "val")) is not None
        files[f"{d}/fineweb_val_bytes_000001.bin"] = shard_bytes(tmp_path, 599, 3, 9)  # one value short
        h.files = files
        assert dl.main(["--data-dir", str(tmp_path / "b"), "-q", "--variant", variant, "--train-shards", "0"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "fineweb_val_bytes_000001.bin" in err[0], err
    finally:
        h.server.shutdown()
