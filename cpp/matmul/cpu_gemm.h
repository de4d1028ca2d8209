// CPU matrix multiplication kernels. C[b] = A[b] (M x K) * B[b] (K x N) with any strides;
// A, B and C share one dtype (f32, f16 or bf16); accumulation is in f32.
//
// Two families (their parameters are defined in src/kernelevo/families.py):
//   gemm    cache-blocked and packed (Goto/BLIS loop order) with an mr x nr register tile
//   gemv  no packing, for few rows of A (LLM decode): streams B once per column block
#pragma once

#include <cstdint>

#include "common/config.h"

namespace kernelevo::cpu {

enum class Dtype { f32, f16, bf16 };

// One operand as the kernel reads it: element (r, c) of batch entry b lives at
// data + batch_offsets[b] + r * row_stride + c * col_stride (all in elements).
struct Operand {
  const void* data;
  int64_t row_stride;
  int64_t col_stride;
  const int64_t* batch_offsets;
};

struct GemmProblem {
  int64_t M, N, K, batch;
  Dtype dtype;
  Operand a;  // M x K
  Operand b;  // K x N
  void* c;    // row-major M x N per batch entry, batch entries contiguous
};

// The register tiles the gemm family is compiled for (rows x columns).
bool gemm_register_tile_supported(int mr, int nr);

// Runs the configuration's family on the problem; throws std::invalid_argument if the
// configuration is not one this kernel takes.
void matmul(const GemmProblem& problem, const KernelConfig& config);

// Throws std::invalid_argument if the configuration is not valid for these kernels.
void validate_matmul_config(const KernelConfig& config);

}  // namespace kernelevo::cpu
