// Attention: softmax(mask(softcap(scale * q k^T))) v, with q [B, Hq, Lq, D] and k, v
// [B, Hkv, Lk, D] row-major; query head h reads key/value head h / (Hq / Hkv) (GQA by
// indexing). Softmax statistics and accumulation are f32, in the log2 domain.
//
// sizes: [B, Hq, Hkv, Lq, Lk, scale (f32 bits), softcap (f32 bits), window,
//         mask strides for batch, head, query, key (elements; 0 where broadcast),
//         slices, keys per slice]
// The causal mask aligns the last query with the last key: query i sees key j when
// j <= Lk - Lq + i, and with a window only the last `window` of those keys.
#ifndef KE_ATTENTION_H
#define KE_ATTENTION_H

namespace ke {

enum MaskKind { MASK_NONE = 0, MASK_BOOL = 1, MASK_ADDITIVE = 2 };

struct AttnSizes {
  int B, Hq, Hkv, Lq, Lk;
  float scale, softcap;
  int window;
  int mask_b, mask_h, mask_q, mask_k;
  int slices, chunk;
};

template <typename PS>
METAL_FUNC AttnSizes attn_sizes(PS s) {
  AttnSizes z;
  z.B = s[0];
  z.Hq = s[1];
  z.Hkv = s[2];
  z.Lq = s[3];
  z.Lk = s[4];
  z.scale = as_type<float>(s[5]);
  z.softcap = as_type<float>(s[6]);
  z.window = s[7];
  z.mask_b = s[8];
  z.mask_h = s[9];
  z.mask_q = s[10];
  z.mask_k = s[11];
  z.slices = s[12];
  z.chunk = s[13];
  return z;
}

// Turns q . k into a log2-domain score: scale, softcap, then the masks (MASKED where a
// mask hides the key). With SCALE_Q the queries already carry the scale (q_scale()).
template <bool SCALE_Q, bool SOFTCAP, int MASK, bool CAUSAL>
struct Scorer {
  float scale;  // applied to each dot product (1 when the queries carry it)
  float softcap;
  int window;
  int offset;  // Lk - Lq: query i is aligned with key offset + i
  int mask_k;

  METAL_FUNC static float q_scale(AttnSizes z) {
    return SCALE_Q ? (SOFTCAP ? z.scale : z.scale * LOG2E) : 1.0f;
  }

  METAL_FUNC static Scorer make(AttnSizes z) {
    Scorer s;
    s.scale = SCALE_Q ? 1.0f : (SOFTCAP ? z.scale : z.scale * LOG2E);
    s.softcap = z.softcap;
    s.window = z.window;
    s.offset = z.Lk - z.Lq;
    s.mask_k = z.mask_k;
    return s;
  }

  // Whether the causal/window mask lets query qi see key j.
  METAL_FUNC bool visible(int qi, int j) const {
    if constexpr (!CAUSAL) {
      return true;
    } else {
      const int pos = offset + qi;
      return j <= pos && (window <= 0 || j > pos - window);
    }
  }

