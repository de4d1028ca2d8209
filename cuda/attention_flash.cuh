// Attention on tensor cores (FlashAttention-2's schedule): a block owns BQ query rows,
// split across WARPS warps by 16-row MMA tiles; it walks its keys BK at a time through a
// STAGES-deep cp.async ring of K and V tiles. S = Q K^T and O += P V are m16n8k16 MMAs
// with f32 accumulators; the softmax runs online in f32 on the S fragments, which are
// re-packed in registers as the A operand of P V (no trip through shared memory). With
// SKIP, key blocks that the causal/window mask hides from every row of the tile are not
// visited; masks are evaluated only on blocks that need them.
//
// PACK: the rows of a block are the gqa query heads of one KV head, interleaved (row r is
// query r / gqa of head r % gqa), so K and V are read once for all of them — with BQ = 16
// this is decode on tensor cores. SPLIT: blockIdx.z takes a slice of `chunk` keys and the
// block writes unnormalised partials (o, m, l) for attention_merge, so few rows and long
// caches still fill the GPU.
#ifndef KE_ATTENTION_FLASH_CUH
#define KE_ATTENTION_FLASH_CUH

namespace ke {

template <class T, class MaskT, int D, int BQ, int BK, int WARPS, int STAGES, bool SKIP,
          bool SCALE_Q, int MASK, bool CAUSAL, bool SOFTCAP, bool PACK, bool SPLIT>
__device__ __forceinline__ void attention_flash(const T* q, const T* k, const T* v,
                                                const MaskT* mask, const int* sizes, T* out,
                                                float* o_part, float* ml_part) {
  constexpr int THREADS = 32 * WARPS;
  constexpr int MTW = BQ / (16 * WARPS);  // 16-row tiles per warp
  constexpr int LD = D + SMEM_PAD;
  constexpr int EPV = 16 / sizeof(T);
  static_assert(MTW >= 1 && BQ % (16 * WARPS) == 0 && D % 16 == 0 && BK % 16 == 0, "tiling");

  KE_DYNAMIC_SMEM(smem_raw);
  T* Qs = reinterpret_cast<T*>(smem_raw);  // [BQ][LD]
  T* Ks = Qs + BQ * LD;                    // [STAGES][BK][LD]
  T* Vs = Ks + STAGES * BK * LD;           // [STAGES][BK][LD]

  const AttnSizes sz(sizes);
  const Scorer<SCALE_Q, SOFTCAP, MASK, CAUSAL, MaskT> score(sz);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3, mat = lane >> 3, r8 = lane & 7;
  const int gqa = sz.Hq / sz.Hkv;

  // Rows of this block: PACK interleaves the KV head's query heads.
  const int rows = PACK ? sz.Lq * gqa : sz.Lq;
  const int q_tiles = cdiv(rows, BQ);
  const int r0 = (q_tiles - 1 - int(blockIdx.x)) * BQ;  // the tiles with most keys first
  const int b = PACK ? blockIdx.y / sz.Hkv : blockIdx.y / sz.Hq;
  const int kvh = PACK ? blockIdx.y % sz.Hkv : (blockIdx.y % sz.Hq) / gqa;
  const int head0 = PACK ? kvh * gqa : blockIdx.y % sz.Hq;
  auto query_of = [&](int r) { return PACK ? r / gqa : r; };
  auto head_of = [&](int r) { return PACK ? head0 + r % gqa : head0; };
  auto row_of = [&](int r) { return (long(b) * sz.Hq + head_of(r)) * sz.Lq + query_of(r); };
  const T* kb = k + (long(b) * sz.Hkv + kvh) * sz.Lk * D;
  const T* vb = v + (long(b) * sz.Hkv + kvh) * sz.Lk * D;

  // Keys of this block: a slice when SPLIT; under a causal/window mask with SKIP, only
  // blocks some row of the tile can see.
  const int slice = SPLIT ? blockIdx.z : 0;
  const int begin = slice * (SPLIT ? sz.chunk : 0);
  const int end = SPLIT ? (begin + sz.chunk < sz.Lk ? begin + sz.chunk : sz.Lk) : sz.Lk;
  const int tile_last = (r0 + BQ < rows ? r0 + BQ : rows) - 1;
  int j_begin = 0, j_end = cdiv(end - begin, BK);
  if constexpr (SKIP && CAUSAL) {
    const int last = sz.Lk - sz.Lq + query_of(tile_last);  // the last key any row sees
    const int j_last = last < begin ? -1 : (last - begin) / BK;
    j_end = j_last + 1 < j_end ? j_last + 1 : j_end;
    if (sz.window > 0) {
      const int first = sz.Lk - sz.Lq + query_of(r0) - sz.window + 1;
      j_begin = first > begin ? (first - begin) / BK : 0;
    }
  }
  const int n_blocks = j_end - j_begin;
  const bool vec = aligned16(k) && aligned16(v);

  auto load_kv = [&](int jt, int slot) {
    const int key0 = begin + (j_begin + jt) * BK;
    load_tile<T, BK, D, LD, THREADS>(Ks + slot * BK * LD, kb + long(key0) * D, D, end - key0, D, vec, tid);
    load_tile<T, BK, D, LD, THREADS>(Vs + slot * BK * LD, vb + long(key0) * D, D, end - key0, D, vec, tid);
  };

  // Start the first K/V tiles, then stage Q (scaled and rounded to T when SCALE_Q).
  if constexpr (STAGES > 1) {
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < n_blocks) load_kv(s, s);
      cp_async_commit();
    }
  }
  const float qs = score.q_scale(sz);
  const bool vec_q = aligned16(q);
  for (int c = tid; c < BQ * D / EPV; c += THREADS) {
    const int r = c / (D / EPV), col = (c % (D / EPV)) * EPV;
    Vec16 val{{0u, 0u, 0u, 0u}};
    if (r0 + r < rows) {
      const T* src = q + row_of(r0 + r) * D + col;
      T* e = reinterpret_cast<T*>(&val);
      if (vec_q) {
        val = *reinterpret_cast<const Vec16*>(src);
      } else {
#pragma unroll
        for (int i = 0; i < EPV; ++i) e[i] = src[i];
      }
      if constexpr (SCALE_Q) {
#pragma unroll
        for (int i = 0; i < EPV; ++i) e[i] = from_float<T>(to_float(e[i]) * qs);
      }
    }
    *reinterpret_cast<Vec16*>(Qs + r * LD + col) = val;
  }
  __syncthreads();
  const int wrow = warp * MTW * 16;  // the warp's first row in the tile
  unsigned int qf[MTW][D / 16][4];
