// Build facts of the CUDA part of segkit._C, reported by build_info() (ops.cpp).
#include <cuda_runtime_api.h>

#include "segkit_ops.h"

namespace segkit {

int cuda_build_version() { return CUDART_VERSION; }

}  // namespace segkit
