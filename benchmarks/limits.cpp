// The machine's own limits, measured: peak f32 FMA throughput and (where the CPU has
// AVX512-BF16 or AMX-BF16) bf16 dot-product and tile throughput of all cores, and
// memory read bandwidth.
// Built and run by machine_limits.py; prints one JSON object.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>
#if defined(__AVX512BF16__) || defined(__AMX_BF16__)
#include <immintrin.h>
#endif
#if defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

using Clock = std::chrono::steady_clock;
constexpr int kLanes = 16;
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));

template <typename Work>
double run_threads(int threads, Work work) {
  std::vector<double> flops(threads);
  std::vector<std::thread> pool;
  std::atomic<int> ready{0};
  auto start = Clock::now();
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      ready.fetch_add(1);
      while (ready.load() < threads) {
      }
      flops[t] = work(t);
    });
  }
  for (auto& th : pool) th.join();
  double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  double total = 0;
  for (double f : flops) total += f;
  return total / seconds;
}

// 16 independent FMA chains: enough to cover the FMA latency on every current core.
double fma_work(long iters) {
  vfloat acc[16];
  vfloat x, y;
  for (int l = 0; l < kLanes; ++l) {
    x[l] = 0.999999f;
    y[l] = 1e-7f * l;
  }
  for (int i = 0; i < 16; ++i) acc[i] = x * (float)i;
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) acc[i] = acc[i] * x + y;
  }
  float sink = 0;
  for (int i = 0; i < 16; ++i) sink += acc[i][0];
  if (sink == 12345.0f) std::puts("");
  return 2.0 * kLanes * 16 * iters;
}

#if defined(__AVX512BF16__)
double bf16_work(long iters) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_ps(0.0f);
  __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3c00);
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
  }
  float sink = 0;
  for (int i = 0; i < 16; ++i) sink += _mm512_reduce_add_ps(acc[i]);
  if (sink == 12345.0f) std::puts("");
  return 2.0 * 32 * 16 * iters;  // 32 bf16 products per lane-pair instruction
}
#endif

#if defined(__AMX_BF16__)
// AMX tiles need the kernel's permission per process (Linux: ARCH_REQ_XCOMP_PERM).
bool amx_permitted() {
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Four independent C tiles (16x16 f32), each += A (16x32 bf16) x B (32x16 bf16 in pairs).
double amx_work(long iters) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  alignas(64) uint16_t a[16 * 32], b[16 * 32];
  for (int i = 0; i < 16 * 32; ++i) a[i] = b[i] = 0x3c00;
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  _tile_loadd(4, a, 64);
  _tile_loadd(5, b, 64);
  _tile_loadd(6, a, 64);
  _tile_loadd(7, b, 64);
  for (long it = 0; it < iters; ++it) {
    _tile_dpbf16ps(0, 4, 5);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 6, 5);
    _tile_dpbf16ps(3, 6, 7);
  }
  alignas(64) float c[16 * 16];
  _tile_stored(0, c, 64);
  _tile_release();
  if (c[0] == 12345.0f) std::puts("");
  return 4.0 * 16 * 16 * 32 * 2 * iters;
}
#endif

int main(int argc, char** argv) {
  int threads = argc > 1 ? std::atoi(argv[1]) : (int)std::thread::hardware_concurrency();
  long iters = 40'000'000;
  auto best = [&](auto work) {
    double b = 0;
    for (int rep = 0; rep < 3; ++rep) b = std::max(b, run_threads(threads, work));
    return b;
  };
  double fma = best([&](int) { return fma_work(iters); });
  double fma1 = 0;
  for (int rep = 0; rep < 3; ++rep) fma1 = std::max(fma1, run_threads(1, [&](int) { return fma_work(iters); }));
  double bf16 = 0;
#if defined(__AVX512BF16__)
  bf16 = best([&](int) { return bf16_work(iters / 2); });
#endif
  double amx = 0;
#if defined(__AMX_BF16__)
  if (amx_permitted()) {
    for (int rep = 0; rep < 3; ++rep)
      amx = std::max(amx, run_threads(threads, [&](int) { amx_permitted(); return amx_work(iters / 64); }));
  }
#endif
  // Read bandwidth: each thread sums its own slice of a buffer far larger than the caches.
  size_t floats = size_t(1) << 28;  // 1 GiB
  std::vector<float> data(floats, 1.0f);
  double bandwidth = 0, bandwidth1 = 0;
  auto read = [&](int t, int n) {
    size_t per = floats / n, begin = per * t;
    vfloat s0{}, s1{}, s2{}, s3{};
    for (size_t i = begin; i + 4 * kLanes <= begin + per; i += 4 * kLanes) {
      vfloat v0, v1, v2, v3;
      std::memcpy(&v0, &data[i], 64);
      std::memcpy(&v1, &data[i + 16], 64);
      std::memcpy(&v2, &data[i + 32], 64);
      std::memcpy(&v3, &data[i + 48], 64);
      s0 += v0; s1 += v1; s2 += v2; s3 += v3;
    }
    vfloat s = s0 + s1 + s2 + s3;
    if (s[0] == -1.0f) std::puts("");
    return double(per) * sizeof(float);
  };
  for (int rep = 0; rep < 5; ++rep) {
    bandwidth = std::max(bandwidth, run_threads(threads, [&](int t) { return read(t, threads); }));
    bandwidth1 = std::max(bandwidth1, run_threads(1, [&](int t) { return read(t, 1); }));
  }
  std::printf("{\"threads\": %d, \"f32_fma_gflops\": %.1f, \"f32_fma_gflops_one_core\": %.1f, "
              "\"bf16_dot_gflops\": %.1f, \"amx_bf16_gflops\": %.1f, \"read_gbs\": %.2f, "
              "\"read_gbs_one_core\": %.2f}\n",
              threads, fma / 1e9, fma1 / 1e9, bf16 / 1e9, amx / 1e9, bandwidth / 1e9,
              bandwidth1 / 1e9);
  return 0;
}
