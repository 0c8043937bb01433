// A CPU emulation of the CUDA execution model, enough to run the kernels of csrc/cuda unchanged
// (tests/test_cuda_emulated.py compiles them with g++ after rewriting `k<<<...>>>(args)` into
// emu::launch and `extern __shared__ T name[];` into emu::dynamic_shared). The blocks of a grid
// run one after another; the threads of a block are fibers (ucontext) on the calling OS thread,
// resumed in thread order until each reaches __syncthreads, a warp shuffle or its end, so that
// a barrier waits for the whole block and a shuffle for its 32 lanes, and every run is
// deterministic. Divergent barriers or shuffles, bad launch configurations and writes past the
// dynamic shared memory are reported. The device is an H100/H200: 132 SMs (the tests may set
// another count: emu_set_multiprocessors), 227 KiB of opt-in shared memory per block. Every launch
// that runs is logged (emu_take_launches), for tests that check which grids a launcher chose.
#pragma once

#include <cuda_runtime.h>  // the host declarations: dim3, uint4, cudaStream_t, cudaError_t, ...
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static  // static __shared__ arrays: one per kernel, shared by the fibers of a block

namespace emu {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
constexpr int kMultiProcessors = 132;
constexpr int kSharedDefault = 48 * 1024;
constexpr int kSharedOptin = 227 * 1024;
constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kCanaryBytes = 64;
constexpr unsigned char kSharedFill = 0xFF;  // uninitialised shared memory: NaN, -1, all bits set
constexpr unsigned char kCanary = 0x5A;

enum class State { kReady, kBarrier, kShuffle, kDone };

struct Fiber {
  ucontext_t context;
  uint3 idx;
  State state;
};

// The lanes of one warp meet here at a shuffle: each posts its value and the lane it reads.
struct Warp {
  int arrived = 0;
  const char* file;   // where the first lane called the shuffle, to catch lanes at different ones
  int line;
  uint64_t value[kWarpSize];
  int source[kWarpSize];
  uint64_t result[kWarpSize];
};

struct Block {
  uint3 idx;
  dim3 dim, grid;
  unsigned char* shared = nullptr;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::string fault;
};

inline thread_local Block* tl_block = nullptr;

inline Block& block() { return *tl_block; }
inline Fiber& thread() { return *tl_block->current; }

// Fault found inside a fiber: recorded, and the fiber is never resumed (the launch throws).
[[noreturn]] inline void fault(const std::string& what) {
  Block& b = block();
  b.fault = what;
  swapcontext(&b.current->context, &b.scheduler);
  __builtin_unreachable();
}

inline void yield(State state) {
  Block& b = block();
  b.current->state = state;
  swapcontext(&b.current->context, &b.scheduler);
}

inline void fiber_main() {
  Block& b = block();
  b.body(b.body_arg);
  yield(State::kDone);
}

// Stacks for up to kMaxThreads fibers, each below a guard page; mapped once per OS thread.
inline unsigned char* stacks() {
  static thread_local unsigned char* base = nullptr;
  if (!base) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t bytes = kMaxThreads * (kStackBytes + page);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("emulated CUDA: cannot map the fiber stacks");
    base = static_cast<unsigned char*>(p);
    for (int i = 0; i < kMaxThreads; ++i) mprotect(base + i * (kStackBytes + page), page, PROT_NONE);
  }
  return base;
}

inline std::string where(const Block& b, const Fiber& f) {
  return "block (" + std::to_string(b.idx.x) + ", " + std::to_string(b.idx.y) + ", " + std::to_string(b.idx.z) +
         ") thread " + std::to_string(f.idx.x + b.dim.x * (f.idx.y + b.dim.y * f.idx.z));
}

