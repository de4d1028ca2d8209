// GEMM on tensor cores: out = act(alpha * op(A) @ op(B) + bias) + residual.
//
// A block computes a BM x BN tile of the output; WM x WN warps each own a (BM/WM) x (BN/WN)
// piece of it as m16n8k16 MMA fragments with f32 accumulators. K advances BK at a time
// through a STAGES-deep ring of shared-memory buffers filled by cp.async, so the loads of
// later steps overlap the MMAs of the current one. Tiles are stored as they lie in global
// memory (k-contiguous or m/n-contiguous rows, padded by 16 bytes against bank conflicts);
// ldmatrix (.trans for the m/n-contiguous layouts) turns them into MMA fragments, so the
// transposed operands need no copy. Blocks walk the tiles in groups of 2^SWIZZLE tile rows
// so that neighbouring blocks share panels of A and B in L2.
//
// sizes: [M, N, K, a_batched, b_batched, alpha (f32 bits), k_chunk (split-K), parts]
#ifndef KE_GEMM_CUH
#define KE_GEMM_CUH

namespace ke {

template <class T, int BM, int BN, int BK, int WM, int WN, int STAGES, bool TA, bool TB>
struct GemmLayout {
  static constexpr int THREADS = 32 * WM * WN;
  static constexpr int WTM = BM / WM, WTN = BN / WN;  // a warp's tile
  static constexpr int MT = WTM / 16, NT = WTN / 8;    // its MMA fragments
  // A tile as stored: TA ? [BK][BM] : [BM][BK]; B tile: TB ? [BN][BK] : [BK][BN]
  static constexpr int A_LD = (TA ? BM : BK) + SMEM_PAD, A_ROWS = TA ? BK : BM;
  static constexpr int B_LD = (TB ? BK : BN) + SMEM_PAD, B_ROWS = TB ? BN : BK;
  static constexpr int A_STAGE = A_ROWS * A_LD, B_STAGE = B_ROWS * B_LD;
  static_assert(WTM % 16 == 0 && WTN % 16 == 0 && BK % 16 == 0, "whole fragments per warp");
};

// The tile loop of one block: acc += op(A)[m0:m0+BM, k_begin:k_end] @ op(B)[k_begin:k_end, n0:n0+BN].
template <class T, int BM, int BN, int BK, int WM, int WN, int STAGES, bool TA, bool TB>
__device__ __forceinline__ void gemm_mainloop(
    const T* a, const T* b, int M, int N, int K, int m0, int n0, int k_begin, int k_end,
    float (&acc)[BM / WM / 16][BN / WN / 8][4]) {
  using L = GemmLayout<T, BM, BN, BK, WM, WN, STAGES, TA, TB>;
  KE_DYNAMIC_SMEM(smem_raw);
  T* As = reinterpret_cast<T*>(smem_raw);
  T* Bs = As + STAGES * L::A_STAGE;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm0 = (warp / WN) * L::WTM, wn0 = (warp % WN) * L::WTN;
  const long lda = TA ? M : K, ldb = TB ? K : N;
  const bool vec_a = lda % (16 / sizeof(T)) == 0 && aligned16(a);
  const bool vec_b = ldb % (16 / sizeof(T)) == 0 && aligned16(b);
  const int k_tiles = k_end > k_begin ? cdiv(k_end - k_begin, BK) : 0;

  auto load_stage = [&](int kt, int slot) {
    const int k0 = k_begin + kt * BK, kv = k_end - k0;
    if constexpr (TA) {
      load_tile<T, BK, BM, L::A_LD, L::THREADS>(As + slot * L::A_STAGE, a + long(k0) * lda + m0,
                                                lda, kv, M - m0, vec_a, tid);
    } else {
      load_tile<T, BM, BK, L::A_LD, L::THREADS>(As + slot * L::A_STAGE, a + long(m0) * lda + k0,
                                                lda, M - m0, kv, vec_a, tid);
    }
    if constexpr (TB) {
      load_tile<T, BN, BK, L::B_LD, L::THREADS>(Bs + slot * L::B_STAGE, b + long(n0) * ldb + k0,
                                                ldb, N - n0, kv, vec_b, tid);
    } else {
      load_tile<T, BK, BN, L::B_LD, L::THREADS>(Bs + slot * L::B_STAGE, b + long(k0) * ldb + n0,
                                                ldb, kv, N - n0, vec_b, tid);
    }
  };

  auto compute_stage = [&](int slot) {
    const T* A = As + slot * L::A_STAGE;
    const T* B = Bs + slot * L::B_STAGE;
    const int mat = lane >> 3, r = lane & 7;  // ldmatrix: which 8x8 matrix, which row
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      unsigned int af[L::MT][4], bf[L::NT / 2][4];
#pragma unroll
      for (int i = 0; i < L::MT; ++i) {
        const int m = wm0 + i * 16;
        if constexpr (TA) {
          ldmatrix_x4_trans(af[i], A + (kk + (mat >> 1) * 8 + r) * L::A_LD + m + (mat & 1) * 8);
        } else {
          ldmatrix_x4(af[i], A + (m + (mat & 1) * 8 + r) * L::A_LD + kk + (mat >> 1) * 8);
        }
      }
#pragma unroll
      for (int p = 0; p < L::NT / 2; ++p) {
        const int n = wn0 + p * 16;
        if constexpr (TB) {
          ldmatrix_x4(bf[p], B + (n + (mat >> 1) * 8 + r) * L::B_LD + kk + (mat & 1) * 8);
        } else {
          ldmatrix_x4_trans(bf[p], B + (kk + (mat & 1) * 8 + r) * L::B_LD + n + (mat >> 1) * 8);
        }
      }
#pragma unroll
      for (int i = 0; i < L::MT; ++i)
#pragma unroll
        for (int j = 0; j < L::NT; ++j)
          mma16816<T>(acc[i][j], af[i], bf[j / 2][(j % 2) * 2], bf[j / 2][(j % 2) * 2 + 1]);
    }
  };

