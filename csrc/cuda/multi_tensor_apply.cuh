// Shared machinery of the CUDA launchers: error checks, the device guard, dtype dispatch,
// 16-byte vector loads/stores, and the chunked tensor-list launcher (in the spirit of apex's
// multi_tensor_apply) used by the optimizer, mask and rewind kernels.
//
// Tensor-list launcher: the host walks the tensors, cuts each one into chunks of kChunk
// elements and packs, by value into the kernel's parameters, a table of the tensors of the
// launch (one address per role, mask, element count, one per-tensor scalar) and a map
// block -> (tensor slot, chunk). A launch holds as many tensors and blocks as fit in the
// parameter budget (< 4 KB); long lists take several launches, and a tensor cut by a launch
// boundary continues in slot 0 of the next one. One block processes one chunk. Element
// offsets are 64-bit (tensors may exceed 2^31 elements); within a chunk they are int.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "lottery/dispatch.h"
#include "lottery/dtype.h"
#include "lottery/macros.h"

namespace lottery::cuda::detail {

// ---------------------------------------------------------------------------------------------
// errors

[[noreturn]] inline void throw_cuda(cudaError_t e, const std::string& what) {
  throw std::runtime_error("lottery_ext CUDA: " + what + ": " + cudaGetErrorName(e) + " (" +
                           cudaGetErrorString(e) + ")");
}

// Checks the return code of a runtime call.
inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // do not leave it to be reported by the next launch check
    throw_cuda(e, what);
  }
}

// Checks the launch just made (bad configuration, missing kernel image, or a sticky error from
// earlier asynchronous work on this device, which the message then reports).
inline void check_launch(const char* kernel) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw_cuda(e, std::string("launch of kernel ") + kernel);
}

// Makes `device` current for the scope of a call and restores the previous device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    (void)cudaGetLastError();  // start the call with a clean (non-sticky) error state
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) {
      check(cudaSetDevice(device), "cudaSetDevice");
      changed_ = true;
    }
  }
  ~DeviceGuard() {
    if (changed_) (void)cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool changed_ = false;
};

inline int sm_count(int device) {
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute(MultiProcessorCount)");
  return sms > 0 ? sms : 1;
}

// dtype dispatch: lottery::dispatch_dtype (lottery/dispatch.h), shared with the CPU launchers.
using lottery::dispatch_dtype;

// ---------------------------------------------------------------------------------------------
// vector memory access

// Elements of T per 16-byte access.
template <typename T>
constexpr int kVec = int(16 / sizeof(T));

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int A>
__device__ LOTTERY_INLINE bool aligned_to(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % A == 0;  // null counts as aligned (absent buffer)
}

template <int N, typename T>
__device__ LOTTERY_INLINE void vload(T (&dst)[N], const T* src) {
  if constexpr (N == 1) {
    dst[0] = src[0];
  } else {
    const Pack<T, N> v = *reinterpret_cast<const Pack<T, N>*>(src);
#pragma unroll
    for (int k = 0; k < N; ++k) dst[k] = v.v[k];
  }
}

template <int N, typename T>
__device__ LOTTERY_INLINE void vstore(T* dst, const T (&src)[N]) {
  if constexpr (N == 1) {
    dst[0] = src[0];
  } else {
    Pack<T, N> v;
#pragma unroll
    for (int k = 0; k < N; ++k) v.v[k] = src[k];
    *reinterpret_cast<Pack<T, N>*>(dst) = v;
  }
}

// vload of base[i .. i+N) when HAS, else `fallback` everywhere (optional roles: masks, buffers).
template <bool HAS, int N, typename T>
__device__ LOTTERY_INLINE void vload_or(T (&dst)[N], const T* base, int i, T fallback) {
  if constexpr (HAS) {
    vload(dst, base + i);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) dst[k] = fallback;
  }
}

template <int N>
using Width = std::integral_constant<int, N>;

// Calls body(i, Width<N>{}) so that the block covers [0, len) once: N == VEC (elements
// i .. i+VEC-1, one 16-byte access per pointer) while `aligned`, then N == 1 for the tail (or
// for everything when a pointer is not aligned). Consecutive threads take consecutive
// elements/vectors: coalesced.
template <int VEC, class Body>
__device__ LOTTERY_INLINE void for_each_element(int len, bool aligned, Body&& body) {
  int done = 0;
  if (aligned) {
    const int nvec = len / VEC;
    for (int v = int(threadIdx.x); v < nvec; v += int(blockDim.x)) body(v * VEC, Width<VEC>{});
    done = nvec * VEC;
  }
  for (int i = done + int(threadIdx.x); i < len; i += int(blockDim.x)) body(i, Width<1>{});
}

