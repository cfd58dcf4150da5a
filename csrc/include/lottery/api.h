// The compiled core's C++ entry points, called only from csrc/bindings.cpp.
// Everything is raw pointers + element counts + a dtype code: no torch types. Inputs are
// validated in Python (python/lottery_ext/_validate.py) before they get here.
//
// Multi-tensor calls: arrays of n pointers, one entry per tensor. A null mask pointer means
// "unmasked"; masks are 1 byte per element (torch.bool), nonzero = keep.
#pragma once

#include <cstddef>
#include <cstdint>

#include "lottery/macros.h"
#include "lottery/select.h"

namespace lottery {

struct SgdArgs {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize;
};

struct AdamArgs {
  double lr, beta1, beta2, eps, weight_decay;
  bool amsgrad, maximize, decoupled;
};

namespace cpu {

// bufs may be null when momentum == 0. first[i] != 0: tensor i has no momentum history.
void sgd_step(DType dtype, size_t n, void* const* params, const void* const* grads,
              void* const* bufs, const uint8_t* const* masks, const int64_t* numels,
              const uint8_t* first, const SgdArgs& args, int threads);

// steps[i]: tensor i's float32 step counter; incremented here, then used for bias correction.
// max_exp_avg_sqs is null unless args.amsgrad.
void adam_step(DType dtype, size_t n, void* const* params, const void* const* grads,
               void* const* exp_avgs, void* const* exp_avg_sqs, void* const* max_exp_avg_sqs,
               const uint8_t* const* masks, const int64_t* numels, float* const* steps,
               const AdamArgs& args, int threads);

// tensors[i][j] = 0 where masks[i][j] == 0.
void apply_mask(DType dtype, size_t n, void* const* tensors, const uint8_t* const* masks,
                const int64_t* numels, int threads);

// Adds to hist[0 .. 2^pass.bits) the digit counts of the candidate magnitudes (mask true or
// no mask) that match the pass's prefix; adds the number of NaN candidates to *nan_count.
void magnitude_histogram(DType dtype, size_t n, const void* const* tensors,
                         const uint8_t* const* masks, const int64_t* numels, const DigitPass& pass,
                         int64_t* hist, int64_t* nan_count, int threads);

// out_masks[i] = candidate && (key > t_key, or key == t_key and not among the first
// ties_to_prune ties in flat order over the list). out may alias old_masks.
void threshold_mask(DType dtype, size_t n, const void* const* tensors,
                    const uint8_t* const* old_masks, uint8_t* const* out_masks,
                    const int64_t* numels, uint64_t t_key, int64_t ties_to_prune, int threads);

// params[i] = snapshots[i] where masks[i] (or everywhere without a mask), else 0; and the
// states_per_tensor buffers of tensor i (states[i * states_per_tensor + k], null = absent)
// zeroed, in the same pass over the tensor's elements.
void rewind(DType dtype, size_t n, void* const* params, const void* const* snapshots,
            const uint8_t* const* masks, void* const* states, size_t states_per_tensor,
            const int64_t* numels, int threads);

}  // namespace cpu

}  // namespace lottery

// The CUDA launchers (lottery::cuda::*, LOTTERY_EXT_WITH_CUDA builds only).
#include "lottery/api_cuda.h"
