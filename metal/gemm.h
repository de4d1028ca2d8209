// Tiled GEMM on simdgroup_matrix, and the split-K reduction.
//
// out[b] = epilogue(op(a[b]) @ op(b[b])), op(a) [M, K], op(b) [K, N], row-major storage:
// a is [M, K] (or [K, M] when TA), b is [K, N] (or [N, K] when TB).
//
// One threadgroup computes a BM x BN tile of the output: it walks K in steps of BK,
// copying an A tile and a B tile into threadgroup memory (each element of the tile
// read from device memory once per threadgroup), then WM x WN simdgroups each multiply
// (BM / WM) x (BN / WN) of it as 8x8 simdgroup_matrix fragments, accumulating in f32.
// Tiles keep the layout of their source (a transposed operand is copied as it lies in
// memory and read transposed from threadgroup memory), so every device read is along
// contiguous rows. Rows are padded by 16 bytes against bank conflicts.
//
// Tiles that lie wholly inside the matrices copy without bounds checks; edge tiles
// check every element and fill zeros (the branch is uniform per threadgroup).
//
// Threadgroup order: with SWIZZLE s, the grid is (tiles_n << s) x cdiv(tiles_m, 2^s)
// and neighbouring threadgroups take 2^s tiles down a column before moving right, so
// the B tiles they read are shared while they are in cache.
//
// Split K (PARTIAL): grid z is batch * parts; each threadgroup reduces `chunk` (a
// multiple of BK) of K into an f32 partial [batch * parts, M, N], summed by
// splitk_reduce, which applies the epilogue.
//
// sizes: [M, N, K, a_batched, b_batched, alpha (f32 bits), chunk, parts, batch]
#ifndef KE_GEMM_H
#define KE_GEMM_H