  if constexpr (STAGES == 1) {
    for (int kt = 0; kt < k_tiles; ++kt) {
      load_stage(kt, 0);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      compute_stage(0);
      __syncthreads();
    }
  } else {
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < k_tiles) load_stage(s, s);
      cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
      cp_async_wait<STAGES - 2>();  // tile kt has landed (for this thread's copies)
      __syncthreads();              // ... for every thread's; and slot (kt - 1) is free
      const int next = kt + STAGES - 1;
      if (next < k_tiles) load_stage(next, next % STAGES);
      cp_async_commit();
      compute_stage(kt % STAGES);
    }
    cp_async_wait<0>();
  }
}

// Block -> output tile, visiting 2^SWIZZLE tile rows per group (column-major in a group).
template <int SWIZZLE>
__device__ __forceinline__ void tile_of_block(int block, int tiles_m, int tiles_n, int& tm, int& tn) {
  constexpr int G = 1 << SWIZZLE;
  const int per_group = G * tiles_n;
  const int first_m = (block / per_group) * G;
  const int rows = tiles_m - first_m < G ? tiles_m - first_m : G;
  const int in_group = block % per_group;
  tm = first_m + in_group % rows;
  tn = in_group / rows;
}

// One kernel: the full product (SPLIT false, out is T) or the f32 partial product of the
// K slice blockIdx.z (SPLIT true, out is float [parts, batch, M, N]).
template <class T, int BM, int BN, int BK, int WM, int WN, int STAGES, int SWIZZLE, bool TA,
          bool TB, bool SPLIT, bool BIAS, int ACT, bool RESIDUAL, bool SCALE, class Out>
