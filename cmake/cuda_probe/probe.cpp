// The host-side CUDA headers of csrc/cuda/ops_cuda.cpp (torch's, which need the toolkit's).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

cudaStream_t probe_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
