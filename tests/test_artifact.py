"""Artifact format 4 (one blob per group, each in its smallest layout and codec), LQER, Hessian-aware SDClip and the
bits of each group."""
import struct

import pytest
import torch

import train_gpt as T
from data.common import UserError
from conftest import SHORT, metric, run_script


def small_hp(**kw):
    return T.Config(T.parse_hparams({"SMOKE": "1"}) | dict(NUM_LAYERS=2, MODEL_DIM=64, NUM_HEADS=2, NUM_KV_HEADS=1,
                    BIGRAM_VOCAB_SIZE=256, BIGRAM_DIM=16, VE_DIM=16, QUANT_MIN_NUMEL=1000, SKIP_GATES=1, **kw))


def case(**kw):
    """A randomized small model, Hessians from correlated inputs for every matrix that has one, and its entries."""
    hp = small_hp(**kw)
    torch.manual_seed(1)
    model = T.GPT(hp, embed_bits=hp["EMBED_BITS"])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(2)
    hs = {}
    for name, p in model.state_dict().items():
        if name in T.quant_kinds(model) and p.numel() > hp["QUANT_MIN_NUMEL"] and not name.startswith(("bigram.", "ve.")):
            X = torch.randn(3 * p.size(1), p.size(1), generator=g) @ torch.randn(p.size(1), p.size(1), generator=g)
            hs[name] = X.T @ X
    entries, originals = T.quantize_state(model.state_dict(), T.quant_kinds(model), hp, hs)
    return hp, model, entries, originals, hs


def with_lqer():
    hp, model, entries, originals, hs = case(LQER_RANK=2, LQER_TOP=2, SMALL_BITS=8, EMBED_BITS=7)
    T.add_lqer(entries, originals, hs, hp)
    return model, entries


def group_offsets(blob):
    """(start, end) of every group's blob in the file, after the header."""
    meta, _ = T.unpack_artifact(blob)
    n = struct.unpack_from("<I", blob, len(T.ARTIFACT_MAGIC) + 2)[0]
    off, out = len(T.ARTIFACT_MAGIC) + 10 + n, []
    for g in meta["groups"]:
        out.append((off, off + g[3]))
        off += g[3]
    assert off == len(blob)
    return out


@pytest.mark.parametrize("codec", T.CODECS)
@pytest.mark.parametrize("which", [0, 1])
def test_every_layout_and_codec_round_trips_bit_for_bit(codec, which):
    model, entries = with_lqer()
    pack = T.Packer(1)
    pack(entries, model.stored_config())
    kinds = {g: "float" if g.startswith("float") else "int" for g in pack.plan}
    assert {"int", "float"} == set(kinds.values()) and "lqer" in kinds
    pack.plan = {g: (T.LAYOUTS[k][which], codec) for g, k in kinds.items()}
    meta, back = T.unpack_artifact(pack(entries, model.stored_config()))
    assert {(g[1], g[2]) for g in meta["groups"]} == {(T.LAYOUTS[k][which], codec) for k in kinds.values()}
    assert [e["name"] for e in back] == [e["name"] for e in entries]
    for e, b in zip(entries, back):
        for k in T.array_specs(e):
            assert b[k].dtype == e[k].dtype and torch.equal(b[k], e[k]), (e["name"], k)
    want, got = T.dequantize(entries), T.dequantize(back)
    assert all(torch.equal(want[k], got[k]) for k in want)
    model.load_state_dict(got)


def test_each_group_gets_its_smallest_layout_and_codec_and_the_fit_reuses_the_choice():
    model, entries = with_lqer()
    pack = T.Packer(2)
    blob = pack(entries, model.stored_config())
    meta, _ = T.unpack_artifact(blob)
    members = {g[0]: g[4] for g in meta["groups"]}
    for g, layout, codec, n, mem in meta["groups"]:
        arrays = [entries[i][k] for i, k in mem]
        sizes = {(lay, c): len(T.compress(c, T.group_bytes(arrays, lay)))
                 for lay in T.LAYOUTS["float" if g.startswith("float") else "int"] for c in T.CODECS}
        assert n == min(sizes.values()) == sizes[layout, codec], g
    assert len(members) >= 8 and "int6:blocks.attn.q.weight" in members  # layers share a group: no layer numbers
    assert len(members["int6:blocks.attn.q.weight"]) == 2
    blobs = len(pack.blobs)
    changed = [dict(e) for e in entries]
    i = next(i for i, e in enumerate(entries) if e["name"] == "blocks.1.mlp.fc.weight")
    changed[i]["q"] = torch.where(changed[i]["q"].abs() == 1, 0, changed[i]["q"])
    again = pack(changed, model.stored_config())
    assert len(pack.blobs) == blobs + 1, "only the changed group is compressed again, with its first choice"
    assert T.unpack_artifact(again)[1][i]["q"].equal(changed[i]["q"])


