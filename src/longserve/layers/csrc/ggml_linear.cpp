// y = x W^T over weights kept in GGUF's block formats (repacked once at load), fp32 activations and fp32
// accumulation. Decode on a CPU is bound by the bytes of weights read per token, so the 4-bit and 8-bit
// blocks are read as they are instead of being expanded to fp32 (4-8x the bytes).
//
//   q4: 32 weights per block as 16 bytes of nibbles (weight j in the low nibble of byte j, weight j + 16 in the
//       high nibble, as in the file), value = scale * code + minimum  (Q4_0: minimum = -8 scale; Q4_1: m).
//   q8: 32 int8 codes per block, value = scale * code  (Q8_0, Q5_0); or a scale per 16 codes (Q6_K), told
//       apart by the scales' shape.
//
// AVX-512 or AVX2 + FMA where the CPU has them (a scalar loop otherwise). Each output is summed in a fixed
// order that does not depend on the number of threads; steps of at most kRowTile rows and larger steps take
// different paths (direct dot products, expanded tiles), which round differently.
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
constexpr int kRowTile = 4;  // activation rows that share one decode of a weight block

#if defined(__AVX2__) && defined(__FMA__)
// A block's 32 codes as four 8-float vectors: codes 0-7, 8-15, 16-23, 24-31.
inline void q4_codes(const uint8_t* q, __m256 c[4]) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i low = _mm_and_si128(bytes, _mm_set1_epi8(15));
  const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(15));
  c[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(low));
  c[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(low, 8)));
  c[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(high));
  c[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(high, 8)));
}

inline void q8_codes(const int8_t* q, __m256 c[4]) {
  for (int i = 0; i < 4; ++i) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * i));
    c[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
  }
}

inline float horizontal_sum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// The direct path (at most kRowTile rows): y[r][c] = sum over blocks of scale * (codes . x_r) for kCols adjacent
// output columns (kCols = 2 keeps two columns' independent FMA chains in flight: with one, the loop waits on
// FMA latency). The minimum term of q4 (minimum * sum(x_r) per block) is added by the caller.
#if defined(__AVX512F__)
// AVX-512: a block's 32 codes as two 16-float vectors (codes 0-15, 16-31): half the instructions of AVX2.
template <bool kQ4, int kScales, int kCols, int rows>
void dot_rows_512(const uint8_t* codes, int64_t column_bytes, const float* scale, const float* x, int64_t in,
                  int64_t groups, float* out) {
  // Two accumulator chains per row and column (even and odd blocks). Rows and columns are template constants so
  // the accumulators stay in registers.
  __m512 acc[kRowTile][kCols][2];
  for (int r = 0; r < kRowTile; ++r)
    for (int c = 0; c < kCols; ++c) acc[r][c][0] = acc[r][c][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    for (int c = 0; c < kCols; ++c) {
      __m512 lo, hi;
      const uint8_t* block_codes = codes + c * column_bytes;
      if constexpr (kQ4) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block_codes + g * kHalf));
        lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, _mm_set1_epi8(15))));
        hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(15))));
      } else {
        const auto* q = reinterpret_cast<const __m128i*>(block_codes + g * kGroup);
        lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q)));
        hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1)));
      }
      const float* ds = scale + (c * groups + g) * kScales;
      if constexpr (kScales == 2) {  // a scale per 16 weights (Q6_K): scaled codes, then one block sum
        lo = _mm512_mul_ps(lo, _mm512_set1_ps(ds[0]));
        hi = _mm512_mul_ps(hi, _mm512_set1_ps(ds[1]));
      }
      const __m512 d = _mm512_set1_ps(kScales == 2 ? 1.f : ds[0]);
      for (int r = 0; r < rows; ++r) {
        const float* xs = x + r * in + g * kGroup;
        const __m512 block = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xs + kHalf), _mm512_mul_ps(lo, _mm512_loadu_ps(xs)));
        acc[r][c][g & 1] = kScales == 2 ? _mm512_add_ps(block, acc[r][c][g & 1]) : _mm512_fmadd_ps(d, block, acc[r][c][g & 1]);
      }
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < kCols; ++c) out[r * kCols + c] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][c][0], acc[r][c][1]));
}
#endif

