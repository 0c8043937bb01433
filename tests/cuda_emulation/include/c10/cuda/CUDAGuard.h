// Emulation shim of c10/cuda/CUDAGuard.h: the emulated device is the CPU.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) {
    TORCH_CHECK(device.is_cpu(), "emulated CUDA: the tensors must be on the CPU; got ", device);
  }
};

}  // namespace c10::cuda
