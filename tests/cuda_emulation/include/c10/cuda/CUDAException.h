// Emulation shim of c10/cuda/CUDAException.h: the checks report the emulated runtime's errors.
#pragma once

#include <c10/util/Exception.h>

#include "cuda_emulation.h"

#define C10_CUDA_CHECK(EXPR)                                                          \
  do {                                                                                \
    const cudaError_t emu_error_ = (EXPR);                                            \
    TORCH_CHECK(emu_error_ == cudaSuccess, "CUDA error: ", ::emu::error_name(emu_error_)); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
