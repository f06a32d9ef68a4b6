// y = x W^T over GGUF blocks with the activations quantized too (llama.cpp's arithmetic): each row's 32-value
// blocks become int8 codes and a scale (d_x = max|x| / 127), and a block's dot product with the weight
// codes is an exact integer sum, scaled once: y = sum_g d_g d_x,g (codes_g . q_x,g) [+ sum_g m_g sum(x_g)].
// Integer dot products read the weights as they are and do a quarter of the fp32 path's multiply-adds:
// AVX-512 VNNI (vpdpbusd, two blocks per instruction), AVX2 (vpmaddubsw + vpmaddwd), or a scalar loop.
// For decode steps (matmul.py picks them by row count); q4 minimum terms use the exact fp32 block sums of x.
#include <torch/types.h>

#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_kernels.h"
#include "vec_math.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int kGroup = 32;
constexpr int kHalf = 16;
constexpr int kMaxRows = 4;

// Each row's blocks as int8 codes (rounded to nearest, ties to even) and scales, and the fp32 block sums.
struct QuantizedRows {
  std::vector<int8_t> codes;  // [rows, in]
  std::vector<float> scale;   // [rows, groups]
  std::vector<float> sums;    // [rows, groups]
};

QuantizedRows quantize_rows(const float* x, int64_t rows, int64_t in) {
  const int64_t groups = in / kGroup;
  QuantizedRows q{std::vector<int8_t>(rows * in), std::vector<float>(rows * groups), std::vector<float>(rows * groups)};
  for (int64_t b = 0; b < rows * groups; ++b) {
    const float* xs = x + b * kGroup;
#if defined(__AVX512F__)
    const __m512 lo = _mm512_loadu_ps(xs), hi = _mm512_loadu_ps(xs + kHalf);
    const float amax16 = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const float d16 = amax16 / 127.f;
    const __m512 inverse16 = _mm512_set1_ps(d16 > 0.f ? 1.f / d16 : 0.f);
    // Rounded to nearest (ties to even), then narrowed: |code| <= 127 by construction.
    _mm_storeu_si128(reinterpret_cast<__m128i*>(&q.codes[b * kGroup]),
                     _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse16))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(&q.codes[b * kGroup + kHalf]),
                     _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse16))));
    q.scale[b] = d16;
    q.sums[b] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
    continue;
#endif
    float amax = 0.f, total = 0.f;
    for (int j = 0; j < kGroup; ++j) {
      amax = std::max(amax, std::fabs(xs[j]));
      total += xs[j];
    }
    const float d = amax / 127.f, inverse = d > 0.f ? 1.f / d : 0.f;
    for (int j = 0; j < kGroup; ++j) q.codes[b * kGroup + j] = static_cast<int8_t>(std::nearbyint(xs[j] * inverse));
    q.scale[b] = d;
    q.sums[b] = total;
  }
  return q;
}

// One column against kRows rows: out[r] = sum_g d_g dx[r][g] (w_g . qx[r]_g).
template <bool kQ4, int kRows>
void column_dot(const uint8_t* codes, const float* d, const QuantizedRows& q, int64_t r0, int64_t in,
                int64_t groups, float* out) {
  const int8_t* qx = q.codes.data() + r0 * in;
  const float* dx = q.scale.data() + r0 * groups;
  int64_t g = 0;
  float acc_tail[kRows] = {};
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  __m512 acc[kRows][2];  // two chains per row (even and odd block pairs): the FMA latency is hidden
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const __m512i spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  for (; g + 1 < groups; g += 2) {
    __m512i w;
    if constexpr (kQ4) {  // [block g low nibbles, high nibbles, block g + 1 low, high]: weights 0-31, 32-63
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + g * kHalf));
      const __m256i low = _mm256_and_si256(bytes, _mm256_set1_epi8(15));
      const __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), _mm256_set1_epi8(15));
      w = _mm512_castsi128_si512(_mm256_castsi256_si128(low));
      w = _mm512_inserti32x4(w, _mm256_castsi256_si128(high), 1);
      w = _mm512_inserti32x4(w, _mm256_extracti128_si256(low, 1), 2);
      w = _mm512_inserti32x4(w, _mm256_extracti128_si256(high, 1), 3);
    } else {
      w = _mm512_loadu_si512(codes + g * kGroup);
    }
    const __mmask64 negative = kQ4 ? 0 : _mm512_movepi8_mask(w);
    const __m512i magnitude = kQ4 ? w : _mm512_abs_epi8(w);  // vpdpbusd multiplies unsigned by signed bytes
    const __m128 dw = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(d + g)));  // d_g, d_g+1
    for (int r = 0; r < kRows; ++r) {
      __m512i x = _mm512_loadu_si512(qx + r * in + g * kGroup);
      if constexpr (!kQ4) x = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), magnitude, x);  // 8 lanes per block
      const __m128 ds = _mm_mul_ps(dw, _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(dx + r * groups + g))));
      const __m512 scale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(ds));
      acc[r][(g >> 1) & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r][(g >> 1) & 1]);
    }
  }
  for (int r = 0; r < kRows; ++r) acc_tail[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
#elif defined(__AVX2__)
  __m256 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (; g < groups; ++g) {
    __m256i w;
    if constexpr (kQ4) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + g * kHalf));
      const __m128i low = _mm_and_si128(bytes, _mm_set1_epi8(15));
      const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(15));
      w = _mm256_inserti128_si256(_mm256_castsi128_si256(low), high, 1);
    } else {
      w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + g * kGroup));
    }
    const __m256i magnitude = kQ4 ? w : _mm256_sign_epi8(w, w);
    for (int r = 0; r < kRows; ++r) {
      __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + r * in + g * kGroup));
      if constexpr (!kQ4) x = _mm256_sign_epi8(x, w);
      // |w| <= 127 and |x| <= 127: a pair of products fits int16 (2 * 127 * 127 < 32768)
      const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, x), ones);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d[g] * dx[r * groups + g]), acc[r]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    acc_tail[r] = _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
  }
