"""random_mask: uniform, reproducible from its generator, and the same selection on every backend."""
import torch

import aclip_kernels as ak


def test_is_uniform_and_reproducible():
    x = torch.randn(2000, 1 + 16, 1)
    kept, idx = ak.random_mask(x, 4, generator=torch.Generator().manual_seed(0))
    kept2, idx2 = ak.random_mask(x, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(idx, idx2) and torch.equal(kept, kept2)
    frequency = torch.bincount(idx.flatten(), minlength=16) / (2000 * 4 / 16)
    assert (frequency - 1).abs().max() < 0.1                     # each patch kept ~1/4 of the time
    _, idx_blocks = ak.random_mask(torch.randn(8, 36, 3), 0.5, num_prefix_tokens=0, grid=(6, 6), block=3,
                                   generator=torch.Generator().manual_seed(1))
    assert idx_blocks.shape == (8, 18)


def test_matches_the_reference_backend(op_backend):
    x = torch.randn(4, 1 + 63, 8, device=op_backend.device)
    kwargs = dict(grid=(7, 9), block=1)
    kept, idx = ak.random_mask(x, 0.5, generator=torch.Generator(op_backend.device).manual_seed(3),
                               backend=op_backend.name, **kwargs)
    ref_kept, ref_idx = ak.random_mask(x, 0.5, generator=torch.Generator(op_backend.device).manual_seed(3),
                                       backend="torch", **kwargs)
    assert torch.equal(idx, ref_idx) and torch.equal(kept, ref_kept)
