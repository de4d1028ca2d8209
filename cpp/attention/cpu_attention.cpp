#include "attention/cpu_attention.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention/kernel_common.h"
#include "attention/vec.h"
#include "common/threadpool.h"

namespace kernelevo::cpu {

namespace {

using namespace detail;

// ---------------------------------------------------------------------------------------
// The register-tiled product both stages of flash attention use:
//   C[i, 0:NV*16] = (ACC ? C[i, :] * col_scale : 0) + sum_k A(i, k) * B[k, 0:NV*16]
// with A(i, k) = A[i * ars + k * acs] (any layout: the value is broadcast) and B, C
// row-major. Both stages keep queries as the columns (vector lanes):
//   scores^T (keys x queries)  = keys (A, rows read in place)  x q^T tile (B)
//   out^T (v_dim x queries)   += values^T (A, rows read in place) x probabilities^T (B),
// the output first rescaled per query by the online softmax's correction (col_scale).
// B and C are then small contiguous tiles, and A is read in place with any row stride.

template <int MR, int NV, bool ACC>
void tile_kernel(int K, const float* __restrict A, int64_t ars, int64_t acs,
                 const float* __restrict B, int64_t ldb, float* __restrict C, int64_t ldc,
                 const float* __restrict col_scale) {
  vfloat acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = vfloat{};
#pragma GCC unroll 2
  for (int k = 0; k < K; ++k) {
    vfloat bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) bv[j] = load(B + k * ldb + j * kLanes);
    const float* a = A + k * acs;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const vfloat av = splat(a[i * ars]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] += av * bv[j];
    }
  }
  vfloat scale[NV];
  if constexpr (ACC) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) scale[j] = load(col_scale + j * kLanes);
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      float* dst = C + i * ldc + j * kLanes;
      if constexpr (ACC) {
        store(dst, load(dst) * scale[j] + acc[i][j]);
      } else {
        store(dst, acc[i][j]);
      }
    }
}

// Register tiles: NV vectors of columns by up to max_rows(NV) rows, so that the
// accumulators, one row of B and a broadcast value fit the register file.
constexpr int kMaxNV = kRegisters >= 32 ? 4 : 2;
constexpr int kMaxMR = 16;
constexpr int max_rows(int nv) {
  return std::min(kMaxMR, (kRegisters - nv - 1) / nv);
}

using TileFn = void (*)(int, const float*, int64_t, int64_t, const float*, int64_t, float*,
                        int64_t, const float*);

template <bool ACC, int NV, size_t... I>
constexpr std::array<TileFn, kMaxMR> rows_table(std::index_sequence<I...>) {
  return {{(I + 1 <= static_cast<size_t>(max_rows(NV))
                ? &tile_kernel<(I + 1 <= static_cast<size_t>(max_rows(NV)) ? I + 1 : 1), NV, ACC>
                : nullptr)...}};
}

template <bool ACC, size_t... NV>
constexpr std::array<std::array<TileFn, kMaxMR>, kMaxNV> tile_table(std::index_sequence<NV...>) {
  return {{rows_table<ACC, NV + 1>(std::make_index_sequence<kMaxMR>{})...}};
}

template <bool ACC>
constexpr auto kTiles = tile_table<ACC>(std::make_index_sequence<kMaxNV>{});

template <bool ACC>
void small_gemm(int M, int nvec, int K, const float* A, int64_t ars, int64_t acs,
                const float* B, int64_t ldb, float* C, int64_t ldc, const float* col_scale) {
  for (int v0 = 0; v0 < nvec; v0 += kMaxNV) {
    const int nv = std::min(kMaxNV, nvec - v0);
    const int mr = max_rows(nv);
    for (int i0 = 0; i0 < M; i0 += mr) {
      const int m = std::min(mr, M - i0);
      kTiles<ACC>[nv - 1][m - 1](K, A + i0 * ars, ars, acs, B + v0 * kLanes, ldb,
                                 C + i0 * ldc + v0 * kLanes, ldc,
                                 ACC ? col_scale + v0 * kLanes : nullptr);
    }
  }
}

