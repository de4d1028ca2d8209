// The gemm family's blocked driver (Goto/BLIS loop order), the packing of operands for
// each engine, configuration reading and dispatch. Micro-kernels: ukernel_*.cpp; the
// skinny family: cpu_gemv.cpp; epilogues: cpu_epilogue.cpp.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/threadpool.h"
#include "matmul/cpu_kernels.h"

namespace kernelevo::cpu {

using namespace detail;

namespace {

constexpr const char* kEngineNames[] = {"fma", "bf16dot", "amx"};

int64_t round_up(int64_t x, int64_t to) {
  return (x + to - 1) / to * to;
}

MicroKernel find_micro_kernel(Engine e, int mr, int nr) {
  switch (e) {
    case Engine::fma: return fma_micro_kernel(mr, nr);
    case Engine::bf16dot: return bf16dot_micro_kernel(mr, nr);
    case Engine::amx: return amx_micro_kernel(mr, nr);
  }
  return nullptr;
}

bool engine_usable(Engine e) {
  switch (e) {
    case Engine::fma: return true;
    case Engine::bf16dot: return bf16dot_usable();
    case Engine::amx: return amx_usable();
  }
  return false;
}

// ---------------------------------------------------------------------------------------
// Configuration

struct GemmTiling {
  int mc, nc, kc, mr, nr, threads;
  bool split_n;  // threads divide the column slivers of a shared A block (else row blocks)
  Engine engine;
  bool pack_a;  // copy A blocks into slivers (else read A where it lies)
  bool fused;   // epilogue applied to each tile as it is finished (else a second pass)
  MicroKernel kernel;
};

bool read_epilogue(ConfigReader& r) {
  return r.choice("epilogue", {"fused", "separate"}) == 0;
}

GemmTiling read_gemm(const KernelConfig& config) {
  ConfigReader r(config, "CPU matmul kernel");
  GemmTiling t;
  t.mc = static_cast<int>(r.integer("mc", 1, 1 << 16));
  t.nc = static_cast<int>(r.integer("nc", 1, 1 << 16));
  t.kc = static_cast<int>(r.integer("kc", 1, 1 << 16));
  t.mr = static_cast<int>(r.integer("mr", 1, 64));
  t.nr = static_cast<int>(r.integer("nr", 1, 256));
  t.threads = static_cast<int>(r.integer("threads", 1, 1024));
  t.split_n = r.choice("split", {"m", "n"}) == 1;
  t.engine = static_cast<Engine>(r.choice("engine", {"fma", "bf16dot", "amx"}));
  t.pack_a = r.flag("pack_a");
  t.fused = read_epilogue(r);
  r.finish();
  const std::string engine = engine_name(t.engine);
  t.kernel = find_micro_kernel(t.engine, t.mr, t.nr);
  if (!t.kernel) {
    throw std::invalid_argument("CPU gemm engine " + engine + " has no " +
                                std::to_string(t.mr) + "x" + std::to_string(t.nr) +
                                " register tile in this build");
  }
  if (t.mc % t.mr || t.nc % t.nr) {
    throw std::invalid_argument("CPU gemm needs mc % mr == 0 and nc % nr == 0 (got " +
                                config.to_string() + ")");
  }
  if (t.kc % engine_k_align(t.engine)) {
    throw std::invalid_argument("CPU gemm engine " + engine + " needs kc % " +
                                std::to_string(engine_k_align(t.engine)) + " == 0 (got " +
                                config.to_string() + ")");
  }
  if (!engine_usable(t.engine)) {
    throw std::invalid_argument("CPU gemm engine " + engine +
                                " is not available on this CPU or in this build");
  }
  return t;
}

GemvTiling read_gemv(const KernelConfig& config) {
  ConfigReader r(config, "CPU matmul kernel");
  GemvTiling t;
  t.nb = static_cast<int>(r.integer("nb", 1, 1 << 16));
  t.kb = static_cast<int>(r.integer("kb", 1, 1 << 20));
  t.threads = static_cast<int>(r.integer("threads", 1, 1024));
  t.fused = read_epilogue(r);
  r.finish();
  if (t.nb % kLanes) {
    throw std::invalid_argument("CPU gemv needs nb % 16 == 0 (got " + config.to_string() + ")");
  }
  return t;
}

// ---------------------------------------------------------------------------------------
// Packing. A is packed row-major (row i of a sliver at i * lda); B slivers in the engine's
// layout (cpu_kernels.h). Depth past kb and rows/columns past the edge are zero.

template <Engine ENG>
using Packed = std::conditional_t<ENG == Engine::fma, float, uint16_t>;

// Rows [0, rows) x depth [0, kb) of A (element (r, k) at a[r * rs + k * cs]) into dst
// (row r at dst + r * lda), zero up to depth kbp; rows [rows, total_rows) are zero.
template <typename E, Engine ENG>
void pack_a_rows(const typename E::raw* a, int64_t rs, int64_t cs, int rows, int total_rows,
                 int kb, int kbp, int64_t lda, Packed<ENG>* dst) {
  using P = Packed<ENG>;
  if (cs == 1) {
    for (int r = 0; r < rows; ++r) {
      const typename E::raw* src = a + r * rs;
      P* out = dst + r * lda;
      if constexpr (std::is_same_v<P, typename E::raw>) {
        std::copy(src, src + kb, out);
      } else {
        int k = 0;
        for (; k + kLanes <= kb; k += kLanes) vstore(out + k, load16<E>(src + k));
        for (; k < kb; ++k) out[k] = to_f32<E>(src[k]);
      }
      std::fill(out + kb, out + kbp, P{});
    }
  } else {
    // A used transposed: walk the contiguous direction of the source.
    for (int r = 0; r < rows; ++r) std::fill(dst + r * lda + kb, dst + r * lda + kbp, P{});
    for (int k = 0; k < kb; ++k)
      for (int r = 0; r < rows; ++r) {
        auto x = a[r * rs + k * cs];
        if constexpr (std::is_same_v<P, typename E::raw>) {
          dst[r * lda + k] = x;
        } else {
          dst[r * lda + k] = to_f32<E>(x);
        }
      }
  }
  for (int r = rows; r < total_rows; ++r) std::fill(dst + r * lda, dst + r * lda + kbp, P{});
}

// How a packed block of A is laid out: slivers of mr rows. fma and bf16dot read slivers
// row-major (rows lda_pack apart); amx reads each 32-deep step of a sliver as one run of
// mr rows x 32 (cpu_kernels.h).
struct PackedA {
  int64_t lda, a_step, sliver;  // element strides: row, depth step, sliver
};

template <Engine ENG>
PackedA packed_a_layout(int mr, int kbp, int64_t lda_pack) {
  if constexpr (ENG == Engine::amx) {
    return {32, int64_t(mr) * 32, int64_t(mr) * kbp};
  } else {
    return {lda_pack, 32, mr * lda_pack};
  }
}

// Rows [0, mb) of A into slivers of mr rows (the last one padded with zero rows).
template <typename E, Engine ENG>
void pack_a_block(const typename E::raw* a, int64_t rs, int64_t cs, int mb, int kb, int kbp,
                  int mr, const PackedA& layout, Packed<ENG>* dst) {
  using P = Packed<ENG>;
  for (int s = 0; s * mr < mb; ++s) {
    const int rows = std::min(mr, mb - s * mr);
    P* out = dst + s * layout.sliver;
    const typename E::raw* src = a + int64_t(s) * mr * rs;
    if constexpr (ENG == Engine::amx) {
      if (cs == 1) {
        // Straight into runs of mr rows x 32 per depth step.
        for (int i = 0; i < mr; ++i)
          for (int step = 0; step * 32 < kbp; ++step) {
            P* o = out + step * layout.a_step + i * 32;
            const int k0 = step * 32, n = i < rows ? std::clamp(kb - k0, 0, 32) : 0;
            std::copy(src + i * rs + k0, src + i * rs + k0 + n, o);
            std::fill(o + n, o + 32, P{});
          }
        continue;
      }
      // A used transposed: row-major first (one sliver is small), then regrouped.
      thread_local Scratch staging;
      P* rows_buf = staging.get_as<P>(int64_t(mr) * kbp);
      pack_a_rows<E, ENG>(src, rs, cs, rows, mr, kb, kbp, kbp, rows_buf);
      for (int step = 0; step < kbp / 32; ++step)
        for (int i = 0; i < mr; ++i)
          std::copy(rows_buf + i * kbp + step * 32, rows_buf + i * kbp + step * 32 + 32,
                    out + step * layout.a_step + i * 32);
    } else {
      pack_a_rows<E, ENG>(src, rs, cs, rows, mr, kb, kbp, layout.lda, out);
    }
  }
}

#if defined(__AVX512BW__)
// Transposes a 16 x 16 block of 32-bit elements held in r[0..15] (row i in r[i]).
inline void transpose16(__m512i r[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 16; i += 2) {
    a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // b[4g + q]: in 128-bit lane L, column 4L + q of rows 4g .. 4g+3
  for (int g = 0; g < 4; ++g) {
    b[4 * g + 0] = _mm512_unpacklo_epi64(a[4 * g], a[4 * g + 2]);
    b[4 * g + 1] = _mm512_unpackhi_epi64(a[4 * g], a[4 * g + 2]);
    b[4 * g + 2] = _mm512_unpacklo_epi64(a[4 * g + 1], a[4 * g + 3]);
    b[4 * g + 3] = _mm512_unpackhi_epi64(a[4 * g + 1], a[4 * g + 3]);
  }
  for (int q = 0; q < 4; ++q) {
    const __m512i c0 = _mm512_shuffle_i32x4(b[q], b[4 + q], 0x44);
    const __m512i c1 = _mm512_shuffle_i32x4(b[q], b[4 + q], 0xEE);
    const __m512i d0 = _mm512_shuffle_i32x4(b[8 + q], b[12 + q], 0x44);
    const __m512i d1 = _mm512_shuffle_i32x4(b[8 + q], b[12 + q], 0xEE);
    r[q] = _mm512_shuffle_i32x4(c0, d0, 0x88);
    r[4 + q] = _mm512_shuffle_i32x4(c0, d0, 0xDD);
    r[8 + q] = _mm512_shuffle_i32x4(c1, d1, 0x88);
    r[12 + q] = _mm512_shuffle_i32x4(c1, d1, 0xDD);
  }
}
#endif

// Depth [0, kb) x columns [0, cols) of B (element (k, j) at b[k * rs + j * cs]) into one
// sliver of nr columns, depth padded to kbp. The vector paths cover whole 16 x 16 blocks
// (32 x 16 for pairs); the rest goes element by element.
template <typename E, Engine ENG>
void pack_b_sliver(const typename E::raw* b, int64_t rs, int64_t cs, int kb, int kbp,
                   int cols, int nr, Packed<ENG>* dst) {
  using T = typename E::raw;
  if constexpr (ENG == Engine::fma) {
    if (cs == 1) {
      for (int k = 0; k < kb; ++k) {
        const T* src = b + k * rs;
        float* out = dst + k * nr;
        int j = 0;
        for (; j + kLanes <= cols; j += kLanes) vstore(out + j, load16<E>(src + j));
        for (; j < cols; ++j) out[j] = to_f32<E>(src[j]);
        std::fill(out + cols, out + nr, 0.0f);
      }
      return;
    }
    if (cols < nr) std::fill(dst, dst + kb * nr, 0.0f);
    int j0 = 0, k0 = 0;
#if defined(__AVX512BW__)
    if (rs == 1) {
      // B used transposed (rows of W contiguous): load 16 rows of W, transpose.
      for (; j0 + 16 <= cols; j0 += 16) {
        for (k0 = 0; k0 + 16 <= kb; k0 += 16) {
          __m512i r[16];
          for (int i = 0; i < 16; ++i)
            r[i] = bit_cast_vec<__m512i>(load16<E>(b + (j0 + i) * cs + k0));
          transpose16(r);
          for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + (k0 + i) * nr + j0, r[i]);
        }
        for (int j = j0; j < j0 + 16; ++j)
          for (int k = k0; k < kb; ++k) dst[k * nr + j] = to_f32<E>(b[j * cs + k]);
      }
    }
#endif
    for (int j = j0; j < cols; ++j) {
      const T* src = b + j * cs;
      for (int k = 0; k < kb; ++k) dst[k * nr + j] = to_f32<E>(src[k * rs]);
    }
  } else {
    // Pairs of depth (B[2 kk, j], B[2 kk + 1, j]) at dst + pair_at(kk, j) * 2.
    // bf16dot: row kk of pairs, nr wide. amx: 1 KiB tiles of 16 kk x 16 columns.
    const int tiles_per_step = nr / 16;
    auto pair_at = [&](int kk, int j) -> int64_t {
      if constexpr (ENG == Engine::amx) {
        return ((kk / 16) * tiles_per_step + j / 16) * 256 + (kk % 16) * 16 + j % 16;
      } else {
        return int64_t(kk) * nr + j;
      }
    };
    if (cols < nr || kb < kbp) std::fill(dst, dst + kbp * nr, uint16_t{0});
    const int full_pairs = kb / 2;
    int j0 = 0;
#if defined(__AVX512BW__)
    if (cs == 1) {
      // Interleave rows 2kk and 2kk+1, 32 columns at a time.
      const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9,
                                          40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33,
                                          1, 32, 0);
      const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
      for (; j0 + 32 <= cols; j0 += 32)
        for (int kk = 0; kk < full_pairs; ++kk) {
          const __m512i r0 = _mm512_loadu_si512(b + 2 * kk * rs + j0);
          const __m512i r1 = _mm512_loadu_si512(b + (2 * kk + 1) * rs + j0);
          _mm512_storeu_si512(dst + pair_at(kk, j0) * 2, _mm512_permutex2var_epi16(r0, lo, r1));
          _mm512_storeu_si512(dst + pair_at(kk, j0 + 16) * 2, _mm512_permutex2var_epi16(r0, hi, r1));
        }
    } else if (rs == 1) {
      // B used transposed: a pair is one 32-bit word of a row of W; transpose 16 x 16 words.
      for (; j0 + 16 <= cols; j0 += 16)
        for (int kk = 0; kk + 16 <= full_pairs; kk += 16) {
          __m512i r[16];
          for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(b + (j0 + i) * cs + 2 * kk);
          transpose16(r);
          for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + pair_at(kk + i, j0) * 2, r[i]);
        }
    }
    // What the vector loops left: columns past j0 entirely, and for rs == 1 the depth
    // past the last whole block of 16 pairs in columns before j0.
    const int kk_done = cs == 1 ? full_pairs : full_pairs / 16 * 16;
    for (int j = 0; j < j0; ++j)
      for (int k = 2 * kk_done; k < kb; ++k) dst[pair_at(k / 2, j) * 2 + (k & 1)] = b[k * rs + j * cs];
#endif
    for (int j = j0; j < cols; ++j)
      for (int k = 0; k < kb; ++k) dst[pair_at(k / 2, j) * 2 + (k & 1)] = b[k * rs + j * cs];
  }
}

