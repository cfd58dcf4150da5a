// The compiled core's C++ entry points, called only from csrc/bindings.cpp: one set of launchers
// per backend, lottery::cpu always and lottery::cuda in LOTTERY_EXT_WITH_CUDA builds, with the
// same declarations (lottery/launchers.inc, included once per namespace) so the bindings are
// written once for both. The CUDA-only extras and the CUDA contract are in lottery/api_cuda.h.
//
// Everything is raw pointers + element counts + a dtype code: no torch types. Inputs are
// validated in Python (python/lottery_ext/_validate.py) before they get here.
#pragma once

#include <cstddef>
#include <cstdint>

#include "lottery/macros.h"
#include "lottery/math.h"
#include "lottery/select.h"

namespace lottery {

// Where a launcher runs. CPU launchers use `threads` (torch.get_num_threads(), read by the
// caller on every call) and ignore the rest; CUDA launchers make `device` current for the call
// (the previous device is restored after), launch on `stream` (the caller's cudaStream_t) and
// ignore `threads`.
struct Exec {
  int threads;
  int device;
  void* stream;
};

}  // namespace lottery

namespace lottery::cpu {
#include "lottery/launchers.inc"
}  // namespace lottery::cpu

#ifdef LOTTERY_EXT_WITH_CUDA
namespace lottery::cuda {
#include "lottery/launchers.inc"
}  // namespace lottery::cuda
#endif