// ---------------------------------------------------------------------------------------
// flash: a tile of bq query rows against blocks of bk keys. Scores are kept transposed
// (keys x queries) so that queries are the vector lanes: the softmax over keys is then
// element-wise across rows of the tile, and f32 keys are read in place.


FlashParams read_flash(const KernelConfig& config) {
  ConfigReader r(config, "CPU attention kernel");
  FlashParams f;
  f.bq = static_cast<int>(r.integer("bq", 1, 1024));
  f.bk = static_cast<int>(r.integer("bk", 1, 4096));
  f.threads = static_cast<int>(r.integer("threads", 1, 1024));
  f.pack_gqa = r.flag("pack_gqa");
  f.skip_masked_blocks = r.flag("skip_masked_blocks");
  f.scale_q = r.choice("scale_at", {"q", "scores"}) == 0;
  f.amx = r.choice("dot", {"fma", "amx"}) == 1;
  r.finish();
  if (f.amx && (f.bq % 32 || f.bk % 32)) {
    throw std::invalid_argument("CPU attention 'flash' with dot=amx needs bq and bk multiples "
                                "of 32 (got " + config.to_string() + ")");
  }
  return f;
}

struct FlashWorkspace {
  Rows rows;
  Buffer qt, st, o, k, v, stats;  // q^T, scores^T, out^T, converted k and v, m/l/corr
};

template <typename T>
void flash_tile(const AttentionProblem& p, const Geometry& g, const FlashParams& f, int64_t b,
                int64_t h0, int64_t pack, int64_t t0, int64_t t1, FlashWorkspace& ws) {
  const int64_t D = p.head_dim, Dv = p.v_dim;
  const int64_t R = t1 - t0, Rp = round_up(R, kLanes), nq = Rp / kLanes;
  const int64_t kvh = h0 / g.group;
  Rows& rows = ws.rows;
  rows.assign(p, g, h0, pack, t0, t1, Rp);

  // The query tile, transposed (D x Rp) and scaled when the scale goes on q.
  float* qt = ws.qt.get(static_cast<size_t>(std::max<int64_t>(D, 1) * Rp));
  std::fill(qt, qt + D * Rp, 0.0f);
  {
    std::vector<float> row(D);
    const float s = f.scale_q ? p.scale : 1.0f;
    for (int64_t r = 0; r < R; ++r) {
      to_f32(at<T>(p.q, b, rows.head[r], rows.pos[r]), D, row.data());
      for (int64_t d = 0; d < D; ++d) qt[d * Rp + r] = row[d] * s;
    }
  }
  float* stats = ws.stats.get(static_cast<size_t>(3 * Rp));
  float *m = stats, *l = stats + Rp, *corr = stats + 2 * Rp;
  std::fill(m, m + Rp, kNegInf);
  std::fill(l, l + Rp, 0.0f);
  float* o = ws.o.get(static_cast<size_t>(Dv * Rp));  // transposed: v_dim x queries
  std::fill(o, o + Dv * Rp, 0.0f);
  float* st = ws.st.get(static_cast<size_t>(f.bk * Rp));

  int64_t k_lo = 0, k_hi = p.kv_len;
  if (f.skip_masked_blocks) {
    k_lo = rows.min_lo;
    k_hi = rows.max_hi;
  }
  const float post_scale = f.scale_q ? 1.0f : p.scale;

  for (int64_t j0 = k_lo; j0 < k_hi; j0 += f.bk) {
    const int64_t n = std::min<int64_t>(f.bk, k_hi - j0);
    // Keys: read in place when they are f32, else converted once for the block.
    const float* kp;
    int64_t k_rs;
    if constexpr (std::is_same_v<T, float>) {
      kp = at<float>(p.k, b, kvh, j0);
      k_rs = p.k.strides[2];
    } else {
      float* kb = ws.k.get(static_cast<size_t>(n * std::max<int64_t>(D, 1)));
      for (int64_t j = 0; j < n; ++j) to_f32(at<T>(p.k, b, kvh, j0 + j), D, kb + j * D);
      kp = kb;
      k_rs = D;
    }
    small_gemm<false>(static_cast<int>(n), static_cast<int>(nq), static_cast<int>(D), kp, k_rs,
                      1, qt, Rp, st, Rp, nullptr);
    scale_and_cap(st, n * Rp, post_scale, p.softcap);
    if (p.mask != MaskKind::none) apply_mask_array<T>(p, b, rows, j0, n, st, 1, Rp);
    if (rows.partial(j0, j0 + n)) {
      for (int64_t v = 0; v < nq; ++v) {
        vint lo, hi;
        std::memcpy(&lo, rows.lo.data() + v * kLanes, sizeof(lo));
        std::memcpy(&hi, rows.hi.data() + v * kLanes, sizeof(hi));
        for (int64_t j = 0; j < n; ++j) {
          const vint key = vint{} + static_cast<int32_t>(j0 + j);
          float* s = st + j * Rp + v * kLanes;
          store(s, select((key < lo) | (key >= hi), splat(kNegInf), load(s)));
        }
      }
    }
    for (int64_t v = 0; v < nq; ++v) {
      vfloat mv = load(m + v * kLanes), lv = load(l + v * kLanes);
      store(corr + v * kLanes, softmax_step(st + v * kLanes, Rp, n, mv, lv));
      store(m + v * kLanes, mv);
      store(l + v * kLanes, lv);
    }
    // Values: read in place when f32, else converted once for the block.
    const float* vp;
    int64_t v_rs;
    if constexpr (std::is_same_v<T, float>) {
      vp = at<float>(p.v, b, kvh, j0);
      v_rs = p.v.strides[2];
    } else {
      float* vb = ws.v.get(static_cast<size_t>(n * std::max<int64_t>(Dv, 1)));
      for (int64_t j = 0; j < n; ++j) to_f32(at<T>(p.v, b, kvh, j0 + j), Dv, vb + j * Dv);
      vp = vb;
      v_rs = Dv;
    }
    small_gemm<true>(static_cast<int>(Dv), static_cast<int>(nq), static_cast<int>(n), vp, 1,
                     v_rs, st, Rp, o, Rp, corr);
  }
  write_rows<T>(p, b, kvh, rows, o, 1, Rp, l);
}

