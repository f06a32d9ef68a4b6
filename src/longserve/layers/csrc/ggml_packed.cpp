// y = x W^T over GGUF blocks repacked in tiles of 16 output columns (layers/packed_blocks.py), with the
// activations quantized per 32-value block: to int8 (llama.cpp's q8_0 arithmetic, d_x = max|x| / 127) or to
// int16 (d_x = max|x| / 32767: near-exact, at half the multiply-adds per instruction), codes rounded to
// nearest. A block's dot product is an exact integer sum, scaled once:
//   y = sum_g d_w,g d_x,g (w_g . q_x,g) [+ sum_g m_g d_x,g sum(q_x,g)]
// q4's minimum term takes the quantized block's sum, as llama.cpp's q8_1 does: the whole product is then the
// file's weights times the rounded activations, an error of sum w (x' - x) with w centred on zero. (With the
// exact fp32 sums the error is sum (w - m)(x' - x), and w - m is never negative: perplexity +0.85% over the
// exact path on the default model, against +0.43% this way.)
//
// The tile layout puts 16 columns' 4 consecutive weights side by side, so one instruction multiplies a
// broadcast quad of x against 16 columns: AVX-512 VNNI's vpdpbusd does 64 multiply-adds per row at once (with
// int16 activations vpdpwssd does 32, the weight quads spread to pairs in registers), the weights are unpacked
// once per tile and reused by up to kMaxRows rows (8 with AVX-512), and every row's sum runs in the same order
// whatever else is in the step (results are batch-invariant and do not depend on thread counts).
// Layout per (tile, block): 8 quads (weights 4j..4j+3 of the block) x 16 columns x 4 bytes. Q8 codes are
// stored as unsigned w + 128 (vpdpbusd takes unsigned bytes; the row's code sum takes the 128 back off);
// q4 packs quads j and j + 4 into one byte's low and high nibbles (256 bytes a block); q5 (Q5_0) is q4's
// nibbles of w + 16 and, per quad, a 64-bit mask of the fifth bits (320 bytes: 5 bits a weight, as the file).
#include <torch/types.h>

#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int kGroup = 32;
constexpr int kHalf = 16;
constexpr int kTile = 16;
constexpr int kQuads = kGroup / 4;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// 32 registers hold 8 rows' sums and dot products beside a block's unpacked weights (one weight scale per
// block; Q6_K's two take 4 rows a pass). A verification step's 5-8 rows then read the weights once.
constexpr int kMaxRows = 8;
#else
constexpr int kMaxRows = 4;  // 16 registers
#endif
constexpr int64_t kNibbleBytes = kQuads * kTile * 2;  // q4 and q5: quads j and j + 4 in one byte's nibbles

// Tile formats, told apart by their bytes per (tile, block): q4 (Q4_0, Q4_1, Q4_K) codes 0-15 with a minimum;
// q5 (Q5_0) codes w + 16 as q4's nibbles plus a 64-bit mask of fifth bits per quad; q8 (Q8_0, Q6_K) codes w + 128.
enum class Format { kQ4, kQ5, kQ8 };
constexpr int64_t block_bytes(Format format) {
  return format == Format::kQ8 ? kQuads * kTile * 4 : format == Format::kQ5 ? kNibbleBytes + kQuads * 8 : kNibbleBytes;
}

// Each row's blocks as integer codes (int8, or int16 for the wide form) and scales, the blocks' quantized sums
// d_x sum(q_x) (q4 minimums) and the code sums of each 16-value half (the Q8 offset).
template <typename Code>
struct QuantizedRows {
  std::vector<Code> codes;         // [rows, in]
  std::vector<float> scale;        // [rows, groups]
  std::vector<float> sums;         // [rows, groups]
  std::vector<int32_t> half_sums;  // [rows, groups * 2]
};

