// CUDA launchers for the masked optimizer updates and apply_mask: the tensor-list launcher of
// multi_tensor_apply.cuh around the functors of lottery/math.h (the CPU loops in
// csrc/cpu/optim.cpp call the same functors). One read and one write of every byte per step.
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
using detail::vload_or;
using detail::vstore;

// Table roles: 0 param, 1 grad, 2 momentum buffer. Scalar: the tensor's `first` flag.
template <typename T, bool HAS_BUF>
struct SgdFunctor {
  using Op = OpMath<T>;
  SgdMath<Op> math;

  template <class Meta>
  __device__ LOTTERY_INLINE void operator()(const Meta& meta, int slot, int64_t start,
                                            int len) const {
    T* p = static_cast<T*>(meta.ptrs[0][slot]) + start;
    const T* g = static_cast<const T*>(meta.ptrs[1][slot]) + start;
    T* buf = HAS_BUF ? static_cast<T*>(meta.ptrs[2][slot]) + start : nullptr;
    const uint8_t* mask = meta.masks[slot];
    const bool first = meta.scalars[slot] != 0;
    if (mask)
      run<true>(p, g, buf, mask + start, first, len);
    else
      run<false>(p, g, buf, nullptr, first, len);
  }

  template <bool HAS_MASK>
  __device__ LOTTERY_INLINE void run(T* p, const T* g, T* buf, const uint8_t* mask, bool first,
                                     int len) const {
    constexpr int V = kVec<T>;
    const bool aligned = detail::aligned_to<16>(p) && detail::aligned_to<16>(g) &&
                         detail::aligned_to<16>(buf) && detail::aligned_to<V>(mask);
    const SgdMath<Op> f = math;
    for_each_element<V>(len, aligned, [&](int i, auto width) {
      constexpr int N = decltype(width)::value;
      T pv[N], gv[N], bv[N];
      uint8_t keep[N];
      vload(pv, p + i);
      vload(gv, g + i);
      vload_or<HAS_BUF>(bv, buf, i, T{});
      vload_or<HAS_MASK>(keep, mask, i, uint8_t(1));
#pragma unroll
      for (int k = 0; k < N; ++k) {
        Op pk = load(pv[k]);
        Op bk = HAS_BUF ? load(bv[k]) : Op(0);
        f(pk, load(gv[k]), bk, first, keep[k] != 0);
        pv[k] = store<T>(pk);
        if constexpr (HAS_BUF) bv[k] = store<T>(bk);
      }
      vstore(p + i, pv);
      if constexpr (HAS_BUF) vstore(buf + i, bv);
    });
  }
};

// Table roles: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, 4 max_exp_avg_sq (AMSGRAD only).
// Scalar: the tensor's AdamMath (its own bias corrections).
template <typename T, bool AMSGRAD>
struct AdamFunctor {
  using Op = OpMath<T>;

  template <class Meta>
  __device__ LOTTERY_INLINE void operator()(const Meta& meta, int slot, int64_t start,
                                            int len) const {
    T* p = static_cast<T*>(meta.ptrs[0][slot]) + start;
    const T* g = static_cast<const T*>(meta.ptrs[1][slot]) + start;
    T* m = static_cast<T*>(meta.ptrs[2][slot]) + start;
    T* v = static_cast<T*>(meta.ptrs[3][slot]) + start;
    T* vmax = AMSGRAD ? static_cast<T*>(meta.ptrs[4][slot]) + start : nullptr;
    const uint8_t* mask = meta.masks[slot];
    const AdamMath<Op> f = meta.scalars[slot];
    if (mask)
      run<true>(f, p, g, m, v, vmax, mask + start, len);
    else
      run<false>(f, p, g, m, v, vmax, nullptr, len);
  }

  template <bool HAS_MASK>
  __device__ LOTTERY_INLINE void run(const AdamMath<Op>& f, T* p, const T* g, T* m, T* v, T* vmax,
                                     const uint8_t* mask, int len) const {
    constexpr int V = kVec<T>;
    const bool aligned = detail::aligned_to<16>(p) && detail::aligned_to<16>(g) &&
                         detail::aligned_to<16>(m) && detail::aligned_to<16>(v) &&
                         detail::aligned_to<16>(vmax) && detail::aligned_to<V>(mask);
    for_each_element<V>(len, aligned, [&](int i, auto width) {
      constexpr int N = decltype(width)::value;
      T pv[N], gv[N], mv[N], vv[N], xv[N];
      uint8_t keep[N];
      vload(pv, p + i);
      vload(gv, g + i);
      vload(mv, m + i);
      vload(vv, v + i);
      vload_or<AMSGRAD>(xv, vmax, i, T{});
      vload_or<HAS_MASK>(keep, mask, i, uint8_t(1));
#pragma unroll
      for (int k = 0; k < N; ++k) {
        Op pk = load(pv[k]), mk = load(mv[k]), vk = load(vv[k]);
        Op xk = AMSGRAD ? load(xv[k]) : Op(0);
        f.template update<AMSGRAD>(pk, load(gv[k]), mk, vk, xk, keep[k] != 0);
        pv[k] = store<T>(pk);
        mv[k] = store<T>(mk);
        vv[k] = store<T>(vk);
        if constexpr (AMSGRAD) xv[k] = store<T>(xk);
      }
      vstore(p + i, pv);
      vstore(m + i, mv);
      vstore(v + i, vv);
      if constexpr (AMSGRAD) vstore(vmax + i, xv);
    });
  }
};