template <typename T>
void flash(const AttentionProblem& p, const FlashParams& f) {
  const Geometry g = geometry(p);
  const int64_t pack = f.pack_gqa ? g.group : 1;
  const int64_t units = p.batch * (p.heads / pack);
  const int64_t tiles = cdiv(p.q_len * pack, f.bq);
  const int threads = std::max(1, std::min(f.threads, available_cores()));
  // AMX tiles read each key/value head packed once: the first task of a head packs it,
  // the last frees it (tasks go out head by head, so few heads are packed at a time).
  struct Packed {
    std::once_flag once;
    AmxHeadPtr head;
    std::atomic<int64_t> users;
  };
  std::unique_ptr<Packed[]> packed(f.amx ? new Packed[p.batch * p.kv_heads] : nullptr);
  if (f.amx) {
    for (int64_t i = 0; i < p.batch * p.kv_heads; ++i) packed[i].users = tiles * (g.group / pack);
  }
  parallel_for(static_cast<int>(units * tiles), threads, [&](int task, int) {
    thread_local FlashWorkspace ws;
    const int64_t unit = task / tiles;
    const int64_t tile = tiles - 1 - task % tiles;  // last tiles first: under causal masks
                                                    // they see the most keys
    const int64_t b = unit / (p.heads / pack), h0 = (unit % (p.heads / pack)) * pack;
    const int64_t t0 = tile * f.bq, t1 = std::min<int64_t>(p.q_len * pack, t0 + f.bq);
    if (!f.amx) {
      flash_tile<T>(p, g, f, b, h0, pack, t0, t1, ws);
      return;
    }
    Packed& kv = packed[b * p.kv_heads + h0 / g.group];
    std::call_once(kv.once, [&] { kv.head = amx_pack_head(p, b, h0 / g.group); });
    flash_amx_tile(p, g, f, *kv.head, b, h0, pack, t0, t1);
    if (--kv.users == 0) kv.head.reset();
  });
}