template <typename Code>
QuantizedRows<Code> quantize_rows(const float* x, int64_t rows, int64_t in) {
  constexpr float kLimit = sizeof(Code) == 1 ? 127.f : 32767.f;
  const int64_t groups = in / kGroup;
  QuantizedRows<Code> q{std::vector<Code>(rows * in), std::vector<float>(rows * groups),
                        std::vector<float>(rows * groups), std::vector<int32_t>(rows * groups * 2)};
  for (int64_t b = 0; b < rows * groups; ++b) {
    const float* xs = x + b * kGroup;
    Code* codes = q.codes.data() + b * kGroup;
#if defined(__AVX512F__)
    const __m512 lo = _mm512_loadu_ps(xs), hi = _mm512_loadu_ps(xs + kHalf);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const float d = amax / kLimit;
    const __m512 inverse = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
    // Rounded to nearest (ties to even), then narrowed: |code| <= kLimit by construction.
    const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse));
    const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse));
    if constexpr (sizeof(Code) == 1) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes), _mm512_cvtsepi32_epi8(qlo));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + kHalf), _mm512_cvtsepi32_epi8(qhi));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes), _mm512_cvtsepi32_epi16(qlo));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + kHalf), _mm512_cvtsepi32_epi16(qhi));
    }
    q.scale[b] = d;
    q.half_sums[2 * b] = _mm512_reduce_add_epi32(qlo);
    q.half_sums[2 * b + 1] = _mm512_reduce_add_epi32(qhi);
    q.sums[b] = d * static_cast<float>(q.half_sums[2 * b] + q.half_sums[2 * b + 1]);
#else
    float amax = 0.f;
    for (int j = 0; j < kGroup; ++j) amax = std::max(amax, std::fabs(xs[j]));
    const float d = amax / kLimit, inverse = d > 0.f ? 1.f / d : 0.f;
    int32_t half[2] = {0, 0};
    for (int j = 0; j < kGroup; ++j) {
      codes[j] = static_cast<Code>(std::nearbyint(xs[j] * inverse));
      half[j / kHalf] += codes[j];
    }
    q.scale[b] = d;
    q.sums[b] = d * static_cast<float>(half[0] + half[1]);
    q.half_sums[2 * b] = half[0];
    q.half_sums[2 * b + 1] = half[1];
#endif
  }
  return q;
}

