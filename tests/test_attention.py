"""Attention kernels (ATTN): FlexAttention's block masks compute what SDPA computes, causal and within documents."""
import warnings

import pytest
import torch

import train_gpt as T

pytestmark = pytest.mark.skipif(T.flex_attention is None, reason="this torch has no FlexAttention (torch < 2.5)")
warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


def masks(ids, doc_mask, kernel):
    m = T.GPT(T.Config(T.parse_hparams({"SMOKE": "1"}) | {"NUM_LAYERS": 2, "MODEL_DIM": 32, "NUM_HEADS": 2, "NUM_KV_HEADS": 1}))
    m.switch(doc_mask=doc_mask)
    m.attn_kernel = kernel
    return m.attn_mask(ids)


@pytest.mark.parametrize("T_len", [1, 37, 128, 131])
@pytest.mark.parametrize("doc_mask", [False, True])
@pytest.mark.parametrize("heads,kv", [(4, 4), (4, 2), (6, 1)])
def test_flex_equals_sdpa_causal_and_within_documents(T_len, doc_mask, heads, kv):
    g = torch.Generator().manual_seed(T_len * 7 + heads)
    B, D = 3, 16
    q, k, v = (torch.randn(B, T_len, h, D, generator=g) for h in (heads, kv, kv))
    ids = torch.randint(1, 100, (B, T_len), generator=g)
    ids[0, 0] = T.BOS_ID  # a document starting at the window's start
    ids[1, T_len // 2] = T.BOS_ID  # one starting mid-window
    ids[2, ::5] = T.BOS_ID  # many short ones
    ref = T.attention(q, k, v, masks(ids, doc_mask, "sdpa"))
    got = T.attention(q, k, v, masks(ids, doc_mask, "flex"))
    assert (ref - got).abs().max() < 1e-5
    if doc_mask and T_len > 5:  # the document mask is really applied: a query sees nothing of an earlier document
        plain = T.attention(q, k, v, masks(ids, False, "flex"))
        assert (plain - got).abs().max() > 1e-3


def test_flex_gradients_equal_sdpa_gradients():
    """Runs where FlexAttention has a backward pass (CUDA); on the CPU torch has none, and only this case skips."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 64, h, 16, generator=g).to(dev).requires_grad_() for h in (4, 2, 2))
    ids = torch.randint(1, 100, (2, 64), generator=g)
    ids[:, 20] = T.BOS_ID
    grads = []
    for kernel in ("sdpa", "flex"):
        try:
            out = T.attention(q, k, v, masks(ids.to(dev), True, kernel))
            grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
        except NotImplementedError as e:
            pytest.skip(f"FlexAttention cannot run backward here: {e}")
    assert all((a - b).abs().max() < 1e-4 for a, b in zip(*grads))


@torch.no_grad()
def test_whole_model_is_the_same_function_with_either_kernel():
    hp = T.Config(T.parse_hparams({"SMOKE": "1"}) | {"DOC_MASK": 1})
    torch.manual_seed(0)
    model = T.GPT(hp.arch)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    ids = torch.randint(1, hp["VOCAB_SIZE"], (2, 64))
    ids[:, 30] = T.BOS_ID
    losses = []
    for kernel in ("sdpa", "flex"):
        model.attn_kernel = kernel
        losses.append(model(ids, ids.roll(-1, 1), per_token=True))
    assert (losses[0] - losses[1]).abs().max() < 1e-5


def test_kernel_choice_per_device():
    cpu = torch.device("cpu")
    assert T.attn_backend("auto", cpu) == "sdpa" and T.attn_backend("sdpa", cpu) == "sdpa"
    with pytest.raises(T.UserError, match="ATTN=fa3 needs CUDA"):
        T.attn_backend("fa3", cpu)
    with pytest.raises(T.UserError, match="ATTN=flex needs CUDA"):
        T.attn_backend("flex", cpu)
    with pytest.raises(T.UserError, match="ATTN='nope' must be auto, fa3, flex or sdpa"):
        T.resolve_config({"ATTN": "nope", "VOCAB_SIZE": "1024"})
