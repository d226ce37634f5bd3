"""Issue 14: document-aware attention (DOC_MASK) and legal score-first test-time training (TTT=chunk)."""
import pytest
import torch

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
    return T.load_validation(T.parse_hparams({"SMOKE": "1"}))[0]


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
