// The element-wise update rules, one functor per rule, shared by the CPU loop (csrc/cpu/)
// and the CUDA kernels (csrc/cuda/). Each functor works in the opmath type Op (float for
// float16/bfloat16/float32 params, double for float64) and follows the operation order of
// torch.optim's single-tensor implementation so results agree to rounding.
//
// Masking contract: `keep == false` means the weight is pruned. Its gradient is ignored and
// the parameter and every state buffer are written as exact zeros.
//
// The hyper-parameters arrive as SgdArgs / AdamArgs (doubles, as torch.optim keeps them in
// Python) and become a functor through make_sgd_math / advance_adam_steps on the host, the
// same code for both launchers, so CPU and CUDA round every scalar identically.
#pragma once

#include <cmath>
#include <cstddef>
#include <vector>

#include "lottery/macros.h"

namespace lottery {

// torch.optim.SGD's hyper-parameters (_core.SgdArgs).
struct SgdArgs {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize;
};

// torch.optim.Adam's hyper-parameters (_core.AdamArgs); decoupled: AdamW's weight decay.
struct AdamArgs {
  double lr, beta1, beta2, eps, weight_decay;
  bool amsgrad, maximize, decoupled;
};

template <typename Op>
LOTTERY_HD LOTTERY_INLINE Op op_sqrt(Op x) {
  using std::sqrt;
  return sqrt(x);
}

// torch.lerp's formula (two branches keep it exact at weight 0 and 1).
template <typename Op>
LOTTERY_HD LOTTERY_INLINE Op lerp(Op self, Op end, Op weight) {
  return (weight < Op(0.5)) ? self + weight * (end - self) : end - (end - self) * (Op(1) - weight);
}

// torch.optim.SGD: weight decay, momentum with dampening, optional Nesterov.
template <typename Op>
struct SgdMath {
  Op lr, momentum;
  Op one_minus_dampening;  // computed in double on the host, as torch does in Python
  Op weight_decay;
  bool nesterov, maximize;

  // `first`: this tensor has no momentum history yet (torch clones the gradient into buf).
  // Ternaries, not ifs, on the loop-invariant flags: the compiler turns them into blends and
  // the loop stays vectorised.
  LOTTERY_HD LOTTERY_INLINE void operator()(Op& p, Op g, Op& buf, bool first, bool keep) const {
    g = maximize ? -g : g;
    g = weight_decay != Op(0) ? g + weight_decay * p : g;
    const Op nb = first ? g : buf * momentum + one_minus_dampening * g;
    const Op d = momentum == Op(0) ? g : (nesterov ? g + momentum * nb : nb);
    buf = momentum == Op(0) ? buf : nb;
    p = p + (-lr) * d;
    p = keep ? p : Op(0);
    buf = keep ? buf : Op(0);
  }
};

template <typename Op>
inline SgdMath<Op> make_sgd_math(const SgdArgs& a) {
  return {Op(a.lr),           Op(a.momentum), Op(1.0 - a.dampening),
          Op(a.weight_decay), a.nesterov,     a.maximize};
}

// torch.optim.Adam / AdamW (decoupled weight decay), optional AMSGrad.
// Per-tensor scalars (bias corrections depend on the tensor's own step count).
template <typename Op>
struct AdamMath {
  Op one_minus_beta1, beta2, one_minus_beta2;  // 1 - beta in double, as torch does in Python
  Op l2;         // coupled (Adam) weight decay added to the gradient, 0 for AdamW
  Op decay;      // decoupled (AdamW) factor 1 - lr * wd, 1 for Adam
  Op step_size;  // lr / (1 - beta1^t)
  Op bc2_sqrt;   // sqrt(1 - beta2^t)
  Op eps;
  bool maximize;

  template <bool AMSGRAD>
  LOTTERY_HD LOTTERY_INLINE void update(Op& p, Op g, Op& m, Op& v, Op& vmax, bool keep) const {
    g = maximize ? -g : g;  // ternaries keep the loop vectorised (see SgdMath)
    g = l2 != Op(0) ? g + l2 * p : g;
    p = p * decay;
    m = lerp(m, g, one_minus_beta1);
    v = v * beta2 + one_minus_beta2 * (g * g);
    Op vhat = v;
    if (AMSGRAD) {
      vmax = (vmax < v || v != v) ? v : vmax;  // torch.maximum propagates NaN
      vhat = vmax;
    }
    const Op denom = op_sqrt(vhat) / bc2_sqrt + eps;
    p = p + (-step_size) * (m / denom);
    p = keep ? p : Op(0);
    m = keep ? m : Op(0);
    v = keep ? v : Op(0);
    if (AMSGRAD) vmax = keep ? vmax : Op(0);
  }
};

// Host-side construction of the per-tensor Adam scalars at step `step`, in double like
// torch's Python code.
template <typename Op>
inline AdamMath<Op> make_adam_math(const AdamArgs& a, double step) {
  AdamMath<Op> m;
  m.one_minus_beta1 = Op(1.0 - a.beta1);
  m.beta2 = Op(a.beta2);
  m.one_minus_beta2 = Op(1.0 - a.beta2);
  m.l2 = Op(a.decoupled ? 0.0 : a.weight_decay);
  m.decay = Op(a.decoupled && a.weight_decay != 0.0 ? 1.0 - a.lr * a.weight_decay : 1.0);
  m.step_size = Op(a.lr / (1.0 - std::pow(a.beta1, step)));
  m.bc2_sqrt = Op(std::sqrt(1.0 - std::pow(a.beta2, step)));
  m.eps = Op(a.eps);
  m.maximize = a.maximize;
  return m;
}

// One Adam step's host work for n tensors: each tensor's float32 step counter (torch.optim
// keeps it as a CPU float32 scalar, and counts in float32 like it) is incremented, then its
// own scalars are built from the new count.
template <typename Op>
inline std::vector<AdamMath<Op>> advance_adam_steps(const AdamArgs& a, size_t n,
                                                    float* const* steps) {
  std::vector<AdamMath<Op>> fs(n);
  for (size_t t = 0; t < n; ++t) {
    *steps[t] += 1.0f;
    fs[t] = make_adam_math<Op>(a, double(*steps[t]));
  }
  return fs;
}

}  // namespace lottery

namespace lottery {

// Zero the pruned entries of a tensor (used when a mask is set: param and state at once).
template <typename Op>
struct ApplyMask {
  LOTTERY_HD LOTTERY_INLINE Op operator()(Op x, bool keep) const { return keep ? x : Op(0); }
};

}  // namespace lottery

namespace lottery {

// Rewind (lottery ticket reset): survivors take their snapshot value, pruned weights 0.
// Works on the storage type directly: the snapshot value is copied bit for bit.
struct RewindValue {
  template <typename T>
  LOTTERY_HD LOTTERY_INLINE T operator()(T snapshot, bool keep) const {
    return keep ? snapshot : T{};
  }
};

}  // namespace lottery