#endif
  for (; g < groups; ++g) {  // the scalar path, and the vector paths' last odd block
    for (int r = 0; r < kRows; ++r) {
      const int8_t* xs = qx + r * in + g * kGroup;
      int32_t dot = 0;
      for (int j = 0; j < kGroup; ++j) {
        const int32_t w = kQ4 ? (j < kHalf ? codes[g * kHalf + j] & 15 : codes[g * kHalf + j - kHalf] >> 4)
                              : static_cast<int32_t>(reinterpret_cast<const int8_t*>(codes)[g * kGroup + j]);
        dot += w * xs[j];
      }
      acc_tail[r] += d[g] * dx[r * groups + g] * static_cast<float>(dot);
    }
  }
  for (int r = 0; r < kRows; ++r) out[r] = acc_tail[r];
}

template <bool kQ4>
void column_rows(const uint8_t* codes, const float* d, const QuantizedRows& q, int64_t r0, int rows, int64_t in,
                 int64_t groups, float* out) {
  switch (rows) {
    case 1: return column_dot<kQ4, 1>(codes, d, q, r0, in, groups, out);
    case 2: return column_dot<kQ4, 2>(codes, d, q, r0, in, groups, out);
    case 3: return column_dot<kQ4, 3>(codes, d, q, r0, in, groups, out);
    default: return column_dot<kQ4, 4>(codes, d, q, r0, in, groups, out);
  }
}

template <bool kQ4>
torch::Tensor int8_block_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scale,
                                const float* minimum, int64_t bytes_per_group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be [rows, in] fp32");
  const int64_t rows = x.size(0), in = x.size(1), out = codes.size(0), groups = in / kGroup;
  TORCH_CHECK(in % kGroup == 0 && codes.size(1) == groups * bytes_per_group, "codes must be [out, in / 32 * block]");
  TORCH_CHECK(scale.size(0) == out && scale.size(1) == groups, "scales must be [out, in / 32]");
  auto y = torch::empty({rows, out}, x.options());
  const QuantizedRows q = quantize_rows(x.data_ptr<float>(), rows, in);
  const uint8_t* cp = static_cast<const uint8_t*>(codes.data_ptr());
  const float* dp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t column_bytes = groups * bytes_per_group;
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
    float tile[kMaxRows];
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
        const int tile_rows = static_cast<int>(std::min<int64_t>(kMaxRows, rows - r0));
        column_rows<kQ4>(cp + n * column_bytes, dp + n * groups, q, r0, tile_rows, in, groups, tile);
        for (int r = 0; r < tile_rows; ++r) {
          const float offset =
              kQ4 ? longserve_cpu::dot(minimum + n * groups, q.sums.data() + (r0 + r) * groups, groups) : 0.f;
          yp[(r0 + r) * out + n] = tile[r] + offset;
        }
      }
    }
  });
  return y;
}

}  // namespace

torch::Tensor q4_linear_int8(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scale,
                             const torch::Tensor& minimum) {
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8, "q4 codes must be uint8");
  TORCH_CHECK(minimum.sizes() == scale.sizes() && minimum.is_contiguous(), "minimums must match the scales");
  return int8_block_linear<true>(x, codes, scale, minimum.data_ptr<float>(), kHalf);
}

torch::Tensor q8_linear_int8(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scale) {
  TORCH_CHECK(codes.scalar_type() == torch::kInt8, "q8 codes must be int8");
  return int8_block_linear<false>(x, codes, scale, nullptr, kGroup);
}