  // mrow: the mask's row for this (batch, head, query); not read without a mask.
  template <typename PM>
  METAL_FUNC float score(float dot, int qi, int j, PM mrow) const {
    float s = dot * scale;
    if constexpr (SOFTCAP) {
      s = softcap * metal::precise::tanh(s / softcap) * LOG2E;
    }
    if constexpr (MASK == MASK_ADDITIVE) {
      // Not clamped: -inf gives the key weight 0, and a row whose keys are all -inf ends
      // with l = 0 and outputs 0/0 = NaN, as MLX's softmax does; NaN stays NaN.
      s = s + static_cast<float>(mrow[int64_t(j) * mask_k]) * LOG2E;
    }
    if constexpr (MASK == MASK_BOOL) {
      if (!mrow[int64_t(j) * mask_k]) {
        return MASKED;
      }
    }
    return visible(qi, j) ? s : MASKED;
  }
};

// Weight of a softmax state with maximum m against a larger maximum m_new.
METAL_FUNC float rescale(float m, float m_new) {
  return fast::exp2(m - m_new);
}

// ---- flash: prefill ------------------------------------------------------------------
//
// One threadgroup per (BQ query rows, batch, head). The Q tile sits in threadgroup
// memory (scaled as loaded when SCALE_Q); K and V tiles of BK keys take turns in one
// buffer. WM simdgroups split the query rows; WN simdgroups split the head dimension of
// the output, each computing the scores of its rows itself (WN > 1 repeats Q K^T to
// halve the output fragments each simdgroup holds). S = Q K^T and O += P V run on
// 8x8 simdgroup_matrix fragments in f32; the online softmax works on the fragments'
// elements, a row's statistics gathered from its four lanes (lanes 1 and 8 apart).
// SKIP: key blocks that the causal/window mask hides from the whole query tile are
// not visited.

template <typename T, int D, int BQ, int BK>
struct FlashTiles {
  static constant constexpr int LD = D + 16 / sizeof(T);
  static constant constexpr int Q = BQ * LD;
  static constant constexpr int KV = BK * LD;
};

// Copies rows [0, rows) of a [*, D] block into dst (rows LD apart), times `scale`,
// zero-filling rows up to R.
template <typename T, int R, int D, int LD, int NT, bool SCALED, typename P>
METAL_FUNC void load_rows(P src, int rows, float scale, threadgroup T* dst, int tid) {
  constexpr int RUNS = R * D / 4;
  for (int i = tid; i < RUNS; i += NT) {
    const int r = i / (D / 4);
    const int c = (i % (D / 4)) * 4;
    threadgroup T* d = dst + r * LD + c;
    if (r < rows) {
      const auto s = src + int64_t(r) * D + c;
      MLX_MTL_PRAGMA_UNROLL
      for (int j = 0; j < 4; j++) {
        d[j] = SCALED ? static_cast<T>(static_cast<float>(s[j]) * scale) : s[j];
      }
    } else {
      MLX_MTL_PRAGMA_UNROLL
      for (int j = 0; j < 4; j++) {
        d[j] = T(0);
      }
    }
  }
}

template <typename T, int D, int BQ, int BK, int WM, int WN, bool SKIP, bool SCALE_Q, int MASK, bool CAUSAL,
          bool SOFTCAP, typename PQ, typename PK, typename PV, typename PM, typename PS, typename PO>
METAL_FUNC void attention_flash(PQ q, PK k, PV v, PM mask, PS sizes, PO out, threadgroup T* qs,
                                threadgroup T* kvs, uint3 tg, uint sg, uint lane, uint tid) {
  using Tiles = FlashTiles<T, D, BQ, BK>;
  constexpr int LD = Tiles::LD;
  constexpr int NT = 32 * WM * WN;
  constexpr int TQ = BQ / (8 * WM);        // query fragments per simdgroup
  constexpr int KF = BK / 8;               // key fragments per block
  constexpr int DF = D / 8;                // head-dimension fragments
  constexpr int TD = (DF + WN - 1) / WN;   // output fragments per simdgroup (the last may have fewer)
  static_assert(D % 8 == 0 && BQ % (8 * WM) == 0 && BK % 8 == 0, "whole fragments");

  const AttnSizes z = attn_sizes(sizes);
  const auto scorer = Scorer<SCALE_Q, SOFTCAP, MASK, CAUSAL>::make(z);
  const int b = int(tg.y) / z.Hq, h = int(tg.y) % z.Hq;
  const int kvh = h / (z.Hq / z.Hkv);
  const int q0 = int(tg.x) * BQ;
  const int64_t q_row0 = (int64_t(b) * z.Hq + h) * z.Lq;
  const auto kp = k + (int64_t(b) * z.Hkv + kvh) * z.Lk * D;
  const auto vp = v + (int64_t(b) * z.Hkv + kvh) * z.Lk * D;
  const auto mbase = mask + (MASK != MASK_NONE ? int64_t(b) * z.mask_b + int64_t(h) * z.mask_h : 0);

  load_rows<T, BQ, D, LD, NT, SCALE_Q>(q + (q_row0 + q0) * D, z.Lq - q0, Scorer<SCALE_Q, SOFTCAP, MASK, CAUSAL>::q_scale(z),
                                       qs, tid);

  const int wi = int(sg) / WN, wj = int(sg) % WN;
  const int rows0 = wi * TQ * 8;  // this simdgroup's first row in the tile
  const short2 rc = frag_coord(lane);

  float m[TQ], l[TQ];
  frag o[TQ][TD];
  MLX_MTL_PRAGMA_UNROLL
  for (int i = 0; i < TQ; i++) {
    m[i] = ABSENT;
    l[i] = 0.0f;
    MLX_MTL_PRAGMA_UNROLL
    for (int t = 0; t < TD; t++) {
      o[i][t] = frag_zero();
    }
  }

  int kb_begin = 0, kb_end = cdiv(z.Lk, BK);
  if (CAUSAL && SKIP) {
    const int last_row = metal::min(q0 + BQ, z.Lq) - 1;
    kb_end = metal::min(kb_end, cdiv(last_row + scorer.offset + 1, BK));
    if (z.window > 0) {
      kb_begin = metal::max(0, q0 + scorer.offset - z.window + 1) / BK;
    }
  }

  for (int kb = kb_begin; kb < kb_end; kb++) {
    const int k0 = kb * BK;
    const int keys = z.Lk - k0;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    load_rows<T, BK, D, LD, NT, false>(kp + int64_t(k0) * D, keys, 1.0f, kvs, tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // S = Q K^T for this simdgroup's rows and all BK keys
    frag s[TQ][KF];
    MLX_MTL_PRAGMA_UNROLL
    for (int i = 0; i < TQ; i++) {
      MLX_MTL_PRAGMA_UNROLL
      for (int j = 0; j < KF; j++) {
        s[i][j] = frag_zero();
      }
    }
    for (int d8 = 0; d8 < DF; d8++) {
      frag qf[TQ], kf[KF];
      MLX_MTL_PRAGMA_UNROLL
      for (int i = 0; i < TQ; i++) {
        frag_load(qf[i], qs + (rows0 + i * 8) * LD + d8 * 8, LD, 1, rc);
      }
      MLX_MTL_PRAGMA_UNROLL
      for (int j = 0; j < KF; j++) {
        // element (d, key) of K^T is kvs[key * LD + d]
        frag_load(kf[j], kvs + j * 8 * LD + d8 * 8, 1, LD, rc);
      }
      MLX_MTL_PRAGMA_UNROLL
      for (int i = 0; i < TQ; i++) {
        MLX_MTL_PRAGMA_UNROLL
        for (int j = 0; j < KF; j++) {
          simdgroup_multiply_accumulate(s[i][j], qf[i], kf[j], s[i][j]);
        }
      }
    }

    // Online softmax: scores, the row maxima over this block, weights P in place of S.
    MLX_MTL_PRAGMA_UNROLL
    for (int i = 0; i < TQ; i++) {
      const int qi = metal::min(q0 + rows0 + i * 8 + rc.y, z.Lq - 1);  // rows past Lq are not stored
      const auto mrow = mbase + (MASK != MASK_NONE ? int64_t(qi) * z.mask_q : 0);
      float block_max = ABSENT;
      MLX_MTL_PRAGMA_UNROLL
      for (int j = 0; j < KF; j++) {
        thread vec<float, 2>& e = elems(s[i][j]);
        MLX_MTL_PRAGMA_UNROLL
        for (int c = 0; c < 2; c++) {
          const int key = k0 + j * 8 + rc.x + c;
          // keys past Lk weigh 0 (exp2(-inf - m)), also in a row whose keys all score -inf
          e[c] = key < z.Lk ? scorer.score(e[c], qi, key, mrow) : -INFINITY;
          block_max = metal::max(block_max, e[c]);
        }
      }
      block_max = metal::max(block_max, simd_shuffle_xor(block_max, ushort(1)));
      block_max = metal::max(block_max, simd_shuffle_xor(block_max, ushort(8)));
      const float m_new = metal::max(m[i], block_max);
      const float factor = rescale(m[i], m_new);
      m[i] = m_new;
      float row_sum = 0.0f;  // this lane's share; the four lanes of a row are summed at the end
      MLX_MTL_PRAGMA_UNROLL
      for (int j = 0; j < KF; j++) {
        thread vec<float, 2>& e = elems(s[i][j]);
        e[0] = fast::exp2(e[0] - m_new);
        e[1] = fast::exp2(e[1] - m_new);
        row_sum += e[0] + e[1];
      }
      l[i] = l[i] * factor + row_sum;
      MLX_MTL_PRAGMA_UNROLL
      for (int t = 0; t < TD; t++) {
        elems(o[i][t]) *= factor;
      }
    }

    threadgroup_barrier(mem_flags::mem_threadgroup);
    load_rows<T, BK, D, LD, NT, false>(vp + int64_t(k0) * D, keys, 1.0f, kvs, tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // O += P V for this simdgroup's output columns
    MLX_MTL_PRAGMA_UNROLL
    for (int t = 0; t < TD; t++) {
      const int d8 = wj * TD + t;
      if (d8 < DF) {
        MLX_MTL_PRAGMA_UNROLL
        for (int j = 0; j < KF; j++) {
          frag vf;
          frag_load(vf, kvs + j * 8 * LD + d8 * 8, LD, 1, rc);
          MLX_MTL_PRAGMA_UNROLL
          for (int i = 0; i < TQ; i++) {
            simdgroup_multiply_accumulate(o[i][t], s[i][j], vf, o[i][t]);
          }
        }
      }
    }
  }

  MLX_MTL_PRAGMA_UNROLL
  for (int i = 0; i < TQ; i++) {
    l[i] += simd_shuffle_xor(l[i], ushort(1));
    l[i] += simd_shuffle_xor(l[i], ushort(8));
    const int qi = q0 + rows0 + i * 8 + rc.y;
    if (qi >= z.Lq) {
      continue;
    }
    const float inv = 1.0f / l[i];
    const auto orow = out + (q_row0 + qi) * D;
    MLX_MTL_PRAGMA_UNROLL
    for (int t = 0; t < TD; t++) {
      const int d8 = wj * TD + t;
      if (d8 < DF) {
        const vec<float, 2> e = elems(o[i][t]);
        orow[d8 * 8 + rc.x] = static_cast<T>(e[0] * inv);
        orow[d8 * 8 + rc.x + 1] = static_cast<T>(e[1] * inv);
      }
    }
  }
}

// ---- decode: few queries against many keys -------------------------------------------
//
// With PACK a threadgroup serves all R = gqa * Lq query rows of one key/value head, so K
// and V are read once per KV head; without, one query row (R = 1), as MLX's sdpa_vector.
// Each lane holds elements d = lane + 32 i of a row (DPL of them); the S simdgroups take
// keys in turn (simdgroup s: keys s, s + S, ...), a simdgroup all R rows of each key it
// takes: one read of the key and value rows, R dot products summed across the simdgroup,
// R online-softmax updates in registers. The simdgroups then merge their (m, l, o)
// through threadgroup memory, a bounded number of rows at a time.
//
// Single pass (SPLIT false): one threadgroup per head covers every key and writes the
// output. Split (SPLIT true): threadgroup x takes the keys of slice x (`chunk` of them)
// and writes its unnormalised partial (o, m, l) in f32 for attention_merge.

template <int D, int R, int S>
struct DecodeScratch {
  static constant constexpr int DPL = (D + 31) / 32;
  static constant constexpr int UNITS = R * DPL;  // (row, element slot) pairs, 32 floats each
  static constant constexpr int PER_PASS = S == 1 ? 1 : (UNITS < 128 / S ? UNITS : 128 / S);
  static constant constexpr int O = S == 1 ? 1 : S * PER_PASS * 32;  // <= 4096 floats
  static constant constexpr int ML = S == 1 ? 1 : 2 * S * R + R;  // m (then weights), l; row sums
};

// Which query row the r-th row of a decode threadgroup is: packed, query r % Lq of head
// head0 + r / Lq; else the threadgroup's one row (query0 of head0).
struct DecodeRows {
  int b, head0, query0, Hq, Lq;
  bool pack;
  METAL_FUNC int query(int r) const {
    return pack ? r % Lq : query0;
  }
  METAL_FUNC int head(int r) const {
    return head0 + (pack ? r / Lq : 0);
  }
  // index of the row in q and out ([B * Hq * Lq] rows of D)
  METAL_FUNC int64_t row(int r) const {
    return (int64_t(b) * Hq + head(r)) * Lq + query(r);
  }
};

template <typename T, int D, int R, int S, bool PACK, bool SPLIT, bool SCALE_Q, int MASK, bool CAUSAL,
          bool SOFTCAP, typename PQ, typename PK, typename PV, typename PM, typename PS, typename PO,
          typename PP, typename PML>
METAL_FUNC void attention_decode(PQ q, PK k, PV v, PM mask, PS sizes, PO out, PP o_part, PML ml_part,
                                 threadgroup float* red_o, threadgroup float* red_ml, uint3 tg, uint sg,
                                 uint lane, uint tid) {
  using Scratch = DecodeScratch<D, R, S>;
  constexpr int DPL = Scratch::DPL;

  const AttnSizes z = attn_sizes(sizes);
  const auto scorer = Scorer<SCALE_Q, SOFTCAP, MASK, CAUSAL>::make(z);
  const int gqa = z.Hq / z.Hkv;
  static_assert(PACK || R == 1, "unpacked, a threadgroup serves one query row");
  // grid y: (batch, KV head) packed, else (batch, query head, query)
  const int per_batch = PACK ? z.Hkv : z.Hq * z.Lq;
  const int b = int(tg.y) / per_batch, within = int(tg.y) % per_batch;
  const int kvh = PACK ? within : within / z.Lq / gqa;
  DecodeRows rows;
  rows.b = b;
  rows.head0 = PACK ? kvh * gqa : within / z.Lq;
  rows.query0 = PACK ? 0 : within % z.Lq;
  rows.Hq = z.Hq;
  rows.Lq = z.Lq;
  rows.pack = PACK;
  const int slice = SPLIT ? int(tg.x) : 0;
  const int begin = slice * z.chunk;
  const int end = SPLIT ? metal::min(z.Lk, begin + z.chunk) : z.Lk;
  const auto kp = k + (int64_t(b) * z.Hkv + kvh) * z.Lk * D;
  const auto vp = v + (int64_t(b) * z.Hkv + kvh) * z.Lk * D;

  // Per row: its query (scaled as loaded when SCALE_Q), mask row, and (m, l, o).
  int64_t moff[R];
  float qr[R][DPL], o[R][DPL], m[R], l[R];
  const float qs = Scorer<SCALE_Q, SOFTCAP, MASK, CAUSAL>::q_scale(z);
  MLX_MTL_PRAGMA_UNROLL
  for (int r = 0; r < R; r++) {
    const int64_t qrow = rows.row(r);
    moff[r] = MASK != MASK_NONE ? int64_t(b) * z.mask_b + int64_t(rows.head(r)) * z.mask_h +
                                      int64_t(rows.query(r)) * z.mask_q
                                : 0;
    MLX_MTL_PRAGMA_UNROLL
    for (int i = 0; i < DPL; i++) {
      const int d = int(lane) + 32 * i;
      qr[r][i] = d < D ? static_cast<float>(q[qrow * D + d]) * qs : 0.0f;
      o[r][i] = 0.0f;
    }
    m[r] = ABSENT;
    l[r] = 0.0f;
  }

  for (int j = begin + int(sg); j < end; j += S) {
    float kx[DPL], vx[DPL];
    MLX_MTL_PRAGMA_UNROLL
    for (int i = 0; i < DPL; i++) {
      const int d = int(lane) + 32 * i;
      kx[i] = d < D ? static_cast<float>(kp[int64_t(j) * D + d]) : 0.0f;
      vx[i] = d < D ? static_cast<float>(vp[int64_t(j) * D + d]) : 0.0f;
    }
    MLX_MTL_PRAGMA_UNROLL
    for (int r = 0; r < R; r++) {
      float dot = 0.0f;
      MLX_MTL_PRAGMA_UNROLL
      for (int i = 0; i < DPL; i++) {
        dot += qr[r][i] * kx[i];
      }
      const float s = scorer.score(simd_sum(dot), rows.query(r), j, mask + moff[r]);
      const float m_new = metal::max(m[r], s);
      const float factor = rescale(m[r], m_new);
      const float p = fast::exp2(s - m_new);
      m[r] = m_new;
      l[r] = l[r] * factor + p;
      MLX_MTL_PRAGMA_UNROLL
      for (int i = 0; i < DPL; i++) {
        o[r][i] = o[r][i] * factor + p * vx[i];
      }
    }
  }

  if constexpr (S == 1) {
    MLX_MTL_PRAGMA_UNROLL
    for (int r = 0; r < R; r++) {
      const int64_t orow = rows.row(r);
      MLX_MTL_PRAGMA_UNROLL
      for (int i = 0; i < DPL; i++) {
        const int d = int(lane) + 32 * i;
        if (d < D) {
          if constexpr (SPLIT) {
            o_part[(orow * z.slices + slice) * D + d] = o[r][i];
          } else {
            out[orow * D + d] = static_cast<T>(o[r][i] / l[r]);
          }
        }
      }
      if constexpr (SPLIT) {
        if (lane == 0) {
          ml_part[(orow * z.slices + slice) * 2] = m[r];
          ml_part[(orow * z.slices + slice) * 2 + 1] = l[r];
        }
      }
    }
  } else {
    // Merge the simdgroups. red_ml: m [S][R] (replaced by the weights), l [S][R], then
    // each row's weighted sum [R].
    threadgroup float* red_m = red_ml;
    threadgroup float* red_l = red_ml + S * R;
    threadgroup float* row_sum = red_ml + 2 * S * R;
    if (lane == 0) {
      MLX_MTL_PRAGMA_UNROLL
      for (int r = 0; r < R; r++) {
        red_m[int(sg) * R + r] = m[r];
        red_l[int(sg) * R + r] = l[r];
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (int(tid) < R) {
      const int r = tid;
      float m_all = ABSENT;
      for (int s = 0; s < S; s++) {
        m_all = metal::max(m_all, red_m[s * R + r]);
      }
      float l_all = 0.0f;
      for (int s = 0; s < S; s++) {
        const float w = rescale(red_m[s * R + r], m_all);
        red_m[s * R + r] = w;
        l_all += w * red_l[s * R + r];
      }
      row_sum[r] = l_all;
      if constexpr (SPLIT) {
        const int64_t orow = rows.row(r);
        ml_part[(orow * z.slices + slice) * 2] = m_all;
        ml_part[(orow * z.slices + slice) * 2 + 1] = l_all;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // The outputs, PER_PASS (row, slot) units of 32 floats per simdgroup at a time.
    constexpr int UNITS = Scratch::UNITS, PER_PASS = Scratch::PER_PASS;
    for (int u0 = 0; u0 < UNITS; u0 += PER_PASS) {
      MLX_MTL_PRAGMA_UNROLL
      for (int r = 0; r < R; r++) {
        MLX_MTL_PRAGMA_UNROLL
        for (int i = 0; i < DPL; i++) {
          const int u = r * DPL + i - u0;
          if (u >= 0 && u < PER_PASS) {
            red_o[(int(sg) * PER_PASS + u) * 32 + lane] = o[r][i];
          }
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      for (int e = tid; e < PER_PASS * 32; e += S * 32) {
        const int u = u0 + e / 32;
        const int r = u / DPL, d = e % 32 + 32 * (u % DPL);
        if (u < UNITS && d < D) {
          float acc = 0.0f;
          for (int s = 0; s < S; s++) {
            acc += red_m[s * R + r] * red_o[(s * PER_PASS + e / 32) * 32 + e % 32];
          }
          const int64_t orow = rows.row(r);
          if constexpr (SPLIT) {
            o_part[(orow * z.slices + slice) * D + d] = acc;
          } else {
            out[orow * D + d] = static_cast<T>(acc / row_sum[r]);
          }
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
  }
}

// Split decode, second pass: one simdgroup per output row combines the slices' partials.
template <typename T, int D, typename PP, typename PML, typename PS, typename PO>
METAL_FUNC void attention_merge(PP o_part, PML ml_part, PS sizes, PO out, threadgroup float* weight, uint row,
                                uint lane) {
  const int slices = sizes[12];
  const auto ml = ml_part + int64_t(row) * slices * 2;
  float m_all = ABSENT;
  for (int s = lane; s < slices; s += 32) {
    m_all = metal::max(m_all, ml[2 * s]);
  }
  m_all = simd_max(m_all);
  float l_all = 0.0f;
  for (int s = lane; s < slices; s += 32) {
    const float w = rescale(ml[2 * s], m_all);
    weight[s] = w;
    l_all += w * ml[2 * s + 1];
  }
  l_all = simd_sum(l_all);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float inv = 1.0f / l_all;
  const auto op = o_part + int64_t(row) * slices * D;
  for (int d = lane; d < D; d += 32) {
    float acc = 0.0f;
    for (int s = 0; s < slices; s++) {
      acc += weight[s] * op[int64_t(s) * D + d];
    }
    out[int64_t(row) * D + d] = static_cast<T>(acc * inv);
  }
}

}  // namespace ke

#endif  // KE_ATTENTION_H