// ---------------------------------------------------------------------------------------
// decode and decode_split: all query rows of a unit (one key/value head's query heads, or
// one query head) stream a range of keys once. Scores are dot products along the head
// dimension (rows x keys); the output accumulates key by key from L1.

struct DecodeParams {
  int bk, blocks, threads;  // blocks: 1 for decode
  bool pack_gqa;
};

DecodeParams read_decode(const KernelConfig& config, bool split) {
  ConfigReader r(config, "CPU attention kernel");
  DecodeParams d;
  d.bk = static_cast<int>(r.integer("bk", 1, 4096));
  d.blocks = split ? static_cast<int>(r.integer("blocks", 2, 4096)) : 1;
  d.threads = static_cast<int>(r.integer("threads", 1, 1024));
  d.pack_gqa = r.flag("pack_gqa");
  r.finish();
  return d;
}

struct DecodeWorkspace {
  Rows rows;
  Buffer q, s, stats, k, v;  // scaled queries, scores, corrections, converted k and v
};

// Scores of one query row against 16 keys (rows of k, stride k_rs, d_chunks vectors each):
// products along the head dimension, then the 16 sums reduced together.
inline vfloat dot16(const float* q, const float* k, int64_t k_rs, int64_t d_chunks) {
  vfloat acc[kLanes] = {};
  for (int64_t c = 0; c < d_chunks; ++c) {
    const vfloat qv = load(q + c * kLanes);
#pragma GCC unroll 16
    for (int j = 0; j < kLanes; ++j) acc[j] += load(k + j * k_rs + c * kLanes) * qv;
  }
  return reduce_add16(acc);
}

inline float dot1(const float* q, const float* k, int64_t d_chunks) {
  vfloat acc = {};
  for (int64_t c = 0; c < d_chunks; ++c) acc += load(k + c * kLanes) * load(q + c * kLanes);
  return reduce_add(acc);
}

// o[r, 0:CN*16] = o[r, :] * corr[r] + sum_j p[r, j] v[j, 0:CN*16] for RN rows: the
// accumulators stay in registers while the block's values stream past.
// o[r, 0:CN*16] = o[r, :] * corr[r] + sum_j p[r, j] v[j, 0:CN*16] for RN rows: the
// accumulators stay in registers while the block's values stream past (converted to f32
// as they are loaded).
template <int RN, int CN, typename V>
void decode_accumulate(int64_t n, const float* __restrict p, int64_t ldp,
                       const V* __restrict v, int64_t v_rs, float* __restrict o,
                       int64_t ldo, const float* __restrict corr) {
  vfloat acc[RN][CN];
#pragma GCC unroll 8
  for (int r = 0; r < RN; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < CN; ++c) acc[r][c] = load(o + r * ldo + c * kLanes) * corr[r];
  for (int64_t j = 0; j < n; ++j) {
    vfloat vv[CN];
#pragma GCC unroll 4
    for (int c = 0; c < CN; ++c) vv[c] = load16(v + j * v_rs + c * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < RN; ++r) {
      const vfloat pr = splat(p[r * ldp + j]);
#pragma GCC unroll 4
      for (int c = 0; c < CN; ++c) acc[r][c] += pr * vv[c];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RN; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < CN; ++c) store(o + r * ldo + c * kLanes, acc[r][c]);
}

constexpr int kAccRows = kRegisters >= 32 ? 6 : 2;  // rows sharing one pass over values

template <typename V>
using AccumulateFn = void (*)(int64_t, const float*, int64_t, const V*, int64_t, float*,
                              int64_t, const float*);

template <typename V, int CN, size_t... R>
constexpr std::array<AccumulateFn<V>, kAccRows> accumulate_rows(std::index_sequence<R...>) {
  return {{&decode_accumulate<static_cast<int>(R) + 1, CN, V>...}};
}
template <typename V, size_t... C>
constexpr std::array<std::array<AccumulateFn<V>, kAccRows>, kMaxNV> accumulate_table(
    std::index_sequence<C...>) {
  return {{accumulate_rows<V, static_cast<int>(C) + 1>(std::make_index_sequence<kAccRows>{})...}};
}
template <typename V>
constexpr auto kAccumulate = accumulate_table<V>(std::make_index_sequence<kMaxNV>{});

#if defined(__AVX512BF16__)
// bf16 keys: scores as bf16 pair dot products (VDPBF16PS, exact products, f32 sums)
// straight from the cache, without converting it; q holds the unscaled bf16 queries.
inline vfloat dot16_bf16(const bfloat16_t* q, const bfloat16_t* k, int64_t k_rs, int64_t dim) {
  __m512 acc[kLanes];
  for (int j = 0; j < kLanes; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += 32) {
    const __mmask32 valid = dim - d >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << (dim - d)) - 1);
    const __m512bh qv = (__m512bh)_mm512_maskz_loadu_epi16(valid, q + d);
#pragma GCC unroll 16
    for (int j = 0; j < kLanes; ++j) {
      acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_maskz_loadu_epi16(valid, k + j * k_rs + d), qv);
    }
  }
  vfloat out[kLanes];
  std::memcpy(out, acc, sizeof(out));
  return reduce_add16(out);
}

