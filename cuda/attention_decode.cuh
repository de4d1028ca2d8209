// Decode attention (few queries, many keys) on CUDA cores: memory-bound, so the aim is to
// read K and V exactly once at full bandwidth.
//
// A block serves R query rows against one key/value head: with PACK all gqa query heads of
// that KV head (R = gqa * Lq), so K and V are read once per KV head, else one query head
// (R = Lq). Lanes form groups of G; a group takes one key at a time and each lane holds
// D / G elements of it (whole 16-byte loads), so a dot product needs only log2(G)
// shuffles. The WARPS * 32 / G groups of the block take interleaved keys (neighbouring
// groups read neighbouring rows), U keys per step with their loads in flight together,
// and keep an online softmax (m, l, o) per row in registers. Groups merge by shuffles,
// warps through shared memory.
//
// Single pass (SPLIT false): the block covers every key and writes the output. Split
// (SPLIT true): blockIdx.x picks a slice of `chunk` keys and the block writes its
// unnormalised partial (o, m, l) for attention_merge to combine.
#ifndef KE_ATTENTION_DECODE_CUH
#define KE_ATTENTION_DECODE_CUH

namespace ke {

template <int G> __device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int m = G / 2; m > 0; m /= 2) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}

template <class T, int NV> __device__ __forceinline__ void load_row(const T* p, bool vec, Vec16 (&out)[NV]) {
  if (vec) {
#pragma unroll
    for (int i = 0; i < NV; ++i) out[i] = load16_stream(p + i * (16 / sizeof(T)));
  } else {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      T* e = reinterpret_cast<T*>(&out[i]);
#pragma unroll
      for (int j = 0; j < int(16 / sizeof(T)); ++j) e[j] = p[i * (16 / sizeof(T)) + j];
    }
  }
}

template <class T, class MaskT, int D, int R, int G, int WARPS, bool PACK, bool SPLIT,
          bool SCALE_Q, int MASK, bool CAUSAL, bool SOFTCAP>
__device__ __forceinline__ void attention_decode(const T* q, const T* k, const T* v,
                                                 const MaskT* mask, const int* sizes, T* out,
                                                 float* o_part, float* ml_part) {
  constexpr int DL = D / G;                     // elements of a key row per lane
  constexpr int EPV = 16 / sizeof(T);           // elements per 16-byte load
  constexpr int NV = DL / EPV;                  // 16-byte loads per lane per row
  constexpr int GROUPS = WARPS * 32 / G;
  constexpr int U = sizeof(T) == 4 ? 2 : 4;     // keys per group per step
  static_assert(DL % EPV == 0, "whole 16-byte loads per lane");

  const AttnSizes sz(sizes);
  const Scorer<SCALE_Q, SOFTCAP, MASK, CAUSAL, MaskT> score(sz);
  const int gqa = sz.Hq / sz.Hkv;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int grp = tid / G, gl = tid % G;

  const int b = PACK ? blockIdx.y / sz.Hkv : blockIdx.y / sz.Hq;
  const int kvh = PACK ? blockIdx.y % sz.Hkv : (blockIdx.y % sz.Hq) / gqa;
  const int head0 = PACK ? kvh * gqa : blockIdx.y % sz.Hq;
  auto head_of = [&](int r) { return head0 + (PACK ? r / sz.Lq : 0); };
  auto query_of = [&](int r) { return PACK ? r % sz.Lq : r; };
  auto row_of = [&](int r) { return (long(b) * sz.Hq + head_of(r)) * sz.Lq + query_of(r); };

  const int slice = SPLIT ? blockIdx.x : 0;
  const int begin = slice * sz.chunk;
  const int end = SPLIT ? (begin + sz.chunk < sz.Lk ? begin + sz.chunk : sz.Lk) : sz.Lk;
  const long kv_offset = (long(b) * sz.Hkv + kvh) * sz.Lk * D + gl * DL;
  const T* kp = k + kv_offset;
  const T* vp = v + kv_offset;
  const bool vec = aligned16(k) && aligned16(v);

  float qr[R][DL];
  const MaskT* mrow[R];
  const float qs = score.q_scale(sz);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const T* qp = q + row_of(r) * D + gl * DL;
#pragma unroll
    for (int i = 0; i < DL; ++i) qr[r][i] = to_float(qp[i]) * qs;
    mrow[r] = MASK == MASK_NONE ? nullptr
                                : mask + long(b) * sz.mask_b + long(head_of(r)) * sz.mask_h +
                                      long(query_of(r)) * sz.mask_q;
  }

  float o[R][DL], m[R], l[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -inf();
    l[r] = 0.0f;
#pragma unroll
    for (int i = 0; i < DL; ++i) o[r][i] = 0.0f;
  }

  // The loop runs in step across the warp (its shuffles need every lane): the bound is the
  // warp's first group's, and each key is checked against the end.
  const int warp_first = begin + warp * (32 / G);
  for (int step = warp_first; step < end; step += GROUPS * U) {
    const int key0 = step + grp % (32 / G);
    Vec16 kr[U][NV], vr[U][NV];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = key0 + u * GROUPS;
      if (j < end) {
        load_row<T, NV>(kp + long(j) * D, vec, kr[u]);
        load_row<T, NV>(vp + long(j) * D, vec, vr[u]);
      } else {  // past the slice: weight 0, and 0 * garbage could be NaN
#pragma unroll
        for (int i = 0; i < NV; ++i) kr[u][i] = vr[u][i] = Vec16{{0u, 0u, 0u, 0u}};
      }
    }
    float s[R][U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kx[DL];
#pragma unroll
      for (int i = 0; i < NV; ++i) unpack16<T>(kr[u][i], kx + i * EPV);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < DL; ++i) dot += qr[r][i] * kx[i];
        s[r][u] = dot;
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int u = 0; u < U; ++u) s[r][u] = group_sum<G>(s[r][u]);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = key0 + u * GROUPS;
#pragma unroll
      for (int r = 0; r < R; ++r) s[r][u] = j < end ? score(s[r][u], query_of(r), j, mrow[r]) : -inf();
    }
    // online softmax: one rescale per step of U keys
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float m_new = m[r];
#pragma unroll
      for (int u = 0; u < U; ++u) m_new = fmaxf(m_new, s[r][u]);
      const float c = rescale(m[r], m_new);
      m[r] = m_new;
      l[r] *= c;