def test_damage_in_any_group_or_truncation_at_any_boundary_is_refused_in_one_line():
    model, entries = with_lqer()
    blob = T.pack_artifact(entries, model.stored_config())
    spans = group_offsets(blob)
    for a, b in spans:
        bad = bytearray(blob)
        bad[(a + b) // 2] ^= 0x20
        with pytest.raises(T.UserError, match="corrupt") as e:
            T.unpack_artifact(bytes(bad), "x.ptz")
        assert "\n" not in str(e.value)
    for cut in [a for a, _ in spans] + [len(blob) - 1, 20, 5]:
        with pytest.raises(T.UserError, match="corrupt|truncated|not an artifact"):
            T.unpack_artifact(blob[:cut], "x.ptz")
    header = bytearray(blob)
    header[len(T.ARTIFACT_MAGIC) + 12] ^= 0xFF
    with pytest.raises(T.UserError, match="unreadable header"):
        T.unpack_artifact(bytes(header), "x.ptz")
    # a header altered into other valid JSON (here: one more layer) is caught by the checksum, which covers it
    h0 = len(T.ARTIFACT_MAGIC) + 10
    codec, (n, size) = T.CODECS[blob[h0 - 9]], struct.unpack_from("<II", blob, h0 - 8)
    text = T.decompress(codec, blob[h0:h0 + n], size).replace(b'"NUM_LAYERS":2', b'"NUM_LAYERS":3')
    packed = T.compress(codec, text)
    forged = blob[:h0 - 8] + struct.pack("<II", len(packed), len(text)) + packed + blob[h0 + n:]
    with pytest.raises(T.UserError, match="checksum mismatch"):
        T.unpack_artifact(forged, "x.ptz")


def test_an_artifact_without_a_setting_of_this_version_names_the_script_to_use(tmp_path):
    """Format 4 from before a switch existed (its configuration lacks the key): one line, not a KeyError."""
    model, entries = with_lqer()
    cfg = {k: v for k, v in model.stored_config().items() if k != "PARALLEL_LANES"}
    path = tmp_path / "old.ptz"
    path.write_bytes(T.pack_artifact(entries, cfg))
    with pytest.raises(T.UserError, match=r"written by an older train_gpt.py \(its configuration lacks PARALLEL_LANES\)"):
        T.read_artifact(str(path))


def test_an_older_format_names_the_script_to_use():
    old = b"PGOLFQZ\x01" + b"\x28\xb5\x2f\xfd" + bytes(64)  # format 3: magic ending in 1, then one zstd frame
    with pytest.raises(T.UserError, match=r"x.ptz has artifact format 3; this train_gpt.py reads format 4: score it "
                                          r"with the train_gpt.py that wrote it"):
        T.unpack_artifact(old, "x.ptz")


def test_lqer_corrects_the_worst_matrices_by_output_error_and_never_adds_error():
    hp, model, entries, originals, hs = case(LQER_RANK=4, LQER_TOP=3)
    err = {e["name"]: T.output_error(originals[e["name"]] - e["q"].float() * e["scale"].float()[:, None], hs[e["name"]])
           for e in entries if e["name"] in hs}
    line = T.add_lqer(entries, originals, hs, hp)
    fixed = [e for e in entries if "lqer" in e]
    assert {e["name"] for e in fixed} <= set(sorted(err, key=err.get, reverse=True)[:3]) and fixed, line
    assert line.startswith(f"lqer: rank:4 bits:4 corrected {len(fixed)} of 3")
    deq = T.dequantize(entries)
    for e in fixed:
        after = T.output_error(originals[e["name"]] - deq[e["name"]], hs[e["name"]])
        assert after < err[e["name"]], e["name"]
        assert e["lqer"] == 4 and e["la"].shape == (e["shape"][0], 4) and e["lb"].shape == (4, e["shape"][1])
        assert 0 <= int(e["la"].min()) and int(e["la"].max()) <= 15 and int(e["lb"].max()) <= 15
    # the full-rank, 7-bit correction of one matrix removes nearly all of its output error
    w, e = originals[fixed[0]["name"]], dict(fixed[0])
    f = T.lqer_fields(w, e, hs[e["name"]], T.Config(hp | {"LQER_RANK": 64, "LQER_BITS": 7}))
    assert T.output_error(w - e["q"].float() * e["scale"].float()[:, None] - T.lqer_product(f), hs[e["name"]]) < 0.05 * err[e["name"]]


def test_asymmetric_factor_rounding_is_within_half_a_step():
    x = torch.randn(8, 50) * torch.rand(8, 1) + torch.randn(8, 1)
    q, s, z = T.quantize_asym(x, 4)
    assert q.dtype == torch.int8 and int(q.min()) >= 0 and int(q.max()) <= 15
    assert ((T.dequant_asym(q, s, z) - x).abs() <= s.float()[:, None] * 0.5 + 1e-3 * x.abs().max()).all()


def test_grouped_factor_rounding_keeps_one_scale_per_group_and_round_trips_through_the_file():
    """LQER_GROUP: one scale and zero per N consecutive values of a factor (within half a step of each value), the
    header says so, and the file restores the factors and the corrected weights exactly."""
    x = torch.randn(64, 4) * 3
    q, s, z = T.quantize_asym(x, 4, 16)
    assert q.shape == x.shape and s.shape == z.shape == (16,)
    assert ((T.dequant_asym(q, s, z) - x).abs().view(16, 16) <= s.float()[:, None] * 0.5 + 1e-3 * x.abs().max()).all()
    hp, model, entries, originals, hs = case(LQER_RANK=4, LQER_TOP=2, LQER_GROUP=64)
    T.add_lqer(entries, originals, hs, hp)
    fixed = [e for e in entries if "lqer" in e]
    assert fixed and all(e["lqer_group"] == 64 and e["la_s"].numel() == e["la"].numel() // 64 for e in fixed)
    meta, back = T.unpack_artifact(T.pack_artifact(entries, {"x": 1}))
    for k, v in T.dequantize(back).items():
        assert torch.equal(v, T.dequantize(entries)[k]), k
    per_row = case(LQER_RANK=4, LQER_TOP=2)
    T.add_lqer(per_row[2], per_row[3], per_row[4], per_row[0])
    assert sum(e["la_s"].numel() + e["lb_s"].numel() for e in per_row[2] if "lqer" in e) > 2 * sum(
        e["la_s"].numel() + e["lb_s"].numel() for e in fixed)  # fewer scale bytes than per row


def test_hessian_aware_sdclip_widens_the_clip_of_rows_that_feed_on_busy_inputs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    H = torch.diag(torch.rand(64, generator=g) * 4)
    m = T.sdclip_rows(w, H, 0.175)
    r = w.abs() @ H.diagonal()
    assert torch.allclose(m, 1 + 0.175 * (r / r.mean() - 1)) and abs(float(m.mean()) - 1) < 1e-6
    assert torch.equal(T.sdclip_rows(w, H, 0.0), torch.ones(32))
    hp0, hp1 = (small_hp(QUANT_SCALE="sdclip", QUANT_METHOD="gptq", SDCLIP_LAMBDA=lam) for lam in (0.0, 0.175))
    s0, s1 = T.quant_fields(w, 6, hp0, H)["scale"].float(), T.quant_fields(w, 6, hp1, H)["scale"].float()
    assert torch.equal(s0, T.row_scales(w, 6, [hp0["SDCLIP_K"]], "std")[0, :, 0])
    assert torch.equal(s1, T.row_scales(w, 6, [hp0["SDCLIP_K"]], "std", m)[0, :, 0])
    busy = r > r.mean()
    assert (s1[busy] >= s0[busy]).all() and (s1[~busy] <= s0[~busy]).all() and int((s1 != s0).sum()) > 24  # fp16 ties
    assert torch.equal(T.quant_fields(w, 6, hp1)["scale"], T.quant_fields(w, 6, hp0)["scale"]), "no Hessian: plain SDClip"


def test_bits_per_group_tied_embedding_and_small_matrices():
    hp, model, entries, _, _ = case(EMBED_BITS=7, SMALL_BITS=8, QUANT_SCALE="sdclip")
    by = {e["name"]: e for e in entries}
    tok = by["tok_emb.weight"]
    assert tok["scheme"] == "int7" and int(tok["q"].abs().max()) <= 63
    w = model.tok_emb.weight.detach()
    assert torch.equal(tok["scale"], T.row_scales(w, 7, [hp["SDCLIP_K_EMBED"]], "std")[0, :, 0].half()), "the table's own k"
    model.set_qat(hp)
    assert model.tok_emb.qspec == ("std", [hp["SDCLIP_K_EMBED"]]) and model.blocks[0].attn.q.qspec == ("std", [hp["SDCLIP_K"]])
    small = [e for e in entries if len(e["shape"]) == 2 and e["name"] not in T.quant_kinds(model)]
    assert {e["name"] for e in small} >= {"skip_weights", "skip_gates"} and all(e["scheme"] == "int8" for e in small)
    for e in small:
        orig = model.state_dict()[e["name"]]
        assert ((e["q"].float() * e["scale"].float()[:, None] - orig).abs() <= e["scale"].float()[:, None] * 0.51).all()
    assert all(e["scheme"] == "fp32" for e in entries if len(e["shape"]) < 2)
    _, _, plain, _, _ = case()
    assert {e["name"]: e["scheme"] for e in plain}["skip_gates"] == "fp16"


def test_every_export_switch_end_to_end_and_eval_only_reproduces_it(sample_data, tmp_path):
    """LQER, Hessian-aware SDClip, an int7 embedding and int8 small matrices in one short run; EVAL_ONLY rebuilds the
    same weights from the file alone: the same round-trip score to the last digit. The log reports the size forecast's
    error and the export's phases."""
    env = SHORT | dict(LQER_RANK=2, LQER_TOP=2, QUANT_SCALE="sdclip", SDCLIP_LAMBDA=0.175, EMBED_BITS=7, SMALL_BITS=8,
                       SKIP_GATES=1)
    rc, _, err, log = run_script(env, tmp_path / "train")
    assert rc == 0, err[-2000:]
    lines = log.split("\n==== end of code ====\n", 1)[1].splitlines()
    lq = next(l for l in lines if l.startswith("lqer: rank:2 bits:4 corrected "))
    assert not lq.startswith("lqer: rank:2 bits:4 corrected 0"), lq
    forecast = next(l for l in lines if l.startswith("size_forecast:"))
    total = int(next(l for l in lines if l.startswith("total_submission_bytes:")).split()[0].split(":")[1])
    err_line = next(l for l in lines if l.startswith("size_forecast_error:"))
    assert f"forecast:{forecast.split()[0].split(':')[1]} final:{total} " in err_line
    assert next(l for l in lines if l.startswith("export_seconds: quantize:")).count(":") == 6
    meta, back = T.unpack_artifact((tmp_path / "train" / "run.ptz").read_bytes())
    assert {e["scheme"] for e in back if e["name"] in ("tok_emb.weight", "skip_gates")} == {"int7", "int8"}
    assert sum("lqer" in m for m in meta["tensors"]) == int(lq.split("corrected ")[1].split()[0])
    rc, _, err, log2 = run_script({"EVAL_ONLY": 1, "ARTIFACT": tmp_path / "train" / "run.ptz", "VAL_MAX_TOKENS": 4096},
                                  tmp_path / "eval")
    assert rc == 0, err[-2000:]
    assert metric(log2, "final_roundtrip_exact") == metric(log, "final_roundtrip_exact")


def test_bytes_report_accounts_for_every_byte_of_the_file(short_run, capsys):
    from tools import bytes_report
    assert bytes_report.main([str(short_run["artifact"]), "--workers", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    size = short_run["artifact"].stat().st_size
    rows = [l.split() for l in out if l.startswith(("int", "float", "lqer"))]
    header = int(next(l for l in out if l.startswith("header")).split()[-1].replace(",", ""))
    assert sum(int(r[-1].replace(",", "")) for r in rows) + header == size
    for r in rows:  # the chosen size is the smallest codec's
        assert int(r[-1].replace(",", "")) == min(int(x.replace(",", "")) for x in r[2:5] if x != "-")
    line = next(l for l in out if l.startswith("per group (format 4, this file):"))
    assert int(line.split(":")[1].split()[0].replace(",", "")) == size
    with pytest.raises(UserError, match="not both, not neither"):
        bytes_report.main([])
    with pytest.raises(UserError, match="does not exist"):
        bytes_report.main(["nowhere.ptz"])