inline float dot1_bf16(const bfloat16_t* q, const bfloat16_t* k, int64_t dim) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += 32) {
    const __mmask32 valid = dim - d >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << (dim - d)) - 1);
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(valid, k + d),
                           (__m512bh)_mm512_maskz_loadu_epi16(valid, q + d));
  }
  return _mm512_reduce_add_ps(acc);
}
constexpr bool kBf16Dot = true;
#else
constexpr bool kBf16Dot = false;
#endif

// Asks for a row to be brought into the caches ahead of its use.
template <typename T>
void prefetch_row(const T* row, int64_t dim) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < dim * static_cast<int64_t>(sizeof(T)); off += 64) {
    __builtin_prefetch(bytes + off, 0, 2);
  }
}

// Rows of a key or value block as f32 rows of whole vectors: in place when the input is
// f32 and rows are whole vectors, else converted (zero-padded) into `scratch`.
template <typename T>
const float* f32_rows(const Tensor4& t, int64_t b, int64_t h, int64_t j0, int64_t n,
                      int64_t dim, Buffer& scratch, int64_t& row_stride) {
  if constexpr (std::is_same_v<T, float>) {
    if (dim % kLanes == 0) {
      row_stride = t.strides[2];
      return at<float>(t, b, h, j0);
    }
  }
  const int64_t padded = round_up(std::max<int64_t>(dim, 1), kLanes);
  float* out = scratch.get(static_cast<size_t>(n * padded));
  for (int64_t j = 0; j < n; ++j) {
    to_f32(at<T>(t, b, h, j0 + j), dim, out + j * padded);
    std::fill(out + j * padded + dim, out + (j + 1) * padded, 0.0f);
  }
  row_stride = padded;
  return out;
}

