// The register-tiled micro-kernels of the gemm family, one set per engine, and what the
// blocked driver (cpu_gemm.cpp) needs to know to pack for them.
//
// Every micro-kernel computes C[0:mr, 0:nr] (+)= A[0:mr, 0:kb] * B[0:kb, 0:nr] with
//   A  element (i, k) at a + i * lda + (k / 32) * a_step + k % 32 (elements of the engine's
//      input type): row-major when a_step == 32, as the fma and bf16dot kernels always
//      read it; the amx engine packs each 32-deep step of a sliver as one contiguous run
//      (lda = 32, a_step = mr * 32) so that its tiles stream in order. Either a packed
//      sliver or the caller's matrix read in place (pack_a=no);
//   B  a packed sliver (layout per engine, below);
//   C  f32, row i at c + i * ldc; `accumulate` adds to what is there.
// Rows >= m_valid and columns >= n_valid are not written (fma, bf16dot); the amx kernel
// writes whole tiles and is given padded C panels instead.
//
// Engines and their B sliver layouts:
//   fma      f32 FMA on the build's vectors. B: for each k, nr floats.
//   bf16dot  AVX512-BF16 VDPBF16PS. B: for each pair of k (kk), nr pairs of bf16
//            (B[2kk, j], B[2kk+1, j]) — the "VNNI" layout; depth padded to even.
//   amx      Intel AMX TDPBF16PS on 16x16 f32 tiles. B: the same pairs, regrouped so
//            that each tile (16 pairs of depth x 16 columns, 1 KiB) is contiguous: for
//            each 32-deep step, nr/16 tiles in column order (dense tile loads stream
//            better than strided ones); depth padded to a multiple of 32.
#pragma once

#include <cstddef>
#include <cstdint>

#include "matmul/cpu_gemm.h"

namespace kernelevo::cpu::detail {

using MicroKernel = void (*)(int kb, const void* a, int64_t lda, int64_t a_step,
                             const void* b, float* c, int64_t ldc, bool accumulate,
                             int m_valid, int n_valid);

// nullptr when the engine has no such register tile (or is not compiled in).
MicroKernel fma_micro_kernel(int mr, int nr);
MicroKernel bf16dot_micro_kernel(int mr, int nr);
MicroKernel amx_micro_kernel(int mr, int nr);

// Whether this build has the engine and this CPU (and OS) can run it.
bool bf16dot_usable();
bool amx_usable();

// AMX keeps a tile configuration per thread: set it before a thread's first amx micro-kernel
// of a call, and release the tile state when the thread is done.
void amx_begin_thread();
void amx_end_thread();

// Depth granularity of the packed operands: kb is padded with zeros to a multiple of it.
inline int engine_k_align(Engine e) {
  return e == Engine::fma ? 1 : e == Engine::bf16dot ? 2 : 32;
}

}  // namespace kernelevo::cpu::detail

namespace kernelevo::cpu::detail {

// ---- epilogue (cpu_epilogue.cpp) ----------------------------------------------------

// Writes rows x cols f32 values (row stride ldacc) to C at (i0, j0) of batch entry
// `batch`, in C's dtype, applying the problem's epilogue when `apply`. acc may alias C
// when C is f32.
void finalize_tile(const GemmProblem& p, int64_t batch, int64_t i0, int64_t j0, int rows,
                   int cols, const float* acc, int64_t ldacc, bool apply);

// The epilogue as a pass of its own over rows [begin, end) of C, counting the rows of all
// batch entries in order (batch * M rows in all).
void epilogue_pass(const GemmProblem& p, int64_t begin, int64_t end);

// ---- gemv (cpu_gemv.cpp) ------------------------------------------------------------

struct GemvTiling {
  int nb, kb, threads;
  bool fused;
};
void gemv(const GemmProblem& p, const GemvTiling& t);

// ---- scratch memory ------------------------------------------------------------------

// 64-byte aligned memory that grows and is reused across calls.
class Scratch {
 public:
  void* get(size_t bytes);
  template <typename T>
  T* get_as(size_t count) {
    return static_cast<T*>(get(count * sizeof(T)));
  }
  ~Scratch();

 private:
  void* data_ = nullptr;
  size_t capacity_ = 0;
};

}  // namespace kernelevo::cpu::detail
