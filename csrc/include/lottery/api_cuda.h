// The CUDA entry points of the compiled core (csrc/cuda/), called only from csrc/bindings.cpp.
// Same contract as the CPU launchers in lottery/api.h (raw pointers, element counts, a dtype
// code; no torch types), plus:
//
// - every pointer ARRAY (params, grads, masks, ...) is a HOST array of n DEVICE pointers; a
//   null mask means "unmasked", a null state buffer means "absent";
// - `device` is the CUDA device index every tensor of the call lives on: it is made current
//   for the call and the previous current device is restored before returning;
// - `stream` is the caller's cudaStream_t (torch.cuda.current_stream().cuda_stream): every
//   kernel is launched on it, nothing synchronises the device or the host;
// - launch failures throw std::runtime_error naming the kernel and the CUDA error; bad
//   arguments throw std::invalid_argument (bindings turn both into Python exceptions).
//
// Kernel parameters are passed by value (per-launch tensor tables under 4 KB), so the host
// arrays may be freed as soon as a call returns; long lists take several launches.
#pragma once

#include <cstddef>
#include <cstdint>

#include "lottery/api.h"
#include "lottery/select.h"

#ifdef LOTTERY_EXT_WITH_CUDA
namespace lottery::cuda {

// torch.optim.SGD with masks. bufs (the array itself may be null when momentum == 0) holds the
// momentum buffers; first: HOST array of n flags, first[i] != 0: tensor i has no momentum
// history yet (its buffer is written from the gradient, as torch clones it).
void sgd_step(DType dtype, size_t n, void* const* params, const void* const* grads,
              void* const* bufs, const uint8_t* const* masks, const int64_t* numels,
              const uint8_t* first, const SgdArgs& args, int device, void* stream);

// torch.optim.Adam / AdamW with masks. host_steps[i]: tensor i's float32 step counter in HOST
// memory (a CPU scalar tensor, as torch.optim keeps it), incremented here on the host before
// the launch; the bias corrections are computed on the host in double (make_adam_math).
// max_exp_avg_sqs is only read when args.amsgrad (it may be null otherwise).
void adam_step(DType dtype, size_t n, void* const* params, const void* const* grads,
               void* const* exp_avgs, void* const* exp_avg_sqs, void* const* max_exp_avg_sqs,
               const uint8_t* const* masks, const int64_t* numels, float* const* host_steps,
               const AdamArgs& args, int device, void* stream);

// tensors[i][j] = 0 where masks[i][j] == 0 (a null mask leaves tensor i untouched).
void apply_mask(DType dtype, size_t n, void* const* tensors, const uint8_t* const* masks,
                const int64_t* numels, int device, void* stream);

// Largest digit width of a GPU histogram pass (shared-memory privatised histograms).
constexpr int kMaxHistogramBits = 12;

// One radix pass (lottery/select.h) over the concatenation of the n tensors:
// hist[d] += #candidates whose key matches pass.prefix on pass.prefix_mask and whose digit is d,
// hist[2^bits] += #NaN candidates (key > MagnitudeKey<T>::kInf). `hist`: DEVICE int64 array of
// 2^pass.bits + 1 entries, accumulated into (the caller zeroes it). 1 <= pass.bits <= 12 and
// 0 <= pass.shift < key bits, else std::invalid_argument.
void magnitude_histogram(DType dtype, size_t n, const void* const* tensors,
                         const uint8_t* const* masks, const int64_t* numels, const DigitPass& pass,
                         int64_t* hist, int device, void* stream);

// The same pass for every tensor on its own (per-layer thresholds): tensor i matches its own
// prefix prefixes[i] (HOST array of n) on prefix_mask and counts into its own row of `hist`
// (DEVICE int64, n rows of 2^bits + 1 entries, row-major; last entry of a row = NaN count).
void magnitude_histogram_batched(DType dtype, size_t n, const void* const* tensors,
                                 const uint8_t* const* masks, const int64_t* numels, int shift,
                                 int bits, const uint64_t* prefixes, uint64_t prefix_mask,
                                 int64_t* hist, int device, void* stream);

// Bytes of device scratch threshold_mask needs for these tensors (0 when they are all empty).
// Depends only on the element counts; the caller allocates it (torch's caching allocator).
size_t threshold_mask_scratch_bytes(size_t n, const int64_t* numels);

// out_masks[i] = candidate && ThresholdRule{t_key}.keep(key, tie_pruned), where over the
// concatenation in flat order the first ties_to_prune candidates with key == t_key are pruned.
// out_masks may alias old_masks. scratch: DEVICE memory, 8-byte aligned, at least
// threshold_mask_scratch_bytes(n, numels) bytes (unused, and may be null, when
// ties_to_prune == 0); it must not be used by other work on other streams meanwhile.
void threshold_mask(DType dtype, size_t n, const void* const* tensors,
                    const uint8_t* const* old_masks, uint8_t* const* out_masks,
                    const int64_t* numels, uint64_t t_key, int64_t ties_to_prune, void* scratch,
                    size_t scratch_bytes, int device, void* stream);

// params[i] = RewindValue()(snapshots[i], mask) (bit copy of the snapshot where kept, +0 where
// pruned) and the states_per_tensor buffers of tensor i (states[i * states_per_tensor + k],
// null = absent) zeroed, in one pass (up to 4 states per tensor fused; more are memset).
void rewind(DType dtype, size_t n, void* const* params, const void* const* snapshots,
            const uint8_t* const* masks, void* const* states, size_t states_per_tensor,
            const int64_t* numels, int device, void* stream);

int runtime_version();  // CUDART_VERSION the kernels were compiled against
int device_count();     // 0 when no usable driver/device

}  // namespace lottery::cuda
#endif  // LOTTERY_EXT_WITH_CUDA
