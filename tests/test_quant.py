"""Issue 4: one quantizer for training and export, late QAT that runs under torch.compile, and the size budget."""
import copy

import pytest
import torch

import train_gpt as T
from conftest import SHORT, run_script


def small_hp(**kw):
    return T.Config(T.parse_hparams({"SMOKE": "1"}) | dict(NUM_LAYERS=2, MODEL_DIM=64, NUM_HEADS=2, NUM_KV_HEADS=1,
                    BIGRAM_VOCAB_SIZE=256, BIGRAM_DIM=16, VE_DIM=16, QUANT_MIN_NUMEL=1000, **kw))


def randomized(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def quantized_copy(model, hp):
    """An uncompiled copy whose exported matrices hold Q(w): what the artifact will contain."""
    ref = copy.deepcopy(model)
    ref.set_qat(None)
    entries, _ = T.quantize_state(model.state_dict(), T.quant_kinds(model), hp)
    deq = T.dequantize(entries)
    with torch.no_grad():
        for e in entries:
            if "q" in e:
                ref.get_parameter(e["name"]).copy_(deq[e["name"]])
    return ref


def test_qat_switch_under_torch_compile_takes_effect_without_recompiling():
    torch._dynamo.reset()
    hp = small_hp()
    model = randomized(T.GPT(hp))
    model.set_qat(hp)
    float_ref, quant_ref = copy.deepcopy(model), quantized_copy(model, hp)
    float_ref.set_qat(None)
    frames = {"n": 0}

    def counting_backend(gm, example_inputs):
        frames["n"] += 1
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(model, backend=counting_backend, dynamic=False)
    ids = torch.randint(0, 1024, (2, 32))
    with torch.no_grad():
        before = compiled(ids, ids, per_token=True)
        torch.testing.assert_close(before, float_ref(ids, ids, per_token=True), atol=2e-5, rtol=1e-5)
        n = frames["n"]
        model.switch(qat=True)
        after = compiled(ids, ids, per_token=True)
        assert frames["n"] == n, "flipping QAT recompiled the model"
        torch.testing.assert_close(after, quant_ref(ids, ids, per_token=True), atol=2e-5, rtol=1e-5)
        assert (after - before).abs().max() > 1e-4  # the fake-quantization really ran
        model.switch(qat=False)
        torch.testing.assert_close(compiled(ids, ids, per_token=True), before)
    assert frames["n"] == n


def test_fake_quant_gradient_is_straight_through():
    w = torch.randn(8, 32, requires_grad=True)
    on = torch.tensor(True)
    out = T.fake_quant(w, 6, ("amax", [1.0, 0.9]), on)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    q, s, _ = T.quantize_rows(w, 6, [1.0, 0.9])
    assert torch.equal(out.detach(), q.float() * s.float()[:, None])


def test_zero_row_stays_finite_in_qat_and_export():
    w = torch.zeros(4, 16)
    w[1] = torch.randn(16)
    for on in (True, False):
        assert torch.isfinite(T.fake_quant(w, 6, ("amax", [1.0, 0.95]), torch.tensor(on))).all()
    q, s, _ = T.quantize_rows(w, 6, [1.0])
    assert (q[0] == 0).all() and s[0] > 0 and torch.isfinite(s.float()).all()


def test_clip_search_picks_least_error_and_is_deterministic():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    w[0, 0] = 40.0  # a lone far outlier: clipping it costs more than the finer grid saves
    cl = [1.0, 0.97, 0.9, 0.5]
    q, s, best = T.quantize_rows(w, 6, cl)
    err = lambda q_, s_: (q_.float() * s_.float()[:, None] - w).square().sum(1)
    for i, c in enumerate(cl):
        qi, si, _ = T.quantize_rows(w, 6, [c])
        assert (err(q, s) <= err(qi, si) + 1e-6).all()
    assert (best > 0).any()  # Gaussian rows often prefer a clip just below their max
    q2, s2, best2 = T.quantize_rows(w.clone(), 6, cl)
    assert torch.equal(q, q2) and torch.equal(s, s2) and torch.equal(best, best2)


def test_qat_from_start_matches_roundtrip(sample_data, monkeypatch, tmp_path):
    """QAT on from step 0, EMA off, rounding to nearest (GPTQ would round differently from the training quantizer):
    the fake-quantized model IS the exported model, so their BPB agree to float noise."""
    for k, v in dict(SMOKE="1", LOG_DIR=str(tmp_path), RUN_ID="qat", QAT_THRESHOLD="1", EMA_DECAY="0", ITERATIONS="12",
                     QUANT_METHOD="rtn",
                     EVAL_STRIDE="0", VAL_MAX_TOKENS="16384").items():
        monkeypatch.setenv(k, v)
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    r = T.main()
    assert r["qat_enabled"]
    hp = T.resolve_config()
    model = r["model"]
    model.set_qat(hp)
    model.switch(qat=True)
    val = T.load_validation(hp, torch.device("cpu"))
    _, bpb, _ = T.evaluate(T.Context(), T.eval_forward(model, False), val, 128, 128, 32)
    assert abs(bpb - r["roundtrip_bpb"]) < 2e-5, (bpb, r["roundtrip_bpb"], r["pre_quant_bpb"])
    assert "late_qat:enabled step:0" in (tmp_path / "qat.txt").read_text()


def test_size_limit_just_below_natural_size_is_met_by_budget_fit(short_run, tmp_path):
    """A short run (the fit does not depend on how long the model trained) again, 2,000 bytes under its natural size."""
    log = short_run["log"]
    natural = int(next(l for l in log.splitlines() if l.startswith("total_submission_bytes:")).split()[0].split(":")[1])
    limit = natural - 2000
    rc, _, err, log = run_script(SHORT | {"SIZE_LIMIT_BYTES": limit}, tmp_path)
    assert rc == 0, err[-2000:]
    fit = [l for l in log.splitlines() if l.startswith("budget_fit:")]
    assert len(fit) == 1 and "bytes_before:" in fit[0] and "bytes_after:" in fit[0]
    total = next(l for l in log.splitlines() if l.startswith("total_submission_bytes:"))
    assert total.endswith(" ok") and int(total.split()[0].split(":")[1]) <= limit
    assert "final_roundtrip_exact" in log


def test_absurd_size_limit_fails_before_evaluation(sample_data, tmp_path):
    rc, _, err, log = run_script({"SIZE_LIMIT_BYTES": 100000, "ITERATIONS": 3}, tmp_path)
    assert rc != 0 and err.strip().splitlines()[-1].startswith("error: artifact cannot fit")
    assert "final_roundtrip_exact" not in log.split("\n==== end of code ====\n")[1]
    assert not list(tmp_path.glob("*.ptz*")), "nothing may be left under the artifact's name"


def budget_case():
    hp = small_hp()
    model = randomized(T.GPT(hp))
    entries, originals = T.quantize_state(model.state_dict(), T.quant_kinds(model), hp)
    return hp, model, entries, originals


def test_budget_fit_moves_matrices_to_int5_when_zeroing_ones_is_not_enough():
    hp, model, entries, originals = budget_case()
    cl, cfg = hp.clips, model.stored_config()
    natural = len(T.pack_artifact(entries, cfg))
    ones_zeroed = [dict(e, q=torch.where(e["q"].abs() == 1, 0, e["q"])) if e.get("scheme") == "int6" else e for e in entries]
    int5 = {e["name"]: T.quantize_rows(originals[e["name"]], 5, cl) for e in entries if e.get("scheme") == "int6"}
    all5 = [dict(e, q=int5[e["name"]][0], scale=int5[e["name"]][1]) if e["name"] in int5 else e for e in entries]
    floor_ones, floor5 = len(T.pack_artifact(ones_zeroed, cfg)), len(T.pack_artifact(all5, cfg))
    assert floor5 < floor_ones < natural
    limit = (floor5 + floor_ones) // 2 + 100  # 100 code bytes
    lines = []
    blob = T.fit_budget(entries, originals, cfg, hp, code_bytes=100, limit=limit, log=lines.append)
    assert len(blob) + 100 <= limit
    assert len(lines) == 1 and lines[0].startswith("budget_fit: moved ") and "to int5" in lines[0], lines
    moved = lines[0].split(" bytes_before:")[0].split()[-1].split(",")
    _, back = T.unpack_artifact(blob)
    got = {e["name"]: e for e in back}
    assert sorted(n for n, e in got.items() if e["scheme"] == "int5") == sorted(moved) and 0 < len(moved) < len(int5)
    for n in moved:  # the int5 rows ARE the int5 quantizer's output, scales included
        assert torch.equal(got[n]["q"], int5[n][0]) and torch.equal(got[n]["scale"], int5[n][1])
    # order: added squared error per estimated byte saved; the moved ones are a prefix of that order
    def key(e):
        q, sc, _ = int5[e["name"]]
        e5 = dict(e, q=q, scale=sc)
        added = float((q.float() * sc.float()[:, None] - originals[e["name"]]).square().sum()) - e["mse"] * e["q"].numel()
        return added / max(T.entropy_bytes([e]) - T.entropy_bytes([e5]), 1)
    order = [e["name"] for e in sorted((e for e in entries if e["name"] in int5), key=key)]
    assert set(order[:len(moved)]) == set(moved)
    fewer = [dict(e, q=int5[e["name"]][0], scale=int5[e["name"]][1]) if e["name"] in order[:len(moved) - 1] else e
             for e in entries]
    assert len(T.pack_artifact(fewer, cfg)) + 100 > limit, "one matrix fewer must not fit (the fewest are moved)"
    assert blob == T.fit_budget(entries, originals, cfg, hp, code_bytes=100, limit=limit, log=print), "deterministic"
    with pytest.raises(T.UserError, match=r"even with all \d+ int6 matrices in int5"):
        T.fit_budget(entries, originals, cfg, hp, code_bytes=100, limit=floor5 - 1000, log=print)


@pytest.mark.parametrize("fp16", [0, 1])
def test_embed_fp16_ships_the_tied_embedding_unrounded_and_leaves_it_out_of_qat(fp16, tmp_path):
    hp = small_hp(EMBED_BITS=16 if fp16 else 8)
    model = randomized(T.GPT(hp, embed_bits=hp["EMBED_BITS"]))
    model.set_qat(hp)
    assert (model.tok_emb.qspec is None) == bool(fp16) and model.ve.qspec is not None
    entries, _ = T.quantize_state(model.state_dict(), T.quant_kinds(model), hp)
    e = next(e for e in entries if e["name"] == "tok_emb.weight")
    w = model.tok_emb.weight.detach()
    (tmp_path / "a.ptz").write_bytes(T.pack_artifact(entries, model.stored_config()))
    rt, _, _ = T.load_artifact_model(str(tmp_path / "a.ptz"), torch.device("cpu"))  # what the round trip scores
    got = rt.tok_emb.weight.detach()
    if fp16:
        assert e["scheme"] == "fp16" and torch.equal(got, w.half().float())
    else:
        assert e["scheme"] == "int8" and not torch.equal(got, w.half().float())
        assert torch.allclose(got, w, atol=float(w.abs().max()) / 127)


def test_fp16_round_equals_the_cast_it_replaces():
    x = torch.cat((torch.rand(100000) * 60000, torch.rand(100000) * 1e-3)).clamp_min(T.SCALE_FLOOR)
    x[:4] = torch.tensor([1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, T.SCALE_FLOOR, 65504.0])  # ties round to even
    assert torch.equal(T.fp16_round(x), x.half().float())


def test_compiled_fake_quant_equals_eager_bit_for_bit():
    torch._dynamo.reset()
    w = torch.randn(96, 64) * 0.05
    on = torch.tensor(True)
    f = torch.compile(lambda w: T.fake_quant(w, 6, ("amax", [1.0, 0.95, 0.9]), on), dynamic=False)
    assert torch.equal(f(w), T.fake_quant(w, 6, ("amax", [1.0, 0.95, 0.9]), on))