__device__ __forceinline__ void gemm(const T* a, const T* b, const T* bias, const T* residual,
                                     const int* sizes, Out* out) {
  using L = GemmLayout<T, BM, BN, BK, WM, WN, STAGES, TA, TB>;
  const int M = sizes[0], N = sizes[1], K = sizes[2];
  const int batch = blockIdx.y, batches = gridDim.y;
  a += sizes[3] ? long(batch) * M * K : 0;
  b += sizes[4] ? long(batch) * K * N : 0;
  int tm, tn;
  tile_of_block<SWIZZLE>(blockIdx.x, cdiv(M, BM), cdiv(N, BN), tm, tn);
  const int m0 = tm * BM, n0 = tn * BN;
  int k_begin = 0, k_end = K;
  if constexpr (SPLIT) {
    k_begin = blockIdx.z * sizes[6];
    k_end = k_begin + sizes[6] < K ? k_begin + sizes[6] : K;
  }

  float acc[L::MT][L::NT][4];
#pragma unroll
  for (int i = 0; i < L::MT; ++i)
#pragma unroll
    for (int j = 0; j < L::NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  gemm_mainloop<T, BM, BN, BK, WM, WN, STAGES, TA, TB>(a, b, M, N, K, m0, n0, k_begin, k_end, acc);

  // Each thread holds rows g and g + 8 and columns 2t, 2t + 1 of every fragment.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = m0 + (warp / WN) * L::WTM + g, col0 = n0 + (warp % WN) * L::WTN + 2 * t;
  const long plane = long(M) * N;
  Out* o = out + (SPLIT ? (long(blockIdx.z) * batches + batch) * plane : long(batch) * plane);
  Epilogue<T, BIAS, ACT, RESIDUAL, SCALE> epi{bias, residual + (RESIDUAL ? long(batch) * plane : 0),
                                             __int_as_float(sizes[5])};
  const bool pairs = (N & 1) == 0;
#pragma unroll
  for (int i = 0; i < L::MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = row0 + i * 16 + h * 8;
      if (m >= M) continue;
#pragma unroll
      for (int j = 0; j < L::NT; ++j) {
        const int n = col0 + j * 8;
        if (n >= N) continue;
        const long mn = long(m) * N + n;
        float v0 = acc[i][j][2 * h], v1 = acc[i][j][2 * h + 1];
        if constexpr (!SPLIT) {
          v0 = epi(v0, mn, n);
          if (n + 1 < N) v1 = epi(v1, mn + 1, n + 1);
        }
        if (pairs && n + 1 < N) {
          if constexpr (SPLIT) {
            *reinterpret_cast<float2*>(o + mn) = make_float2(v0, v1);
          } else {
            *reinterpret_cast<unsigned int*>(o + mn) = pack2<T>(v0, v1);
          }
        } else {
          o[mn] = Convert<Out>::from(v0);
          if (n + 1 < N) o[mn + 1] = Convert<Out>::from(v1);
        }
      }
    }
}

// Split-K, second pass: out = epilogue(sum of the parts' f32 partials); one thread per
// output element.
template <class T, bool BIAS, int ACT, bool RESIDUAL, bool SCALE>
__device__ __forceinline__ void splitk_reduce(const float* partials, const T* bias,
                                              const T* residual, const int* sizes, T* out) {
  const int M = sizes[0], N = sizes[1], parts = sizes[7];
  const long plane = long(M) * N, total = plane * gridDim.y;
  const long idx = long(blockIdx.x) * blockDim.x + threadIdx.x + long(blockIdx.y) * plane;
  if (long(blockIdx.x) * blockDim.x + threadIdx.x >= plane) return;
  float v = 0.0f;
  for (int p = 0; p < parts; ++p) v += partials[p * total + idx];
  const long mn = idx % plane;
  Epilogue<T, BIAS, ACT, RESIDUAL, SCALE> epi{bias, residual, __int_as_float(sizes[5])};
  out[idx] = from_float<T>(epi(v, idx, int(mn % N)));
}

}  // namespace ke

#endif  // KE_GEMM_CUH
