"""Issue 3: each technique of the record recipe has its defining property; switched off, it leaves nothing behind."""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt as T

RECORD_PARAMS = 26_993_756  # the public 1.1233 record's count (from its log)
FRONTIER_PARAMS = 35_943_512  # the public 1.0835 record's (2026-04-06, sp8192)


def hp(**kw):
    h = T.parse_hparams({"SMOKE": "1"})
    h.update(NUM_LAYERS=4, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, **kw)
    return h


@pytest.mark.parametrize("env,count", [({}, RECORD_PARAMS), ({"PRESET": "frontier", "VOCAB_SIZE": "8192"}, FRONTIER_PARAMS)])
def test_parameter_count_matches_the_published_model(env, count):
    with torch.device("meta"):
        model = T.GPT(T.parse_hparams(env))
    assert sum(p.numel() for p in model.parameters()) == count


def test_xsa_output_is_orthogonal_to_own_value():
    torch.manual_seed(0)
    attn = T.Attention(64, 4, 2, 1.5, xsa=True, has_ve=False)
    with torch.no_grad():
        for m in (attn.q, attn.k, attn.v):
            m.weight.normal_(0, 0.1)
        attn.o.weight.copy_(torch.eye(64))  # expose the per-head output
    x = torch.randn(2, 16, 64)
    cos, sin = T.rope_tables(16, 8, 10000.0, 16, "cpu")
    y = attn(x, cos, sin, None).view(2, 16, 2, 2, 16)  # (B, T, kv head, group, D)
    v = attn.v(x).view(2, 16, 2, 1, 16)
    assert (y * F.normalize(v, dim=-1)).sum(-1).abs().max() < 1e-5
    attn.xsa = False
    y2 = attn(x, cos, sin, None).view(2, 16, 2, 2, 16)
    assert (y2 * F.normalize(v, dim=-1)).sum(-1).abs().max() > 1e-2  # the property is not trivially true


def test_smeargate_at_minus_infinity_is_identity_and_mixes_previous_token():
    torch.manual_seed(0)
    with_gate = T.GPT(hp())
    without = T.GPT(hp(SMEAR_GATE=0))
    state = {k: v for k, v in with_gate.state_dict().items() if k != "smear"}
    without.load_state_dict(state)
    ids = torch.randint(0, 1024, (2, 32))
    with torch.no_grad():
        with_gate.smear.fill_(-1e4)
        torch.testing.assert_close(with_gate(ids, ids, per_token=True), without(ids, ids, per_token=True))
        with_gate.smear.fill_(1e4)  # gate fully open: each position sees only its predecessor's embedding
        changed = with_gate(ids, ids, per_token=True) - without(ids, ids, per_token=True)
    assert changed.abs().max() > 1e-3


def test_partial_rope_rotates_only_the_first_dims():
    q = torch.randn(1, 1, 1, 64).expand(1, 10, 1, 64)  # the same vector at every position
    cos, sin = T.rope_tables(10, 16, 10000.0, 10, "cpu")
    out = T.apply_rope(q, cos, sin)
    assert torch.equal(out[..., 16:], q[..., 16:])
    assert (out[:, 1:, :, :16] - out[:, :1, :, :16]).abs().max() > 1e-3
    torch.testing.assert_close(out.norm(dim=-1), q.norm(dim=-1))  # a rotation
    # relative positions: <R_m q, R_n k> depends on m - n only
    k = torch.randn(1, 1, 1, 64).expand(1, 10, 1, 64)
    ko = T.apply_rope(k, cos, sin)
    d = lambda m, n: (out[0, m, 0] * ko[0, n, 0]).sum()
    torch.testing.assert_close(d(5, 2), d(7, 4))


def test_rope_ntk_scaling_beyond_training_length():
    c_train, _ = T.rope_tables(128, 16, 10000.0, 128, "cpu")
    c_long, _ = T.rope_tables(256, 16, 10000.0, 128, "cpu")
    assert not torch.allclose(c_long[:, :128], c_train)  # base scaled up when longer than trained
    # the slowest rotated frequency at the longest position stays within the angle range seen in training
    inv_long = torch.acos(c_long[0, 1, 0, -1].clamp(-1, 1))
    assert inv_long * 255 <= torch.acos(c_train[0, 1, 0, -1]) * 127 * 1.01


def test_bigram_position_zero_uses_reserved_bucket():
    ids = torch.randint(0, 1024, (4, 50))
    b = T.bigram_buckets(ids, 2048)
    assert (b[:, 0] == 2047).all() and (b[:, 1:] < 2047).all() and (b >= 0).all()
    same = T.bigram_buckets(torch.tensor([[5, 7, 5, 7]]), 2048)
    assert same[0, 1] == same[0, 3]  # a function of the (previous, current) pair


def test_ln_scale_multiplies_block_input_norm():
    blocks = T.GPT(hp()).blocks
    assert [b.ln for b in blocks] == [1 / math.sqrt(i + 1) for i in range(4)]
    assert [b.ln for b in T.GPT(hp(LN_SCALE=0)).blocks] == [1.0] * 4