// ---------------------------------------------------------------------------------------
// The blocked driver

template <typename T>
const T* typed(const Operand& op, int64_t batch) {
  return static_cast<const T*>(op.data) + op.batch_offsets[batch];
}

// Loop order: A is packed once per batch entry, in blocks of mc rows x kc deep (L2-sized).
// For each panel of nc columns, B is packed for the whole depth (shared by the team); then
// for each block of mc rows the depth is walked in blocks of kc, and every mr-row sliver of
// A (L1-sized) meets every kc x nr sliver of B in the micro-kernel. The block's
// accumulators (mc x nc f32) stay in L2 over the depth, and each tile is finished
// (epilogue, rounding) as soon as its depth is done.
template <typename E, Engine ENG>
void gemm_run(const GemmProblem& p, const GemmTiling& t) {
  using T = typename E::raw;
  using P = Packed<ENG>;
  const int64_t M = p.M, N = p.N, K = p.K;
  const int kal = engine_k_align(ENG);
  const int mr = t.mr, nr = t.nr;
  // f32 products accumulate in C itself; the others in f32 tiles or blocks first.
  constexpr bool direct = std::is_same_v<E, F32> && ENG == Engine::fma;
  const bool one_depth_block = K <= t.kc;
  const bool apply_fused = t.fused && !p.epilogue.empty();
  // A is read where it lies when asked and its layout fits the kernel: rows of the
  // kernel's element type with unit stride, depth padded as the engine needs.
  const bool a_layout_fits = std::is_same_v<P, T> && p.a.col_stride == 1 && K % kal == 0;
  const bool a_copied = !t.pack_a && !a_layout_fits;  // read in place from a row-major copy

  const int64_t depth_blocks = (K + t.kc - 1) / t.kc;
  const int kcp = static_cast<int>(round_up(std::min<int64_t>(t.kc, K), kal));
  const int64_t lda_pack = kcp + 64 / sizeof(P);  // rows a cache line apart: no set aliasing
  const int ncp = static_cast<int>(round_up(std::min<int64_t>(t.nc, N), nr));
  const int mcp = static_cast<int>(round_up(std::min<int64_t>(t.mc, M), mr));
  const int64_t m_blocks = (M + t.mc - 1) / t.mc;
  const int64_t b_block = static_cast<int64_t>(ncp) * kcp;  // one depth block of the panel
  const int64_t a_block = (mcp / mr) * packed_a_layout<ENG>(mr, kcp, lda_pack).sliver;
  const int64_t lda_copy = round_up(K, kal) + 64 / sizeof(P);

  thread_local Scratch b_scratch, a_scratch, copy_scratch;
  P* bpanel = b_scratch.get_as<P>(depth_blocks * b_block);
  // pack_a=yes: all of A, packed once per batch entry (every row block, every depth block)
  P* apacked = t.pack_a ? a_scratch.get_as<P>(m_blocks * depth_blocks * a_block) : nullptr;
  P* acopy = a_copied ? copy_scratch.get_as<P>(M * lda_copy) : nullptr;

  const int threads = std::max(1, std::min(t.threads, available_cores()));
  parallel_team(threads, [&](int rank, int size, Barrier& barrier) {
    struct AmxScope {
      AmxScope() { if (ENG == Engine::amx) amx_begin_thread(); }
      ~AmxScope() { if (ENG == Engine::amx) amx_end_thread(); }
    } amx_scope;
    thread_local Scratch own_c, own_edge;
    // f32 accumulators of the current block (or of one tile, when the depth is one block)
    float* cbuf = direct ? nullptr
                         : own_c.get_as<float>(one_depth_block ? mr * nr : mcp * int64_t(ncp));
    const int64_t ldcb = one_depth_block ? nr : ncp;
    P* edge = !t.pack_a ? own_edge.get_as<P>(packed_a_layout<ENG>(mr, kcp, lda_pack).sliver) : nullptr;

    for (int64_t batch = 0; batch < p.batch; ++batch) {
      const T* a = typed<T>(p.a, batch);
      const T* b = typed<T>(p.b, batch);
      const int64_t ars = p.a.row_stride, acs = p.a.col_stride;
      // A once for every panel of B (after the previous batch entry is done with it):
      // packed into slivers, or copied to plain rows for the kernel to read in place.
      if (batch > 0 && (apacked || a_copied)) barrier.wait();
      if (apacked) {
        const int64_t slivers = mcp / mr;
        for (int64_t task = rank; task < m_blocks * depth_blocks * slivers; task += size) {
          const int64_t blk = task / (depth_blocks * slivers);
          const int64_t pb = task / slivers % depth_blocks, sl = task % slivers;
          const int64_t i0 = blk * t.mc + sl * mr, pc = pb * t.kc;
          const int rows = static_cast<int>(std::min<int64_t>(mr, std::min<int64_t>(M, (blk + 1) * t.mc) - i0));
          if (rows <= 0) continue;
          const int kb = static_cast<int>(std::min<int64_t>(t.kc, K - pc));
          const int kbp = static_cast<int>(round_up(kb, kal));
          const PackedA packed = packed_a_layout<ENG>(mr, kbp, lda_pack);
          pack_a_block<E, ENG>(a + i0 * ars + pc * acs, ars, acs, rows, kb, kbp, mr, packed,
                               apacked + (blk * depth_blocks + pb) * a_block + sl * packed.sliver);
        }
      }
      if (a_copied) {
        for (int64_t r = rank; r < M; r += size) {
          pack_a_rows<E, ENG>(a + r * ars, ars, acs, 1, 1, static_cast<int>(K),
                              static_cast<int>(round_up(K, kal)), lda_copy, acopy + r * lda_copy);
        }
      }

      for (int64_t jc = 0; jc < N; jc += t.nc) {
        const int nb = static_cast<int>(std::min<int64_t>(t.nc, N - jc));
        const int n_slivers = (nb + nr - 1) / nr;
        // The panel's B for the whole depth, once the previous panel is done with. B is read
        // from memory front to back along its contiguous direction: when its rows are
        // contiguous a task packs 32 rows of depth into every sliver; otherwise (B used
        // transposed, W stored [N, K]) a task packs one sliver for the whole depth.
        if (jc > 0 || batch > 0) barrier.wait();
        const bool by_rows = p.b.col_stride == 1;
        const int64_t chunks = (std::min<int64_t>(t.kc, K) + 31) / 32;
        const int64_t tasks = by_rows ? depth_blocks * chunks : n_slivers;
        for (int64_t task = rank; task < tasks; task += size) {
          const int64_t pb_begin = by_rows ? task / chunks : 0;
          const int64_t pb_end = by_rows ? pb_begin + 1 : depth_blocks;
          for (int64_t pb = pb_begin; pb < pb_end; ++pb) {
            const int64_t pc = pb * t.kc;
            const int kb = static_cast<int>(std::min<int64_t>(t.kc, K - pc));
            const int kbp = static_cast<int>(round_up(kb, kal));
            const int r0 = by_rows ? static_cast<int>(task % chunks) * 32 : 0;
            if (r0 >= kb) continue;
            const int r1 = by_rows ? std::min(kb, r0 + 32) : kb;
            const int s_begin = by_rows ? 0 : static_cast<int>(task);
            const int s_end = by_rows ? n_slivers : s_begin + 1;
            for (int s = s_begin; s < s_end; ++s) {
              // rows [r0, r1) of the sliver; the last piece pads the depth to kbp
              pack_b_sliver<E, ENG>(
                  b + (pc + r0) * p.b.row_stride + (jc + s * nr) * p.b.col_stride,
                  p.b.row_stride, p.b.col_stride, r1 - r0, (r1 == kb ? kbp : r1) - r0,
                  std::min(nr, nb - s * nr), nr,
                  bpanel + pb * b_block + int64_t(s) * kbp * nr + int64_t(r0) * nr);
            }
          }
        }
        barrier.wait();

        for (int64_t pass = 0; pass < (t.split_n ? m_blocks : (m_blocks + size - 1) / size); ++pass) {
          // split=m: this member's row block; split=n: every member on the same block.
          const int64_t blk = t.split_n ? pass : pass * size + rank;
          const bool mine = blk < m_blocks;
          const int64_t ic = blk * t.mc;
          const int mb = mine ? static_cast<int>(std::min<int64_t>(t.mc, M - ic)) : 0;

          for (int64_t pb = 0; pb < depth_blocks; ++pb) {
            const int64_t pc = pb * t.kc;
            const int kb = static_cast<int>(std::min<int64_t>(t.kc, K - pc));
            const int kbp = static_cast<int>(round_up(kb, kal));
            const bool first = pb == 0, last = pb + 1 == depth_blocks;
            const P* bp = bpanel + pb * b_block;

            // This block's A for depth block pb: packed, or where it lies (nullptr).
            const PackedA packed = packed_a_layout<ENG>(mr, kbp, lda_pack);
            const P* block = apacked ? apacked + (blk * depth_blocks + pb) * a_block : nullptr;
            if (!mine) continue;

            // The A sliver of rows [ic + ir, + mr): packed, or where it lies (row-major).
            auto a_sliver = [&](int ir, int rows, PackedA& at) -> const P* {
              if (block) {
                at = packed;
                return block + (ir / mr) * packed.sliver;
              }
              const int64_t i = ic + ir;
              const P* src = a_copied ? acopy + i * lda_copy + pc
                                      : reinterpret_cast<const P*>(a) + i * ars + pc;
              const int64_t ld = a_copied ? lda_copy : ars;
              if (rows == mr) {
                at = {ld, 32, 0};
                return src;
              }
              // The edge sliver: its missing rows must not be read.
              if constexpr (std::is_same_v<P, T>) {
                pack_a_block<E, ENG>(reinterpret_cast<const T*>(src), ld, 1, rows, kb, kbp, mr,
                                     packed, edge);
              } else {
                pack_a_block<F32, ENG>(reinterpret_cast<const float*>(src), ld, 1, rows, kb,
                                       kbp, mr, packed, edge);
              }
              at = packed;
              return edge;
            };

            auto tile = [&](int s, int ir) {
              const int n_valid = std::min(nr, nb - s * nr);
              const P* bs = bp + s * kbp * nr;
              const int m_valid = std::min(mr, mb - ir);
              PackedA at;
              const P* as = a_sliver(ir, m_valid, at);
              const int64_t i0 = ic + ir, j0 = jc + s * nr;
              if constexpr (direct) {
                float* c = static_cast<float*>(p.c) + batch * M * N + i0 * N + j0;
                t.kernel(kbp, as, at.lda, at.a_step, bs, c, N, !first, m_valid, n_valid);
                if (last && apply_fused) finalize_tile(p, batch, i0, j0, m_valid, n_valid, c, N, true);
              } else {
                float* c = one_depth_block ? cbuf : cbuf + ir * ldcb + s * nr;
                t.kernel(kbp, as, at.lda, at.a_step, bs, c, ldcb, !first, mr, nr);
                if (last) finalize_tile(p, batch, i0, j0, m_valid, n_valid, c, ldcb, t.fused);
              }
            };
            // Each sliver of A stays in L1 while the slivers of B stream past it from L2
            // (split=n: this member's slivers of B are s0, s0 + ds, ...).
            const int s0 = t.split_n ? rank : 0, ds = t.split_n ? size : 1;
            for (int ir = 0; ir < mb; ir += mr)
              for (int s = s0; s < n_slivers; s += ds) tile(s, ir);
          }
        }
      }
    }
    if (!t.fused && !p.epilogue.empty()) {
      // The epilogue as a second pass, once every product is written.
      barrier.wait();
      const int64_t rows = p.batch * M, per = (rows + size - 1) / size;
      epilogue_pass(p, std::min(rows, rank * per), std::min(rows, (rank + 1) * per));
    }
  });
}

