// Matrix-vector products (M == 1 or N == 1) and the few-row "wide" variant.
//
// gemv: the product is a matrix (one operand) times a vector (the other). MLX's
// arrangement: a threadgroup is BM x BN simdgroups, a simdgroup SM x SN threads, a thread
// TM x TN elements, where M-named sizes run along the matrix's rows and N-named ones
// along its contiguous columns as it lies in memory. Stored [out, K] (MAT_T false) the
// columns are the reduction: a thread reads TN contiguous elements of TM rows per step
// and the SN lanes of a row, then the BN simdgroups, are summed. Stored [K, out]
// (MAT_T true) the rows are the reduction: a thread reads TN contiguous outputs' elements
// of TM rows per step, and SM lanes, then BM simdgroups, are summed. Either way every
// matrix element is read from device memory once.
//
// sizes: [M, N, K, a_batched, b_batched, alpha (f32 bits), out_len, 0, 0]
#ifndef KE_GEMV_H
#define KE_GEMV_H

namespace ke {

// The first argument when FIRST, else the second (they may differ in address space).
template <bool FIRST, typename P1, typename P2>
METAL_FUNC auto pick(P1 first, P2 second) {
  if constexpr (FIRST) {
    return first;
  } else {
    return second;
  }
}

// Threadgroup memory (floats) for the cross-simdgroup sum; 1 when none is needed.
template <int BM, int BN, int SM, int SN, int TM, int TN, bool MAT_T>
struct GemvScratch {
  static constant constexpr int SIZE =
      MAT_T ? (BM > 1 ? BM * BN * SN * TN : 1) : (BN > 1 ? BN * BM * SM * TM : 1);
};

// MAT_A: the matrix is a (N == 1: a [M, K] times the vector b) rather than b (M == 1).
template <typename T, int BM, int BN, int SM, int SN, int TM, int TN, bool MAT_T, bool MAT_A,
          bool BIAS, int ACT, bool RESIDUAL, bool SCALE, typename PA, typename PB, typename PBias,
          typename PRes, typename PS, typename PO>
METAL_FUNC void gemv(PA a, PB b, PBias bias, PRes residual, PS sizes, PO out, threadgroup float* scratch,
                     uint3 tg, uint sg, uint lane) {
  static_assert(SM * SN == 32, "a simdgroup is 32 threads");
  const int K = sizes[2], out_len = sizes[6];
  const float alpha = as_type<float>(sizes[5]);
  const int batch = tg.z;
  const int64_t mat_step = sizes[MAT_A ? 3 : 4] ? int64_t(K) * out_len : 0;
  const int64_t vec_step = sizes[MAT_A ? 4 : 3] ? K : 0;
  const auto mat = pick<MAT_A>(a, b) + batch * mat_step;
  const auto xv = pick<!MAT_A>(a, b) + batch * vec_step;
  const int sgm = int(sg) / BN, sgn = int(sg) % BN;
  const int thm = int(lane) / SN, thn = int(lane) % SN;

  if constexpr (!MAT_T) {
    // rows are outputs, columns the reduction
    constexpr int BLOCK_M = BM * SM * TM, BLOCK_N = BN * SN * TN;
    const int r_local = (sgm * SM + thm) * TM;
    const int row0 = int(tg.x) * BLOCK_M + r_local;
    float acc[TM] = {0.0f};
    for (int k = (sgn * SN + thn) * TN; k < K; k += BLOCK_N) {
      float x[TN];
      const bool k_full = k + TN <= K;
      MLX_MTL_PRAGMA_UNROLL
      for (int t = 0; t < TN; t++) {
        x[t] = k_full || k + t < K ? static_cast<float>(xv[k + t]) : 0.0f;
      }
      MLX_MTL_PRAGMA_UNROLL
      for (int tm = 0; tm < TM; tm++) {
        if (row0 + tm < out_len) {
          const auto row = mat + int64_t(row0 + tm) * K + k;
          MLX_MTL_PRAGMA_UNROLL
          for (int t = 0; t < TN; t++) {
            if (k_full || k + t < K) {
              acc[tm] += static_cast<float>(row[t]) * x[t];
            }
          }
        }
      }
    }
    // The SN lanes of a row, then the BN simdgroups along the reduction.
    MLX_MTL_PRAGMA_UNROLL
    for (int tm = 0; tm < TM; tm++) {
      for (ushort off = SN / 2; off >= 1; off /= 2) {
        acc[tm] += simd_shuffle_down(acc[tm], off);
      }
    }
    if constexpr (BN > 1) {
      if (thn == 0) {
        MLX_MTL_PRAGMA_UNROLL
        for (int tm = 0; tm < TM; tm++) {
          scratch[sgn * BLOCK_M + r_local + tm] = acc[tm];
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      if (sgn == 0 && thn == 0) {
        for (int s = 1; s < BN; s++) {
          MLX_MTL_PRAGMA_UNROLL
          for (int tm = 0; tm < TM; tm++) {
            acc[tm] += scratch[s * BLOCK_M + r_local + tm];
          }
        }
      }
    }
    if (sgn == 0 && thn == 0) {
      MLX_MTL_PRAGMA_UNROLL
      for (int tm = 0; tm < TM; tm++) {
        const int e = row0 + tm;
        if (e < out_len) {
          const int64_t at = int64_t(batch) * out_len + e;
          out[at] = static_cast<T>(epilogue<BIAS, ACT, RESIDUAL, SCALE>(acc[tm], alpha, bias, MAT_A ? 0 : e, residual, at));
        }
      }
    }
  } else {
    // rows are the reduction, columns outputs
    constexpr int BLOCK_M = BM * SM * TM, BLOCK_N = BN * SN * TN;
    const int c_local = (sgn * SN + thn) * TN;
    const int col0 = int(tg.x) * BLOCK_N + c_local;
    const bool cols_full = col0 + TN <= out_len;
    float acc[TN] = {0.0f};
    for (int k = (sgm * SM + thm) * TM; k < K; k += BLOCK_M) {
      MLX_MTL_PRAGMA_UNROLL
      for (int tm = 0; tm < TM; tm++) {
        if (k + tm < K && col0 < out_len) {
          const float x = static_cast<float>(xv[k + tm]);
          const auto row = mat + int64_t(k + tm) * out_len + col0;
          MLX_MTL_PRAGMA_UNROLL
          for (int t = 0; t < TN; t++) {
            if (cols_full || col0 + t < out_len) {
              acc[t] += x * static_cast<float>(row[t]);
            }
          }
        }
      }
    }
    // The SM lanes of a column (lanes SN apart), then the BM simdgroups.
    MLX_MTL_PRAGMA_UNROLL
    for (int t = 0; t < TN; t++) {
      for (ushort off = SM / 2; off >= 1; off /= 2) {
        acc[t] += simd_shuffle_down(acc[t], ushort(off * SN));
      }
    }
    if constexpr (BM > 1) {
      if (thm == 0) {
        MLX_MTL_PRAGMA_UNROLL
        for (int t = 0; t < TN; t++) {
          scratch[sgm * BLOCK_N + c_local + t] = acc[t];
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      if (sgm == 0 && thm == 0) {
        for (int s = 1; s < BM; s++) {
          MLX_MTL_PRAGMA_UNROLL
          for (int t = 0; t < TN; t++) {
            acc[t] += scratch[s * BLOCK_N + c_local + t];
          }
        }
      }
    }
    if (sgm == 0 && thm == 0) {
      MLX_MTL_PRAGMA_UNROLL
      for (int t = 0; t < TN; t++) {
        const int e = col0 + t;
        if (e < out_len) {
          const int64_t at = int64_t(batch) * out_len + e;
          out[at] = static_cast<T>(epilogue<BIAS, ACT, RESIDUAL, SCALE>(acc[t], alpha, bias, MAT_A ? 0 : e, residual, at));
        }
      }
    }
  }
}

// gemv_wide: out[M, N] = x[M, K] @ w[N, K]^T for a few rows. A threadgroup owns four
// weight rows (LANES lanes reduce K for one row; 32 / LANES rows per simdgroup, LANES / 8
// simdgroups) and applies each weight element it reads to VECS input rows held in
// registers: the weight is read once per pass of VECS rows. SPLIT: the passes are
// separate threadgroup columns (grid x = passes); else one column walks them, re-reading
// its rows while they are in cache.
//
// sizes: [M, N, K, a_batched, b_batched, alpha (f32 bits), 0, 0, 0]; K % 4 == 0.
template <typename T, int VECS, int LANES, bool SPLIT, bool BIAS, int ACT, bool RESIDUAL, bool SCALE,
          typename PA, typename PB, typename PBias, typename PRes, typename PS, typename PO>
METAL_FUNC void gemv_wide(PA x, PB w, PBias bias, PRes residual, PS sizes, PO out, uint3 tg, uint sg,
                          uint lane) {
  constexpr int ROWS_SG = 32 / LANES;
  constexpr int ROWS_TG = ROWS_SG * (LANES / 8);  // four
  const int M = sizes[0], N = sizes[1], K = sizes[2];
  const float alpha = as_type<float>(sizes[5]);
  const int batch = tg.z;
  const auto xb = x + (sizes[3] ? int64_t(batch) * M * K : 0);
  const auto wb = w + (sizes[4] ? int64_t(batch) * N * K : 0);
  const int n = int(tg.y) * ROWS_TG + int(sg) * ROWS_SG + int(lane) / LANES;
  const int kl = int(lane) % LANES;
  const bool row_in = n < N;
  const auto wrow = wb + int64_t(row_in ? n : 0) * K;
  const int passes = cdiv(M, VECS);
  const int k4 = K / 4;

  for (int pass = SPLIT ? int(tg.x) : 0; pass < (SPLIT ? int(tg.x) + 1 : passes); pass++) {
    const int v0 = pass * VECS;
    float acc[VECS] = {0.0f};
    if (row_in) {
      for (int c = kl; c < k4; c += LANES) {
        const float4 wv = float4(static_cast<float>(wrow[4 * c]), static_cast<float>(wrow[4 * c + 1]),
                                 static_cast<float>(wrow[4 * c + 2]), static_cast<float>(wrow[4 * c + 3]));
        MLX_MTL_PRAGMA_UNROLL
        for (int v = 0; v < VECS; v++) {
          if (v0 + v < M) {
            const auto xr = xb + int64_t(v0 + v) * K + 4 * c;
            acc[v] += dot(wv, float4(static_cast<float>(xr[0]), static_cast<float>(xr[1]),
                                     static_cast<float>(xr[2]), static_cast<float>(xr[3])));
          }
        }
      }
    }
    // The LANES lanes of a row.
    MLX_MTL_PRAGMA_UNROLL
    for (int v = 0; v < VECS; v++) {
      for (ushort off = LANES / 2; off >= 1; off /= 2) {
        acc[v] += simd_shuffle_down(acc[v], off);
      }
    }
    if (kl == 0 && row_in) {
      MLX_MTL_PRAGMA_UNROLL
      for (int v = 0; v < VECS; v++) {
        if (v0 + v < M) {
          const int64_t at = (int64_t(batch) * M + v0 + v) * N + n;
          out[at] = static_cast<T>(epilogue<BIAS, ACT, RESIDUAL, SCALE>(acc[v], alpha, bias, n, residual, at));
        }
      }
    }
  }
}

}  // namespace ke

#endif  // KE_GEMV_H