// One tile (16 columns) against kRows rows from r0: out[r * 16 + c]. kSub: weight scales per block (Q6_K: 2).
// Code: int8_t (a quad of activations per 32-bit broadcast, vpdpbusd) or int16_t (a pair, vpdpwssd: the weight
// quads are spread to 16-bit pairs in registers, half the multiply-adds per instruction).
template <typename Code, Format kFormat, int kSub, int kRows>
void tile_rows(const uint8_t* w, const float* d, const float* m, const QuantizedRows<Code>& q, int64_t r0,
               int64_t in, int64_t groups, float* out) {
  constexpr bool kWide = sizeof(Code) == 2;
  constexpr bool kQ4 = kFormat == Format::kQ4, kNibbles = kFormat != Format::kQ8;
  constexpr int32_t kOffset = kFormat == Format::kQ8 ? 128 : kFormat == Format::kQ5 ? 16 : 0;  // stored w + offset
  constexpr int64_t kBlockBytes = block_bytes(kFormat);
  const int32_t* xq[kRows];  // each row's codes, 4 bytes at a time: a quad of int8 or a pair of int16
  for (int r = 0; r < kRows; ++r) xq[r] = reinterpret_cast<const int32_t*>(q.codes.data() + (r0 + r) * in);
  constexpr int kWordsPerBlock = kGroup * sizeof(Code) / 4;
  const float* dx = q.scale.data() + r0 * groups;
  const float* sums = q.sums.data() + r0 * groups;
  const int32_t* half_sums = q.half_sums.data() + r0 * groups * 2;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  // byte -> 16-bit pair spreads within each column's 4 bytes: (w0, w1) and (w2, w3), zero-extended
  const __m512i first_pair = _mm512_broadcast_i32x4(_mm_setr_epi8(0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13, -1));
  const __m512i second_pair =
      _mm512_broadcast_i32x4(_mm_setr_epi8(2, -1, 3, -1, 6, -1, 7, -1, 10, -1, 11, -1, 14, -1, 15, -1));
  __m512 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* wb = w + g * kBlockBytes;
    __m512i wq[kQuads];
    if constexpr (kNibbles) {
      const __m512i nibble = _mm512_set1_epi8(15);
      for (int h = 0; h < kQuads / 2; ++h) {
        const __m512i bytes = _mm512_loadu_si512(wb + 64 * h);
        wq[h] = _mm512_and_si512(bytes, nibble);
        wq[h + kQuads / 2] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);
      }
      if constexpr (kFormat == Format::kQ5) {  // the fifth bits: one 64-bit mask per quad register
        const uint64_t* fifth = reinterpret_cast<const uint64_t*>(wb + kNibbleBytes);
        for (int j = 0; j < kQuads; ++j)
          wq[j] = _mm512_mask_add_epi8(wq[j], _cvtu64_mask64(fifth[j]), wq[j], _mm512_set1_epi8(16));
      }
    } else {
      for (int j = 0; j < kQuads; ++j) wq[j] = _mm512_loadu_si512(wb + 64 * j);
    }
    __m512i dot[kRows][kSub];
    for (int r = 0; r < kRows; ++r)
      for (int s = 0; s < kSub; ++s) dot[r][s] = _mm512_setzero_si512();
    for (int j = 0; j < kQuads; ++j) {
      const int s = j * kSub / kQuads;
      if constexpr (kWide) {
        const __m512i w01 = _mm512_shuffle_epi8(wq[j], first_pair), w23 = _mm512_shuffle_epi8(wq[j], second_pair);
        for (int r = 0; r < kRows; ++r) {
          const int32_t* x = xq[r] + g * kWordsPerBlock + 2 * j;
          dot[r][s] = _mm512_dpwssd_epi32(dot[r][s], w01, _mm512_set1_epi32(x[0]));
          dot[r][s] = _mm512_dpwssd_epi32(dot[r][s], w23, _mm512_set1_epi32(x[1]));
        }
      } else {
        for (int r = 0; r < kRows; ++r)
          dot[r][s] = _mm512_dpbusd_epi32(dot[r][s], wq[j], _mm512_set1_epi32(xq[r][g * kWordsPerBlock + j]));
      }
    }
    for (int r = 0; r < kRows; ++r) {
      const __m512 dxr = _mm512_set1_ps(dx[r * groups + g]);
      for (int s = 0; s < kSub; ++s) {
        __m512i v = dot[r][s];
        if constexpr (kOffset != 0) {
          const int32_t* hs = half_sums + r * groups * 2 + g * 2;
          const int32_t code_sum = kSub == 1 ? hs[0] + hs[1] : hs[s];
          v = _mm512_sub_epi32(v, _mm512_set1_epi32(kOffset * code_sum));
        }
        const __m512 dw = _mm512_loadu_ps(d + (g * kSub + s) * kTile);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(dw, dxr), acc[r]);
      }
      if constexpr (kQ4)
        acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(m + g * kTile), _mm512_set1_ps(sums[r * groups + g]), acc[r]);
    }
  }
  for (int r = 0; r < kRows; ++r) _mm512_storeu_ps(out + r * kTile, acc[r]);
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i first_pair = _mm256_broadcastsi128_si256(_mm_setr_epi8(0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13, -1));
  const __m256i second_pair =
      _mm256_broadcastsi128_si256(_mm_setr_epi8(2, -1, 3, -1, 6, -1, 7, -1, 10, -1, 11, -1, 14, -1, 15, -1));
  for (int half = 0; half < 2; ++half) {  // columns 0-7, then 8-15: the upper 32 bytes of each 64
    __m256 acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* wb = w + g * kBlockBytes + 32 * half;
      __m256i wq[kQuads];
      if constexpr (kNibbles) {
        const __m256i nibble = _mm256_set1_epi8(15);
        for (int h = 0; h < kQuads / 2; ++h) {
          const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 64 * h));
          wq[h] = _mm256_and_si256(bytes, nibble);
          wq[h + kQuads / 2] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
        }
        if constexpr (kFormat == Format::kQ5) {  // this half's 32 bits of each quad's mask, one per byte
          const uint64_t* fifth = reinterpret_cast<const uint64_t*>(w + g * kBlockBytes + kNibbleBytes);
          const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2,
                                                  2, 3, 3, 3, 3, 3, 3, 3, 3);
          const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
          for (int j = 0; j < kQuads; ++j) {
            const __m256i bytes = _mm256_shuffle_epi8(
                _mm256_set1_epi32(static_cast<int32_t>(fifth[j] >> (32 * half))), spread);
            const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
            wq[j] = _mm256_or_si256(wq[j], _mm256_and_si256(set, _mm256_set1_epi8(16)));
          }
        }
      } else {
        for (int j = 0; j < kQuads; ++j) wq[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 64 * j));
      }
      __m256i dot[kRows][kSub];
      for (int r = 0; r < kRows; ++r)
        for (int s = 0; s < kSub; ++s) dot[r][s] = _mm256_setzero_si256();
      for (int j = 0; j < kQuads; ++j) {
        const int s = j * kSub / kQuads;
        if constexpr (kWide) {  // unsigned weights (Q8: w + 128, taken off below) times int16 pairs
          const __m256i w01 = _mm256_shuffle_epi8(wq[j], first_pair), w23 = _mm256_shuffle_epi8(wq[j], second_pair);
          for (int r = 0; r < kRows; ++r) {
            const int32_t* x = xq[r] + g * kWordsPerBlock + 2 * j;
            dot[r][s] = _mm256_add_epi32(dot[r][s], _mm256_madd_epi16(w01, _mm256_set1_epi32(x[0])));
            dot[r][s] = _mm256_add_epi32(dot[r][s], _mm256_madd_epi16(w23, _mm256_set1_epi32(x[1])));
          }
        } else {
          // Q8 back to signed codes: vpmaddubsw's pairs of 255 * 127 would saturate int16
          const __m256i wj = kNibbles ? wq[j] : _mm256_xor_si256(wq[j], _mm256_set1_epi8(static_cast<char>(0x80)));
          for (int r = 0; r < kRows; ++r) {
            const __m256i x = _mm256_set1_epi32(xq[r][g * kWordsPerBlock + j]);
            // |w| <= 128 and |x| <= 127: a pair of products fits int16 (2 * 128 * 127 < 32768)
            const __m256i pairs = kNibbles ? _mm256_maddubs_epi16(wj, x)
                                      : _mm256_maddubs_epi16(_mm256_sign_epi8(wj, wj), _mm256_sign_epi8(x, wj));
            dot[r][s] = _mm256_add_epi32(dot[r][s], _mm256_madd_epi16(pairs, ones));
          }
        }
      }
      for (int r = 0; r < kRows; ++r) {
        const __m256 dxr = _mm256_set1_ps(dx[r * groups + g]);
        for (int s = 0; s < kSub; ++s) {
          __m256i v = dot[r][s];
          // the stored offset comes off the unsigned products (the 8-bit Q8 path multiplied signed codes)
          if constexpr (kOffset != 0 && (kWide || kNibbles)) {
            const int32_t* hs = half_sums + r * groups * 2 + g * 2;
            const int32_t code_sum = kSub == 1 ? hs[0] + hs[1] : hs[s];
            v = _mm256_sub_epi32(v, _mm256_set1_epi32(kOffset * code_sum));
          }
          const __m256 dw = _mm256_loadu_ps(d + (g * kSub + s) * kTile + 8 * half);
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_mul_ps(dw, dxr), acc[r]);
        }
        if constexpr (kQ4)
          acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(m + g * kTile + 8 * half), _mm256_set1_ps(sums[r * groups + g]),
                                   acc[r]);
      }
    }
    for (int r = 0; r < kRows; ++r) _mm256_storeu_ps(out + r * kTile + 8 * half, acc[r]);
  }
