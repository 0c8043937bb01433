// Emulation shim of c10/cuda/CUDAStream.h: one stream, the legacy default one.
#pragma once

#include <cuda_runtime_api.h>

namespace c10::cuda {

struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream() { return {}; }

}  // namespace c10::cuda
