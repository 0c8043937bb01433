"""Bad input raises ValueError/TypeError naming the argument, before any kernel runs."""
import pytest
import torch

import aclip_kernels as ak

X = torch.randn(4, 197, 16)
S = torch.randn(2, 196)
Q, K = torch.randn(2, 3, 8), torch.randn(2, 3, 197, 8)


@pytest.mark.parametrize("kwargs,exc,names", [
    (dict(x=torch.randn(197, 16), scores=S), ValueError, ["x", "[197, 16]"]),                        # rank of x
    (dict(x=X.long(), scores=S), TypeError, ["x", "int64"]),                                          # integer x
    (dict(x=X, scores=torch.randn(3, 196)), ValueError, ["x", "4 rows", "3 rows"]),                  # batch
    (dict(x=X, scores=torch.randn(2, 195)), ValueError, ["scores", "195"]),                          # non-square N
    (dict(x=X, scores=torch.randn(2, 1, 14, 14)), ValueError, ["scores", "[2, 1, 14, 14]"]),          # rank of scores
    (dict(x=X, scores=S, grid=(14, 15)), ValueError, ["grid", "196"]),                              # N != Hg*Wg
    (dict(x=X, scores=S, block=3), ValueError, ["block=3", "(14, 14)"]),                              # block does not divide
    (dict(x=X, scores=S, keep=0), ValueError, ["keep=0"]),
    (dict(x=X, scores=S, keep=197), ValueError, ["keep=197", "196"]),
    (dict(x=X, scores=S, keep=50, block=2), ValueError, ["keep=50", "49"]),
    (dict(x=X, scores=S, keep=1.5), ValueError, ["keep=1.5"]),
    (dict(x=X, scores=S, keep=0.0), ValueError, ["keep=0.0"]),
    (dict(x=X, scores=S, keep=True), TypeError, ["keep"]),
    (dict(x=X, scores=S, boxes=torch.rand(2, 4)), ValueError, ["boxes", "[2, 4]", "[4, 4]"]),
    (dict(x=X, scores=S, boxes=torch.rand(4, 3)), ValueError, ["boxes", "[4, 3]"]),
    (dict(x=X), ValueError, ["scores", "q and k"]),                                                  # neither
    (dict(x=X, scores=S, q=Q, k=K), ValueError, ["scores", "q and k"]),                              # both
    (dict(x=X, q=Q), ValueError, ["q and k"]),
    (dict(x=X, q=Q, k=torch.randn(2, 4, 197, 8)), ValueError, ["k", "[2, 4, 197, 8]", "q"]),         # heads
    (dict(x=X, q=Q, k=torch.randn(2, 3, 197, 9)), ValueError, ["k", "q"]),                           # head dim (width)
    (dict(x=X, q=Q, k=K, prior=torch.randn(2, 195)), ValueError, ["prior", "[2, 195]"]),
    (dict(x=X, scores=S, prior=torch.randn(2, 196)), ValueError, ["prior"]),
    (dict(x=X, scores=S, num_prefix_tokens=197), ValueError, ["num_prefix_tokens=197"]),
    (dict(x=X, scores=S.int()), TypeError, ["scores", "int32"]),
    (dict(x=X, scores=S, backend="gpu"), ValueError, ["backend", "gpu"]),
])
def test_attentive_mask_rejects(kwargs, exc, names):
    with pytest.raises(exc) as info:
        ak.attentive_mask(**kwargs)
    for name in names:
        assert name in str(info.value), (name, str(info.value))


def test_a_score_map_on_its_own_grid_is_accepted():
    kept, idx = ak.attentive_mask(X, torch.randn(2, 13, 15), 0.5)
    assert kept.shape == (4, 1 + 98, 16) and idx.shape == (4, 98)


def test_devices_that_differ_are_rejected_before_any_kernel():
    meta_scores = torch.randn(2, 196, device="meta")
    with pytest.raises(ValueError, match="scores is on meta but x is on cpu"):
        ak.attentive_mask(X, meta_scores)
    with pytest.raises(ValueError, match="boxes is on meta"):
        ak.attentive_mask(X, S, boxes=torch.rand(4, 4, device="meta"))


def test_cls_attention_rejects():
    with pytest.raises(ValueError, match=r"k \[2, 3, 197, 9\]"):
        ak.cls_attention(Q, torch.randn(2, 3, 197, 9))
    with pytest.raises(ValueError, match="q must have 3 dims"):
        ak.cls_attention(Q[0], K)
    with pytest.raises(TypeError, match="k must be a floating-point"):
        ak.cls_attention(Q, K.int())
    with pytest.raises(ValueError, match=r"prior must be \[Bs, N\] = \[2, 196\]"):
        ak.cls_attention(Q, K, prior=torch.zeros(2, 197))
    with pytest.raises(ValueError, match=r"out must be a float32 tensor \[B, N\] = \[2, 196\]"), \
            pytest.warns(DeprecationWarning):
        ak.cls_attention(Q, K, out=torch.zeros(2, 197))
    with pytest.raises(ValueError, match="out must be a float32"), pytest.warns(DeprecationWarning):
        ak.cls_attention(Q, K, out=torch.zeros(2, 196, dtype=torch.float16))


def test_random_mask_rejects():
    with pytest.raises(ValueError, match="x must have 3 dims"):
        ak.random_mask(torch.randn(4, 197))
    with pytest.raises(ValueError, match=r"grid=\(14, 15\)"):
        ak.random_mask(X, grid=(14, 15))
    with pytest.raises(ValueError, match="block=5"):
        ak.random_mask(X, block=5)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_unavailable_backend_is_a_clear_error(backend, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=f"backend='{backend}' is not available: .+"):
        ak.attentive_mask(X, S, backend=backend)


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv("ACLIP_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="ACLIP_KERNELS_BACKEND='nonsense'"):
        ak.attentive_mask(X, S)
    monkeypatch.setenv("ACLIP_KERNELS_BACKEND", "torch")
    assert ak.resolve_backend(None, torch.device("cpu")) == "torch"
