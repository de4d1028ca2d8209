// flash attention tiles on AMX (flash dot=amx, bf16 inputs): both products, q k^T and
// p v, are bf16 tile products with f32 accumulation (TDPBF16PS); the online softmax runs
// on AVX-512 in between, in f32. A tile is 16 rows of 64 bytes; the layouts:
//   q       row-major bf16, head_dim padded to 32: A tiles of 16 queries x 32 dims
//   k       per block, B tiles: row r holds dims (2r, 2r+1) of 16 keys, i.e. the block
//           transposed as 32-bit pairs (16 x 16 transposes on AVX-512)
//   scores  f32, queries x keys (C tiles stored row-major)
//   p       bf16 row-major: A tiles of 16 queries x 32 keys, read in place
//   v       per block, B tiles: row r holds keys (2r, 2r+1) of 16 value columns, interleaved
//   out     f32 row-major: C tiles loaded, accumulated and stored per block, and rescaled
//           in memory when a row's running max moves
// Tiles 0-3 accumulate (2 x 2 blocks), 4-5 hold A and 6-7 hold B.
#include <mutex>
#include <stdexcept>
#include <string>

#include "attention/kernel_common.h"

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__) && \
    defined(__AVX512BW__) && defined(__linux__)
#define KE_HAVE_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define KE_HAVE_AMX 0
#endif

namespace kernelevo::cpu::detail {

#if KE_HAVE_AMX

namespace {

using bf16 = uint16_t;  // raw bits
constexpr int kTileElems = 16 * 32;  // bf16 values per tile (16 rows x 64 bytes)

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

bf16* bf16_buffer(Buffer& buffer, int64_t n) {
  return reinterpret_cast<bf16*>(buffer.get(static_cast<size_t>((n + 1) / 2)));
}

__mmask32 first(int64_t n) {
  return n >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << n) - 1);
}

// 16 x 16 transpose of 32-bit elements (r[i] is row i; afterwards r[j] is column j).
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + k], 128-bit lane L: column 4L + k of rows 4i..4i+3
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int k = 0; k < 4; ++k) {
    const __m512i x0 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0x88);
    const __m512i x1 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0xDD);
    const __m512i y0 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0x88);
    const __m512i y1 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0xDD);
    t[k] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    t[4 + k] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    t[8 + k] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
    t[12 + k] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

struct AmxWorkspace {
  Rows rows;
  Buffer q, s, p, o, stats;
  std::vector<int32_t> span;       // per row: the visible keys of the block, [2r], [2r + 1]
  std::vector<int32_t> pair_span;  // per pair of row tiles: the union of their rows' spans
};

// All keys of a head as B tiles: tile (jt, c) holds dims [32c, 32c + 32) of keys
// [16 jt, 16 jt + 16), at (jt * dim_chunks + c) tiles; keys past kv_len are zero.
void pack_keys(const AttentionProblem& pr, int64_t b, int64_t kvh, int64_t key_tiles,
               int64_t dim_chunks, bf16* out) {
  for (int64_t jt = 0; jt < key_tiles; ++jt) {
    for (int64_t c = 0; c < dim_chunks; ++c) {
      const __mmask32 valid = first(pr.head_dim - c * 32);
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t key = jt * 16 + i;
        r[i] = key < pr.kv_len
                   ? _mm512_maskz_loadu_epi16(valid, at<bfloat16_t>(pr.k, b, kvh, key) + c * 32)
                   : _mm512_setzero_si512();
      }
      transpose16(r);
      bf16* tile = out + (jt * dim_chunks + c) * kTileElems;
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(tile + i * 32, r[i]);
    }
  }
}

