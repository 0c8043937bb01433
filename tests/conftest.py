"""Session setup. Without a GPU, Triton kernels can only run in the interpreter, and triton.jit
reads TRITON_INTERPRET when a kernel module is imported: set it before any test module imports
aclip_kernels.triton, whatever the collection order."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