@pytest.mark.parametrize("off,gone", [
    (dict(SMEAR_GATE=0), ["smear"]),
    (dict(BIGRAM_VOCAB_SIZE=0), ["bigram"]),
    (dict(VE_LAYERS=""), ["ve.", "ve_proj", "ve_scale", "ve_shared_scale"]),
])
def test_disabled_feature_leaves_no_parameters(off, gone):
    on_names = [n for n, _ in T.GPT(hp()).named_parameters()]
    off_names = [n for n, _ in T.GPT(hp(**off)).named_parameters()]
    for g in gone:
        assert any(g in n for n in on_names) and not any(g in n for n in off_names), g


def test_xsa_layers_and_ve_layers_placement():
    m = T.GPT(T.parse_hparams({"NUM_LAYERS": "11"}) | {"MODEL_DIM": 64, "NUM_HEADS": 4, "NUM_KV_HEADS": 2, "VE_DIM": 16, "BIGRAM_DIM": 16})
    assert [i for i, b in enumerate(m.blocks) if b.attn.xsa] == [7, 8, 9, 10]
    assert m.ve_layers == [9, 10] and [i for i, b in enumerate(m.blocks) if b.attn.ve_scale is not None] == [9, 10]
    assert m.orders == [list(range(11))] and m.skip_weights.shape[0] == 5


def test_init_matches_the_record():
    """The 1.1233 record's init: orthogonal matrices; block output projections zero (every block starts as the
    identity); the bigram and value-embedding projections orthogonal x 1/sqrt(2 layers); bigram table zero, value
    table std 0.01 behind a shared scale 0.1; tied embedding std 0.005."""
    m = T.GPT(hp(BIGRAM_DIM=64, VE_DIM=64) | {"NUM_KV_HEADS": 4})
    q = m.blocks[0].attn.q.weight
    torch.testing.assert_close(q @ q.T, torch.eye(64), atol=1e-5, rtol=0)
    for b in m.blocks:
        assert b.attn.o.weight.abs().max() == 0 and b.mlp.proj.weight.abs().max() == 0
    for proj in (m.bigram_proj.weight, m.ve_proj.weight):
        w = proj * math.sqrt(2 * 4)
        torch.testing.assert_close(w.T @ w, torch.eye(64), atol=1e-5, rtol=0)
    assert m.bigram.weight.abs().max() == 0 and m.ve_shared_scale.item() == pytest.approx(0.1)
    assert abs(m.ve.weight.std().item() - 0.01) < 1e-3 and abs(m.tok_emb.weight.std().item() - 0.005) < 5e-4


def test_ema_matches_closed_form():
    torch.manual_seed(0)
    w = [torch.randn(3, 4), torch.randn(5)]
    ema = [t.clone() for t in w]
    d, history = 0.9, [[t.clone() for t in w]]
    for _ in range(7):
        for t in w:
            t.add_(torch.randn_like(t))
        history.append([t.clone() for t in w])
        T.ema_update(ema, w, d)
    k = len(history) - 1
    for j in range(2):  # ema_k = d^k w_0 + (1 - d) sum_i d^(k-i) w_i
        want = d ** k * history[0][j] + sum((1 - d) * d ** (k - i) * history[i][j] for i in range(1, k + 1))
        torch.testing.assert_close(ema[j], want)


def test_newton_schulz_orthogonalizes():
    g = torch.randn(64, 256)
    x = T.newton_schulz(g, 5)
    s = torch.linalg.svdvals(x)
    assert s.min() > 0.5 and s.max() < 1.5  # the quintic's fixed band around 1
    assert x.shape == g.shape and T.newton_schulz(g.T, 5).shape == g.T.shape


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_fused_cross_entropy_gives_the_plain_losses_and_gradients(amp, monkeypatch):
    """FUSED_CE: the chunked softcapped cross-entropy (logits recomputed in the backward pass) is the plain path's
    function: the same loss and gradients for every parameter, in fp32 (1e-5) and under bf16 autocast (bf16 noise)."""
    monkeypatch.setattr(T, "FUSED_CE_CHUNK", 100)  # several chunks, the last one short
    hp = T.Config(T.parse_hparams({"SMOKE": "1"}) | {"QAT_THRESHOLD": 1.0})
    torch.manual_seed(0)
    model = T.GPT(hp.arch)
    model.set_qat(hp)
    model.switch(qat=True)  # the tied table fake-quantized: its gradient goes through the STE into the weight
    ids = torch.randint(1, hp["VOCAB_SIZE"], (3, 90))
    runs = []
    for fused in (False, True):
        model.fused_ce = fused
        model.zero_grad()
        with torch.autocast("cpu", dtype=amp) if amp else contextlib.nullcontext():
            loss = model(ids, ids.roll(-1, 1))
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = runs
    tol = 1e-5 if amp is None else 2e-2
    assert abs(float(l0 - l1)) < tol and g0.keys() == g1.keys()
    for n in g0:
        scale = float(g0[n].abs().max()) + 1e-12
        assert float((g0[n] - g1[n]).abs().max()) <= tol * max(1.0, scale), n
    with torch.no_grad():  # scoring never takes the chunked path
        model.fused_ce = True
        assert torch.equal(model(ids, ids, per_token=True), (setattr(model, "fused_ce", False), model(ids, ids, per_token=True))[1])