#else
  (void)half_sums;
  (void)xq;
  for (int r = 0; r < kRows; ++r) {
    const Code* xr = q.codes.data() + (r0 + r) * in;
    for (int c = 0; c < kTile; ++c) {
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* wb = w + g * kBlockBytes;
        for (int s = 0; s < kSub; ++s) {
          int32_t dot = 0;
          for (int k = s * kGroup / kSub; k < (s + 1) * kGroup / kSub; ++k) {
            const int quad = k / 4, lane = k % 4;
            int32_t weight = kNibbles ? (wb[64 * (quad % 4) + 4 * c + lane] >> (quad < 4 ? 0 : 4)) & 15
                                      : wb[64 * quad + 4 * c + lane];
            if constexpr (kFormat == Format::kQ5)
              weight |= ((reinterpret_cast<const uint64_t*>(wb + kNibbleBytes)[quad] >> (4 * c + lane)) & 1) << 4;
            weight -= kOffset;
            dot += weight * xr[g * kGroup + k];
          }
          acc = std::fma(static_cast<float>(dot), d[(g * kSub + s) * kTile + c] * dx[r * groups + g], acc);
        }
        if constexpr (kQ4) acc = std::fma(m[g * kTile + c], sums[r * groups + g], acc);
      }
      out[r * kTile + c] = acc;
    }
  }
#endif
}

constexpr int rows_per_pass(int64_t sub) { return sub == 1 ? kMaxRows : 4; }

template <typename Code, Format kFormat, int kSub>
void tile(const uint8_t* w, const float* d, const float* m, const QuantizedRows<Code>& q, int64_t r0, int rows,
          int64_t in, int64_t groups, float* out) {
  switch (rows) {
    case 1: return tile_rows<Code, kFormat, kSub, 1>(w, d, m, q, r0, in, groups, out);
    case 2: return tile_rows<Code, kFormat, kSub, 2>(w, d, m, q, r0, in, groups, out);
    case 3: return tile_rows<Code, kFormat, kSub, 3>(w, d, m, q, r0, in, groups, out);
    case 4: return tile_rows<Code, kFormat, kSub, 4>(w, d, m, q, r0, in, groups, out);
  }
  if constexpr (kMaxRows == 8 && kSub == 1) {
    switch (rows) {
      case 5: return tile_rows<Code, kFormat, kSub, 5>(w, d, m, q, r0, in, groups, out);
      case 6: return tile_rows<Code, kFormat, kSub, 6>(w, d, m, q, r0, in, groups, out);
      case 7: return tile_rows<Code, kFormat, kSub, 7>(w, d, m, q, r0, in, groups, out);
      case 8: return tile_rows<Code, kFormat, kSub, 8>(w, d, m, q, r0, in, groups, out);
    }
  }
  TORCH_CHECK(false, "a tile pass takes 1 to ", rows_per_pass(kSub), " rows, not ", rows);
}