// Runs one block to its end: fibers in thread order (in reverse order in odd blocks, so that a
// missing barrier shows either way) until none can go on; the barrier opens once every thread
// waits at it.
inline void run_block(Block& b, bool reverse) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  unsigned char* stack = stacks();
  const int n = static_cast<int>(b.dim.x * b.dim.y * b.dim.z);
  b.fibers.assign(n, Fiber{});
  b.warps.assign((n + kWarpSize - 1) / kWarpSize, Warp{});
  for (int t = 0; t < n; ++t) {
    Fiber& f = b.fibers[t];
    f.idx = uint3{t % b.dim.x, (t / b.dim.x) % b.dim.y, t / (b.dim.x * b.dim.y)};
    f.state = State::kReady;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = stack + t * (kStackBytes + page) + page;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
  }
  tl_block = &b;
  for (;;) {
    bool ran = false;
    for (int t = 0; t < n; ++t) {
      Fiber& f = b.fibers[reverse ? n - 1 - t : t];
      if (f.state != State::kReady) continue;
      b.current = &f;
      swapcontext(&b.scheduler, &f.context);
      if (!b.fault.empty()) throw std::runtime_error("emulated CUDA, " + where(b, f) + ": " + b.fault);
      ran = true;
    }
    if (ran) continue;
    int done = 0, waiting = 0;
    for (const Fiber& f : b.fibers) {
      done += f.state == State::kDone;
      waiting += f.state == State::kBarrier;
    }
    if (done == n) break;
    if (waiting == n) {
      for (Fiber& f : b.fibers) f.state = State::kReady;
      continue;
    }
    for (const Fiber& f : b.fibers)
      if (f.state == State::kShuffle)
        throw std::runtime_error("emulated CUDA, " + where(b, f) + ": waits at a warp shuffle that lanes of its warp "
                                 "never reach (divergence, a barrier or an exit)");
    throw std::runtime_error("emulated CUDA: __syncthreads not reached by every thread of block (" +
                             std::to_string(b.idx.x) + ", " + std::to_string(b.idx.y) + "): " +
                             std::to_string(waiting) + " wait, " + std::to_string(done) + " have exited");
  }
  tl_block = nullptr;
}

// Kernel attributes set with cudaFuncSetAttribute: the dynamic shared memory each kernel may use.
inline std::map<const void*, int>& shared_limits() {
  static std::map<const void*, int> limits;
  return limits;
}

inline cudaError_t& last_error() {
  static thread_local cudaError_t error = cudaSuccess;
  return error;
}

// The SM count the device reports (cudaDevAttrMultiProcessorCount).
inline int& multi_processors() {
  static int count = kMultiProcessors;
  return count;
}

// A launch that ran: grid x, y, z, threads per block and bytes of dynamic shared memory.
struct LaunchRecord {
  unsigned grid[3], threads, shared;
};
inline std::vector<LaunchRecord>& launches() {
  static std::vector<LaunchRecord> log;
  return log;
}

// <<<grid, block, shared, stream>>>; every stream is the one emulated stream.
struct Config {
  Config(dim3 grid, dim3 block, size_t shared = 0, cudaStream_t = nullptr) : grid(grid), block(block), shared(shared) {}
  dim3 grid, block;
  size_t shared;
};

// kernel<<<grid, block, shared, stream>>>(args...), the blocks in grid order. Configuration errors
// are reported as a real launch reports them (cudaGetLastError), faults found while running as
// exceptions.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), const Config& c, Args&&... args) {
  const auto threads = static_cast<uint64_t>(c.block.x) * c.block.y * c.block.z;
  if (threads == 0 || threads > kMaxThreads || c.block.z > 64 || c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 ||
      c.grid.x > 0x7fffffffu || c.grid.y > 65535 || c.grid.z > 65535) {
    last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  const auto limit = shared_limits().find(reinterpret_cast<const void*>(kernel));
  if (c.shared > static_cast<size_t>(limit == shared_limits().end() ? kSharedDefault : limit->second)) {
    last_error() = cudaErrorInvalidValue;
    return;
  }
  launches().push_back({{c.grid.x, c.grid.y, c.grid.z}, static_cast<unsigned>(threads), static_cast<unsigned>(c.shared)});
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  auto body = [&] { std::apply(kernel, params); };
  // Dynamic shared memory: 16-byte aligned, filled with garbage, followed by a canary.
  const size_t padded = (c.shared + 15) / 16 * 16;
  std::vector<uint4> storage((padded + kCanaryBytes) / sizeof(uint4));
  auto* shared = reinterpret_cast<unsigned char*>(storage.data());
  Block b;
  b.dim = c.block;
  b.grid = c.grid;
  b.shared = shared;
  b.body = [](void* f) { (*static_cast<decltype(body)*>(f))(); };
  b.body_arg = &body;
  for (unsigned z = 0; z < c.grid.z; ++z)
    for (unsigned y = 0; y < c.grid.y; ++y)
      for (unsigned x = 0; x < c.grid.x; ++x) {
        b.idx = uint3{x, y, z};
        b.fault.clear();
        std::memset(shared, kSharedFill, c.shared);
        std::memset(shared + c.shared, kCanary, padded + kCanaryBytes - c.shared);
        run_block(b, (x + y + z) % 2 == 1);
        for (size_t i = c.shared; i < padded + kCanaryBytes; ++i)
          if (shared[i] != kCanary)
            throw std::runtime_error("emulated CUDA: block (" + std::to_string(x) + ", " + std::to_string(y) +
                                     ") wrote past its " + std::to_string(c.shared) +
                                     " bytes of dynamic shared memory (byte " + std::to_string(i) + ")");
      }
}