template <typename Fn>
void with_dtype(Dtype d, Fn&& fn) {
  switch (d) {
    case Dtype::f32: return fn(F32{});
    case Dtype::f16: return fn(F16{});
    case Dtype::bf16: return fn(BF16{});
  }
}

void check_engine_dtype(Engine e, Dtype d) {
  if (e != Engine::fma && d != Dtype::bf16) {
    throw std::invalid_argument(std::string("CPU gemm engine ") + engine_name(e) +
                                " multiplies bfloat16 only");
  }
}

}  // namespace

const char* engine_name(Engine e) {
  return kEngineNames[static_cast<int>(e)];
}

std::vector<std::string> available_engines() {
  std::vector<std::string> out;
  for (Engine e : {Engine::fma, Engine::bf16dot, Engine::amx}) {
    if (engine_usable(e)) out.emplace_back(engine_name(e));
  }
  return out;
}

bool gemm_register_tile_supported(const std::string& engine, int mr, int nr) {
  for (Engine e : {Engine::fma, Engine::bf16dot, Engine::amx}) {
    if (engine == engine_name(e)) return find_micro_kernel(e, mr, nr) != nullptr;
  }
  throw std::invalid_argument("the CPU gemm family has no engine '" + engine + "'");
}

void validate_matmul_config(const KernelConfig& config) {
  if (config.family == "gemm") {
    read_gemm(config);
  } else if (config.family == "gemv") {
    read_gemv(config);
  } else {
    throw std::invalid_argument("the CPU backend has no matmul family '" + config.family +
                                "'");
  }
}

