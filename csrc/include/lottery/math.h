// The element-wise update rules, one functor per rule, shared by the CPU loop (csrc/cpu/)
// and the CUDA kernels (csrc/cuda/). Each functor works in the opmath type Op (float for
// float16/bfloat16/float32 params, double for float64) and follows the operation order of
// torch.optim's single-tensor implementation so results agree to rounding.
//
// Masking contract: `keep == false` means the weight is pruned. Its gradient is ignored and
// the parameter and every state buffer are written as exact zeros.
#pragma once

#include <cmath>

#include "lottery/macros.h"

namespace lottery {

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

// Host-side construction of the per-tensor Adam scalars, in double like torch's Python code.
template <typename Op>
inline AdamMath<Op> make_adam_math(double lr, double beta1, double beta2, double eps, double wd,
                                   bool decoupled, bool maximize, double step) {
  AdamMath<Op> a;
  a.one_minus_beta1 = Op(1.0 - beta1);
  a.beta2 = Op(beta2);
  a.one_minus_beta2 = Op(1.0 - beta2);
  a.l2 = Op(decoupled ? 0.0 : wd);
  a.decay = Op(decoupled && wd != 0.0 ? 1.0 - lr * wd : 1.0);
  a.step_size = Op(lr / (1.0 - std::pow(beta1, step)));
  a.bc2_sqrt = Op(std::sqrt(1.0 - std::pow(beta2, step)));
  a.eps = Op(eps);
  a.maximize = maximize;
  return a;
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
