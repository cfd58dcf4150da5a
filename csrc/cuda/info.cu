// CUDA runtime facts for build_info(). The CUDA kernels themselves land with the CUDA issue;
// this translation unit makes LOTTERY_EXT_CUDA=ON compile and link real device code.
#include <cuda_runtime.h>

#include "lottery/api.h"

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