// All values of a head as B tiles: tile (kc, t) row r interleaves keys 32kc + 2r and
// 32kc + 2r + 1 over value columns [16t, 16t + 16), at (kc * v_tiles + t) tiles; keys
// past kv_len are zero.
void pack_values(const AttentionProblem& pr, int64_t b, int64_t kvh, int64_t key_chunks,
                 int64_t v_tiles, bf16* out) {
  alignas(64) static constexpr uint16_t lo_index[32] = {
      0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
      8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr uint16_t hi_index[32] = {
      16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
      24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(lo_index), hi = _mm512_load_si512(hi_index);
  for (int64_t kc = 0; kc < key_chunks; ++kc) {
    for (int r = 0; r < 16; ++r) {
      const int64_t k0 = kc * 32 + 2 * r;
      const bfloat16_t* a = k0 < pr.kv_len ? at<bfloat16_t>(pr.v, b, kvh, k0) : nullptr;
      const bfloat16_t* c = k0 + 1 < pr.kv_len ? at<bfloat16_t>(pr.v, b, kvh, k0 + 1) : nullptr;
      for (int64_t t2 = 0; 2 * t2 < v_tiles; ++t2) {
        const __mmask32 valid = first(pr.v_dim - t2 * 32);
        const __m512i va = a ? _mm512_maskz_loadu_epi16(valid, a + t2 * 32) : _mm512_setzero_si512();
        const __m512i vc = c ? _mm512_maskz_loadu_epi16(valid, c + t2 * 32) : _mm512_setzero_si512();
        _mm512_storeu_si512(out + (kc * v_tiles + 2 * t2) * kTileElems + r * 32,
                            _mm512_permutex2var_epi16(va, lo, vc));
        _mm512_storeu_si512(out + (kc * v_tiles + 2 * t2 + 1) * kTileElems + r * 32,
                            _mm512_permutex2var_epi16(va, hi, vc));
      }
    }
  }
}

}  // namespace

bool amx_available(std::string* why) {
  // Linux hands out the tile state on request, once per process.
  static const bool granted = [] {
    constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  if (!granted && why) *why = "CPU attention 'flash' dot=amx: the OS refused AMX tiles to this process";
  return granted;
}

namespace {

std::mutex pool_mutex;
std::vector<AmxPackedHead*> pool;  // at most a few idle buffers, kept for the next call

AmxPackedHead* take_from_pool() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  if (pool.empty()) return new AmxPackedHead();
  AmxPackedHead* head = pool.back();
  pool.pop_back();
  return head;
}

}  // namespace

void ReleaseHead::operator()(AmxPackedHead* head) const {
  std::lock_guard<std::mutex> lock(pool_mutex);
  if (pool.size() < 4) {
    pool.push_back(head);
  } else {
    delete head;
  }
}

AmxHeadPtr amx_pack_head(const AttentionProblem& p, int64_t b, int64_t kvh) {
  AmxHeadPtr head(take_from_pool());
  const int64_t keys = round_up(p.kv_len, 32);
  const int64_t dim_chunks = round_up(std::max<int64_t>(p.head_dim, 1), 32) / 32;
  const int64_t v_tiles = round_up(p.v_dim, 32) / 16;
  bf16* k = bf16_buffer(head->k, keys * dim_chunks * 32);
  bf16* v = bf16_buffer(head->v, keys * v_tiles * 16);
  pack_keys(p, b, kvh, keys / 16, dim_chunks, k);
  pack_values(p, b, kvh, keys / 32, v_tiles, v);
  return head;
}

void flash_amx_tile(const AttentionProblem& p, const Geometry& g, const FlashParams& f,
                    const AmxPackedHead& head, int64_t b, int64_t h0, int64_t pack, int64_t t0,
                    int64_t t1) {
  thread_local AmxWorkspace ws;
  const int64_t D = p.head_dim, Dv = p.v_dim, bk = f.bk;
  const int64_t R = t1 - t0, Rp = round_up(R, 32), row_tiles = Rp / 16;
  const int64_t Dq = round_up(std::max<int64_t>(D, 1), 32), dim_chunks = Dq / 32;
  const int64_t Dvq = round_up(Dv, 32), v_tiles = Dvq / 16;
  const int64_t kvh = h0 / g.group;
  Rows& rows = ws.rows;
  rows.assign(p, g, h0, pack, t0, t1, Rp);

  // Queries, scaled first when the scale goes on q (then rounded to bf16).
  bf16* q = bf16_buffer(ws.q, Rp * Dq);
  std::fill(q, q + Rp * Dq, bf16{0});
  for (int64_t r = 0; r < R; ++r) {
    const bfloat16_t* src = at<bfloat16_t>(p.q, b, rows.head[r], rows.pos[r]);
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const __mmask16 valid = static_cast<__mmask16>(D - d0 >= 16 ? 0xFFFF : (1u << (D - d0)) - 1);
      __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(valid, src + d0)), 16));
      if (f.scale_q) x = _mm512_mul_ps(x, _mm512_set1_ps(p.scale));
      _mm256_mask_storeu_epi16(q + r * Dq + d0, valid, (__m256i)_mm512_cvtneps_pbh(x));
    }
  }
  float* stats = ws.stats.get(static_cast<size_t>(5 * Rp));
  float *m = stats, *l = stats + Rp, *corr = stats + 2 * Rp;
  float *shift = stats + 3 * Rp, *block_sum = stats + 4 * Rp;  // per block: max, sum
  std::fill(m, m + Rp, kNegInf);
  std::fill(l, l + Rp, 0.0f);
  std::fill(shift, shift + Rp, kNegInf);  // padding rows stay dead
  std::fill(block_sum, block_sum + Rp, 0.0f);
  float* o = ws.o.get(static_cast<size_t>(Rp * Dvq));
  std::fill(o, o + Rp * Dvq, 0.0f);
  float* s = ws.s.get(static_cast<size_t>(Rp * bk));
  bf16* pm = bf16_buffer(ws.p, Rp * bk);
  ws.span.resize(static_cast<size_t>(2 * Rp));
  ws.pair_span.resize(static_cast<size_t>(row_tiles));
  int32_t* span = ws.span.data();
  int32_t* pair_span = ws.pair_span.data();
  std::fill(pm + R * bk, pm + Rp * bk, bf16{0});  // padding rows: no weight

  // Blocks start at multiples of 32 keys, where the packed tiles start.
  int64_t k_lo = 0, k_hi = p.kv_len;
  if (f.skip_masked_blocks) {
    k_lo = rows.min_lo / 32 * 32;
    k_hi = rows.max_hi;
  }
  const float post_scale = f.scale_q ? 1.0f : p.scale;
  configure_tiles();

  for (int64_t j0 = k_lo; j0 < k_hi; j0 += bk) {
    const int64_t n = std::min<int64_t>(bk, k_hi - j0);
    const int64_t nb = round_up(n, 32);
    const bf16* kt = reinterpret_cast<const bf16*>(head.k.data.get()) +
                     (j0 / 16) * dim_chunks * kTileElems;  // (jt, c) tiles
    const bf16* vt = reinterpret_cast<const bf16*>(head.v.data.get()) +
                     (j0 / 32) * v_tiles * kTileElems;  // (kc, t) tiles

    // Causal and window masks leave each row a range of visible keys: work only on the
    // 32-key chunks it overlaps (its probabilities elsewhere are 0), and on the chunks
    // some row of a pair of row tiles overlaps.
    const bool partial = rows.partial(j0, j0 + n);
    for (int64_t r = 0; r < Rp; ++r) {
      int64_t jb = 0, je = nb;
      if (r >= R) {
        je = 0;  // padding rows
      } else if (partial) {
        jb = std::clamp<int64_t>(rows.lo[r] - j0, 0, nb) / 32 * 32;
        je = std::max(jb, round_up(std::clamp<int64_t>(rows.hi[r] - j0, 0, n), 32));
      }
      span[2 * r] = static_cast<int32_t>(jb);
      span[2 * r + 1] = static_cast<int32_t>(je);
    }
    for (int64_t i = 0; i < row_tiles; i += 2) {
      int32_t lo = static_cast<int32_t>(nb), hi = 0;
      for (int64_t r = i * 16; r < (i + 2) * 16; ++r) {
        if (span[2 * r] < span[2 * r + 1]) {
          lo = std::min(lo, span[2 * r]);
          hi = std::max(hi, span[2 * r + 1]);
        }
      }
      pair_span[i] = lo;
      pair_span[i + 1] = std::max(lo, hi);
    }

    // scores = q k^T, 2 x 2 tiles at a time
    for (int64_t i = 0; i < row_tiles; i += 2) {
      for (int64_t jt = pair_span[i] / 16; jt < pair_span[i + 1] / 16; jt += 2) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t c = 0; c < dim_chunks; ++c) {
          _tile_loadd(4, q + i * 16 * Dq + c * 32, Dq * 2);
          _tile_loadd(5, q + (i + 1) * 16 * Dq + c * 32, Dq * 2);
          _tile_loadd(6, kt + (jt * dim_chunks + c) * kTileElems, 64);
          _tile_loadd(7, kt + ((jt + 1) * dim_chunks + c) * kTileElems, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        float* c0 = s + i * 16 * bk + jt * 16;
        _tile_stored(0, c0, bk * 4);
        _tile_stored(1, c0 + 16, bk * 4);
        _tile_stored(2, c0 + 16 * bk, bk * 4);
        _tile_stored(3, c0 + 16 * bk + 16, bk * 4);
      }
    }

    // Scale, softcap, masks; then the online softmax per row, p stored as bf16.
    if (post_scale != 1.0f || p.softcap != 0.0f) {
      for (int64_t r = 0; r < R; ++r) {
        scale_and_cap(s + r * bk + span[2 * r], span[2 * r + 1] - span[2 * r], post_scale,
                      p.softcap);
      }
    }
    if (p.mask != MaskKind::none) apply_mask_array<bfloat16_t>(p, b, rows, j0, n, s, bk, 1);
    // Row maxima (after hiding keys past the block and those the row may not see), then
    // the new running maxima and corrections for 16 rows at a time.
    for (int64_t r = 0; r < R; ++r) {
      float* sr = s + r * bk;
      const int64_t jb = span[2 * r], je = span[2 * r + 1];
      vfloat big = splat(kNegInf);
      for (int64_t j = jb; j < je; j += kLanes) {
        const vint key = iota() + static_cast<int32_t>(j);
        vint hidden = key >= static_cast<int32_t>(n);
        if (partial) {
          const vint abs_key = key + static_cast<int32_t>(j0);
          hidden |= (abs_key < rows.lo[r]) | (abs_key >= rows.hi[r]);
        }
        const vfloat x = select(hidden, splat(kNegInf), load(sr + j));
        store(sr + j, x);
        big = vmax(big, x);
      }
      shift[r] = reduce_max(big);
    }
    for (int64_t r = 0; r < Rp; r += kLanes) {
      const vfloat m_old = load(m + r);
      const vfloat m_new = vmax(m_old, load(shift + r));
      const vint dead = m_new == kNegInf;  // nothing visible yet: p = 0, no correction
      const vfloat m_safe = select(dead, splat(0.0f), m_new);
      store(corr + r, select(dead, splat(1.0f), vexp(m_old - m_safe)));
      store(m + r, m_new);
      store(shift + r, m_safe);
    }
    // p = exp(score - max) as bf16; row sums in f32.
    for (int64_t r = 0; r < R; ++r) {
      const float* sr = s + r * bk;
      bf16* pr = pm + r * bk;
      const int64_t jb = span[2 * r], je = span[2 * r + 1];
      std::fill(pr, pr + jb, bf16{0});
      std::fill(pr + je, pr + nb, bf16{0});
      const vfloat top = splat(shift[r]);
      vfloat sum = {};
      for (int64_t j = jb; j < je; j += 2 * kLanes) {
        const vfloat e0 = vexp_bf16(load(sr + j) - top);
        const vfloat e1 = vexp_bf16(load(sr + j + kLanes) - top);
        sum += e0 + e1;
        __m512 lo, hi;
        std::memcpy(&lo, &e0, sizeof(lo));
        std::memcpy(&hi, &e1, sizeof(hi));
        _mm512_storeu_si512(pr + j, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
      block_sum[r] = reduce_add(sum);
    }
    for (int64_t r = 0; r < Rp; r += kLanes) {
      store(l + r, load(l + r) * load(corr + r) + load(block_sum + r));
    }
    // Rescale the rows whose max moved, then out += p v.
    for (int64_t r = 0; r < R; ++r) {
      if (corr[r] == 1.0f) continue;
      const vfloat c = splat(corr[r]);
      for (int64_t d = 0; d < Dvq; d += kLanes) store(o + r * Dvq + d, load(o + r * Dvq + d) * c);
    }
    for (int64_t i = 0; i < row_tiles; i += 2) {
      for (int64_t t = 0; t < v_tiles; t += 2) {
        float* c0 = o + i * 16 * Dvq + t * 16;
        _tile_loadd(0, c0, Dvq * 4);
        _tile_loadd(1, c0 + 16, Dvq * 4);
        _tile_loadd(2, c0 + 16 * Dvq, Dvq * 4);
        _tile_loadd(3, c0 + 16 * Dvq + 16, Dvq * 4);
        for (int64_t kc = pair_span[i] / 32; kc < pair_span[i + 1] / 32; ++kc) {
          _tile_loadd(4, pm + i * 16 * bk + kc * 32, bk * 2);
          _tile_loadd(5, pm + (i + 1) * 16 * bk + kc * 32, bk * 2);
          _tile_loadd(6, vt + (kc * v_tiles + t) * kTileElems, 64);
          _tile_loadd(7, vt + (kc * v_tiles + t + 1) * kTileElems, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, c0, Dvq * 4);
        _tile_stored(1, c0 + 16, Dvq * 4);
        _tile_stored(2, c0 + 16 * Dvq, Dvq * 4);
        _tile_stored(3, c0 + 16 * Dvq + 16, Dvq * 4);
      }
    }
  }
  _tile_release();
  write_rows<bfloat16_t>(p, b, kvh, rows, o, Dvq, 1, l);
}

#else  // no AMX in this build

bool amx_available(std::string* why) {
  if (why) *why = "CPU attention 'flash' dot=amx: this build has no AMX (it needs AMX-BF16 "
                  "and AVX512-BF16 at build time)";
  return false;
}

void ReleaseHead::operator()(AmxPackedHead* head) const {
  delete head;
}

AmxHeadPtr amx_pack_head(const AttentionProblem&, int64_t, int64_t) {
  throw std::invalid_argument("this build has no AMX kernels");
}

void flash_amx_tile(const AttentionProblem&, const Geometry&, const FlashParams&,
                    const AmxPackedHead&, int64_t, int64_t, int64_t, int64_t, int64_t) {
  throw std::invalid_argument("this build has no AMX kernels");
}

#endif

}  // namespace kernelevo::cpu::detail
