"""Shared pytest setup. GPU-only tests skip with the reason "no CUDA device"."""
import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
