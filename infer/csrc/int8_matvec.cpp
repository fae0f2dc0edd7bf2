// furnace_int8::matmul: a decode-specialised int8 linear, y (M, n) = x (M, K) fp32 @ (q * scale[:, None]).T
//
// Weights: int8, one fp32 scale per output row, packed by infer/quant.py `pack_rows` into one int8 buffer:
// the weights as (N/64, K/4, 64, 4), then the scales (N fp32), then the row sums (N int32). In the weights, for
// each block of 64 output rows, 4 consecutive k of one row form a 32-bit lane, so one 64-byte load holds 16 rows
// x 4 k (AVX-512) or two 32-byte loads 8 rows x 4 k each (AVX2), and a block's weights are one contiguous stream.
// N is padded to 64 rows and K to 4 with zeros. One buffer, not three: a compiled step fetches each tensor it
// reads from the module tree in Python on every call.
// Activations: each row of x is quantised once per call to int8 with its own symmetric scale
// (s = max|x| / 127, q = round(x * 127 / max|x|)), as llama.cpp's q8 activations are: no zero point, no
// packing, no GEMM machinery for M = 1.
// Accumulation is exact in int32, the epilogue is y = float(acc) * (s_x * scale[n]):
// - avx512_vnni: vpdpbusd multiplies unsigned by signed bytes, so activations go in as q + 128 (uint8) and
//   128 * sum(w_row) is subtracted from each row's sum;
// - avx2: vpmaddubsw(|q_x|, sign(w, q_x)) (both operands within +-127, so its int16 pairs cannot saturate),
//   then vpmaddwd with ones into int32.
// Kernels are compiled per function with __attribute__((target(...))) and chosen at run time by the caller
// (infer/quant.py asks cpu_isa() once); a CPU with neither keeps FBGEMM.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kRows = 64;  // output rows per packed block
#ifndef FURNACE_PREFETCH
#define FURNACE_PREFETCH 4096
#endif
constexpr int64_t kPrefetch = FURNACE_PREFETCH;  // bytes ahead in the weight stream (a few KiB: DRAM latency)

// x (K) -> q (Kp) int8 (padding 0), xor-ed with `flip` (0x80 turns q into q + 128 as uint8, for vpdpbusd);
// returns the scale. The scalar form is the spec; the AVX-512 one below gives the same bytes.
float quantize_row(const float* x, int64_t K, int64_t Kp, uint8_t flip, int8_t* q) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  for (int64_t k = 0; k < K; ++k) {
    float v = std::nearbyint(x[k] * inv);  // round half to even, as torch.round
    v = std::min(127.f, std::max(-127.f, v));
    q[k] = static_cast<int8_t>(static_cast<uint8_t>(static_cast<int8_t>(v)) ^ flip);
  }
  for (int64_t k = K; k < Kp; ++k) q[k] = static_cast<int8_t>(flip);
  return amax / 127.f;
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) float quantize_row_avx512(const float* x, int64_t K,
                                                                                int64_t Kp, uint8_t flip,
                                                                                int8_t* q) {
  const int64_t K16 = K / 16 * 16;
  __m512 m = _mm512_setzero_ps();
  for (int64_t k = 0; k < K16; k += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  float amax = _mm512_reduce_max_ps(m);
  for (int64_t k = K16; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m128i vflip = _mm_set1_epi8(static_cast<char>(flip));
  for (int64_t k = 0; k < K16; k += 16) {
    // |x * inv| <= 127 up to rounding; the saturating narrow does the clamp
    const __m512i i = _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), vinv),
                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm_xor_si128(_mm512_cvtsepi32_epi8(i), vflip));
  }
  for (int64_t k = K16; k < K; ++k) {
    float v = std::min(127.f, std::max(-127.f, std::nearbyint(x[k] * inv)));
    q[k] = static_cast<int8_t>(static_cast<uint8_t>(static_cast<int8_t>(v)) ^ flip);
  }
  for (int64_t k = K; k < Kp; ++k) q[k] = static_cast<int8_t>(flip);
  return amax / 127.f;
}

// Store `count` (<= width) floats of v's lanes to y.
inline void store_tail(float* y, const float* v, int64_t count) { std::memcpy(y, v, count * sizeof(float)); }

// ---- AVX-512 VNNI: MT activation rows x one 64-row block, 4 zmm accumulators per activation row ----
template <int MT>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void block_vnni(
    const int8_t* w, const uint8_t* const* xq, const float* sx, const int32_t* wsum, const float* scale,
    int64_t Kq, float* const* y, int64_t rows) {
  __m512i acc[MT][4];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_si512();
  for (int64_t kq = 0; kq < Kq; ++kq) {
    const int8_t* wk = w + kq * 256;
    for (int l = 0; l < 4; ++l) _mm_prefetch(reinterpret_cast<const char*>(wk + kPrefetch + 64 * l), _MM_HINT_T0);
    const __m512i w0 = _mm512_loadu_si512(wk), w1 = _mm512_loadu_si512(wk + 64);
    const __m512i w2 = _mm512_loadu_si512(wk + 128), w3 = _mm512_loadu_si512(wk + 192);
    for (int m = 0; m < MT; ++m) {
      int32_t x4;
      std::memcpy(&x4, xq[m] + 4 * kq, 4);
      const __m512i xb = _mm512_set1_epi32(x4);  // 4 activation bytes in every lane
      acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], xb, w0);
      acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], xb, w1);
      acc[m][2] = _mm512_dpbusd_epi32(acc[m][2], xb, w2);
      acc[m][3] = _mm512_dpbusd_epi32(acc[m][3], xb, w3);
    }
  }
  for (int m = 0; m < MT; ++m) {
    const __m512 s = _mm512_set1_ps(sx[m]);
    for (int j = 0; j < 4; ++j) {
      const __m512i corr = _mm512_slli_epi32(_mm512_loadu_si512(wsum + 16 * j), 7);  // 128 * sum(w_row)
      const __m512 a = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m][j], corr));
      const __m512 v = _mm512_mul_ps(a, _mm512_mul_ps(s, _mm512_loadu_ps(scale + 16 * j)));
      const int64_t left = rows - 16 * j;
      if (left >= 16) {
        _mm512_storeu_ps(y[m] + 16 * j, v);
      } else if (left > 0) {
        _mm512_mask_storeu_ps(y[m] + 16 * j, static_cast<__mmask16>((1u << left) - 1), v);
      }
    }
  }
}

