// CPU matrix multiplication kernels. C[b] = epilogue(A[b] (M x K) * B[b] (K x N)) with any
// strides; A, B and C share one dtype (f32, f16 or bf16); accumulation is in f32.
//
// Two families (their parameters are defined in src/kernelevo/families/cpu_matmul.py):
//   gemm  cache-blocked and packed (Goto/BLIS loop order) with an mr x nr register tile,
//         computed by one of three engines: `fma` (f32 FMA on the build's vectors:
//         AVX-512, AVX2 or NEON), `bf16dot` (AVX512-BF16 pair dot products) or `amx`
//         (Intel AMX tiles); see cpu_kernels.h.
//   gemv  for few rows of A (LLM decode): no packing; B is streamed from memory once.
//
// The epilogue, in this order: out = act(product * scale + bias) + residual.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/config.h"
#include "matmul/cpu_simd.h"

namespace kernelevo::cpu {

// One operand as the kernel reads it: element (r, c) of batch entry b lives at
// data + batch_offsets[b] + r * row_stride + c * col_stride (all in elements).
struct Operand {
  const void* data = nullptr;
  int64_t row_stride = 0;
  int64_t col_stride = 0;
  const int64_t* batch_offsets = nullptr;
};

enum class Activation { none, relu, gelu, gelu_tanh, silu };

// What is applied to the f32 product before it is rounded to the output dtype. Bias and
// residual are read as M x N operands of the output's dtype (broadcast by their strides).
struct Epilogue {
  float scale = 1.0f;
  Operand bias;      // data == nullptr when absent
  Activation activation = Activation::none;
  Operand residual;  // data == nullptr when absent

  bool empty() const {
    return scale == 1.0f && !bias.data && activation == Activation::none && !residual.data;
  }
};

struct GemmProblem {
  int64_t M, N, K, batch;
  Dtype dtype;
  Operand a;  // M x K
  Operand b;  // K x N
  void* c;    // row-major M x N per batch entry, batch entries contiguous
  Epilogue epilogue;
};

// The engines the gemm family can compute with (the schema's `engine` choices).
enum class Engine { fma, bf16dot, amx };
const char* engine_name(Engine e);

// Engines this build can run on this CPU (compiled in, and the CPU reports the feature
// and, for AMX, the OS grants the tile state).
std::vector<std::string> available_engines();

// The register tiles the gemm family is compiled for, per engine (rows x columns).
bool gemm_register_tile_supported(const std::string& engine, int mr, int nr);

// Runs the configuration's family on the problem; throws std::invalid_argument if the
// configuration is not one these kernels take, or cannot run this problem here.
void matmul(const GemmProblem& problem, const KernelConfig& config);

// Throws std::invalid_argument if the configuration is not valid for these kernels.
void validate_matmul_config(const KernelConfig& config);

}  // namespace kernelevo::cpu
