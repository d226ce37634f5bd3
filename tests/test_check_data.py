"""tools/check_data.py and data/overlap.py: validation documents that also occur in training, by exact token hash,
streamed shard by shard (documents may cross shard boundaries)."""
import numpy as np
import pytest

from conftest import ROOT
from data.common import BOS_ID, load_data_shard, write_shard
from data.overlap import documents, overlap
from test_logformats import tool


def _stream(docs):
    return np.concatenate([np.concatenate([[BOS_ID], d]) for d in docs]).astype(np.uint16)


def _write(folder, split, tokens, cuts):
    """The stream cut into shards at token positions `cuts` (not at BOS: documents cross shard boundaries)."""
    edges = [0, *cuts, len(tokens)]
    for i, (a, b) in enumerate(zip(edges, edges[1:])):
        write_shard(folder / f"synth_{split}_{i:06d}.bin", tokens[a:b])


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """10,000 random documents: 2,000 validation, 8,000 training (3 shards each side, cut mid-document)."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 1024, size=rng.integers(5, 60)).astype(np.uint16) for _ in range(10_000)]
    return docs[:2000], docs[2000:], tmp_path_factory


def _folder(synthetic, name, plant=None, near=None):
    val, train, factory = synthetic
    train = list(train)
    if plant is not None:
        train.insert(3100, val[plant])  # lands across a shard boundary below
    if near is not None:
        train.insert(5000, np.concatenate([val[near][:-1], [(int(val[near][-1]) + 1) % 1024 or 2]]).astype(np.uint16))
    d = factory.mktemp(name)
    vs, ts = _stream(val), _stream(train)
    _write(d, "val", vs, [len(vs) // 3, 2 * len(vs) // 3])
    cut = len(_stream(train[:3100])) + 3  # 3 tokens into the planted document
    _write(d, "train", ts, [len(ts) // 4, cut])
    return d


def test_documents_stream_across_shard_boundaries(synthetic):
    folder = _folder(synthetic, "stream")
    got = [t.tolist() for _, _, t in documents(sorted(folder.glob("*_val_*.bin")))]
    assert got == [d.tolist() for d in synthetic[0]]
    shards = sorted(folder.glob("*_train_*.bin"))
    assert sum(len(load_data_shard(s)) for s in shards) == len(_stream(synthetic[1]))
    assert [t.tolist() for _, _, t in documents(shards)] == [d.tolist() for d in synthetic[1]]


def test_finds_the_planted_duplicate_among_10000_documents(synthetic):
    folder = _folder(synthetic, "planted", plant=1234, near=77)
    r = overlap(sorted(folder.glob("*_train_*.bin")), sorted(folder.glob("*_val_*.bin")))
    assert (r["val_docs"], r["train_docs"]) == (2000, 8002)
    assert [h["index"] for h in r["hits"]] == [1234] and r["hits"][0]["train_index"] == 3100  # the near copy of 77 is not
    assert r["hits"][0]["train_shard"].endswith("synth_train_000001.bin")  # it starts in shard 1 and ends in shard 2
    rc, out, err = tool("check_data", folder)
    assert rc == 1 and "leak: validation document 1,234 (" in out and "is training document 3,100" in out
    assert out.rstrip().endswith("1 of 2,000 validation documents ({:,} tokens, {:.2f}% of validation tokens) also occur in "
                                 "training: LEAK".format(len(synthetic[0][1234]), 100 * len(synthetic[0][1234]) / sum(map(len, synthetic[0]))))


def test_reports_no_overlap_when_there_is_none(synthetic):
    folder = _folder(synthetic, "clean", near=5)
    rc, out, _ = tool("check_data", "--train", str(folder / "*_train_*.bin"), "--val", str(folder / "*_val_*.bin"))
    assert rc == 0 and out.rstrip().endswith("0 of 2,000 validation documents (0 tokens, 0.00% of validation tokens) also occur in "
                                             "training: no overlap")


def test_the_embedded_sample_agrees_with_an_independent_count():
    """On the embedded sample the check agrees with a plain set of token tuples (no hashing, the whole stream split at
    BOS): no validation document occurs in training."""
    data = ROOT / "data" / "datasets" / "stdlib_sp1024"
    if not data.is_dir():
        from data.build_sample import ensure_sample
        ensure_sample(ROOT)

    def docs(split):
        toks = np.concatenate([load_data_shard(p) for p in sorted(data.glob(f"*_{split}_*.bin"))]).tolist()
        starts = [i for i, t in enumerate(toks) if t == BOS_ID] + [len(toks)]
        return [tuple(toks[a + 1:b]) for a, b in zip(starts, starts[1:])]
    train = set(docs("train"))
    expected = [i for i, d in enumerate(docs("val")) if d and d in train]
    r = overlap(sorted(data.glob("*_train_*.bin")), sorted(data.glob("*_val_*.bin")))
    assert [h["index"] for h in r["hits"]] == expected
    assert expected == []  # build_sample drops duplicates; prepare_text checks what it wrote
    rc, out, _ = tool("check_data", data)
    assert rc == 0 and out.rstrip().endswith(f"0 of {r['val_docs']:,} validation documents (0 tokens, 0.00% of "
                                             "validation tokens) also occur in training: no overlap")


@pytest.mark.parametrize("args, message", [
    (["nowhere"], "nowhere is not a folder"),
    (["--train", "nothing_*.bin", "--val", "nothing_*.bin"], "no training shard matches nothing_*.bin"),
])
def test_bad_input_is_one_line(args, message):
    rc, out, err = tool("check_data", *args)
    assert rc == 1 and err == f"error: {message}" + err[len("error: ") + len(message):] and len(err.strip().splitlines()) == 1
    assert message in err