// Table role: 0 the tensor. Tensors without a mask are not in the table.
template <typename T>
struct MaskFunctor {
  template <class Meta>
  __device__ LOTTERY_INLINE void operator()(const Meta& meta, int slot, int64_t start,
                                            int len) const {
    constexpr int V = kVec<T>;
    T* x = static_cast<T*>(meta.ptrs[0][slot]) + start;
    const uint8_t* mask = meta.masks[slot] + start;
    const bool aligned = detail::aligned_to<16>(x) && detail::aligned_to<V>(mask);
    const ApplyMask<OpMath<T>> f;
    for_each_element<V>(len, aligned, [&](int i, auto width) {
      constexpr int N = decltype(width)::value;
      T xv[N];
      uint8_t keep[N];
      vload(xv, x + i);
      vload(keep, mask + i);
#pragma unroll
      for (int k = 0; k < N; ++k) xv[k] = store<T>(f(load(xv[k]), keep[k] != 0));
      vstore(x + i, xv);
    });
  }
};

}  // namespace

void sgd_step(DType dtype, size_t n, void* const* params, const void* const* grads,
              void* const* bufs, const uint8_t* const* masks, const int64_t* numels,
              const uint8_t* first, const SgdArgs& a, const Exec& exec) {
  if (n == 0) return;
  const detail::DeviceGuard guard(exec.device);
  const auto s = static_cast<cudaStream_t>(exec.stream);
  const bool has_buf = a.momentum != 0.0;
  detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const SgdMath<OpMath<T>> math = make_sgd_math<OpMath<T>>(a);
    const auto fill = [&](auto& meta, int slot, size_t t) {
      meta.ptrs[0][slot] = params[t];
      meta.ptrs[1][slot] = const_cast<void*>(grads[t]);
      meta.ptrs[2][slot] = has_buf ? bufs[t] : nullptr;
      meta.masks[slot] = masks[t];
      meta.scalars[slot] = first[t] != 0 ? 1 : 0;
    };
    if (has_buf)
      detail::multi_tensor_apply<3, uint8_t>("sgd_step", n, numels, SgdFunctor<T, true>{math}, fill,
                                             s);
    else
      detail::multi_tensor_apply<3, uint8_t>("sgd_step", n, numels, SgdFunctor<T, false>{math},
                                             fill, s);
  });
}

void adam_step(DType dtype, size_t n, void* const* params, const void* const* grads,
               void* const* exp_avgs, void* const* exp_avg_sqs, void* const* max_exp_avg_sqs,
               const uint8_t* const* masks, const int64_t* numels, float* const* steps,
               const AdamArgs& a, const Exec& exec) {
  if (n == 0) return;
  const detail::DeviceGuard guard(exec.device);
  const auto s = static_cast<cudaStream_t>(exec.stream);
  detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Op = OpMath<T>;
    // Per-tensor scalars on the host (the step counters are host memory), the same code as
    // the CPU launcher: each tensor has its own step count, bias corrections in double.
    const std::vector<AdamMath<Op>> fs = advance_adam_steps<Op>(a, n, steps);
    const auto fill = [&](auto& meta, int slot, size_t t) {
      meta.ptrs[0][slot] = params[t];
      meta.ptrs[1][slot] = const_cast<void*>(grads[t]);
      meta.ptrs[2][slot] = exp_avgs[t];
      meta.ptrs[3][slot] = exp_avg_sqs[t];
      meta.ptrs[4][slot] = a.amsgrad ? max_exp_avg_sqs[t] : nullptr;
      meta.masks[slot] = masks[t];
      meta.scalars[slot] = fs[t];
    };
    if (a.amsgrad)
      detail::multi_tensor_apply<5, AdamMath<Op>>("adam_step", n, numels, AdamFunctor<T, true>{},
                                                  fill, s);
    else
      detail::multi_tensor_apply<5, AdamMath<Op>>("adam_step", n, numels, AdamFunctor<T, false>{},
                                                  fill, s);
  });
}

void apply_mask(DType dtype, size_t n, void* const* tensors, const uint8_t* const* masks,
                const int64_t* numels, const Exec& exec) {
  if (n == 0) return;
  // Unmasked tensors have nothing to do: leave them out of the launch.
  std::vector<int64_t> todo(numels, numels + n);
  bool any = false;
  for (size_t t = 0; t < n; ++t) {
    if (!masks[t]) todo[t] = 0;
    any = any || todo[t] > 0;
  }
  if (!any) return;
  const detail::DeviceGuard guard(exec.device);
  const auto s = static_cast<cudaStream_t>(exec.stream);
  detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto fill = [&](auto& meta, int slot, size_t t) {
      meta.ptrs[0][slot] = tensors[t];
      meta.masks[slot] = masks[t];
    };
    detail::multi_tensor_apply<1, detail::NoScalar>("apply_mask", n, todo.data(), MaskFunctor<T>{},
                                                    fill, s);
  });
}

}  // namespace lottery::cuda
