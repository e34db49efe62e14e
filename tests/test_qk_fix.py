"""The QK fix's pure tensor math against brute-force softmax recomputation (float64)."""

import pytest
import torch

from edgeatp.attribution.qk_fix import joint_fix, key_fix, query_fix

T, D = 7, 5


def _setup(seed: int, scale: float, causal: bool = True, pad_from: int | None = None):
    g = torch.Generator().manual_seed(seed)
    q, k, q2, k2 = (torch.randn(3, T, D, generator=g, dtype=torch.float64) * scale for _ in range(4))
    mask = torch.ones(T, T, dtype=torch.bool)
    if causal:
        mask = mask.tril()
    if pad_from is not None:
        mask[:, pad_from:] = False  # keys that no query may see, and rows that see nothing
        mask[pad_from:, :] = False
    def scores(qq, kk):
        return (qq @ kk.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    S = scores(q, k)
    A = torch.softmax(S, -1).nan_to_num(0.0)
    G = torch.randn(3, T, T, generator=g, dtype=torch.float64)
    return q, k, q2, k2, scores, S, A, G


def _brute(scores, S, A, G, q, k, q2, k2, which):
    out = torch.zeros(3, T, dtype=torch.float64)
    for i in range(T):
        qq, kk = q.clone(), k.clone()
        if which == "q":
            qq[:, i] = q2[:, i]
        else:
            kk[:, i] = k2[:, i]
        A2 = torch.softmax(scores(qq, kk), -1).nan_to_num(0.0)
        out[:, i] = ((A2 - A) * G).sum((-1, -2))
    return out


@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0, 40.0])
@pytest.mark.parametrize("causal", [True, False])
def test_query_and_key_fix_equal_brute_force(scale, causal):
    q, k, q2, k2, scores, S, A, G = _setup(int(scale * 10), scale, causal)
    got_q = query_fix(S, scores(q2, k), A, G)
    got_k = key_fix(S, q @ (k2 - k).transpose(-1, -2), G)
    ref_q = _brute(scores, S, A, G, q, k, q2, k2, "q")
    ref_k = _brute(scores, S, A, G, q, k, q2, k2, "k")
    tol = 1e-12 * max(1.0, float(ref_k.abs().max()))
    assert torch.allclose(got_q, ref_q, atol=tol, rtol=0)
    assert torch.allclose(got_k, ref_k, atol=tol, rtol=0)
    assert torch.isfinite(got_k).all() and torch.isfinite(got_q).all()


def test_saturated_rows_and_sub_epsilon_probabilities():
    q, k, q2, k2, scores, S, A, G = _setup(1, 1.0)
    S = S.clone()
    S[:, 5, 2] = 60.0  # row 5 saturated on key 2; key 3 of row 5 far below machine epsilon
    S[:, 5, 3] = -60.0
    A = torch.softmax(S, -1)
    assert float(A[0, 5, 3]) < 1e-40
    delta = torch.zeros(3, T, T, dtype=torch.float64)
    delta[:, 5, 3] = 150.0  # patching key 3 makes it dominant in row 5
    got = key_fix(S, delta, G)
    S2 = S.clone()
    S2[:, 5, 3] += 150.0
    ref = ((torch.softmax(S2, -1) - A) * G).sum((-1, -2))
    assert torch.allclose(got[:, 3], ref, atol=1e-12)
    expected = G[:, 5, 3] - G[:, 5, 2]  # all mass moves from key 2 to key 3
    assert torch.allclose(got[:, 3], expected, atol=1e-9)
    moved_off = delta.clone()
    moved_off[:, 5, 3] = 0.0
    moved_off[:, 5, 2] = -150.0  # the saturated key drops: its linear estimate would be ~0
    got2 = key_fix(S, moved_off, G)[:, 2]
    S3 = S.clone()
    S3[:, 5, 2] -= 150.0
    ref2 = ((torch.softmax(S3, -1) - A) * G).sum((-1, -2))
    assert torch.allclose(got2, ref2, atol=1e-12) and float(ref2.abs().min()) > 1e-3


def test_single_key_rows_and_fully_masked_rows_give_zero_not_nan():
    q, k, q2, k2, scores, S, A, G = _setup(3, 2.0, causal=True, pad_from=5)
    got_k = key_fix(S, q @ (k2 - k).transpose(-1, -2), G)
    got_q = query_fix(S, scores(q2, k), A, G)
    assert torch.isfinite(got_k).all() and torch.isfinite(got_q).all()
    assert torch.equal(got_k[:, 5:], torch.zeros_like(got_k[:, 5:])), "keys nobody can see"
    assert torch.equal(got_q[:, 5:], torch.zeros_like(got_q[:, 5:])), "queries that see nothing"
    terms_row0 = key_fix(S[:, :1, :], (q @ (k2 - k).transpose(-1, -2))[:, :1, :], G[:, :1, :])
    assert torch.equal(terms_row0, torch.zeros_like(terms_row0)), "a row with a single key cannot change"
    ref_k = _brute(scores, S, A, G, q, k, q2, k2, "k")
    assert torch.allclose(got_k, ref_k, atol=1e-12)


def test_joint_fix_patches_all_queries_or_keys_at_once():
    q, k, q2, k2, scores, S, A, G = _setup(5, 4.0)
    all_keys = joint_fix(S, scores(q, k2), A, G)
    ref = ((torch.softmax(scores(q, k2), -1) - A) * G).sum((-1, -2))
    assert torch.allclose(all_keys, ref, atol=1e-12)
    all_queries = joint_fix(S, scores(q2, k), A, G)
    assert torch.allclose(all_queries, query_fix(S, scores(q2, k), A, G).sum(-1), atol=1e-12)
