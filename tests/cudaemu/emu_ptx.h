// The PTX primitives of cuda/ke_ptx.cuh, emulated on the CPU (see emu.h): included after
// cuda/ke_common.cuh in place of ke_ptx.cuh.
#pragma once


namespace ke {

inline void cp_async16(void* smem, const void* gmem, int src_bytes) {
  if (src_bytes < 0 || src_bytes > 16) ke_emu::fail("cp.async src_bytes out of [0, 16]");
  if (reinterpret_cast<uintptr_t>(smem) % 16 || (src_bytes && reinterpret_cast<uintptr_t>(gmem) % 16))
    ke_emu::fail("cp.async with a misaligned address");
  ke_emu::Copy c;
  c.dst = static_cast<unsigned char*>(smem);
  std::memset(c.data, 0, 16);
  if (src_bytes) std::memcpy(c.data, gmem, src_bytes);
  ke_emu::st().cur->open.push_back(c);
}
inline void cp_async_commit() {
  auto& f = *ke_emu::st().cur;
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}
template <int N> inline void cp_async_wait() {
  auto& f = *ke_emu::st().cur;
  while (static_cast<int>(f.groups.size()) > N) {
    for (auto& c : f.groups.front()) std::memcpy(c.dst, c.data, 16);
    f.groups.erase(f.groups.begin());
  }
}

inline unsigned short lane_b16(int lane, int elem) {  // element of the row lane gave
  const auto* row = reinterpret_cast<const unsigned short*>(ke_emu::lane_slot(lane)[0]);
  return row[elem];
}

template <bool TRANS> inline void ldmatrix_x4_impl(unsigned int (&r)[4], const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16) ke_emu::fail("ldmatrix row address not 16-byte aligned");
  ke_emu::my_slot()[0] = reinterpret_cast<uint64_t>(p);
  ke_emu::warp_sync();
  const int lane = ke_emu::st().cur->lane, g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    unsigned int lo, hi;
    if (!TRANS) {  // row g of matrix i, columns 2t and 2t+1
      lo = lane_b16(8 * i + g, 2 * t);
      hi = lane_b16(8 * i + g, 2 * t + 1);
    } else {  // column g of matrix i, rows 2t and 2t+1
      lo = lane_b16(8 * i + 2 * t, g);
      hi = lane_b16(8 * i + 2 * t + 1, g);
    }
    r[i] = lo | (hi << 16);
  }
  ke_emu::warp_sync();
}
inline void ldmatrix_x4(unsigned int (&r)[4], const void* p) { ldmatrix_x4_impl<false>(r, p); }
inline void ldmatrix_x4_trans(unsigned int (&r)[4], const void* p) { ldmatrix_x4_impl<true>(r, p); }

template <class T> inline float b16_to_float(unsigned short bits) {
  T v;
  v.x = bits;
  return to_float(v);
}

// The m16n8k16 fragment layouts of the PTX ISA: A row-major (16 x 16), B column-major
// (16 x 8), C/D (16 x 8); lane = 4 * group + thread-in-group.
template <class T>
inline void mma16816(float (&d)[4], const unsigned int (&a)[4], unsigned int b0, unsigned int b1) {
  uint64_t* mine = ke_emu::my_slot();
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b0;
  mine[5] = b1;
  ke_emu::warp_sync();
  auto A = [](int row, int k) {
    int lane = (row % 8) * 4 + (k % 8) / 2, reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    unsigned int w = static_cast<unsigned int>(ke_emu::lane_slot(lane)[reg]);
    return b16_to_float<T>(static_cast<unsigned short>(k % 2 ? w >> 16 : w & 0xffff));
  };
  auto B = [](int k, int n) {
    int lane = n * 4 + (k % 8) / 2, reg = 4 + (k >= 8 ? 1 : 0);
    unsigned int w = static_cast<unsigned int>(ke_emu::lane_slot(lane)[reg]);
    return b16_to_float<T>(static_cast<unsigned short>(k % 2 ? w >> 16 : w & 0xffff));
  };
  const int lane = ke_emu::st().cur->lane, g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i % 2);
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    d[i] = acc;
  }
  ke_emu::warp_sync();
}

inline float fast_exp2(float x) { return std::exp2(x); }

inline Vec16 load16_stream(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16) ke_emu::fail("16-byte load from a misaligned address");
  Vec16 v;
  std::memcpy(&v, p, 16);
  return v;
}

}  // namespace ke