template <bool kQ4, int kScales, int kCols, int rows>
void dot_rows(const uint8_t* codes, int64_t column_bytes, const float* scale, const float* x, int64_t in,
              int64_t groups, float* out) {
  __m256 acc[kRowTile][kCols][2];  // two accumulator chains per row and column, as in dot_rows_512
  for (int r = 0; r < kRowTile; ++r)
    for (int c = 0; c < kCols; ++c) acc[r][c][0] = acc[r][c][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    for (int c = 0; c < kCols; ++c) {
      __m256 v[4];
      if constexpr (kQ4) {
        q4_codes(codes + c * column_bytes + g * kHalf, v);
      } else {
        q8_codes(reinterpret_cast<const int8_t*>(codes + c * column_bytes) + g * kGroup, v);
      }
      const float* ds = scale + (c * groups + g) * kScales;
      if constexpr (kScales == 2) {  // a scale per 16 weights (Q6_K): scaled codes, then one block sum
        for (int i = 0; i < 4; ++i) v[i] = _mm256_mul_ps(v[i], _mm256_set1_ps(ds[i / 2]));
      }
      const __m256 d = _mm256_set1_ps(kScales == 2 ? 1.f : ds[0]);
      for (int r = 0; r < rows; ++r) {
        const float* xs = x + r * in + g * kGroup;
        __m256 block = _mm256_mul_ps(v[0], _mm256_loadu_ps(xs));
        block = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(xs + 8), block);
        block = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(xs + 16), block);
        block = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xs + 24), block);
        acc[r][c][g & 1] = kScales == 2 ? _mm256_add_ps(block, acc[r][c][g & 1]) : _mm256_fmadd_ps(d, block, acc[r][c][g & 1]);
      }
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < kCols; ++c) out[r * kCols + c] = horizontal_sum(_mm256_add_ps(acc[r][c][0], acc[r][c][1]));
}
#else
template <bool kQ4, int kScales, int kCols, int rows>
void dot_rows(const uint8_t* codes, int64_t column_bytes, const float* scale, const float* x, int64_t in,
              int64_t groups, float* out) {
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < kCols; ++c) {
      const uint8_t* column = codes + c * column_bytes;
      float total = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const float* xs = x + r * in + g * kGroup;
        float block = 0.f;
        const float* ds = scale + (c * groups + g) * kScales;
        for (int j = 0; j < kGroup; ++j) {
          float code;
          if constexpr (kQ4) {
            const uint8_t byte = column[g * kHalf + j % kHalf];
            code = static_cast<float>(j < kHalf ? byte & 15 : byte >> 4);
          } else {
            code = static_cast<float>(reinterpret_cast<const int8_t*>(column)[g * kGroup + j]);
          }
          block += (kScales == 2 ? ds[j / kHalf] * code : code) * xs[j];
        }
        total += kScales == 2 ? block : ds[0] * block;
      }
      out[r * kCols + c] = total;
    }
  }
}
#endif

template <bool kQ4, int kScales, int kCols, int kRows>
void direct_dot_rows(const uint8_t* codes, int64_t column_bytes, const float* scale, const float* x, int64_t in,
                     int64_t groups, float* out) {
#if defined(__AVX512F__)
  dot_rows_512<kQ4, kScales, kCols, kRows>(codes, column_bytes, scale, x, in, groups, out);
#else
  dot_rows<kQ4, kScales, kCols, kRows>(codes, column_bytes, scale, x, in, groups, out);
#endif
}

template <bool kQ4, int kScales, int kCols>
void direct_dot(const uint8_t* codes, int64_t column_bytes, const float* scale, const float* x, int64_t in,
                int64_t groups, int rows, float* out) {
  switch (rows) {
    case 1: return direct_dot_rows<kQ4, kScales, kCols, 1>(codes, column_bytes, scale, x, in, groups, out);
    case 2: return direct_dot_rows<kQ4, kScales, kCols, 2>(codes, column_bytes, scale, x, in, groups, out);
    case 3: return direct_dot_rows<kQ4, kScales, kCols, 3>(codes, column_bytes, scale, x, in, groups, out);
    default: return direct_dot_rows<kQ4, kScales, kCols, 4>(codes, column_bytes, scale, x, in, groups, out);
  }
}

// Larger steps: a thread expands 16 output columns at a time into float rows (the file's values, computed as
// dequantization computes them: scale * code + minimum, rounded after each op), then multiplies every
// activation row with them in a 4-row x 2-column register-blocked kernel, so the arithmetic runs near the FMA
// rate instead of re-decoding the codes for every row.
constexpr int kTileColumns = 16;