// ---------------------------------------------------------------------------------------------
// the tensor-list launcher

constexpr size_t kParamBudget = 4000;  // bytes of kernel parameters per launch (limit: 4096)
constexpr int64_t kChunk = 65536;      // elements per block
constexpr int kThreads = 512;          // threads per block
constexpr int kMaxBlocks = 320;        // blocks per launch

struct NoScalar {};

// Per-launch table, passed by value as the kernel's parameter. DEPTH addresses per tensor
// (the roles of the op: param, grad, states...), its mask (null: unmasked), its element count
// and one per-tensor Scalar (AdamMath of the tensor, SGD's `first` flag...).
template <int DEPTH, typename Scalar, int MAX_T>
struct TensorListMeta {
  static constexpr int kDepth = DEPTH;
  static constexpr int kMaxTensors = MAX_T;
  void* ptrs[DEPTH][MAX_T];
  const uint8_t* masks[MAX_T];
  int64_t numels[MAX_T];
  Scalar scalars[MAX_T];
  int32_t block_chunk[kMaxBlocks];   // chunk index of the block within its tensor
  uint8_t block_tensor[kMaxBlocks];  // tensor slot of the block
};

// As many tensors as fit in the budget next to `arg_bytes` of other kernel arguments.
template <int DEPTH, typename Scalar>
constexpr int max_tensors(size_t arg_bytes) {
  const size_t per = (DEPTH + 2) * sizeof(void*) + sizeof(Scalar);
  const size_t fixed = kMaxBlocks * (sizeof(int32_t) + sizeof(uint8_t)) + 64;  // + padding
  const size_t t = (kParamBudget - arg_bytes - fixed) / per;
  return t > 255 ? 255 : int(t);
}

template <class Meta, class Functor>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_kernel(const __grid_constant__ Meta meta, const Functor f) {
  const int slot = meta.block_tensor[blockIdx.x];
  const int64_t start = int64_t(meta.block_chunk[blockIdx.x]) * kChunk;
  const int64_t rest = meta.numels[slot] - start;
  const int len = rest < kChunk ? int(rest) : int(kChunk);
  f(meta, slot, start, len);
}

// Runs `f` over every chunk of every non-empty tensor. fill(meta, slot, t) writes tensor t's
// addresses, mask and scalar into `slot` of the table (numels are written here). Tensors with
// numels[t] <= 0 are skipped. `name` names the kernel in error messages.
template <int DEPTH, typename Scalar, class Functor, class Fill>
void multi_tensor_apply(const char* name, size_t n, const int64_t* numels, const Functor& f,
                        Fill&& fill, cudaStream_t stream) {
  constexpr int MAX_T = max_tensors<DEPTH, Scalar>(sizeof(Functor));
  static_assert(MAX_T >= 8, "tensor-list table too small: too many roles or a large scalar");
  using Meta = TensorListMeta<DEPTH, Scalar, MAX_T>;
  static_assert(sizeof(Meta) + sizeof(Functor) <= kParamBudget, "kernel parameters over 4 KB");
  static_assert(std::is_trivially_copyable_v<Meta> && std::is_trivially_copyable_v<Functor>);

  Meta meta;
  std::memset(static_cast<void*>(&meta), 0, sizeof(meta));
  int nt = 0, nb = 0;  // tensors and blocks in the table
  const auto launch = [&] {
    multi_tensor_kernel<Meta, Functor><<<unsigned(nb), kThreads, 0, stream>>>(meta, f);
    check_launch(name);
  };
  for (size_t t = 0; t < n; ++t) {
    const int64_t numel = numels[t];
    if (numel <= 0) continue;
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    if (chunks > std::numeric_limits<int32_t>::max())
      throw std::invalid_argument(std::string(name) + ": tensor too large");
    fill(meta, nt, t);
    meta.numels[nt] = numel;
    ++nt;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_tensor[nb] = uint8_t(nt - 1);
      meta.block_chunk[nb] = int32_t(c);
      ++nb;
      const bool last_chunk = c == chunks - 1;
      if (nb == kMaxBlocks || (nt == MAX_T && last_chunk)) {
        launch();
        nb = 0;
        if (last_chunk) {
          nt = 0;
        } else {  // the tensor goes on in the next launch: move it to slot 0
          const int s = nt - 1;
          for (int d = 0; d < DEPTH; ++d) meta.ptrs[d][0] = meta.ptrs[d][s];
          meta.masks[0] = meta.masks[s];
          meta.numels[0] = meta.numels[s];
          meta.scalars[0] = meta.scalars[s];
          nt = 1;
        }
      }
    }
  }
  if (nb > 0) launch();
}

}  // namespace lottery::cuda::detail