void matmul(const GemmProblem& problem, const KernelConfig& config) {
  if (problem.M == 0 || problem.N == 0 || problem.batch == 0) return;
  if (config.family != "gemm" && config.family != "gemv") validate_matmul_config(config);
  const bool gemm_family = config.family == "gemm";
  const GemmTiling tiling = gemm_family ? read_gemm(config) : GemmTiling{};
  const GemvTiling skinny = gemm_family ? GemvTiling{} : read_gemv(config);
  if (gemm_family) check_engine_dtype(tiling.engine, problem.dtype);
  if (problem.K == 0) {
    // An empty sum: every product is zero, and the epilogue still applies.
    std::vector<float> zeros(problem.N, 0.0f);
    for (int64_t b = 0; b < problem.batch; ++b)
      for (int64_t i = 0; i < problem.M; ++i)
        finalize_tile(problem, b, i, 0, 1, static_cast<int>(problem.N), zeros.data(), 0, true);
    return;
  }
  if (!gemm_family) {
    gemv(problem, skinny);
    return;
  }
  switch (tiling.engine) {
    case Engine::fma:
      with_dtype(problem.dtype, [&](auto e) { gemm_run<decltype(e), Engine::fma>(problem, tiling); });
      break;
    case Engine::bf16dot: gemm_run<BF16, Engine::bf16dot>(problem, tiling); break;
    case Engine::amx: gemm_run<BF16, Engine::amx>(problem, tiling); break;
  }
}

}  // namespace kernelevo::cpu