template <bool kQ4, int kScales>
void expand_column(const uint8_t* codes, const float* scale, const float* minimum, int64_t groups, float* out) {
  for (int64_t g = 0; g < groups; ++g) {
#if defined(__AVX2__) && defined(__FMA__)
    __m256 c[4];
    if constexpr (kQ4) {
      q4_codes(codes + g * kHalf, c);
    } else {
      q8_codes(reinterpret_cast<const int8_t*>(codes) + g * kGroup, c);
    }
    const __m256 m = _mm256_set1_ps(kQ4 ? minimum[g] : 0.f);
    for (int i = 0; i < 4; ++i) {
      const __m256 value = _mm256_mul_ps(c[i], _mm256_set1_ps(scale[g * kScales + (kScales == 2 ? i / 2 : 0)]));
      _mm256_storeu_ps(out + g * kGroup + 8 * i, kQ4 ? _mm256_add_ps(value, m) : value);
    }
#else
    for (int j = 0; j < kGroup; ++j) {
      float code;
      if constexpr (kQ4) {
        const uint8_t byte = codes[g * kHalf + j % kHalf];
        code = static_cast<float>(j < kHalf ? byte & 15 : byte >> 4);
      } else {
        code = static_cast<float>(reinterpret_cast<const int8_t*>(codes)[g * kGroup + j]);
      }
      const float d = scale[g * kScales + (kScales == 2 ? j / kHalf : 0)];
      out[g * kGroup + j] = kQ4 ? d * code + minimum[g] : d * code;
    }
#endif
  }
}