// ---- AVX2: one activation row x half a block (32 rows), 4 ymm accumulators ----
__attribute__((target("avx2,fma"))) void block_avx2(const int8_t* w, const int8_t* xq, float sx, const float* scale,
                                                     int64_t Kq, float* y, int64_t rows) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int half = 0; half < 2; ++half) {
    if (rows - 32 * half <= 0) break;
    __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                      _mm256_setzero_si256()};
    for (int64_t kq = 0; kq < Kq; ++kq) {
      int32_t x4;
      std::memcpy(&x4, xq + 4 * kq, 4);
      const __m256i xb = _mm256_set1_epi32(x4);
      const __m256i ax = _mm256_abs_epi8(xb);
      const int8_t* wk = w + kq * 256 + 128 * half;
      for (int j = 0; j < 4; ++j) {
        const __m256i sw = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + 32 * j)), xb);
        acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sw), ones));
      }
    }
    const __m256 s = _mm256_set1_ps(sx);
    for (int j = 0; j < 4; ++j) {
      const int64_t r0 = 32 * half + 8 * j, left = rows - r0;
      if (left <= 0) break;
      const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[j]), _mm256_mul_ps(s, _mm256_loadu_ps(scale + r0)));
      if (left >= 8) {
        _mm256_storeu_ps(y + r0, v);
      } else {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, v);
        store_tail(y + r0, tmp, left);
      }
    }
  }
}

// x (M, K) fp32; w the packed buffer (Np * Kp weights, Np fp32 scales, Np int32 row sums); isa 2 = avx512_vnni,
// 1 = avx2.
at::Tensor matmul(const at::Tensor& x_in, const at::Tensor& w, int64_t n, int64_t isa) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "furnace_int8::matmul: x must be (M, K) fp32");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.is_contiguous(), "furnace_int8::matmul: packed weights must be int8");
  TORCH_CHECK(isa == 1 || isa == 2, "furnace_int8::matmul: isa must be 1 (avx2) or 2 (avx512_vnni), got ", isa);
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), Kp = (K + 3) / 4 * 4, Np = w.numel() / (Kp + 8), nb = Np / kRows;
  TORCH_CHECK(w.numel() == Np * (Kp + 8) && Np % kRows == 0 && n <= Np && n > Np - kRows,
              "furnace_int8::matmul: packed weights do not match x's ", K, " inputs and ", n, " outputs");
  at::Tensor y = at::empty({M, n}, x.options());
  if (M == 0) return y;
  std::vector<int8_t> xq(M * Kp);
  std::vector<float> sx(M);
  const uint8_t flip = isa == 2 ? 0x80 : 0;  // vpdpbusd reads activations as uint8: q + 128
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x.data_ptr<float>() + m * K;
    sx[m] = isa == 2 ? quantize_row_avx512(xm, K, Kp, flip, &xq[m * Kp]) : quantize_row(xm, K, Kp, flip, &xq[m * Kp]);
  }
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = reinterpret_cast<const float*>(wp + Np * Kp);              // 256-byte aligned offsets
  const int32_t* ws = reinterpret_cast<const int32_t*>(wp + Np * Kp + Np * 4);
  float* yp = y.data_ptr<float>();
  const int64_t Kq = Kp / 4;
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int8_t* wb = wp + b * kRows * Kp;
      const int64_t r0 = b * kRows, rows = std::min(kRows, n - r0);
      for (int64_t m0 = 0; m0 < M;) {
        if (isa == 2) {
          const int mt = static_cast<int>(std::min<int64_t>(4, M - m0));
          const uint8_t* xs[4];
          float* ys[4];
          for (int i = 0; i < mt; ++i) {
            xs[i] = reinterpret_cast<const uint8_t*>(&xq[(m0 + i) * Kp]);
            ys[i] = yp + (m0 + i) * n + r0;
          }
          switch (mt) {
            case 4: block_vnni<4>(wb, xs, &sx[m0], ws + r0, sp + r0, Kq, ys, rows); break;
            case 3: block_vnni<3>(wb, xs, &sx[m0], ws + r0, sp + r0, Kq, ys, rows); break;
            case 2: block_vnni<2>(wb, xs, &sx[m0], ws + r0, sp + r0, Kq, ys, rows); break;
            default: block_vnni<1>(wb, xs, &sx[m0], ws + r0, sp + r0, Kq, ys, rows); break;
          }
          m0 += mt;
        } else {
          block_avx2(wb, &xq[m0 * Kp], sx[m0], sp + r0, Kq, yp + m0 * n + r0, rows);
          m0 += 1;
        }
      }
    }
  });
  return y;
}

// 2: AVX-512 VNNI (and BW), 1: AVX2, 0: neither (callers keep FBGEMM).
int64_t cpu_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni"))
    return 2;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(furnace_int8, m) {
  m.def("matmul(Tensor x, Tensor w, int n, int isa) -> Tensor");
  m.impl("matmul", c10::DispatchKey::CPU, TORCH_FN(matmul));
  m.def("cpu_isa() -> int", cpu_isa);
}
