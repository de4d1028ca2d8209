// How this CPU's memory serves the read patterns of gemv's x @ W.T (one decode row, a bf16
// weight [151936, 1024] far larger than the caches): the figures behind the read-ahead in
// cpp/matmul/cpu_gemv.cpp. One thread, best of 7 passes over the weight, GB/s of weight read.
//
//   g++ -O3 -march=native -std=c++20 -Icpp -o /tmp/probe_gemv_streams benchmarks/probe_gemv_streams.cpp
//   /tmp/probe_gemv_streams
//
// - four rows side by side: a 4-row tile (the kernel's), 4 streams 2 KB apart, no read-ahead
// - four rows side by side, read ahead: the same tile asking for the rows ahead in memory order
// - one row at a time: each row a single stream (the rows follow each other in memory)
// - plain read: the same bytes summed front to back, no arithmetic on them
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include "matmul/cpu_simd.h"

using namespace kernelevo::cpu;

constexpr int64_t N = 151936, K = 1024;

template <int AHEAD>
void four_rows(const float* a, const uint16_t* w, float* out) {
  vfloat acc[4] = {splat(0.f), splat(0.f), splat(0.f), splat(0.f)};
  const char* next = reinterpret_cast<const char*>(w) + AHEAD;  // rows are contiguous
  for (int64_t k = 0; k < K; k += kLanes) {
    if (AHEAD)
      for (int q = 0; q < 4 * 32; q += 64) __builtin_prefetch(next + (k / kLanes) * 4 * 32 + q, 0, 2);
    const vfloat av = vload(a + k);
    for (int j = 0; j < 4; ++j) acc[j] += av * load16<BF16>(w + j * K + k);
  }
  for (int j = 0; j < 4; ++j) out[j] = hsum(acc[j]);
}

void one_row_at_a_time(const float* a, const uint16_t* w, float* out) {
  for (int j = 0; j < 4; ++j) {
    vfloat c0 = splat(0.f), c1 = c0, c2 = c0, c3 = c0;
    for (int64_t k = 0; k < K; k += 4 * kLanes) {
      c0 += vload(a + k) * load16<BF16>(w + j * K + k);
      c1 += vload(a + k + 16) * load16<BF16>(w + j * K + k + 16);
      c2 += vload(a + k + 32) * load16<BF16>(w + j * K + k + 32);
      c3 += vload(a + k + 48) * load16<BF16>(w + j * K + k + 48);
    }
    out[j] = hsum(c0 + c1 + c2 + c3);
  }
}

void plain_read(const float*, const uint16_t* w, float* out) {
  vfloat s = splat(0.f);
  for (int64_t k = 0; k < 4 * K; k += 2 * kLanes) s += vload(reinterpret_cast<const float*>(w + k));
  out[0] = hsum(s);
}

int main() {
  std::vector<uint16_t> w(N * K);
  std::vector<float> a(K, 1.0f), out(N);
  for (int64_t i = 0; i < N * K; ++i) w[i] = 0x3f80 + (i % 7);
  auto bench = [&](const char* name, void (*tile)(const float*, const uint16_t*, float*)) {
    double best = 1e9;
    for (int r = 0; r < 7; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      for (int64_t j = 0; j < N; j += 4) tile(a.data(), w.data() + j * K, out.data() + j);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::printf("%-36s %7.2f ms  %5.1f GB/s\n", name, best * 1e3, N * K * 2 / best / 1e9);
  };
  bench("four rows side by side", four_rows<0>);
  bench("four rows side by side, read ahead", four_rows<16384>);
  bench("one row at a time", one_row_at_a_time);
  bench("plain read", plain_read);
}