#pragma unroll
  for (int i = 0; i < MTW; ++i)
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      ldmatrix_x4(qf[i][kk], Qs + (wrow + i * 16 + (mat & 1) * 8 + r8) * LD + kk * 16 + (mat >> 1) * 8);

  // Each thread's rows: g and g + 8 of each of its 16-row tiles; their queries and masks.
  const MaskT* mrow[MTW][2];
  int qrow[MTW][2];
#pragma unroll
  for (int i = 0; i < MTW; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = r0 + wrow + i * 16 + g + 8 * h;
      qrow[i][h] = r < rows ? query_of(r) : -1;  // -1: a padding row, never stored
      mrow[i][h] = MASK == MASK_NONE || r >= rows ? nullptr
                   : mask + long(b) * sz.mask_b + long(head_of(r)) * sz.mask_h +
                         long(query_of(r)) * sz.mask_q;
    }
  // The queries the warp's rows hold, for deciding which key blocks need the mask.
  const int warp_last = r0 + wrow + MTW * 16 - 1;
  const int q_first = query_of(r0 + wrow < rows ? r0 + wrow : rows - 1);
  const int q_last = query_of(warp_last < rows ? warp_last : rows - 1);

  float oacc[MTW][D / 8][4], m[MTW][2], l[MTW][2];
