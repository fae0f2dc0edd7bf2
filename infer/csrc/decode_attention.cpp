// furnace_int8::decode_attention: one query per sequence against the first T positions of its KV cache (decode).
//
// q (B, H, hd) fp32; k, v (B, T, Hkv, hd) fp32, read in place from the cache (views with any strides, head_dim
// contiguous); H = g * Hkv and query head h uses kv head h / g (GQA, no broadcast copy). Returns (B, H, hd):
// softmax(q . k_t / sqrt(hd)) over t < T (max-subtracted, fp32) times v, per query head.
//
// Why: SDPA's CPU flash kernel spends most of a one-query call in MKL's sgemm packing blocks of a few rows; this is
// three plain loops per kv head (scores, softmax, weighted sum of v) over the cache, for 4 query heads at a time
// (the g heads sharing a kv head, in tiles of 4 then 1): each key and value is loaded once for the tile, the tile's
// sums stay in registers, and the keys and values are prefetched (the cache is cold after a decode step's weights).
//
// One body written with GCC vector extensions (W floats per vector), compiled three times: AVX-512 (W 16) and
// AVX2 (W 8) through __attribute__((target)), and a portable one (W 4, SSE2 on x86-64). The caller picks (isa 2,
// 1, 0; infer/int8_op.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#pragma GCC diagnostic ignored "-Wpsabi"  // vectors passed between always-inlined helpers: no ABI boundary

#ifdef __has_builtin
#if __has_builtin(__builtin_shufflevector)  // GCC >= 12, clang; older compilers add the lanes one by one
#define FURNACE_SHUFFLEVECTOR 1
#endif
#endif

