"""The reference against independent formulations: explicit attention, grid_sample, a brute-force
ranking, timm-style argsort. These pin down the semantics every kernel is tested against."""
import pytest
import torch
import torch.nn.functional as F

from aclip_kernels import reference as ref
from aclip_kernels.testing import random_boxes


def test_cls_attention_equals_explicit_attention_row():
    g = torch.Generator().manual_seed(0)
    q_all = torch.randn(2, 3, 17, 8, generator=g)          # [B, H, T, Dh], token 0 is [CLS]
    k = torch.randn(2, 3, 17, 8, generator=g)
    attn = (q_all @ k.transpose(-1, -2) * 8 ** -0.5).softmax(-1)    # [B, H, T, T]
    expected = attn[:, :, 0, 1:].mean(1)
    torch.testing.assert_close(ref.cls_attention_ref(q_all[:, :, 0], k, 1), expected)


@pytest.mark.parametrize("score_grid,grid", [((14, 14), (14, 14)), ((7, 7), (14, 14)), ((14, 14), (8, 6)),
                                             ((5, 9), (7, 9))])
def test_alignment_equals_grid_sample(score_grid, grid):
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(6, *score_grid, generator=g)
    boxes = random_boxes(6, g, min_size=0.2)
    boxes[0] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    boxes[1] = torch.tensor([0.9, 0.9, 0.5, 0.5])        # reaches past the border: clamped
    y = boxes[:, 0, None] + (torch.arange(grid[0]) + 0.5) / grid[0] * boxes[:, 2, None]
    x = boxes[:, 1, None] + (torch.arange(grid[1]) + 0.5) / grid[1] * boxes[:, 3, None]
    sample = torch.stack(torch.broadcast_tensors(x[:, None, :], y[:, :, None]), dim=-1) * 2 - 1
    expected = F.grid_sample(maps[:, None], sample, mode="bilinear", padding_mode="border",
                             align_corners=False)[:, 0]
    # equal up to float32 rounding (the two round their intermediate steps differently)
    torch.testing.assert_close(ref.align_scores_ref(maps, boxes, grid), expected, rtol=1e-5, atol=1e-5)


def test_alignment_without_boxes_is_identity_on_equal_grids_and_full_box_otherwise():
    maps = torch.randn(2, 6, 6)
    assert ref.align_scores_ref(maps, None, (6, 6)) is maps
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    torch.testing.assert_close(ref.align_scores_ref(maps, None, (4, 4)), ref.align_scores_ref(maps, full, (4, 4)))


def test_block_pooling_is_the_block_mean():
    cells = torch.randn(3, 8, 6)
    torch.testing.assert_close(ref.pool_blocks_ref(cells, 2), F.avg_pool2d(cells[:, None], 2)[:, 0])


def _brute_force_rank(scores):
    """Rank by explicit pairwise comparison of (NaN last, score desc, index asc)."""
    def key(i):
        s = scores[i].item()
        return (s != s, -s if s == s else 0.0, i)
    return sorted(range(len(scores)), key=key)


@pytest.mark.parametrize("seed", range(5))
def test_ranking_ties_lower_index_and_nan_last(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(-2, 3, (4, 30), generator=g).float()
    scores[torch.rand(scores.shape, generator=g) < 0.2] = float("nan")
    scores[0, :3] = float("-inf")
    order = ref.rank_units_ref(scores)
    for row in range(4):
        assert order[row].tolist() == _brute_force_rank(scores[row])


def test_keep_count_rule():
    assert ref.num_keep_units(0.5, 49) == 25           # A-CLIP: int(49 * 0.5) + 1 = 25 blocks
    assert ref.num_keep_units(0.5, 196) == 98
    assert ref.num_keep_units(1e-9, 196) == 1
    assert ref.num_keep_units(1.0, 196) == 196
    assert ref.num_keep_units(7, 196) == 7


def test_selection_matches_timm_style_argsort_without_ties():
    scores = torch.randn(4, 196)
    kept, idx = ref.attentive_mask_ref(torch.randn(4, 197, 8), scores, 98)
    timm_idx = scores.argsort(dim=1, descending=True)[:, :98].sort(dim=1).values
    assert torch.equal(idx, timm_idx)


def test_backward_scatters_to_kept_rows_only():
    x = torch.randn(2, 1 + 16, 4, requires_grad=True)
    kept, idx = ref.attentive_mask_ref(x, torch.randn(2, 16), 5)
    grad = torch.randn_like(kept)
    kept.backward(grad)
    torch.testing.assert_close(x.grad, ref.scatter_tokens_ref(grad, idx, 1, 16))
    dropped = torch.ones(2, 16, dtype=torch.bool).scatter_(1, idx, False)
    assert (x.grad[:, 1:][dropped] == 0).all()


def test_published_pipeline_baseline_selects_like_the_op_on_full_boxes():
    """The benchmark's re-expression of the published A-CLIP pipeline is faithful: with full boxes
    and an EMA crop of 14x14 pixels its resizes are identities and its 7x7 bilinear downsample is
    the 2x2 block mean, so it keeps the same 25 blocks as the op."""
    from aclip_kernels.baselines import aclip_published_mask, timm_style_mask
    g = torch.Generator().manual_seed(0)
    x, scores = torch.randn(6, 197, 8, generator=g), torch.randn(3, 196, generator=g)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(6, 1)
    kept, idx = aclip_published_mask(x, scores, boxes, 25, ema_pixels=(14, 14))
    ref_kept, ref_idx = ref.attentive_mask_ref(x, scores, 0.5, block=2, boxes=None)
    assert torch.equal(idx, ref_idx) and torch.equal(kept, ref_kept)
    kept, idx = timm_style_mask(x, scores.repeat(2, 1), 98)
    assert torch.equal(idx, ref.attentive_mask_ref(x, scores, 98)[1])