#pragma unroll
  for (int i = 0; i < MTW; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      m[i][h] = -inf();
      l[i][h] = 0.0f;
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) oacc[i][n][e] = 0.0f;
  }

  auto compute = [&](int jt, int slot) {
    const T* K = Ks + slot * BK * LD;
    const T* V = Vs + slot * BK * LD;
    const int key0 = begin + (j_begin + jt) * BK;
    float s[MTW][BK / 8][4];
#pragma unroll
    for (int i = 0; i < MTW; ++i)
#pragma unroll
      for (int n = 0; n < BK / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[i][n][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
      for (int p = 0; p < BK / 16; ++p) {
        unsigned int kf[4];
        ldmatrix_x4(kf, K + (p * 16 + (mat >> 1) * 8 + r8) * LD + kk * 16 + (mat & 1) * 8);
#pragma unroll
        for (int i = 0; i < MTW; ++i) {
          mma16816<T>(s[i][2 * p], qf[i][kk], kf[0], kf[1]);
          mma16816<T>(s[i][2 * p + 1], qf[i][kk], kf[2], kf[3]);
        }
      }

    // Scores in the log2 domain; the per-element mask only where this block needs it.
    const int offset = sz.Lk - sz.Lq;
    const bool needs_mask =
        MASK != MASK_NONE || key0 + BK > end ||
        (CAUSAL && (key0 + BK - 1 > offset + q_first ||
                    (sz.window > 0 && key0 <= offset + q_last - sz.window)));
#pragma unroll
    for (int i = 0; i < MTW; ++i)
#pragma unroll
      for (int n = 0; n < BK / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e >> 1;
          const int key = key0 + n * 8 + 2 * t + (e & 1);
          if (!needs_mask) {
            s[i][n][e] = score.plain(s[i][n][e]);
          } else if (key >= end) {
            s[i][n][e] = -inf();
          } else if (qrow[i][h] < 0) {
            s[i][n][e] = MASKED;  // a padding row: never stored
          } else {
            s[i][n][e] = score(s[i][n][e], qrow[i][h], key, mrow[i][h]);
          }
        }

    // Online softmax per row (h: rows g and g + 8); a row's values live in one quad.
#pragma unroll
    for (int i = 0; i < MTW; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = m[i][h];
#pragma unroll
        for (int n = 0; n < BK / 8; ++n) mx = fmaxf(mx, fmaxf(s[i][n][2 * h], s[i][n][2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float c = rescale(m[i][h], mx);
        m[i][h] = mx;
        const float base = mx == -inf() ? 0.0f : mx;  // no key yet: every weight is 0
        float sum = 0.0f;
#pragma unroll
        for (int n = 0; n < BK / 8; ++n) {
          s[i][n][2 * h] = fast_exp2(s[i][n][2 * h] - base);
          s[i][n][2 * h + 1] = fast_exp2(s[i][n][2 * h + 1] - base);
          sum += s[i][n][2 * h] + s[i][n][2 * h + 1];
        }
        l[i][h] = l[i][h] * c + sum;  // this thread's share; the quad is summed at the end
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          oacc[i][n][2 * h] *= c;
          oacc[i][n][2 * h + 1] *= c;
        }
      }

    // O += P V: two S fragments (16 keys) make one A fragment.
#pragma unroll
    for (int kc = 0; kc < BK / 16; ++kc) {
      unsigned int pf[MTW][4];
#pragma unroll
      for (int i = 0; i < MTW; ++i) {
        pf[i][0] = pack2<T>(s[i][2 * kc][0], s[i][2 * kc][1]);
        pf[i][1] = pack2<T>(s[i][2 * kc][2], s[i][2 * kc][3]);
        pf[i][2] = pack2<T>(s[i][2 * kc + 1][0], s[i][2 * kc + 1][1]);
        pf[i][3] = pack2<T>(s[i][2 * kc + 1][2], s[i][2 * kc + 1][3]);
      }
#pragma unroll
      for (int p = 0; p < D / 16; ++p) {
        unsigned int vf[4];
        ldmatrix_x4_trans(vf, V + (kc * 16 + (mat & 1) * 8 + r8) * LD + p * 16 + (mat >> 1) * 8);
#pragma unroll
        for (int i = 0; i < MTW; ++i) {
          mma16816<T>(oacc[i][2 * p], pf[i], vf[0], vf[1]);
          mma16816<T>(oacc[i][2 * p + 1], pf[i], vf[2], vf[3]);
        }
      }
    }
  };

  if constexpr (STAGES == 1) {
    for (int jt = 0; jt < n_blocks; ++jt) {
      load_kv(jt, 0);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      compute(jt, 0);
      __syncthreads();
    }
  } else {
    for (int jt = 0; jt < n_blocks; ++jt) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();
      const int next = jt + STAGES - 1;
      if (next < n_blocks) load_kv(next, next % STAGES);
      cp_async_commit();
      compute(jt, jt % STAGES);
    }
    cp_async_wait<0>();
  }

#pragma unroll
  for (int i = 0; i < MTW; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sum = l[i][h];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int r = r0 + wrow + i * 16 + g + h * 8;
      if (r >= rows) continue;
      const long row = row_of(r);
      if constexpr (SPLIT) {  // unnormalised, with the row's (m, l)
        const long at = row * sz.slices + slice;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
          *reinterpret_cast<float2*>(o_part + at * D + n * 8 + 2 * t) =
              make_float2(oacc[i][n][2 * h], oacc[i][n][2 * h + 1]);
        if (t == 0) {
          ml_part[at * 2] = m[i][h];
          ml_part[at * 2 + 1] = sum;
        }
      } else {
        const float inv = 1.0f / sum;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
          *reinterpret_cast<unsigned int*>(out + row * D + n * 8 + 2 * t) =
              pack2<T>(oacc[i][n][2 * h] * inv, oacc[i][n][2 * h + 1] * inv);
      }
    }
}

}  // namespace ke

#endif  // KE_ATTENTION_FLASH_CUH
