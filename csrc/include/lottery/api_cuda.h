// The CUDA side of the compiled core (csrc/cuda/): the contract of the lottery::cuda launchers
// declared in lottery/api.h (same signatures as the CPU ones), and the CUDA-only extras.
//
// - every pointer ARRAY (params, grads, masks, ...) is a HOST array of n DEVICE pointers; the
//   scalar arrays (numels, first, steps, prefixes) are host memory, `hist` and `scratch` device
//   memory;
// - exec.device is the CUDA device index every tensor of the call lives on: it is made current
//   for the call and the previous current device is restored before returning;
// - exec.stream is the caller's cudaStream_t (torch.cuda.current_stream().cuda_stream): every
//   kernel is launched on it, nothing synchronises the device or the host;
// - magnitude_histogram*: 1 <= bits <= kMaxHistogramBits and 0 <= shift <= 63;
// - threshold_mask's scratch is 8-byte aligned device memory (unused, and may be null, when
//   ties_to_prune == 0) that no work on other streams uses meanwhile;
// - launch failures throw std::runtime_error naming the kernel and the CUDA error; bad
//   arguments throw std::invalid_argument (bindings turn both into Python exceptions).
//
// Kernel parameters are passed by value (per-launch tensor tables under 4 KB), so the host
// arrays may be freed as soon as a call returns; long lists take several launches.
#pragma once

#include "lottery/api.h"

#ifdef LOTTERY_EXT_WITH_CUDA
namespace lottery::cuda {

// Largest digit width of a GPU histogram pass (shared-memory privatised histograms).
constexpr int kMaxHistogramBits = 12;

int runtime_version();  // CUDART_VERSION the kernels were compiled against
int device_count();     // 0 when no usable driver/device

}  // namespace lottery::cuda
#endif  // LOTTERY_EXT_WITH_CUDA
