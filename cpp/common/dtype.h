// The element types the CPU kernels take (f32, f16, bf16), shared by matmul and attention.
#pragma once

namespace kernelevo::cpu {

enum class Dtype { f32, f16, bf16 };

}  // namespace kernelevo::cpu