template <typename Code>
void run_tiles(const float* x, int64_t rows, int64_t in, const uint8_t* cp, int64_t block_bytes, const float* dp,
               int64_t sub, const float* mp, int64_t tiles, int64_t out_features, float* yp) {
  const int64_t groups = in / kGroup;
  const QuantizedRows<Code> q = quantize_rows<Code>(x, rows, in);
  const int64_t tile_bytes = groups * block_bytes, tile_scales = groups * sub * kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    float buffer[kMaxRows * kTile];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t columns = std::min<int64_t>(kTile, out_features - t * kTile);
      const uint8_t* w = cp + t * tile_bytes;
      const float* d = dp + t * tile_scales;
      const float* m = mp != nullptr ? mp + t * groups * kTile : nullptr;
      for (int64_t r0 = 0; r0 < rows; r0 += rows_per_pass(sub)) {
        const int n = static_cast<int>(std::min<int64_t>(rows_per_pass(sub), rows - r0));
        if (m != nullptr) tile<Code, Format::kQ4, 1>(w, d, m, q, r0, n, in, groups, buffer);
        else if (block_bytes == 320) tile<Code, Format::kQ5, 1>(w, d, m, q, r0, n, in, groups, buffer);
        else if (sub == 1) tile<Code, Format::kQ8, 1>(w, d, m, q, r0, n, in, groups, buffer);
        else tile<Code, Format::kQ8, 2>(w, d, m, q, r0, n, in, groups, buffer);
        for (int r = 0; r < n; ++r)
          std::memcpy(yp + (r0 + r) * out_features + t * kTile, buffer + r * kTile, columns * sizeof(float));
      }
    }
  });
}

}  // namespace

torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scale,
                            const c10::optional<torch::Tensor>& minimum, int64_t out_features,
                            int64_t activation_bits) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be [rows, in] fp32");
  TORCH_CHECK(activation_bits == 8 || activation_bits == 16, "activations are quantized to 8 or 16 bits");
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == torch::kUInt8 && codes.is_contiguous(),
              "codes must be [tiles, groups, block bytes] uint8");
  const int64_t rows = x.size(0), in = x.size(1), tiles = codes.size(0), groups = codes.size(1);
  const bool q4 = minimum.has_value();
  TORCH_CHECK(codes.size(2) == (q4 ? 256 : 512) || (!q4 && codes.size(2) == 320),
              "a block of 16 columns has 256 (q4), 320 (q5) or 512 (q8) bytes");
  TORCH_CHECK(in == groups * kGroup, "x has ", in, " columns, the weights ", groups * kGroup);
  TORCH_CHECK(out_features <= tiles * kTile && out_features > (tiles - 1) * kTile, "out_features does not fit the tiles");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.dim() == 3 &&
                  scale.size(0) == tiles && scale.size(2) == kTile && scale.size(1) % groups == 0,
              "scales must be [tiles, groups * sub-blocks, 16] fp32");
  const int64_t sub = scale.size(1) / groups;
  TORCH_CHECK(sub == 1 || (sub == 2 && codes.size(2) == 512), "one scale per block, or two for q8 (Q6_K)");
  if (q4) TORCH_CHECK(minimum->sizes() == scale.sizes() && minimum->is_contiguous(), "minimums must match the scales");
  auto y = torch::empty({rows, out_features}, x.options());
  const float* mp = q4 ? minimum->data_ptr<float>() : nullptr;
  if (activation_bits == 8)
    run_tiles<int8_t>(x.data_ptr<float>(), rows, in, codes.data_ptr<uint8_t>(), codes.size(2), scale.data_ptr<float>(),
                      sub, mp, tiles, out_features, y.data_ptr<float>());
  else
    run_tiles<int16_t>(x.data_ptr<float>(), rows, in, codes.data_ptr<uint8_t>(), codes.size(2),
                       scale.data_ptr<float>(), sub, mp, tiles, out_features, y.data_ptr<float>());
  return y;
}