// Runs rows `rows` (of kv head kvh) over keys [k_begin, k_end): leaves the unnormalised
// output in o (count x ldo, ldo >= v_dim rounded up to whole vectors), the running max in
// m and the sum in l.
template <typename T>
void decode_range(const AttentionProblem& p, const DecodeParams& dp, int64_t b, int64_t kvh,
                  const Rows& rows, int64_t k_begin, int64_t k_end, float* o, int64_t ldo,
                  float* m, float* l, DecodeWorkspace& ws) {
  const int64_t D = p.head_dim, Dv = p.v_dim, R = rows.count;
  const int64_t Dp = round_up(std::max<int64_t>(D, 1), kLanes), bkp = round_up(dp.bk, kLanes);
  const int64_t d_chunks = Dp / kLanes, v_chunks = round_up(Dv, kLanes) / kLanes;

  float* q = ws.q.get(static_cast<size_t>(R * Dp));
  for (int64_t r = 0; r < R; ++r) {
    float* qr = q + r * Dp;
    to_f32(at<T>(p.q, b, rows.head[r], rows.pos[r]), D, qr);
    for (int64_t d = 0; d < D; ++d) qr[d] *= p.scale;
    std::fill(qr + D, qr + Dp, 0.0f);
  }
  float* s = ws.s.get(static_cast<size_t>(R * bkp));
  float* corr = ws.stats.get(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) {
    m[r] = kNegInf;
    l[r] = 0.0f;
    std::fill(o + r * ldo, o + (r + 1) * ldo, 0.0f);
  }

  // bf16 keys are multiplied as they are (VDPBF16PS) and the scores scaled after.
  constexpr bool bf16_keys = kBf16Dot && std::is_same_v<T, bfloat16_t>;
  const float score_scale = bf16_keys ? p.scale : 1.0f;
  for (int64_t j0 = k_begin; j0 < k_end; j0 += dp.bk) {
    const int64_t n = std::min<int64_t>(dp.bk, k_end - j0);
    int64_t k_rs = p.k.strides[2], v_rs;
    const float* kb = bf16_keys ? nullptr : f32_rows<T>(p.k, b, kvh, j0, n, D, ws.k, k_rs);
    // Scores, 16 keys at a time per row (the block stays in L1 across rows). The first
    // row's pass also prefetches the next block, spread over the work.
    const int64_t ahead = std::min<int64_t>(dp.bk, k_end - j0 - n);
    for (int64_t r = 0; r < R; ++r) {
      float* sr = s + r * bkp;
      int64_t j = 0;
      for (; j + kLanes <= n; j += kLanes) {
        if (r == 0) {
          for (int64_t i = j; i < std::min<int64_t>(j + kLanes, ahead); ++i) {
            prefetch_row(at<T>(p.k, b, kvh, j0 + n + i), D);
            prefetch_row(at<T>(p.v, b, kvh, j0 + n + i), Dv);
          }
        }
        if constexpr (bf16_keys) {
          store(sr + j, dot16_bf16(at<T>(p.q, b, rows.head[r], rows.pos[r]),
                                   at<T>(p.k, b, kvh, j0 + j), k_rs, D));
        } else {
          store(sr + j, dot16(q + r * Dp, kb + j * k_rs, k_rs, d_chunks));
        }
      }
      for (; j < n; ++j) {
        if constexpr (bf16_keys) {
          sr[j] = dot1_bf16(at<T>(p.q, b, rows.head[r], rows.pos[r]), at<T>(p.k, b, kvh, j0 + j), D);
        } else {
          sr[j] = dot1(q + r * Dp, kb + j * k_rs, d_chunks);
        }
      }
      if (score_scale != 1.0f || p.softcap != 0.0f) {
        scale_and_cap(sr, round_up(n, kLanes), score_scale, p.softcap);
      }
      std::fill(sr + n, sr + bkp, kNegInf);
    }
    if (p.mask != MaskKind::none) apply_mask_array<T>(p, b, rows, j0, n, s, bkp, 1);
    if (rows.partial(j0, j0 + n)) {
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t j = 0; j < n; j += kLanes) {
          const vint key = iota() + static_cast<int32_t>(j0 + j);
          float* sr = s + r * bkp + j;
          store(sr, select((key < rows.lo[r]) | (key >= rows.hi[r]), splat(kNegInf), load(sr)));
        }
      }
    }
    // Online softmax per row, along the keys.
    for (int64_t r = 0; r < R; ++r) {
      float* sr = s + r * bkp;
      vfloat bm = splat(kNegInf);
      for (int64_t j = 0; j < n; j += kLanes) bm = vmax(bm, load(sr + j));
      float block_max = kNegInf;
      for (int i = 0; i < kLanes; ++i) block_max = std::max(block_max, bm[i]);
      const float m_new = std::max(m[r], block_max);
      // Nothing finite visible yet: probabilities exp(score - 0) are 0, or NaN for a NaN
      // score (the max drops NaN; the sum and the output keep it).
      const bool dead = m_new == kNegInf;
      const float m_safe = dead ? 0.0f : m_new;
      corr[r] = dead ? 1.0f : std::exp(m[r] - m_new);
      vfloat sum = {};
      for (int64_t j = 0; j < n; j += kLanes) {
        const vfloat e = vexp(load(sr + j) - m_safe);
        store(sr + j, e);
        sum += e;
      }
      l[r] = l[r] * corr[r] + reduce_add(sum);
      m[r] = m_new;
    }
    // Output: rescale, then add p(r, j) v_j, a group of rows and vectors at a time.
    // Values rows of whole vectors are read (and converted) in place, others padded first.
    auto accumulate = [&](auto* vb) {
      for (int64_t c0 = 0; c0 < v_chunks; c0 += kMaxNV) {
        const int cn = static_cast<int>(std::min<int64_t>(kMaxNV, v_chunks - c0));
        for (int64_t r0 = 0; r0 < R; r0 += kAccRows) {
          const int rn = static_cast<int>(std::min<int64_t>(kAccRows, R - r0));
          kAccumulate<std::remove_cv_t<std::remove_pointer_t<decltype(vb)>>>[cn - 1][rn - 1](
              n, s + r0 * bkp, bkp, vb + c0 * kLanes, v_rs, o + r0 * ldo + c0 * kLanes, ldo,
              corr + r0);
        }
      }
    };
    if (Dv % kLanes == 0) {
      v_rs = p.v.strides[2];
      accumulate(at<T>(p.v, b, kvh, j0));
    } else {
      accumulate(f32_rows<T>(p.v, b, kvh, j0, n, Dv, ws.v, v_rs));
    }
  }
}