namespace ke {

// Threadgroup memory of one GEMM configuration, in elements of T.
template <typename T, int BM, int BN, int BK, bool TA, bool TB>
struct GemmTiles {
  static constant constexpr int PAD = 16 / sizeof(T);
  static constant constexpr int A_LD = TA ? BM + PAD : BK + PAD;  // row length of the A tile
  static constant constexpr int B_LD = TB ? BK + PAD : BN + PAD;
  static constant constexpr int A = TA ? BK * A_LD : BM * A_LD;
  static constant constexpr int B = TB ? BN * B_LD : BK * B_LD;
};

// Copies an R x C block of a row-major matrix (leading dimension ld) starting at src
// into dst (rows LD apart). Elements at row >= rows or column >= cols are zero.
// Each thread copies runs of 4 contiguous elements.
template <typename T, int R, int C, int LD, int NT, typename P>
METAL_FUNC void load_tile(P src, int64_t ld, int rows, int cols, threadgroup T* dst, int tid, bool full) {
  constexpr int RUNS = R * C / 4;
  for (int i = tid; i < RUNS; i += NT) {
    const int r = i / (C / 4);
    const int c = (i % (C / 4)) * 4;
    threadgroup T* d = dst + r * LD + c;
    if (full) {
      const auto s = src + r * ld + c;
      d[0] = s[0];
      d[1] = s[1];
      d[2] = s[2];
      d[3] = s[3];
    } else {
      const bool row_in = r < rows;
      MLX_MTL_PRAGMA_UNROLL
      for (int j = 0; j < 4; j++) {
        d[j] = row_in && c + j < cols ? static_cast<T>(src[r * ld + c + j]) : T(0);
      }
    }
  }
}

template <typename T, int BM, int BN, int BK, int WM, int WN, int SWIZZLE, bool TA, bool TB,
          bool PARTIAL, bool BIAS, int ACT, bool RESIDUAL, bool SCALE, typename PA, typename PB,
          typename PBias, typename PRes, typename PS, typename PO>
METAL_FUNC void gemm(PA a, PB b, PBias bias, PRes residual, PS sizes, PO out, threadgroup T* as,
                     threadgroup T* bs, uint3 tg, uint sg, uint lane, uint tid) {
  using Tiles = GemmTiles<T, BM, BN, BK, TA, TB>;
  constexpr int NT = 32 * WM * WN;
  constexpr int TM = BM / (8 * WM);  // fragments per simdgroup along M
  constexpr int TN = BN / (8 * WN);
  static_assert(TM * 8 * WM == BM && TN * 8 * WN == BN && BK % 8 == 0, "whole 8x8 fragments");

  const int M = sizes[0], N = sizes[1], K = sizes[2];
  const float alpha = as_type<float>(sizes[5]);
  const int chunk = sizes[6], parts = sizes[7];

  // Which tile: the swizzle maps 2^s consecutive threadgroups down a column of tiles.
  const int tile_n = int(tg.x) >> SWIZZLE;
  const int tile_m = (int(tg.y) << SWIZZLE) + (int(tg.x) & ((1 << SWIZZLE) - 1));
  if (tile_m * BM >= M || tile_n * BN >= N) {
    return;  // the whole threadgroup: a tile the swizzled grid rounds up to
  }
  const int row0 = tile_m * BM, col0 = tile_n * BN;
  const int batch = int(tg.z) / parts, part = int(tg.z) % parts;
  const int k_begin = part * chunk;
  const int k_end = metal::min(K, k_begin + chunk);
  if (sizes[3]) {
    a += int64_t(batch) * M * K;
  }
  if (sizes[4]) {
    b += int64_t(batch) * K * N;
  }

  const int sm = (int(sg) / WN) * TM * 8;  // this simdgroup's rows within the tile
  const int sn = (int(sg) % WN) * TN * 8;
  const short2 rc = frag_coord(lane);
  frag acc[TM][TN];
  MLX_MTL_PRAGMA_UNROLL
  for (int i = 0; i < TM; i++) {
    MLX_MTL_PRAGMA_UNROLL
    for (int j = 0; j < TN; j++) {
      acc[i][j] = frag_zero();
    }
  }

  const bool rows_full = row0 + BM <= M, cols_full = col0 + BN <= N;
  for (int k0 = k_begin; k0 < k_end; k0 += BK) {
    const bool k_full = k0 + BK <= k_end;
    const int k_left = k_end - k0;
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous step's reads are done
    if constexpr (TA) {
      load_tile<T, BK, BM, Tiles::A_LD, NT>(a + int64_t(k0) * M + row0, M, k_left, M - row0, as, tid,
                                            rows_full && k_full);
    } else {
      load_tile<T, BM, BK, Tiles::A_LD, NT>(a + int64_t(row0) * K + k0, K, M - row0, k_left, as, tid,
                                            rows_full && k_full);
    }
    if constexpr (TB) {
      load_tile<T, BN, BK, Tiles::B_LD, NT>(b + int64_t(col0) * K + k0, K, N - col0, k_left, bs, tid,
                                            cols_full && k_full);
    } else {
      load_tile<T, BK, BN, Tiles::B_LD, NT>(b + int64_t(k0) * N + col0, N, k_left, N - col0, bs, tid,
                                            cols_full && k_full);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    MLX_MTL_PRAGMA_UNROLL
    for (int kk = 0; kk < BK; kk += 8) {
      frag af[TM], bf[TN];
      MLX_MTL_PRAGMA_UNROLL
      for (int i = 0; i < TM; i++) {
        // element (m, k) of the A tile
        const int m = sm + i * 8;
        if constexpr (TA) {
          frag_load(af[i], as + kk * Tiles::A_LD + m, 1, Tiles::A_LD, rc);
        } else {
          frag_load(af[i], as + m * Tiles::A_LD + kk, Tiles::A_LD, 1, rc);
        }
      }
      MLX_MTL_PRAGMA_UNROLL
      for (int j = 0; j < TN; j++) {
        // element (k, n) of the B tile
        const int n = sn + j * 8;
        if constexpr (TB) {
          frag_load(bf[j], bs + n * Tiles::B_LD + kk, 1, Tiles::B_LD, rc);
        } else {
          frag_load(bf[j], bs + kk * Tiles::B_LD + n, Tiles::B_LD, 1, rc);
        }
      }
      MLX_MTL_PRAGMA_UNROLL
      for (int i = 0; i < TM; i++) {
        MLX_MTL_PRAGMA_UNROLL
        for (int j = 0; j < TN; j++) {
          simdgroup_multiply_accumulate(acc[i][j], af[i], bf[j], acc[i][j]);
        }
      }
    }
  }

  // Each lane stores its two elements of every fragment.
  MLX_MTL_PRAGMA_UNROLL
  for (int i = 0; i < TM; i++) {
    const int r = row0 + sm + i * 8 + rc.y;
    if (r >= M) {
      continue;
    }
    MLX_MTL_PRAGMA_UNROLL
    for (int j = 0; j < TN; j++) {
      const int c = col0 + sn + j * 8 + rc.x;
      const vec<float, 2> v = elems(acc[i][j]);
      MLX_MTL_PRAGMA_UNROLL
      for (int e = 0; e < 2; e++) {
        if (c + e < N) {
          if constexpr (PARTIAL) {
            out[(int64_t(tg.z) * M + r) * N + c + e] = v[e];
          } else {
            const int64_t at = (int64_t(batch) * M + r) * N + c + e;
            out[at] = static_cast<T>(epilogue<BIAS, ACT, RESIDUAL, SCALE>(v[e], alpha, bias, c + e, residual, at));
          }
        }
      }
    }
  }
}

// Split K, second pass: out = epilogue(sum of the parts' partials), one thread per element.
template <typename T, bool BIAS, int ACT, bool RESIDUAL, bool SCALE, typename PP, typename PBias,
          typename PRes, typename PS, typename PO>
METAL_FUNC void splitk_reduce(PP partials, PBias bias, PRes residual, PS sizes, PO out, uint index) {
  const int M = sizes[0], N = sizes[1], parts = sizes[7], batch_count = sizes[8];
  const float alpha = as_type<float>(sizes[5]);
  const int64_t mn = int64_t(M) * N;
  if (int64_t(index) >= batch_count * mn) {
    return;
  }
  const int64_t batch = int64_t(index) / mn, at = int64_t(index) % mn;
  float v = 0.0f;
  for (int p = 0; p < parts; p++) {
    v += partials[(batch * parts + p) * mn + at];
  }
  out[index] = static_cast<T>(epilogue<BIAS, ACT, RESIDUAL, SCALE>(v, alpha, bias, int(at % N), residual, index));
}

}  // namespace ke

#endif  // KE_GEMM_H
