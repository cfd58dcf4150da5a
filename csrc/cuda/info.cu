// CUDA runtime facts for build_info() (runtime version, device count). The CUDA kernels
// live beside it: optim.cu, select.cu and rewind.cu.
#include <cuda_runtime.h>

#include "lottery/api_cuda.h"

namespace lottery::cuda {

int runtime_version() { return CUDART_VERSION; }

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver/device" error
    return 0;
  }
  return n;
}

}  // namespace lottery::cuda
