"""Document-aware attention (DOC_MASK) and legal score-first test-time training (TTT=chunk, TTT=doc)."""
import pytest
import torch
import torch.nn.functional as F

import train_gpt as T


def noisy_model(hp, seed=0):
    """A SMOKE-sized model with every weight perturbed, so attention, skips and side paths all matter."""
    torch.manual_seed(seed)
    model = T.GPT(hp).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def val(sample_data):
    return T.load_validation(T.resolve_config({"SMOKE": "1"}), torch.device("cpu")).tokens


def V(tokens, luts):
    """Tokens and byte tables as the Validation record the scorers take."""
    return T.Validation(tokens, luts, len(tokens))


def assert_causal(scores, v, ref, positions, seed):
    """For each p: every token after p replaced at random (BOS included, so documents end elsewhere) leaves the scores
    of targets <= p bit-identical (and changes later ones, so the test can fail)."""
    g = torch.Generator().manual_seed(seed)
    for p in positions:
        w = v.clone()
        w[p + 1:] = torch.randint(0, 1024, (len(v) - p - 1,), generator=g, dtype=w.dtype)
        w[p + 1 + torch.randperm(len(v) - p - 1, generator=g)[:(len(v) - p) // 40]] = T.BOS_ID
        got = scores(w)
        assert torch.equal(got[:p + 1].nan_to_num(), ref[:p + 1].nan_to_num()), p
        assert not torch.equal(got[p + 1:], ref[p + 1:])


@torch.no_grad()
def test_doc_mask_equals_each_document_alone(val):
    hp = T.parse_hparams({"SMOKE": "1", "DOC_MASK": "1"})
    masked = noisy_model(hp)
    plain = noisy_model(hp | {"DOC_MASK": 0})  # same weights (same seed), no mask
    for s in (5, 400, 1170):  # each window starts inside a document and holds several
        ids = val[s:s + 129].long()
        x, y = ids[None, :-1], ids[None, 1:]
        got = masked(x, y, per_token=True)[0]
        cuts = [0] + [i for i in range(1, 128) if x[0, i] == T.BOS_ID] + [128]
        assert len(cuts) >= 4
        for a, b in zip(cuts, cuts[1:]):  # targets a+1..b-1 lie inside the segment that starts at a
            if b - a < 2:
                continue
            alone = plain(x[:, a:b - 1], y[:, a:b - 1], per_token=True)[0]
            torch.testing.assert_close(got[a:b - 1], alone, rtol=0, atol=1e-5)
        unmasked = plain(x, y, per_token=True)[0]
        assert (unmasked - got).abs().max() > 1e-3  # without the mask, documents do see each other


def ttt_hp(**kw):
    env = {"SMOKE": "1", "TTT": "chunk", "TTT_CHUNK_TOKENS": "256", "TTT_LR": "0.05", "TTT_EPOCHS": "2",
           "EVAL_BATCH_SEQS": "4"} | {k: str(v) for k, v in kw.items()}
    return T.resolve_config(env)


def ttt_scores(hp, val, luts):
    """Per-target scores (index = target position) of TTT=chunk on a fresh copy of the same noisy model."""
    model = noisy_model(hp)
    out = torch.full((len(val),), float("nan"), dtype=torch.float64)
    res = T.ttt_chunk(hp, T.Context(), model, T.eval_forward(model, False), V(val, luts), out=out)
    return out, res


@pytest.fixture(scope="module")
def luts(sample_data):
    return T.byte_luts(T.resolve_config({"SMOKE": "1"}), torch.device("cpu"))


def test_ttt_score_depends_only_on_earlier_tokens(val, luts):
    """Legality: change every token after p; the score of every target at or before p stays bit for bit."""
    hp, v = ttt_hp(), val[:1400]
    ref, (loss, _, n) = ttt_scores(hp, v, luts)
    assert n == len(v) - 1 and not ref[1:].isnan().any() and ref[0].isnan()
    sliding = T.evaluate(T.Context(), T.eval_forward(noisy_model(hp), False), V(v, luts), 128, 32, 4)
    assert loss < sliding[0] - 1e-3  # training on scored chunks helps (and so can leak, if it were illegal)
    bos = int(next(i for i in range(600, 1400) if v[i] == T.BOS_ID))
    # inside a chunk, a chunk's last/first target, a document's edge
    assert_causal(lambda w: ttt_scores(hp, w, luts)[0], v, ref, (255, 256, 300, 511, 512, 767, bos - 1, bos, 1100), seed=1)


def test_ttt_trains_only_on_scored_targets_and_never_on_the_last_chunk(val, luts, monkeypatch):
    """Every update uses only targets already scored, the last chunk is never trained on, and the gradient reads no
    token outside its targets and their predecessors."""
    hp, v = ttt_hp(), val[:1400]
    out = torch.full((len(v),), float("nan"), dtype=torch.float64)
    calls, grad = [], T.ttt_grad

    def spy(hp, ctx, model, val, a, b):
        assert not out[a:b + 1].isnan().any() and out[b + 1:].isnan().all()  # scored, and nothing after yet
        calls.append((a, b))
        return grad(hp, ctx, model, val, a, b)
    monkeypatch.setattr(T, "ttt_grad", spy)
    model = noisy_model(hp)
    T.ttt_chunk(hp, T.Context(), model, T.eval_forward(model, False), V(v, luts), out=out)
    assert calls == [(max(c * 256, 1), c * 256 + 255) for c in range(5) for _ in range(2)]  # chunk 5 (1280..1399) never
    model = noisy_model(hp)
    for a, b in ((1, 255), (256, 511), (300, 330)):
        grads = []
        for w in (v, torch.cat((torch.randint(2, 1024, (a - 1,)), v[a - 1:b + 1], torch.randint(2, 1024, (len(v) - b - 1,))))):
            grad(hp, T.Context(), model, w.to(v.dtype), a, b)  # sequences of 128 targets, 4 per pass
            grads.append([p.grad.clone() for p in model.parameters()])
        assert all(torch.equal(x, y) for x, y in zip(*grads))
        model.zero_grad()
        for t in range(a, b + 1, 128):  # sequences of 128 targets one by one, the mean loss: the same gradient
            e = min(t + 128, b + 1)
            (model(v[t - 1:e - 1].long()[None], v[t:e].long()[None], per_token=True).sum() / (b - a + 1)).backward()
        for p, g in zip(model.parameters(), grads[0]):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def doc_hp(**kw):
    return ttt_hp(**{"TTT": "doc", "TTT_LORA_RANK": 8, "TTT_DOC_CHUNK": 16, "TTT_DOC_BATCH": 4, "TTT_LORA_LR": 0.01} | kw)


def doc_scores(hp, val, luts):
    model = noisy_model(hp)
    out = torch.full((len(val),), float("nan"), dtype=torch.float64)
    return out, T.ttt_doc(hp, T.Context(), model, V(val, luts), out=out)


@pytest.mark.parametrize("doc_mask", [0, 1])
def test_doc_ttt_score_depends_only_on_earlier_tokens_of_its_document(val, luts, doc_mask):
    """Legality under TTT=doc, bit for bit; each document's first chunk is scored by the untouched model on that
    document alone (fresh adapter, no context from before its BOS); later chunks gain from the adapter."""
    hp, v = doc_hp(DOC_MASK=doc_mask), val[:900]
    ref, (loss, _, n) = doc_scores(hp, v, luts)
    assert n == len(v) - 1 and not ref[1:].isnan().any()
    bos = [i for i in range(1, len(v) - 1) if v[i] == T.BOS_ID]
    plain = noisy_model(hp)  # with DOC_MASK=1 the mask itself (ttt_doc's windows do without it)
    with torch.no_grad():
        for s0, end in zip(bos, bos[1:] + [len(v) - 1]):  # a document scores its targets up to the next BOS
            e = min(s0 + 16, end)
            alone = plain(v[None, s0:e].long(), v[None, s0 + 1:e + 1].long(), per_token=True)[0].double()
            torch.testing.assert_close(ref[s0 + 1:e + 1], alone, rtol=0, atol=1e-5)
    frozen, _ = doc_scores(T.Config(hp | {"TTT_LORA_LR": 1e-12}), v, luts)
    assert ref[1:].sum() < frozen[1:].sum() - 1  # the adapters learn within each document
    long_doc = max(zip(bos, bos[1:]), key=lambda d: d[1] - d[0])[0]
    assert_causal(lambda w: doc_scores(hp, w, luts)[0], v, ref,
                  (100, long_doc - 1, long_doc, long_doc + 1, long_doc + 16, long_doc + 17, 800), seed=2)


def test_doc_ttt_last_chunk_of_a_long_document_does_not_see_where_it_ends(val, luts):
    """A document longer than the window (128) + TTT_DOC_CHUNK: the scores of its last targets stay bit-identical
    when the next BOS moves (the window of a step is placed by the step, not by the document's end)."""
    starts = (val[:-1] == T.BOS_ID).nonzero().flatten().tolist()
    s0, e = next((a, b) for a, b in zip(starts, starts[1:]) if b - a > 200)
    v, hp = val[s0 - 40:e + 60], doc_hp()
    e -= s0 - 40
    ref, _ = doc_scores(hp, v, luts)
    assert_causal(lambda w: doc_scores(hp, w, luts)[0], v, ref, (e - 1, e - 2, e - 15, e - 16, e - 17), seed=4)


def test_doc_phases_train_the_base_on_every_document_scored_so_far(val, luts, monkeypatch):
    """TTT_DOC_PHASES=2 over the first TTT_PREFIX_DOCS documents: after each phase the base takes SGD steps (TTT_EPOCHS
    per TTT_CHUNK_TOKENS piece) on every target from the stream's start to that phase's last document's end, all
    scored by then; the documents after the prefix are scored with the final weights, and no SGD follows them.
    Legality holds bit for bit across the phase boundaries, and the phases change the later scores."""
    v = val[:900]
    bos = [0] + [i for i in range(1, len(v) - 1) if v[i] == T.BOS_ID]
    ends = bos[1:] + [len(v) - 1]  # a document's last target is the next BOS
    prefix = 2 * len(bos) // 3
    hp = doc_hp(TTT_DOC_PHASES=2, TTT_PREFIX_DOCS=prefix)
    out, calls, grad = torch.full((len(v),), float("nan"), dtype=torch.float64), [], T.ttt_grad

    def spy(hp, ctx, model, w, a, b):
        calls.append((a, b, int((~out.isnan()).sum())))  # targets a..b, and how many targets are scored by then
        return grad(hp, ctx, model, w, a, b)
    monkeypatch.setattr(T, "ttt_grad", spy)
    T.ttt_doc(hp, T.Context(), noisy_model(hp), V(v, luts), out=out)
    monkeypatch.setattr(T, "ttt_grad", grad)
    cut = [ends[prefix // 2 - 1], ends[prefix - 1]]  # scored by then: exactly targets 1..cut
    pieces = lambda end: [(a, min(a + 255, end), end) for a in range(1, end + 1, 256) for _ in range(2)]
    assert calls == pieces(cut[0]) + pieces(cut[1])
    ref, _ = doc_scores(hp, v, luts)
    torch.testing.assert_close(ref, out, rtol=0, atol=0, equal_nan=True)
    one, _ = doc_scores(doc_hp(), v, luts)
    assert torch.equal(one[:cut[0] + 1].nan_to_num(), ref[:cut[0] + 1].nan_to_num())  # phase 1: no SGD yet
    assert not torch.equal(one[cut[0] + 1:cut[1] + 1], ref[cut[0] + 1:cut[1] + 1])
    assert not torch.equal(one[cut[1] + 1:], ref[cut[1] + 1:])
    assert_causal(lambda w: doc_scores(hp, w, luts)[0], v, ref, (cut[0] - 1, cut[0], cut[0] + 1, 450, cut[1], 700), seed=3)


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_ttt_sgd_clips_the_gradient_norm_and_follows_its_cosine(val, luts, clip):
    """TTT_GRAD_CLIP: each SGD step sees a gradient of global norm at most the clip (none with 0), at TTT_LR
    cosine-decayed to t."""
    hp = ttt_hp(TTT_GRAD_CLIP=clip, TTT_EPOCHS=1)
    model, seen = noisy_model(hp), []
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    opt.step = lambda: seen.append((opt.param_groups[0]["lr"], float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())))
    T.ttt_sgd(hp, T.Context(), model, opt, val[:600], 1, 500, t=0.5)
    (lr, norm), = seen
    assert lr == pytest.approx(0.05 * 0.5), lr
    assert norm == pytest.approx(clip, rel=1e-3) if clip else norm > 0.05, norm  # (float32 norms differ by ~1e-4)


def test_output_head_adapter_adds_a_scaled_low_rank_term_to_the_logits(val, luts):
    """TTT_LORA_HEAD: the logits gain TTT_LORA_SCALE * (h A^T) B^T per batch row (h = the final norm's output), the
    same in the fused cross-entropy's setting; with it TTT=doc scores each target once and learns more."""
    hp = doc_hp(FUSED_CE=1)
    model, x = noisy_model(hp), val[None, :65].long().repeat(2, 1)
    h = {}
    model.final_norm.register_forward_hook(lambda m, a, o: h.setdefault("h", o))
    base = model(x[:, :-1], x[:, 1:], per_token=True)
    a, b = torch.randn(2, 4, 128), torch.randn(2, 1024, 4) * 0.1
    model.lora = (a, b, 1.8)
    got = model(x[:, :-1], x[:, 1:], per_token=True)
    logits = F.linear(h["h"], model.tok_emb.weight) + 1.8 * (h["h"] @ a.transpose(1, 2)) @ b.transpose(1, 2)
    want = F.cross_entropy((30 * torch.tanh(logits / 30)).flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(2, -1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, base)
    model.lora = None
    v = val[:700]
    plain, (loss0, _, n0) = doc_scores(hp, v, luts)
    head, (loss1, _, n1) = doc_scores(doc_hp(TTT_LORA_HEAD=1), v, luts)
    assert n0 == n1 == len(v) - 1 and not head[1:].isnan().any() and loss1 != loss0


def test_doc_ttt_scores_each_target_once_for_any_world_and_batch(val, luts, monkeypatch):
    """Every target scored exactly once for any world size, document batch and phase count, and each target's score
    is the same bits whichever rank and batch mates it gets (no row leaks into another)."""
    monkeypatch.setattr(T, "metrics", lambda ctx, sums: sums)  # this rank's sums, not all-reduced
    monkeypatch.setattr(T, "ttt_sgd", lambda *a, **kw: None)  # phases: ranks simulated one after another cannot all-reduce
    v, res, ref = val[:700], [], None
    for world, batch, phases in ((1, 4, 0), (2, 4, 0), (3, 4, 0), (2, 3, 0), (3, 32, 0), (1, 4, 2), (2, 3, 1)):
        hp, covered, total = doc_hp(TTT_DOC_BATCH=batch, TTT_DOC_PHASES=phases, TTT_LORA_HEAD=1), torch.zeros(len(v), dtype=torch.int64), 0
        scores = torch.zeros(len(v), dtype=torch.float64)
        for r in range(world):
            out = torch.full((len(v),), float("nan"), dtype=torch.float64)
            total = total + T.ttt_doc(hp, T.Context(r, world), noisy_model(hp), V(v, luts), out=out)
            covered += ~out.isnan()
            scores += out.nan_to_num()
        assert total[2] == len(v) - 1 and covered[1:].eq(1).all() and covered[0] == 0
        ref = scores if ref is None else ref
        assert torch.equal(scores, ref), (world, batch, phases)
        res.append(total)
    for other in res[1:]:
        torch.testing.assert_close(other, res[0], rtol=1e-9, atol=0)


def test_doc_chunk_longer_than_the_window_is_refused(val, luts):
    with pytest.raises(T.UserError, match="TTT_DOC_CHUNK=200 must be at most the evaluation window 128"):
        T.ttt_doc(doc_hp(TTT_DOC_CHUNK=200), T.Context(), noisy_model(doc_hp()), V(val[:500], luts))


def counting_forward(x, y):
    return y.double()  # "loss" of a target = its position (tokens are positions)


@pytest.mark.parametrize("n,L,stride,C", [(1000, 128, 32, 256), (1000, 128, 32, 100), (777, 64, 9, 1),
                                          (513, 128, 128, 512), (4000, 128, 64, 32768), (300, 32, 5, 7)])
def test_chunks_score_each_target_once_in_its_own_chunk(n, L, stride, C):
    val = torch.arange(n, dtype=torch.int32)
    luts = (torch.ones(n, dtype=torch.int16), torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool))
    chunks = T.chunk_windows(n, L, stride, C)
    assert len(chunks) == (n - 1) // C + 1
    for world in (1, 2, 3):
        for batch in (1, 4, 32):
            total = torch.zeros(3, dtype=torch.float64)
            for c, win in enumerate(chunks):
                out = torch.zeros(n, dtype=torch.float64)
                for r in range(world):
                    total += T.eval_sums(T.Context(r, world), counting_forward, V(val, luts), L, stride, batch, windows=win,
                                         out=out)
                a, b = max(c * C, 1), min((c + 1) * C - 1, n - 1)
                assert out.nonzero().flatten().tolist() == list(range(a, b + 1)), (c, world, batch)
            assert total.tolist() == [sum(range(1, n)), n - 1, n - 1], (world, batch)


@pytest.mark.parametrize("env,msg", [
    ({"TTT": "foo"}, "TTT='foo' must be off, chunk or doc"),
    ({"TTT_CHUNK_TOKENS": "0"}, "TTT_CHUNK_TOKENS=0 must be positive"),
    ({"TTT_EPOCHS": "0"}, "TTT_EPOCHS=0 must be positive"),
    ({"TTT_LR": "-1"}, "TTT_LR=-1.0 must be positive"),
    ({"TTT_MOMENTUM": "1"}, "TTT_MOMENTUM=1.0 must be in [0, 1)"),
    ({"DOC_MASK": "2"}, "DOC_MASK=2 must be 0 or 1"),
    ({"TTT": "lora", "EVAL_ONLY": "1", "ARTIFACT": "x.ptz"}, "TTT='lora' must be off, chunk or doc"),
    ({"TTT_DOC_CHUNK": "0"}, "TTT_DOC_CHUNK=0 must be positive"),
    ({"TTT_LORA_RANK": "-2"}, "TTT_LORA_RANK=-2 must be positive"),
    ({"TTT_LORA_LR": "0"}, "TTT_LORA_LR=0.0 must be positive"),
    ({"TTT_DOC_PHASES": "-1"}, "TTT_DOC_PHASES, TTT_LORA_WD and TTT_GRAD_CLIP must be non-negative"),
    ({"TTT_LORA_WD": "-0.5"}, "TTT_DOC_PHASES, TTT_LORA_WD and TTT_GRAD_CLIP must be non-negative"),
    ({"TTT_PREFIX_DOCS": "0"}, "TTT_PREFIX_DOCS=0 must be positive"),
    ({"TTT_LORA_SCALE": "0"}, "TTT_LORA_SCALE=0.0 must be positive"),
    ({"TTT_LORA_BETAS": "0.9"}, "TTT_LORA_BETAS='0.9' must be two numbers in [0, 1)"),
    ({"TTT_LORA_BETAS": "0.9,1"}, "TTT_LORA_BETAS='0.9,1' must be two numbers in [0, 1)"),
    ({"TTT_LORA_HEAD": "2"}, "TTT_LORA_HEAD=2 must be 0 or 1"),
    ({"TTT": "doc", "MICRO_BATCHES": "3", "EVAL_ONLY": "1", "ARTIFACT": "x.ptz"}, "TTT needs MICRO_BATCHES=3 to be a multiple of the world size 2"),
])
def test_bad_ttt_settings_are_refused_with_one_line(env, msg):
    with pytest.raises(T.UserError) as e:
        T.check_hparams(T.parse_hparams(env), 2 if "MICRO_BATCHES" in env else 1)
    assert msg in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("protocol", ["chunk", "doc", "doc-phases"])
def test_ttt_one_rank_equals_two_gloo_ranks(smoke, tmp_path, protocol):
    """EVAL_ONLY with TTT on one artifact: 1 process and 2 gloo ranks give the same score; the TTT line comes after
    the sliding line, with its timing and the full-split extrapolation."""
    from conftest import metric, run_script
    env = {"EVAL_ONLY": "1", "ARTIFACT": smoke["artifact"], "TTT": protocol.split("-")[0], "VAL_MAX_TOKENS": "4096",
           "TTT_DOC_PHASES": "2" if protocol == "doc-phases" else "0", "TTT_PREFIX_DOCS": "8", "TTT_LORA_HEAD": "1",
           "TTT_CHUNK_TOKENS": "1024", "TTT_LR": "0.01", "EVAL_BATCH_SEQS": "8", "TTT_LORA_RANK": "8", "TTT_DOC_BATCH": "16"}
    scores = []
    for nproc, d in ((0, tmp_path / "one"), (2, tmp_path / "two")):
        rc, out, err, log = run_script(env, d, nproc=nproc)
        assert rc == 0, err[-3000:]
        assert log.index("final_sliding_exact") < log.index("final_ttt_exact") < log.index("ttt_eval tokens:4095 ")
        assert f"protocol:{env['TTT']}" in log and "full_split_8gpu_estimate_s:" in log
        scores.append((metric(log, "final_ttt_exact"), metric(log, "final_ttt_exact", "val_loss"), metric(log, "final_sliding_exact")))
    (one, one_loss, slide), (two, two_loss, _) = scores
    assert one == two and one_loss == two_loss  # the SGD's gradients sum as a tree: bit-identical on 1 and 2 ranks
    assert one != slide


def test_doc_mask_trains_and_travels_with_the_artifact(sample_data, tmp_path):
    """DOC_MASK=1 in training: the artifact records it, and EVAL_ONLY (no DOC_MASK given) rebuilds it and
    reproduces the run's scores exactly."""
    from conftest import metric, run_script
    rc, _, err, log = run_script({"DOC_MASK": "1", "ITERATIONS": "8", "VAL_MAX_TOKENS": "4096"}, tmp_path / "train")
    assert rc == 0, err[-3000:]
    meta, _ = T.unpack_artifact((tmp_path / "train" / "run.ptz").read_bytes())
    assert meta["config"]["DOC_MASK"] == 1
    rc, _, err, again = run_script({"EVAL_ONLY": "1", "ARTIFACT": tmp_path / "train" / "run.ptz", "VAL_MAX_TOKENS": "4096"},
                                   tmp_path / "eval")
    assert rc == 0, err[-3000:]
    for line in ("final_roundtrip_exact", "final_sliding_exact"):
        assert metric(again, line) == metric(log, line)