// `extern __shared__ __align__(A) T name[];`
template <typename T, size_t Align>
T* dynamic_shared() {
  static_assert(Align <= 16, "dynamic shared memory is 16-byte aligned");
  return reinterpret_cast<T*>(block().shared);
}

inline void syncthreads() { yield(State::kBarrier); }

// One lane's part of a shuffle; `source` is the lane it reads (its own when out of range).
template <typename T>
T shuffle(unsigned mask, T var, int source, const char* file, int line) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 8 bytes");
  if (mask != 0xffffffffu) fault("the emulation supports full-warp shuffles only");
  Block& b = block();
  Fiber& f = thread();
  const int t = static_cast<int>(&f - b.fibers.data()), lane = t % kWarpSize;
  Warp& w = b.warps[t / kWarpSize];
  if (w.arrived == 0) {
    w.file = file;
    w.line = line;
  } else if (w.line != line || std::strcmp(w.file, file) != 0) {
    fault("lanes of one warp are at different shuffles: " + std::string(w.file) + ":" + std::to_string(w.line) +
          " and " + file + ":" + std::to_string(line));
  }
  std::memcpy(&w.value[lane], &var, sizeof(T));
  w.source[lane] = source;
  if (++w.arrived < kWarpSize) {
    yield(State::kShuffle);
  } else {
    w.arrived = 0;
    for (int l = 0; l < kWarpSize; ++l) {
      w.result[l] = w.value[w.source[l]];
      Fiber& lane_fiber = b.fibers[t - lane + l];
      if (&lane_fiber != &f) lane_fiber.state = State::kReady;
    }
  }
  T out;
  std::memcpy(&out, &w.result[lane], sizeof(T));
  return out;
}

inline int lane_id() { return static_cast<int>(&thread() - block().fibers.data()) % kWarpSize; }

// The lanes of shfl.sync's segments of `width` lanes (PTX ISA, shfl.sync).
inline int xor_source(int lane, int lane_mask, int width) {
  const int last = (lane & ~(width - 1)) + width - 1, j = lane ^ lane_mask;
  return j <= last ? j : lane;
}
inline int up_source(int lane, int delta, int width) {
  const int first = lane & ~(width - 1), j = lane - delta;
  return j >= first ? j : lane;
}

inline const char* error_name(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    default: return "an error the emulation does not name";
  }
}

// The CUDA runtime calls of the host code.
inline cudaError_t GetLastError() { return std::exchange(last_error(), cudaSuccess); }

inline cudaError_t GetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t DeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = multi_processors(); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = kSharedOptin; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t FuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > kSharedOptin)
    return cudaErrorInvalidValue;
  shared_limits()[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

}  // namespace emu

// For the tests, through ctypes: set the SM count (returns the previous one), and take the launches
// logged since the last call (up to `capacity` records of 5 unsigned ints: grid x, y, z, threads,
// shared bytes; returns how many were logged).
extern "C" __attribute__((used, visibility("default"))) inline int emu_set_multiprocessors(int count) {
  return std::exchange(::emu::multi_processors(), count);
}
extern "C" __attribute__((used, visibility("default"))) inline int emu_take_launches(unsigned* out, int capacity) {
  auto& log = ::emu::launches();
  const int n = static_cast<int>(log.size());
  for (int i = 0; i < n && i < capacity; ++i) {
    const auto& r = log[i];
    const unsigned fields[5] = {r.grid[0], r.grid[1], r.grid[2], r.threads, r.shared};
    std::memcpy(out + 5 * i, fields, sizeof fields);
  }
  log.clear();
  return n;
}

#define cudaGetLastError ::emu::GetLastError
#define cudaGetDevice ::emu::GetDevice
#define cudaDeviceGetAttribute ::emu::DeviceGetAttribute
#define cudaFuncSetAttribute ::emu::FuncSetAttribute

#define threadIdx (::emu::thread().idx)
#define blockIdx (::emu::block().idx)
#define blockDim (::emu::block().dim)
#define gridDim (::emu::block().grid)

inline void __syncthreads() { ::emu::syncthreads(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = ::emu::kWarpSize,
                  const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::emu::shuffle(mask, var, ::emu::xor_source(::emu::lane_id(), lane_mask, width), file, line);
}

template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = ::emu::kWarpSize,
                 const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::emu::shuffle(mask, var, ::emu::up_source(::emu::lane_id(), static_cast<int>(delta), width), file, line);
}

// Device math: one IEEE float32 operation each (the build uses -ffp-contract=off).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
inline int min(int a, int b) { return a < b ? a : b; }

// mask_math.h's device branch (the _rn intrinsics, __float_as_uint), as nvcc compiles it for the
// GPU; #pragma once makes the kernels' own include of it a no-op.
#define __CUDA_ARCH__ 900
#include "mask_math.h"
#undef __CUDA_ARCH__