#pragma unroll
      for (int i = 0; i < DL; ++i) o[r][i] *= c;
      const float base = m_new == -inf() ? 0.0f : m_new;  // no key yet: every weight is 0
#pragma unroll
      for (int u = 0; u < U; ++u) {
        s[r][u] = fast_exp2(s[r][u] - base);
        l[r] += s[r][u];
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vx[DL];
#pragma unroll
      for (int i = 0; i < NV; ++i) unpack16<T>(vr[u][i], vx + i * EPV);
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int i = 0; i < DL; ++i) o[r][i] += s[r][u] * vx[i];
    }
  }

  // Merge the groups of each warp: lanes holding the same elements differ in the bits >= G.
#pragma unroll
  for (int mask_bit = G; mask_bit < 32; mask_bit *= 2) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float m_o = __shfl_xor_sync(0xffffffffu, m[r], mask_bit);
      const float l_o = __shfl_xor_sync(0xffffffffu, l[r], mask_bit);
      const float m_new = fmaxf(m[r], m_o);
      const float f = rescale(m[r], m_new), f_o = rescale(m_o, m_new);
      l[r] = l[r] * f + l_o * f_o;
#pragma unroll
      for (int i = 0; i < DL; ++i) o[r][i] = o[r][i] * f + __shfl_xor_sync(0xffffffffu, o[r][i], mask_bit) * f_o;
      m[r] = m_new;
    }
  }

  // Merge the warps through shared memory: [WARPS][R][D] outputs, then [WARPS][R] m and l.
  KE_DYNAMIC_SMEM(smem_raw);
  float* so = reinterpret_cast<float*>(smem_raw);
  float* sm = so + WARPS * R * D;
  float* sl = sm + WARPS * R;
  if (lane < G) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int i = 0; i < DL; ++i) so[(warp * R + r) * D + gl * DL + i] = o[r][i];
      if (gl == 0) {
        sm[warp * R + r] = m[r];
        sl[warp * R + r] = l[r];
      }
    }
  }
  __syncthreads();
  for (int e = tid; e < R * D; e += WARPS * 32) {
    const int r = e / D, d = e % D;
    float m_all = -inf();
#pragma unroll
    for (int w = 0; w < WARPS; ++w) m_all = fmaxf(m_all, sm[w * R + r]);
    float l_all = 0.0f, o_all = 0.0f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      const float f = rescale(sm[w * R + r], m_all);
      l_all += sl[w * R + r] * f;
      o_all += so[(w * R + r) * D + d] * f;
    }
    const long row = row_of(r);
    if constexpr (SPLIT) {
      const long at = row * sz.slices + slice;
      o_part[at * D + d] = o_all;
      if (d == 0) {
        ml_part[at * 2] = m_all;
        ml_part[at * 2 + 1] = l_all;
      }
    } else {
      out[row * D + d] = from_float<T>(o_all / l_all);
    }
  }
}

}  // namespace ke

#endif  // KE_ATTENTION_DECODE_CUH