template <typename T>
void decode(const AttentionProblem& p, const DecodeParams& dp) {
  const Geometry g = geometry(p);
  const int64_t pack = dp.pack_gqa ? g.group : 1;
  const int64_t per_batch = p.heads / pack, units = p.batch * per_batch;
  const int64_t R = p.q_len * pack, Dvp = round_up(p.v_dim, kLanes);
  const int threads = std::max(1, std::min(dp.threads, available_cores()));
  const int64_t blocks = dp.blocks;

  // Split: each (unit, chunk) leaves its partial output, max and sum here.
  const int64_t part_stride = R * (Dvp + 2);
  std::vector<float> parts(blocks > 1 ? static_cast<size_t>(units * blocks * part_stride) : 0);

  parallel_for(static_cast<int>(units * blocks), threads, [&](int task, int) {
    thread_local DecodeWorkspace ws;
    thread_local Buffer acc;
    const int64_t unit = task / blocks, chunk = task % blocks;
    const int64_t b = unit / per_batch, h0 = (unit % per_batch) * pack, kvh = h0 / g.group;
    ws.rows.assign(p, g, h0, pack, 0, R, R);
    const int64_t lo = ws.rows.min_lo, hi = ws.rows.max_hi;
    if (blocks == 1) {
      float* buf = acc.get(static_cast<size_t>(R * (Dvp + 2)));
      float *o = buf, *m = buf + R * Dvp, *l = m + R;
      decode_range<T>(p, dp, b, kvh, ws.rows, lo, hi, o, Dvp, m, l, ws);
      write_rows<T>(p, b, kvh, ws.rows, o, Dvp, 1, l);
      return;
    }
    // Chunks of whole key blocks; trailing chunks may be empty.
    const int64_t size = round_up(cdiv(std::max<int64_t>(hi - lo, 0), blocks), dp.bk);
    const int64_t begin = std::min(hi, lo + chunk * size), end = std::min(hi, begin + size);
    float* part = parts.data() + (unit * blocks + chunk) * part_stride;
    decode_range<T>(p, dp, b, kvh, ws.rows, begin, std::max(begin, end), part, Dvp,
                    part + R * Dvp, part + R * Dvp + R, ws);
  });
  if (blocks == 1) return;

  // Merge the chunks' partial softmaxes: rescale each to the common max and add.
  parallel_for(static_cast<int>(units), threads, [&](int unit, int) {
    thread_local Rows rows;
    thread_local Buffer acc;
    const int64_t b = unit / per_batch, h0 = (unit % per_batch) * pack, kvh = h0 / g.group;
    rows.assign(p, g, h0, pack, 0, R, R);
    float* buf = acc.get(static_cast<size_t>(R * (Dvp + 1)));
    float *o = buf, *l = buf + R * Dvp;
    for (int64_t r = 0; r < R; ++r) {
      float big = kNegInf;
      for (int64_t c = 0; c < blocks; ++c) {
        big = std::max(big, parts[(unit * blocks + c) * part_stride + R * Dvp + r]);
      }
      float* orow = o + r * Dvp;
      std::fill(orow, orow + p.v_dim, 0.0f);
      l[r] = 0.0f;
      // A chunk that saw no finite score has l == 0 (skipped), or l NaN (kept: weight
      // exp(-inf - big) is 0, and 0 * NaN keeps the NaN).
      const float big_safe = big == kNegInf ? 0.0f : big;
      for (int64_t c = 0; c < blocks; ++c) {
        const float* part = parts.data() + (unit * blocks + c) * part_stride;
        const float mc = part[R * Dvp + r];
        if (part[R * Dvp + R + r] == 0.0f) continue;
        const float w = std::exp(mc - big_safe);
        l[r] += part[R * Dvp + R + r] * w;
        for (int64_t d = 0; d < p.v_dim; ++d) orow[d] += part[r * Dvp + d] * w;
      }
    }
    write_rows<T>(p, b, kvh, rows, o, Dvp, 1, l);
  });
}

