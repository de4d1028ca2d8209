// Staging a tile of global memory in shared memory (GEMM operands, attention's K and V).
#ifndef KE_TILE_CUH
#define KE_TILE_CUH

namespace ke {

constexpr int SMEM_PAD = 8;  // elements of padding per shared-memory row (16 bytes)

// A ROWS x COLS tile whose COLS are contiguous in global memory (leading dimension ld),
// into shared memory rows of LD elements; what lies outside rows_valid x cols_valid reads
// as zero. vec: 16-byte copies are legal (aligned base, ld a multiple of 8 elements).
template <class T, int ROWS, int COLS, int LD, int THREADS>
__device__ __forceinline__ void load_tile(T* smem, const T* g, long ld, int rows_valid,
                                          int cols_valid, bool vec, int tid) {
  constexpr int EPC = 16 / sizeof(T);  // elements per 16-byte chunk
  constexpr int CPR = COLS / EPC;      // chunks per row
  constexpr int CHUNKS = ROWS * CPR;
  if (vec) {
#pragma unroll 4
    for (int c0 = 0; c0 < CHUNKS; c0 += THREADS) {
      const int c = c0 + tid;
      if (CHUNKS % THREADS == 0 || c < CHUNKS) {
        const int r = c / CPR, col = (c % CPR) * EPC;
        int valid = cols_valid - col;
        valid = r < rows_valid ? (valid < 0 ? 0 : (valid > EPC ? EPC : valid)) : 0;
        cp_async16(smem + r * LD + col, valid ? g + r * ld + col : g, valid * int(sizeof(T)));
      }
    }
  } else {
    for (int e = tid; e < ROWS * COLS; e += THREADS) {
      const int r = e / COLS, col = e % COLS;
      smem[r * LD + col] =
          (r < rows_valid && col < cols_valid) ? g[r * ld + col] : from_float<T>(0.0f);
    }
  }
}

}  // namespace ke

#endif  // KE_TILE_CUH
