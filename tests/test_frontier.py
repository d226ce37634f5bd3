"""Issue 13: the frontier techniques (depth recurrence, parallel residuals, skip gates, LeakyReLU^2, MuonEq-R,
Polar Express, warmdown fraction and LR floor), the SmearGate BOS fix and fidelity to the 1.1233 record."""
import copy

import pytest
import torch
import torch.nn.functional as F

import train_gpt as T


def frontier_hp(**kw):
    """PRESET=frontier at SMOKE size (4 layers: blocks 1-2 looped, parallel from 3)."""
    return T.parse_hparams({"PRESET": "frontier", "SMOKE": "1"}) | {"VOCAB_SIZE": 1024, "MODEL_DIM": 64} | kw


def batch(T_=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 1024, (2, T_ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def randomize(model, seed=0):
    """Every parameter random (zero-initialized projections would hide most of the function)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.5) + (0 if p.ndim > 1 else 1.0))
    return model


# ---------------------------------------------------------------- depth recurrence
def test_loop_orders_and_skip_sizes_follow_the_published_layout():
    m = T.GPT(T.parse_hparams({"PRESET": "frontier", "VOCAB_SIZE": "8192"}) | {"MODEL_DIM": 64})
    assert m.orders == [list(range(11)), [0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 10],
                        [0, 1, 2, 3, 4, 5, 4, 5, 4, 5, 6, 7, 8, 9, 10]]
    assert m.skip_weights.shape == m.skip_gates.shape == (7, 64)  # 15 virtual layers: 7 encoder, 8 decoder


def test_recurrence_reuses_the_blocks_and_gradients_accumulate_over_passes():
    """With one extra pass the model equals an unrolled copy whose repeated blocks are separate modules; the tied
    gradient of a looped block is the sum of the copies' gradients. Only the per-virtual-layer skip vectors grow."""
    torch.manual_seed(0)
    tied = randomize(T.GPT(frontier_hp()))
    flat = T.GPT(frontier_hp(LOOP_LAYERS=""))
    n = lambda m, skip: sum(p.numel() for k, p in m.named_parameters() if k.startswith("skip") == skip)
    assert n(tied, False) == n(flat, False) and n(tied, True) == n(flat, True) + 2 * 2 * 64  # 4 skips vs 2, x 2 tensors
    tied.switch(loops=1)
    unrolled = copy.deepcopy(tied)
    b = unrolled.blocks
    unrolled.blocks = torch.nn.ModuleList([b[0], b[1], b[2], copy.deepcopy(b[1]), copy.deepcopy(b[2]), b[3]])
    unrolled.orders = [None, list(range(6))]
    x, y = batch()
    lt, lu = tied(x, y), unrolled(x, y)
    assert torch.allclose(lt, lu, rtol=0, atol=1e-6)
    lt.backward(), lu.backward()
    for i, j in ((1, 3), (2, 4)):
        for (name, p), q1, q2 in zip(tied.blocks[i].named_parameters(), unrolled.blocks[i].parameters(),
                                     unrolled.blocks[j].parameters()):
            assert torch.allclose(p.grad, q1.grad + q2.grad, rtol=1e-4, atol=1e-6), name
            assert not torch.allclose(q1.grad, q2.grad), name  # both passes contribute
    tied.switch(loops=0)
    assert not torch.allclose(tied(x, y), lt)  # the extra pass changes the function


def test_loop_switch_under_compile_changes_the_output_without_a_recompile():
    """Warm-up compiles every depth (as train() does); switching afterwards reuses a cached graph."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()  # graphs compiled by earlier tests in this process do not count
    model = randomize(T.GPT(frontier_hp())).eval()
    f = torch.compile(model, backend="eager", dynamic=False)
    x, y = batch()
    outs = []
    with torch.no_grad():
        for depth in range(len(model.orders)):  # warm-up
            model.switch(loops=depth)
            outs.append(f(x, y))
        frames = counters["stats"]["unique_graphs"]
        for depth in (0, 1, 2, 0, 2):
            model.switch(loops=depth)
            assert torch.equal(f(x, y), outs[depth])
    assert counters["stats"]["unique_graphs"] == frames == 3
    assert len({o.item() for o in outs}) == 3


def test_training_switches_loops_on_at_their_budget_fractions(sample_data, tmp_path):
    from conftest import run_script
    rc, _, err, log = run_script({"PRESET": "frontier", "ITERATIONS": 10, "LOOP_START": "0.2,0.5", "EVAL_STRIDE": 0,
                                  "VAL_MAX_TOKENS": 4096, "QUANT_METHOD": "rtn", "WARMUP_STEPS": 3}, tmp_path)
    assert rc == 0, err[-2000:]
    assert "layer_loop:enabled passes:1 step:2 frac:0.200 layers:6" in log
    assert "layer_loop:enabled passes:2 step:5 frac:0.500 layers:8" in log
    assert log.split("\n==== end of code ====\n", 1)[1].count("layer_loop: first_step_ms:") == 2
    meta, _ = T.unpack_artifact((tmp_path / "run.ptz").read_bytes())
    assert meta["config"]["LOOP_ACTIVE"] == 2 and meta["config"]["LOOP_LAYERS"] == "1,2"


# ---------------------------------------------------------------- block variants
def test_parallel_block_equals_its_formula():
    hp = frontier_hp()
    block = randomize(T.Block(hp, 3, False))
    assert block.parallel and not T.Block(hp, 2, False).parallel
    x, x0 = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    cos, sin = T.rope_tables(16, 16, 10000.0, 128, "cpu")
    h = block.resid_mix[0] * x + block.resid_mix[1] * x0
    n = T.rms_norm(h) * block.ln
    want = h + block.attn_scale * block.attn(n, cos, sin, None) + block.mlp_scale * block.mlp(n)
    torch.testing.assert_close(block(x, x0, cos, sin, None), want, rtol=0, atol=1e-6)


def test_leaky_relu_squared():
    mlp = T.MLP(8, 2, "leaky2")
    with torch.no_grad():
        mlp.fc.weight.copy_(torch.eye(16, 8))
        mlp.proj.weight.copy_(torch.eye(8, 16))
    x = torch.linspace(-2, 2, 8)[None]
    torch.testing.assert_close(mlp(x), torch.where(x > 0, x, 0.5 * x) ** 2)
    assert T.MLP(8, 2, "relu2").slope == 0.0


def test_skip_gate_is_a_sigmoid_lerp():
    """Gate g: x <- lerp(w * skip, x, sigmoid(g)); at g = 0 the decoder input is the mean of x and the skip."""
    torch.manual_seed(0)
    gated = randomize(T.GPT(frontier_hp(LOOP_LAYERS="", SKIP_GATES=1)))
    with torch.no_grad():
        gated.skip_gates.zero_()
    plain = T.GPT(frontier_hp(LOOP_LAYERS="", SKIP_GATES=0))
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if k != "skip_gates"})
    seen = {}
    for name, m in (("g", gated), ("p", plain)):
        m.blocks[2].register_forward_pre_hook(lambda _, a, k=name: seen.__setitem__(k, a[0]))
        m.blocks[1].register_forward_hook(lambda _, a, out, k=name: seen.__setitem__(k + "1", out))
    x, y = batch()
    gated(x, y), plain(x, y)
    h = seen["g1"]  # 4 layers: blocks 0-1 encode, so block 2 reads block 1's output x and its skip (the last pushed)
    torch.testing.assert_close(seen["p1"], h)
    s = gated.skip_weights[0] * h
    torch.testing.assert_close(seen["g"], 0.5 * (s + h))
    torch.testing.assert_close(seen["p"], h + s)


# ---------------------------------------------------------------- optimizer and schedule
def test_muoneq_r_normalizes_rows_before_newton_schulz(monkeypatch):
    seen = []
    real = T.newton_schulz
    monkeypatch.setattr(T, "newton_schulz", lambda g, *a: seen.append(g.clone()) or real(g, *a))
    for row_norm in (True, False):
        w = torch.nn.Parameter(torch.zeros(16, 32))
        w.grad = torch.randn(16, 32) * torch.logspace(-2, 2, 16)[:, None]
        T.Muon([w], lr=0.1, momentum=0.9, steps=5, wd=0.0, row_norm=row_norm).step()
    norms_on, norms_off = seen[0].norm(dim=1), seen[1].norm(dim=1)
    torch.testing.assert_close(norms_on, torch.ones(16))
    assert norms_off.max() / norms_off.min() > 100


@pytest.mark.parametrize("kind", ["quintic", "polar"])
def test_batched_newton_schulz_gives_the_per_matrix_updates(kind):
    """MUON_BATCHED: this rank's same-shape matrices go through one batched Newton-Schulz call; each result equals the
    one-matrix call within 1e-6 relative (fp32), and a Muon step with it updates every matrix as the per-matrix loop
    does, within 1e-6 of the step (tall, wide and square shapes mixed)."""
    g = torch.Generator().manual_seed(0)
    for shape in ((48, 16), (16, 48), (32, 32)):
        stack = torch.randn(5, *shape, generator=g) * torch.logspace(-1, 1, 5)[:, None, None]
        one = torch.stack([T.newton_schulz(x, 5, kind) for x in stack])
        assert (T.newton_schulz(stack, 5, kind) - one).abs().max() <= 1e-6 * one.abs().max()
    shapes = [(48, 16), (16, 48), (48, 16), (32, 32), (16, 48), (48, 16)]
    grads = [torch.randn(*s, generator=g) for s in shapes]
    after = []
    for batched in (False, True):
        ps = [torch.nn.Parameter(torch.ones(*s)) for s in shapes]
        opt = T.Muon(ps, lr=0.1, momentum=0.9, steps=5, wd=0.01, ns=kind, row_norm=True, batched=batched)
        for _ in range(2):
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            opt.step()
        after.append([p.detach().clone() for p in ps])
    for a, b in zip(*after):
        assert (a - b).abs().max() <= 1e-6 * 0.2


def test_polar_express_orthogonalizes_better_than_the_quintic():
    """Measure: RMS of (singular values - 1) of the result, at 5 iterations, on random and ill-conditioned
    matrices. Polar Express must be at least as close to orthogonal, and here it is several times closer."""
    torch.manual_seed(0)
    mats = [torch.randn(64, 256), torch.randn(128, 128) @ torch.diag(torch.logspace(-3, 0, 128)), torch.randn(256, 96)]
    for g in mats:
        err = {k: (torch.linalg.svdvals(T.newton_schulz(g, 5, k)) - 1).pow(2).mean().sqrt().item() for k in ("quintic", "polar")}
        assert err["polar"] <= err["quintic"], err
    g = mats[0]
    err = {k: (torch.linalg.svdvals(T.newton_schulz(g, 5, k)) - 1).pow(2).mean().sqrt().item() for k in ("quintic", "polar")}
    assert err["polar"] < 0.5 * err["quintic"], err


def test_warmdown_fraction_and_lr_floor():
    hp = T.parse_hparams({"WARMDOWN_FRAC": "0.5", "ITERATIONS": "100", "MAX_WALLCLOCK_SECONDS": "0", "MIN_LR": "0.1"})
    assert T.lr_multiplier(hp, 50, 0.0) == 1.0
    assert T.lr_multiplier(hp, 75, 0.0) == pytest.approx(0.5)
    assert T.lr_multiplier(hp, 99, 0.0) == pytest.approx(0.1)  # 0.02 floored
    capped = hp | {"MAX_WALLCLOCK_SECONDS": 10.0, "QUANT_METHOD": "rtn", "ITERATIONS": 20000, "MIN_LR": 0.0}
    assert T.lr_multiplier(capped, 10, 7500.0) == pytest.approx(0.5)  # 75 % of the time budget
    assert T.lr_multiplier(capped, 10, 10000.0) == 0.0


def test_embedding_weight_decay_is_separate():
    hp = T.parse_hparams({"SMOKE": "1", "EMBED_WD": "0.085", "ADAM_WD": "0.02"})
    _, adam = T.build_optimizers(hp, T.Context(), T.GPT(hp))
    assert [g["weight_decay"] for g in adam.param_groups] == [0.085, 0.02]


# ---------------------------------------------------------------- SmearGate BOS fix and fidelity
def test_smear_gate_does_not_blend_the_previous_document_into_bos():
    torch.manual_seed(0)
    model = randomize(T.GPT(T.parse_hparams({"SMOKE": "1", "BIGRAM_VOCAB_SIZE": "0"})))  # the bigram reads (prev, BOS)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda _, a: seen.append(a[1]))  # x0: the smeared embedding
    x, y = batch()
    x[:, 10] = T.BOS_ID
    x2 = x.clone()
    x2[:, 9] = (x[:, 9] + 7) % 1000 + 2  # the previous document's last token changes
    x2[:, 20] = (x[:, 20] + 7) % 1000 + 2
    model(x, y), model(x2, y)
    diff = (seen[0] - seen[1]).abs().amax(dim=(0, 2))
    assert diff[10] == 0  # BOS position: independent of the previous token
    assert diff[21] > 0 and diff[9] > 0  # elsewhere the previous token does blend in (the test can fail)


def test_bigram_hash_is_the_records():
    ids = torch.tensor([[5, 7, 1023, 0, 60000, 65535]])
    got = T.bigram_buckets(ids, 2048)[0].tolist()
    wrap = lambda v: (v + 2 ** 31) % 2 ** 32 - 2 ** 31  # int32 products wrap as in the record
    want = [2047] + [(wrap(36313 * c) ^ wrap(27191 * p)) % 2047 for p, c in zip(ids[0, :-1].tolist(), ids[0, 1:].tolist())]
    assert got == want


def test_rope_base_is_the_records_ntk_scaled_base():
    """The record's rotary uses base 10000 at a reference length 1024 and trains at 2048, so it NTK-scales:
    base 10000 * 2^(16/14) on 16 rotated dims. Ours is that base at length 2048: identical tables."""
    hp = T.parse_hparams({})
    assert hp["ROPE_BASE"] == pytest.approx(22081.79, abs=0.01)
    ours = T.rope_tables(2048, 16, hp["ROPE_BASE"], 2048, "cpu")
    record = T.rope_tables(2048, 16, 10000.0, 1024, "cpu")
    for a, b in zip(ours, record):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_vocab_size_follows_the_tokenizer_unless_set(sample_data):
    data, tok = sample_data
    hp = T.resolve_config({"PRESET": "frontier", "TOKENIZER_PATH": str(tok)})  # the preset's default would be 8192
    assert hp["VOCAB_SIZE"] == 1024 and hp.arch["VOCAB_SIZE"] == 1024
    T.byte_luts(hp, torch.device("cpu"))
    hp = T.resolve_config({"TOKENIZER_PATH": str(tok), "VOCAB_SIZE": "8192"})
    with pytest.raises(T.UserError, match="has vocab 1024 but VOCAB_SIZE=8192"):
        T.byte_luts(hp, torch.device("cpu"))
    with pytest.raises(TypeError, match="read-only"):  # resolved once: nothing downstream can change it
        hp["VOCAB_SIZE"] = 1024


def test_frontier_without_its_data_names_the_download_command(tmp_path):
    hp = T.parse_hparams({"PRESET": "frontier"}) | {"DATA_PATH": str(tmp_path / "fineweb10B_sp8192")}
    with pytest.raises(T.UserError, match=r"--variant sp8192\)"):
        T.shard_files(hp, "train")


@pytest.mark.parametrize("env,msg", [
    ({"LOOP_LAYERS": "4,6"}, "must be contiguous"),
    ({"LOOP_LAYERS": "10,11"}, "must be contiguous increasing block indices in 0..10"),
    ({"LOOP_LAYERS": "a"}, "comma-separated block indices"),
    ({"LOOP_LAYERS": "4,5", "LOOP_START": "0.7,0.5"}, "non-decreasing fractions"),
    ({"LOOP_LAYERS": "4,5", "LOOP_START": "0.5,0.6,0.7"}, "needs one or LOOP_REPEATS=2"),
    ({"LOOP_LAYERS": "4,5", "LOOP_REPEATS": "0"}, "LOOP_REPEATS=0 must be at least 1"),
    ({"MLP_ACT": "gelu"}, "MLP_ACT='gelu' must be relu2 or leaky2"),
    ({"MUON_NS": "cubic"}, "MUON_NS='cubic' must be quintic or polar"),
    ({"PARALLEL_FROM": "11"}, "PARALLEL_FROM=11 must be -1"),
    ({"WARMDOWN_FRAC": "1.5"}, "WARMDOWN_FRAC must be in [0, 1]"),
])
def test_bad_frontier_settings_are_refused_with_one_line(env, msg):
    with pytest.raises(T.UserError, match=None) as e:
        T.check_hparams(T.parse_hparams(env), 1)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_attention_gate_scales_each_heads_output_by_a_sigmoid_of_the_first_window_channels():
    hp = T.Config(T.parse_hparams({"SMOKE": "1"}) | {"ATTN_GATE": 1, "GATE_WINDOW": 12, "ATTN_GATE_SCALE": 0.5})
    torch.manual_seed(0)
    gated, plain = T.GPT(hp.arch), T.GPT(hp.arch | {"ATTN_GATE": 0})
    heads, dim = hp["NUM_HEADS"], hp["MODEL_DIM"]
    extra = sum(p.numel() for p in gated.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == hp["NUM_LAYERS"] * heads * 12 and gated.blocks[0].attn.gate.shape == (heads, 12)
    a, b = gated.blocks[0].attn, plain.blocks[0].attn
    b.load_state_dict({k: v for k, v in a.state_dict().items() if k != "gate"})
    with torch.no_grad():
        for m in (a, b):
            m.o.weight.copy_(torch.eye(dim))  # the output projection passes the gated heads through
    x = torch.randn(2, 16, dim)
    cos, sin = T.rope_tables(16, hp["ROPE_DIMS"], hp["ROPE_BASE"], hp["TRAIN_SEQ_LEN"], "cpu")
    with torch.no_grad():
        assert torch.allclose(a(x, cos, sin, None), 0.5 * b(x, cos, sin, None), atol=1e-6)  # zero init: sigmoid(0)
        a.gate.normal_()
        want = b(x, cos, sin, None).view(2, 16, heads, -1) * torch.sigmoid(0.5 * x[..., :12] @ a.gate.T)[..., None]
        assert torch.allclose(a(x, cos, sin, None), want.view(2, 16, dim), atol=1e-6)
    opts = T.build_optimizers(hp, T.Context(), gated)
    assert any(p is gated.blocks[0].attn.gate for g in opts[1].param_groups for p in g["params"]), "AdamW, not Muon"
    entries, _ = T.quantize_state(gated.state_dict(), T.quant_kinds(gated), T.Config(hp | {"SMALL_BITS": 8}))
    assert {e["scheme"] for e in entries if e["name"].endswith("attn.gate")} == {"int8"}, "int8 rows with SMALL_BITS=8"


def test_parallel_lanes_mix_attention_and_mlp_into_two_lanes_in_the_decoder_half():
    hp = T.Config(T.parse_hparams({"SMOKE": "1", "PRESET": "frontier"}) | {"PARALLEL_FROM": 3, "PARALLEL_LANES": 1})
    torch.manual_seed(0)
    model = T.GPT(hp.arch)
    lanes = [i for i, b in enumerate(model.blocks) if b.lanes]
    assert lanes == [3] and model.blocks[3].lane_post.shape == (2, 2) and abs(float(model.blocks[3].lane_resid[0]) - 1.1) < 1e-6
    b, dim = model.blocks[3], hp["MODEL_DIM"]
    with torch.no_grad():
        for p in b.parameters():
            p.normal_(0, 0.3)
        l0, l1, x0 = (torch.randn(2, 8, dim) for _ in range(3))
        cos, sin = T.rope_tables(8, hp["ROPE_DIMS"], hp["ROPE_BASE"], hp["TRAIN_SEQ_LEN"], "cpu")
        mix = b.resid_mix
        a = b.attn_scale * b.attn(T.rms_norm(mix[0] * l0 + mix[1] * x0) * b.ln, cos, sin, None)
        m = b.mlp_scale * b.mlp(T.rms_norm(l1) * b.ln)
        r, p = b.lane_resid, b.lane_post
        got = b((l0, l1), x0, cos, sin, None)
        assert torch.allclose(got[0], r[0] * l0 + p[0, 0] * a + p[1, 0] * m, atol=1e-5)
        assert torch.allclose(got[1], r[1] * l1 + p[0, 1] * a + p[1, 1] * m, atol=1e-5)
        plain = b(l0, x0, cos, sin, None)  # in the encoder half the same block is sequential, not GPT-J
        h = mix[0] * l0 + mix[1] * x0
        h = h + b.attn_scale * b.attn(T.rms_norm(h) * b.ln, cos, sin, None)
        assert torch.allclose(plain, h + b.mlp_scale * b.mlp(T.rms_norm(h) * b.ln), atol=1e-5)
    ids = torch.randint(1, hp["VOCAB_SIZE"], (2, 32))
    for loops in range(hp["LOOP_REPEATS"] + 1):
        model.switch(loops=loops)
        model(ids, ids).backward()
        assert model.blocks[3].lane_post.grad is not None and torch.isfinite(model.blocks[3].lane_post.grad).all()
    with pytest.raises(T.UserError, match="PARALLEL_LANES=1 needs PARALLEL_FROM set past the last of LOOP_LAYERS"):
        T.resolve_config({"SMOKE": "1", "PRESET": "frontier", "PARALLEL_FROM": "2", "PARALLEL_LANES": "1"})


def test_windowed_smear_gate_adds_a_gated_previous_embedding_except_at_bos():
    hp = T.Config(T.parse_hparams({"SMOKE": "1"}) | {"SMEAR_GATE": 2, "GATE_WINDOW": 12, "BIGRAM_VOCAB_SIZE": 0})
    torch.manual_seed(0)
    model, plain = T.GPT(hp.arch), T.GPT(hp.arch | {"SMEAR_GATE": 0})
    n = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    assert n == 13 and model.smear is None  # w on 12 channels + lambda: the later records' form
    ids = torch.randint(1, hp["VOCAB_SIZE"], (2, 16))
    ids[0, 5] = T.BOS_ID
    seen = {}
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("smear")})
    for m in (model, plain):  # capture the embedding after the smear, before the norm
        m.blocks[0].register_forward_pre_hook(lambda mod, args, m=m: seen.__setitem__(m, args[1]))
    with torch.no_grad():
        model(ids, ids), plain(ids, ids)
        assert torch.equal(seen[model], seen[plain]), "lambda = 0 at init: the identity"
        model.smear_w.normal_()
        model.smear_lambda.fill_(0.7)
        model(ids, ids)
        x = F.embedding(ids, model.tok_emb.weight)
        g = 0.7 * torch.sigmoid(x[:, 1:, :12] @ model.smear_w.T)
        want = torch.cat((x[:, :1], x[:, 1:] + g * x[:, :-1] * (ids[:, 1:, None] != T.BOS_ID)), 1)
        assert torch.allclose(seen[model], T.rms_norm(want), atol=1e-6)
        assert torch.allclose(seen[model][0, 5], T.rms_norm(x[0, 5]), atol=1e-6), "a BOS takes nothing from before"


def test_the_top_preset_has_the_1_0611_records_parameter_count_and_settings():
    """PRESET=top logs the 1.0611 record's 35,945,671 parameters, less the 48 lane weights it allocates for blocks that
    never run two lanes: the frontier preset's model (35,943,512) with blocks 3-5 looped (one more U-Net skip:
    +2 x 512), the attention gate (11 x 8 x 12), the windowed SmearGate (13) and the lanes from block 8 (3 blocks x 6,
    where the record allocates 11 x 6). Its quantizer takes the record's clip per role."""
    with torch.device("meta"):
        counts = [sum(p.numel() for p in T.GPT(T.resolve_config({"PRESET": p, "VOCAB_SIZE": "8192"}).arch).parameters())
                  for p in ("frontier", "top")]
    assert counts == [35_943_512, 35_945_671 - 8 * 6]
    hp = T.resolve_config({"PRESET": "top", "VOCAB_SIZE": "8192"})
    with torch.device("meta"):
        top = T.GPT(hp.arch)
    order = top.orders[-1]  # the record logs encoder [0, 1, 2, 3, 4, 5, 3, 4] and decoder [5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert (order[:len(order) // 2], order[len(order) // 2:]) == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])
    assert T.loop_starts(hp) == [0.35, 0.35] and len(top.orders) == 3  # both extra passes switch on together
    assert [b.lanes for b in top.blocks] == [False] * 8 + [True] * 3
    model = T.GPT(T.Config(hp | {"NUM_LAYERS": 2, "LOOP_LAYERS": "", "PARALLEL_FROM": -1, "PARALLEL_LANES": 0}), embed_bits=7)
    model.set_qat(hp)
    assert [m.qspec for m in (model.blocks[0].mlp.fc, model.blocks[1].attn.q, model.tok_emb)] == [
        ("std", [11.5]), ("std", [13.0]), ("std", [14.0])]
