"""random_mask: the FLIP / PatchDropout baseline through the same selection-and-gather kernel."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ._check_cache import cached_tokens
from .attentive_mask import attentive_mask

__all__ = ["random_mask"]


def random_mask(x: Tensor, keep=0.5, *, num_prefix_tokens: int = 1, block: int = 1,
                grid: Optional[Sequence[int]] = None, generator: Optional[torch.Generator] = None,
                return_indices: bool = True, backend: Optional[str] = None):
    """Keep the prefix tokens and a uniformly random set of patches (or b x b blocks) of each row.

    Same contract as ``attentive_mask`` (x [Bx, P+N, D] -> kept [Bx, P+n*b*b, D], idx ascending),
    with i.i.d. uniform scores drawn from ``generator`` (on x's device) for every row.
    """
    _, grid = cached_tokens(x, num_prefix_tokens, grid)
    scores = torch.rand(x.shape[0], *grid, generator=generator, device=x.device)
    return attentive_mask(x, scores, keep, num_prefix_tokens=num_prefix_tokens, grid=grid, block=block,
                          return_indices=return_indices, backend=backend)