namespace {

#define FURNACE_INLINE __attribute__((always_inline)) inline

template <int W>
struct Vec {
  typedef float F __attribute__((vector_size(4 * W)));
  typedef int32_t I __attribute__((vector_size(4 * W)));
};

template <int W>
FURNACE_INLINE typename Vec<W>::F load(const float* p) {
  typename Vec<W>::F v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int W>
FURNACE_INLINE void store(float* p, typename Vec<W>::F v) {
  std::memcpy(p, &v, sizeof v);
}

template <int W>
FURNACE_INLINE typename Vec<W>::F splat(float x) {
  return typename Vec<W>::F{} + x;
}

// Sum of the lanes: halves added until one is left.
template <int W>
FURNACE_INLINE float hsum(typename Vec<W>::F v) {
  if constexpr (W == 1) {
    return v[0];
  } else {
    typename Vec<W / 2>::F lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
    return hsum<W / 2>(lo + hi);
  }
}

// e^x for x <= 0 (scores minus their max), lane by lane: Cephes' expf (x = n ln2 + r, |r| <= ln2 / 2, a degree-6
// polynomial for e^r, 2^n put in the exponent bits); relative error ~2e-7. x below -87 is taken as -87 (e^-87 ~ 1.6e-38).
template <int W>
FURNACE_INLINE typename Vec<W>::F exp_neg(typename Vec<W>::F x) {
  using F = typename Vec<W>::F;
  using I = typename Vec<W>::I;
  const F lo = splat<W>(-87.0f), magic = splat<W>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  x = x < lo ? lo : x;
  const F n = (x * 1.44269504088896341f + magic) - magic;         // round(x / ln2)
  const F r = (x - n * 0.693359375f) - n * -2.12194440e-4f;        // ln2 in two parts
  F p = splat<W>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;      // 2^n, n in [-126, 0]
  F scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

constexpr int64_t kAhead = 16;  // keys prefetched ahead (~100 ns of DRAM latency at ~30 cycles of work a key)

// Asks for the cache lines of one key or value row (n floats).
FURNACE_INLINE void prefetch_row(const float* p, int64_t n) {
  for (int64_t c = 0; c < n; c += 16) __builtin_prefetch(p + c, 0, 3);
  __builtin_prefetch(p + n - 1, 0, 3);
}

// Lanes l and l + W/2 added (or maxed) until N lanes are left: lane j then holds lanes j, j + N, j + 2N, ... of v.
template <int W, int N, bool Max>
FURNACE_INLINE typename Vec<N>::F fold(typename Vec<W>::F v) {
  if constexpr (W == N) {
    return v;
  } else {
    typename Vec<W / 2>::F lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
    if constexpr (Max) {
      return fold<W / 2, N, Max>(lo > hi ? lo : hi);
    } else {
      return fold<W / 2, N, Max>(lo + hi);
    }
  }
}

// N queries q[j] of one kv head (N = 4 or 1) against T keys / values at k0 + t * sk, v0 + t * sv (hd floats each):
// outputs y[j]. st: scratch of N * Tp floats holding the scores as (T, N) (Tp = T rounded up to W).
template <int W, int N>
FURNACE_INLINE void attend_tile(const float* const* q, const float* k0, int64_t sk, const float* v0, int64_t sv,
                                int64_t T, int64_t hd, float* st, float* const* y, bool fetch) {
  using F = typename Vec<W>::F;
  using F4 = typename Vec<4>::F;
  const int64_t hv = hd / W * W, n = N * ((T + W - 1) / W * W);  // hd's whole vectors (the rest lane by lane)
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  // The cache comes from memory (a decode step's weight stream has evicted it): without prefetches the loads wait
  // on one key at a time. Keys are fetched kAhead ahead of the scores; values during the scores, for the sum after.
  if (fetch)
    for (int64_t t = 0; t < std::min(T, kAhead); ++t) prefetch_row(k0 + t * sk, hd);
  for (int64_t t = 0; t < T; ++t) {  // scores: each key read once for the N queries
    const float* kt = k0 + t * sk;
    if (fetch) {
      if (t + kAhead < T) prefetch_row(kt + kAhead * sk, hd);
      prefetch_row(v0 + t * sv, hd);
    }
    F a[N] = {};
    for (int64_t c = 0; c < hv; c += W) {
      const F x = load<W>(kt + c);
      #pragma GCC unroll 4
      for (int j = 0; j < N; ++j) a[j] += load<W>(q[j] + c) * x;
    }
    if constexpr (N == 4) {  // the four sums side by side: halves folded to 4 lanes, then two pairwise adds
      F4 b[4];
      #pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) b[j] = fold<W, 4, false>(a[j]);
#ifdef FURNACE_SHUFFLEVECTOR
      const F4 h01 = __builtin_shufflevector(b[0], b[1], 0, 2, 4, 6) + __builtin_shufflevector(b[0], b[1], 1, 3, 5, 7);
      const F4 h23 = __builtin_shufflevector(b[2], b[3], 0, 2, 4, 6) + __builtin_shufflevector(b[2], b[3], 1, 3, 5, 7);
      F4 r = __builtin_shufflevector(h01, h23, 0, 2, 4, 6) + __builtin_shufflevector(h01, h23, 1, 3, 5, 7);
#else
      F4 r;
      for (int j = 0; j < 4; ++j) r[j] = (b[j][0] + b[j][1]) + (b[j][2] + b[j][3]);
#endif
      for (int64_t c = hv; c < hd; ++c)
        #pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) r[j] += q[j][c] * kt[c];
      store<4>(st + 4 * t, r * scale);
    } else {
      float d = hsum<W>(a[0]);
      for (int64_t c = hv; c < hd; ++c) d += q[0][c] * kt[c];
      st[t] = d * scale;
    }
  }
  // softmax of each query's scores (lane j of every N: query j), max-subtracted, in fp32
  for (int64_t i = N * T; i < n; ++i) st[i] = -std::numeric_limits<float>::infinity();  // the padding
  F m = splat<W>(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < n; i += W) {
    const F x = load<W>(st + i);
    m = x > m ? x : m;
  }
  const typename Vec<N>::F mx = fold<W, N, true>(m);
  F mxs;  // mx repeated over W lanes
  for (int l = 0; l < W; ++l) mxs[l] = mx[l % N];
  for (int64_t i = 0; i < n; i += W) store<W>(st + i, exp_neg<W>(load<W>(st + i) - mxs));
  for (int64_t i = N * T; i < n; ++i) st[i] = 0.0f;
  F sum{};
  for (int64_t i = 0; i < n; i += W) sum += load<W>(st + i);
  const typename Vec<N>::F inv = 1.0f / fold<W, N, false>(sum);
  for (int64_t c = 0; c < hv; c += W) {  // weighted sum of the values, W lanes of head_dim at a time
    F acc[N] = {};
    for (int64_t t = 0; t < T; ++t) {
      const F x = load<W>(v0 + t * sv + c);
      #pragma GCC unroll 4
      for (int j = 0; j < N; ++j) acc[j] += st[N * t + j] * x;
    }
    #pragma GCC unroll 4
    for (int j = 0; j < N; ++j) store<W>(y[j] + c, acc[j] * inv[j]);
  }
  for (int64_t c = hv; c < hd; ++c) {
    float acc[N] = {};
    for (int64_t t = 0; t < T; ++t)
      #pragma GCC unroll 4
      for (int j = 0; j < N; ++j) acc[j] += st[N * t + j] * v0[t * sv + c];
    #pragma GCC unroll 4
    for (int j = 0; j < N; ++j) y[j][c] = acc[j] * inv[j];
  }
}

// One kv head of one sequence: its g query heads q[i], 4 at a time, then one by one; st: 4 * Tp floats.
template <int W>
FURNACE_INLINE void attend_head(const float* const* q, int64_t g, const float* k0, int64_t sk, const float* v0,
                                int64_t sv, int64_t T, int64_t hd, float* st, float* const* y) {
  int64_t i = 0;
  for (; i + 4 <= g; i += 4) attend_tile<W, 4>(q + i, k0, sk, v0, sv, T, hd, st, y + i, i == 0);
  for (; i < g; ++i) attend_tile<W, 1>(q + i, k0, sk, v0, sv, T, hd, st, y + i, i == 0);
}

struct Args {
  const float *q, *k, *v;
  float* y;
  int64_t H, Hkv, T, hd, sq0, sq1, sk0, sk1, sk2, sv0, sv1, sv2;
};

// Heads [b0, b1) of the flattened (B, Hkv).
template <int W>
FURNACE_INLINE void attend_range(const Args& a, int64_t b0, int64_t b1) {
  const int64_t g = a.H / a.Hkv, Tp = (a.T + W - 1) / W * W;
  std::vector<float> scratch(4 * Tp);
  std::vector<const float*> qs(g);
  std::vector<float*> ys(g);
  for (int64_t bh = b0; bh < b1; ++bh) {
    const int64_t b = bh / a.Hkv, h = bh % a.Hkv;
    for (int64_t i = 0; i < g; ++i) {
      qs[i] = a.q + b * a.sq0 + (h * g + i) * a.sq1;
      ys[i] = a.y + (b * a.H + h * g + i) * a.hd;
    }
    attend_head<W>(qs.data(), g, a.k + b * a.sk0 + h * a.sk2, a.sk1, a.v + b * a.sv0 + h * a.sv2, a.sv1, a.T, a.hd,
                   scratch.data(), ys.data());
  }
}

__attribute__((target("avx512f"))) void attend_avx512(const Args& a, int64_t b0, int64_t b1) {
  attend_range<16>(a, b0, b1);
}
__attribute__((target("avx2,fma"))) void attend_avx2(const Args& a, int64_t b0, int64_t b1) {
  attend_range<8>(a, b0, b1);
}
void attend_portable(const Args& a, int64_t b0, int64_t b1) { attend_range<4>(a, b0, b1); }

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, int64_t isa) {
  TORCH_CHECK(q_in.dim() == 3 && k_in.dim() == 4 && v_in.dim() == 4 && k_in.sizes() == v_in.sizes(),
              "furnace_int8::decode_attention: expected q (B, H, hd) and k, v (B, T, Hkv, hd)");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && k_in.scalar_type() == at::kFloat && v_in.scalar_type() == at::kFloat,
              "furnace_int8::decode_attention: q, k, v must be fp32");
  const int64_t B = q_in.size(0), H = q_in.size(1), hd = q_in.size(2), T = k_in.size(1), Hkv = k_in.size(2);
  TORCH_CHECK(k_in.size(0) == B && k_in.size(3) == hd && Hkv > 0 && H % Hkv == 0 && T > 0,
              "furnace_int8::decode_attention: shapes do not match: q ", q_in.sizes(), ", k ", k_in.sizes());
  __builtin_cpu_init();
  TORCH_CHECK(isa == 0 || (isa == 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ||
                  (isa == 2 && __builtin_cpu_supports("avx512f")),
              "furnace_int8::decode_attention: instruction set ", isa, " does not run on this CPU");
  // head_dim must be contiguous; any other strides are read in place (the cache's views)
  const at::Tensor q = q_in.stride(2) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  at::Tensor y = at::empty({B, H, hd}, q.options());
  const Args a{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), y.data_ptr<float>(), H, Hkv, T, hd,
               q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2)};
  // Threads only when a head is long enough to pay for waking them (decode of a short context stays on one).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / (2 * (H / Hkv) * T * hd));
  at::parallel_for(0, B * Hkv, grain, [&](int64_t b0, int64_t b1) {
    if (isa == 2) {
      attend_avx512(a, b0, b1);
    } else if (isa == 1) {
      attend_avx2(a, b0, b1);
    } else {
      attend_portable(a, b0, b1);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(furnace_int8, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, int isa) -> Tensor");
  m.impl("decode_attention", c10::DispatchKey::CPU, TORCH_FN(decode_attention));
}
