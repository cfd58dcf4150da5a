// CUDA launcher for the fused rewind: every parameter back to its snapshot (RewindValue of
// lottery/math.h: bit copy where kept, +0 where pruned) and its optimizer state buffers
// zeroed, for the whole list in one tensor-list launch (csrc/cpu/rewind.cpp is the CPU loop).
#include <cuda_runtime.h>

#include <vector>

#include "lottery/api_cuda.h"
#include "lottery/math.h"
#include "multi_tensor_apply.cuh"

namespace lottery::cuda {
namespace {

using detail::for_each_element;
using detail::kVec;
using detail::vload;
using detail::vstore;

// State buffers per tensor zeroed inside the fused kernel (Adam with AMSGrad has 3); any
// further ones are zeroed with cudaMemsetAsync.
constexpr int kFusedStates = 4;

// Table roles: 0 param, 1 snapshot, 2.. state buffers (null: absent).
template <typename T>
struct RewindFunctor {
  template <class Meta>
  __device__ LOTTERY_INLINE void operator()(const Meta& meta, int slot, int64_t start,
                                            int len) const {
    T* p = static_cast<T*>(meta.ptrs[0][slot]) + start;
    const T* snap = static_cast<const T*>(meta.ptrs[1][slot]) + start;
    T* st[kFusedStates];
    bool aligned = detail::aligned_to<16>(p) && detail::aligned_to<16>(snap);
#pragma unroll
    for (int k = 0; k < kFusedStates; ++k) {
      T* b = static_cast<T*>(meta.ptrs[2 + k][slot]);
      st[k] = b ? b + start : nullptr;
      aligned = aligned && detail::aligned_to<16>(st[k]);
    }
    const uint8_t* mask = meta.masks[slot];
    if (mask)
      run<true>(p, snap, st, mask + start, aligned && detail::aligned_to<kVec<T>>(mask), len);
    else
      run<false>(p, snap, st, nullptr, aligned, len);
  }

  template <bool HAS_MASK>
  __device__ LOTTERY_INLINE void run(T* p, const T* snap, T* const (&st)[kFusedStates],
                                     const uint8_t* mask, bool aligned, int len) const {
    const RewindValue f;
    for_each_element<kVec<T>>(len, aligned, [&](int i, auto width) {
      constexpr int N = decltype(width)::value;
      T sv[N];
      vload(sv, snap + i);
      if constexpr (HAS_MASK) {
        uint8_t keep[N];
        vload(keep, mask + i);
#pragma unroll
        for (int k = 0; k < N; ++k) sv[k] = f(sv[k], keep[k] != 0);
      } else {
#pragma unroll
        for (int k = 0; k < N; ++k) sv[k] = f(sv[k], true);
      }
      vstore(p + i, sv);
      T zero[N];
#pragma unroll
      for (int k = 0; k < N; ++k) zero[k] = T{};
#pragma unroll
      for (int k = 0; k < kFusedStates; ++k)
        if (st[k]) vstore(st[k] + i, zero);
    });
  }
};

}  // namespace

void rewind(DType dtype, size_t n, void* const* params, const void* const* snapshots,
            const uint8_t* const* masks, void* const* states, size_t states_per_tensor,
            const int64_t* numels, const Exec& exec) {
  if (n == 0) return;
  const detail::DeviceGuard guard(exec.device);
  const auto s = static_cast<cudaStream_t>(exec.stream);
  const size_t fused =
      states_per_tensor < size_t(kFusedStates) ? states_per_tensor : size_t(kFusedStates);
  detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto fill = [&](auto& meta, int slot, size_t t) {
      meta.ptrs[0][slot] = params[t];
      meta.ptrs[1][slot] = const_cast<void*>(snapshots[t]);
      for (int k = 0; k < kFusedStates; ++k)
        meta.ptrs[2 + k][slot] = size_t(k) < fused ? states[t * states_per_tensor + k] : nullptr;
      meta.masks[slot] = masks[t];
    };
    detail::multi_tensor_apply<2 + kFusedStates, detail::NoScalar>("rewind", n, numels,
                                                                   RewindFunctor<T>{}, fill, s);
    // Beyond the fused buffers (no caller has more today): zero them on the same stream.
    for (size_t t = 0; t < n; ++t) {
      if (numels[t] <= 0) continue;
      for (size_t k = fused; k < states_per_tensor; ++k) {
        void* b = states[t * states_per_tensor + k];
        if (b)
          detail::check(cudaMemsetAsync(b, 0, size_t(numels[t]) * sizeof(T), s),
                        "cudaMemsetAsync (rewind state buffer)");
      }
    }
  });
}

}  // namespace lottery::cuda