template <typename Fn>
void with_dtype(Dtype d, Fn&& fn) {
  switch (d) {
    case Dtype::f32: return fn(float{});
    case Dtype::f16: return fn(float16_t{});
    case Dtype::bf16: return fn(bfloat16_t{});
  }
}

}  // namespace

void validate_attention_config(const KernelConfig& config) {
  if (config.family == "flash") {
    read_flash(config);
  } else if (config.family == "decode") {
    read_decode(config, false);
  } else if (config.family == "decode_split") {
    read_decode(config, true);
  } else {
    throw std::invalid_argument("the CPU backend has no attention family '" + config.family +
                                "'");
  }
}

void validate_attention_call(const KernelConfig& config, Dtype dtype, int64_t q_len) {
  validate_attention_config(config);
  if (config.family == "flash") {
    if (!read_flash(config).amx) return;
    if (dtype != Dtype::bf16) {
      throw std::invalid_argument("CPU attention 'flash' with dot=amx takes bfloat16 inputs");
    }
    std::string why;
    if (!amx_available(&why)) throw std::invalid_argument(why);
  } else if (q_len > kDecodeMaxQueries) {
    throw std::invalid_argument("CPU attention '" + config.family + "' takes at most " +
                                std::to_string(kDecodeMaxQueries) + " queries, got " +
                                std::to_string(q_len));
  }
}

void attention(const AttentionProblem& p, const KernelConfig& config) {
  validate_attention_call(config, p.dtype, p.q_len);
  if (p.batch == 0 || p.heads == 0 || p.q_len == 0 || p.v_dim == 0) return;
  if (p.kv_len == 0) {  // softmax over no keys: MLX outputs zeros
    with_dtype(p.dtype, [&](auto t) {
      using T = decltype(t);
      std::fill_n(static_cast<T*>(p.out), p.batch * p.heads * p.q_len * p.v_dim, T(0.0f));
    });
    return;
  }
  if (config.family == "flash") {
    const FlashParams f = read_flash(config);
    with_dtype(p.dtype, [&](auto t) { flash<decltype(t)>(p, f); });
  } else {
    const DecodeParams d = read_decode(config, config.family == "decode_split");
    with_dtype(p.dtype, [&](auto t) { decode<decltype(t)>(p, d); });
  }
}

}  // namespace kernelevo::cpu