// y[r, c] = x[r] . w[c] for every row and the tile's columns (w: [columns][in] floats).
void tile_matmul(const float* x, int64_t rows, int64_t in, const float* w, int columns, float* y, int64_t out) {
#if defined(__AVX512F__)
  if (in % 16 == 0) {
    constexpr int kR = 4, kC = 4;
    for (int64_t r0 = 0; r0 < rows; r0 += kR) {
      const int nr = static_cast<int>(std::min<int64_t>(kR, rows - r0));
      for (int c0 = 0; c0 < columns; c0 += kC) {
        const int nc = std::min(kC, columns - c0);
        __m512 acc[kR][kC];
        for (int r = 0; r < kR; ++r)
          for (int c = 0; c < kC; ++c) acc[r][c] = _mm512_setzero_ps();
        for (int64_t k = 0; k < in; k += 16) {
          __m512 wv[kC];
          for (int c = 0; c < kC; ++c) wv[c] = _mm512_loadu_ps(w + (c0 + std::min(c, nc - 1)) * in + k);
          for (int r = 0; r < kR; ++r) {
            const __m512 xv = _mm512_loadu_ps(x + (r0 + std::min(r, nr - 1)) * in + k);
            for (int c = 0; c < kC; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
          }
        }
        for (int r = 0; r < nr; ++r)
          for (int c = 0; c < nc; ++c) y[(r0 + r) * out + c0 + c] = _mm512_reduce_add_ps(acc[r][c]);
      }
    }
    return;
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  constexpr int kR = 4, kC = 3;
  for (int64_t r0 = 0; r0 < rows; r0 += kR) {
    const int nr = static_cast<int>(std::min<int64_t>(kR, rows - r0));
    for (int c0 = 0; c0 < columns; c0 += kC) {
      const int nc = std::min(kC, columns - c0);
      __m256 acc[kR][kC];
      for (int r = 0; r < kR; ++r)
        for (int c = 0; c < kC; ++c) acc[r][c] = _mm256_setzero_ps();
      for (int64_t k = 0; k < in; k += 8) {
        __m256 wv[kC];
        for (int c = 0; c < kC; ++c) wv[c] = _mm256_loadu_ps(w + (c0 + std::min(c, nc - 1)) * in + k);
        for (int r = 0; r < kR; ++r) {
          const __m256 xv = _mm256_loadu_ps(x + (r0 + std::min(r, nr - 1)) * in + k);
          for (int c = 0; c < kC; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
        }
      }
      for (int r = 0; r < nr; ++r)
        for (int c = 0; c < nc; ++c) y[(r0 + r) * out + c0 + c] = horizontal_sum(acc[r][c]);
    }
  }
#else
  for (int64_t r = 0; r < rows; ++r) {
    for (int c = 0; c < columns; ++c) {
      float total = 0.f;
      for (int64_t k = 0; k < in; ++k) total += x[r * in + k] * w[c * in + k];
      y[r * out + c] = total;
    }
  }
#endif
}

void check(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scale, int64_t bytes_per_group,
           int64_t scales_per_group = 1) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be [rows, in] fp32");
  TORCH_CHECK(x.size(1) % kGroup == 0, "in_features must be a multiple of 32");
  const int64_t groups = x.size(1) / kGroup;
  TORCH_CHECK(codes.dim() == 2 && codes.size(1) == groups * bytes_per_group && codes.is_contiguous(),
              "codes must be [out, in / 32 * bytes per block]");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == codes.size(0) && scale.size(1) == groups * scales_per_group &&
                  scale.scalar_type() == torch::kFloat32 && scale.is_contiguous(),
              "scales must be [out, in / 32] (or [out, in / 16]) fp32");
}

// Output columns are split into chunks across threads; each thread runs every activation row over its chunk
// (kRowTile rows per decoded block), so a weight block is read from memory once per call whatever the batch.
constexpr int64_t kColumnsPerTask = 16;

template <bool kQ4, int kScales>
torch::Tensor block_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scale,
                           const float* minimum, int64_t bytes_per_group) {
  const int64_t rows = x.size(0), in = x.size(1), out = codes.size(0), groups = in / kGroup;
  auto y = torch::empty({rows, out}, x.options());
  // Per-block sums of x carry the minimum term: sum_j (d q_j + m) x_j = d sum_j q_j x_j + m sum_j x_j.
  const float* xp = x.data_ptr<float>();
  std::vector<float> x_sums(kQ4 ? rows * groups : 0);
  for (int64_t i = 0; i < static_cast<int64_t>(x_sums.size()); ++i) {
    float total = 0.f;
    for (int j = 0; j < kGroup; ++j) total += xp[i * kGroup + j];
    x_sums[i] = total;
  }
  const float* sp = kQ4 ? x_sums.data() : nullptr;
  const uint8_t* cp = static_cast<const uint8_t*>(codes.data_ptr());
  const float* dp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (rows > kRowTile) {
    at::parallel_for(0, (out + kTileColumns - 1) / kTileColumns, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> tile(in * kTileColumns);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n0 = t * kTileColumns;
        const int columns = static_cast<int>(std::min<int64_t>(kTileColumns, out - n0));
        for (int c = 0; c < columns; ++c) {
          const int64_t n = n0 + c;
          expand_column<kQ4, kScales>(cp + n * groups * bytes_per_group, dp + n * groups * kScales,
                                      kQ4 ? minimum + n * groups : nullptr, groups, tile.data() + c * in);
        }
        tile_matmul(xp, rows, in, tile.data(), columns, yp + n0, out);
      }
    });
    return y;
  }
  const int64_t column_bytes = groups * bytes_per_group;
  at::parallel_for(0, (out + 1) / 2, kColumnsPerTask / 2, [&](int64_t begin, int64_t end) {
    float tile[kRowTile * 2];
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t n = 2 * pair;
      const int columns = n + 1 < out ? 2 : 1;
      for (int64_t r0 = 0; r0 < rows; r0 += kRowTile) {
        const int tile_rows = static_cast<int>(std::min<int64_t>(kRowTile, rows - r0));
        const uint8_t* column_codes = cp + n * column_bytes;
        if (columns == 2) {
          direct_dot<kQ4, kScales, 2>(column_codes, column_bytes, dp + n * groups * kScales, xp + r0 * in, in, groups,
                                      tile_rows, tile);
        } else {
          direct_dot<kQ4, kScales, 1>(column_codes, column_bytes, dp + n * groups * kScales, xp + r0 * in, in, groups,
                                      tile_rows, tile);
        }
        for (int r = 0; r < tile_rows; ++r) {
          for (int c = 0; c < columns; ++c) {
            // q4's minimum term: sum over blocks of minimum * sum(x_r over the block), one vector dot
            const float offset =
                kQ4 ? longserve_cpu::dot(minimum + (n + c) * groups, sp + (r0 + r) * groups, groups) : 0.f;
            yp[(r0 + r) * out + n + c] = tile[r * columns + c] + offset;
          }
        }
      }
    }
  });
  return y;
}

}  // namespace

torch::Tensor q4_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scale,
                        const torch::Tensor& minimum) {
  check(x, codes, scale, kHalf);
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8, "q4 codes must be uint8");
  TORCH_CHECK(minimum.sizes() == scale.sizes() && minimum.scalar_type() == torch::kFloat32 && minimum.is_contiguous(),
              "minimums must match the scales");
  return block_linear<true, 1>(x, codes, scale, minimum.data_ptr<float>(), kHalf);
}

torch::Tensor q8_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scale) {
  // A scale per 32 weights (Q8_0, Q5_0), or per 16 (Q6_K): told apart by the scales' shape.
  const int64_t scales_per_group = x.dim() == 2 && scale.dim() == 2 && scale.size(1) * 16 == x.size(1) ? 2 : 1;
  check(x, codes, scale, kGroup, scales_per_group);
  TORCH_CHECK(codes.scalar_type() == torch::kInt8, "q8 codes must be int8");
  return scales_per_group == 2 ? block_linear<false, 2>(x, codes, scale, nullptr, kGroup)
                               : block_linear<false, 1>(x, codes, scale, nullptr, kGroup);
}
