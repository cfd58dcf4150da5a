// CPU launchers for the masked optimizer updates: one pass over memory per tensor,
// the math from lottery/math.h, threads from parallel.h.
#include <vector>

#include "lottery/api.h"
#include "lottery/dispatch.h"
#include "lottery/math.h"
#include "parallel.h"

namespace lottery::cpu {
namespace {

template <typename T, bool HAS_MASK, bool HAS_BUF>
void sgd_range(const SgdMath<OpMath<T>> f, T* __restrict p, const T* __restrict g,
               T* __restrict buf, const uint8_t* __restrict mask, bool first, int64_t b,
               int64_t e) {
  using Op = OpMath<T>;
  for (int64_t i = b; i < e; ++i) {
    Op pv = load(p[i]);
    Op bv = HAS_BUF ? load(buf[i]) : Op(0);
    f(pv, load(g[i]), bv, first, HAS_MASK ? mask[i] != 0 : true);
    p[i] = store<T>(pv);
    if (HAS_BUF) buf[i] = store<T>(bv);
  }
}

template <typename T, bool AMSGRAD, bool HAS_MASK>
void adam_range(const AdamMath<OpMath<T>> f, T* __restrict p, const T* __restrict g,
                T* __restrict m, T* __restrict v, T* __restrict vmax,
                const uint8_t* __restrict mask, int64_t b, int64_t e) {
  using Op = OpMath<T>;
  for (int64_t i = b; i < e; ++i) {
    Op pv = load(p[i]), mv = load(m[i]), vv = load(v[i]);
    Op xv = AMSGRAD ? load(vmax[i]) : Op(0);
    f.template update<AMSGRAD>(pv, load(g[i]), mv, vv, xv, HAS_MASK ? mask[i] != 0 : true);
    p[i] = store<T>(pv);
    m[i] = store<T>(mv);
    v[i] = store<T>(vv);
    if (AMSGRAD) vmax[i] = store<T>(xv);
  }
}

template <typename T>
void mask_range(T* __restrict x, const uint8_t* __restrict mask, int64_t b, int64_t e) {
  const ApplyMask<OpMath<T>> f;
  for (int64_t i = b; i < e; ++i) x[i] = store<T>(f(load(x[i]), mask[i] != 0));
}

}  // namespace

void sgd_step(DType dtype, size_t n, void* const* params, const void* const* grads,
              void* const* bufs, const uint8_t* const* masks, const int64_t* numels,
              const uint8_t* first, const SgdArgs& a, const Exec& exec) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const SgdMath<OpMath<T>> f = make_sgd_math<OpMath<T>>(a);
    const bool has_buf = a.momentum != 0.0;
    for_each_range(n, numels, exec.threads, [&](size_t t, int64_t b, int64_t e) {
      T* p = static_cast<T*>(params[t]);
      const T* g = static_cast<const T*>(grads[t]);
      T* buf = has_buf ? static_cast<T*>(bufs[t]) : nullptr;
      const uint8_t* mk = masks[t];
      const bool fst = first[t] != 0;
      if (mk && has_buf)
        sgd_range<T, true, true>(f, p, g, buf, mk, fst, b, e);
      else if (mk)
        sgd_range<T, true, false>(f, p, g, buf, mk, fst, b, e);
      else if (has_buf)
        sgd_range<T, false, true>(f, p, g, buf, mk, fst, b, e);
      else
        sgd_range<T, false, false>(f, p, g, buf, mk, fst, b, e);
    });
  });
}

void adam_step(DType dtype, size_t n, void* const* params, const void* const* grads,
               void* const* exp_avgs, void* const* exp_avg_sqs, void* const* max_exp_avg_sqs,
               const uint8_t* const* masks, const int64_t* numels, float* const* steps,
               const AdamArgs& a, const Exec& exec) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    // Per-tensor scalars first (each tensor has its own step count, as in torch.optim).
    const std::vector<AdamMath<OpMath<T>>> fs = advance_adam_steps<OpMath<T>>(a, n, steps);
    for_each_range(n, numels, exec.threads, [&](size_t t, int64_t b, int64_t e) {
      T* p = static_cast<T*>(params[t]);
      const T* g = static_cast<const T*>(grads[t]);
      T* m = static_cast<T*>(exp_avgs[t]);
      T* v = static_cast<T*>(exp_avg_sqs[t]);
      T* vmax = a.amsgrad ? static_cast<T*>(max_exp_avg_sqs[t]) : nullptr;
      const uint8_t* mk = masks[t];
      if (a.amsgrad && mk)
        adam_range<T, true, true>(fs[t], p, g, m, v, vmax, mk, b, e);
      else if (a.amsgrad)
        adam_range<T, true, false>(fs[t], p, g, m, v, vmax, mk, b, e);
      else if (mk)
        adam_range<T, false, true>(fs[t], p, g, m, v, vmax, mk, b, e);
      else
        adam_range<T, false, false>(fs[t], p, g, m, v, vmax, mk, b, e);
    });
  });
}

void apply_mask(DType dtype, size_t n, void* const* tensors, const uint8_t* const* masks,
                const int64_t* numels, const Exec& exec) {
  // Unmasked tensors have nothing to do: count them as empty, so the threads split only the
  // masked elements (and never read a null mask).
  std::vector<int64_t> todo(numels, numels + n);
  for (size_t t = 0; t < n; ++t)
    if (!masks[t]) todo[t] = 0;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_range(n, todo.data(), exec.threads, [&](size_t t, int64_t b, int64_t e) {
      mask_range<T>(static_cast<T*>(tensors[t]), masks[t], b, e);
    });
  });
}

}  // namespace lottery::cpu
