// Paged decode attention on the CPU: each new token attends its whole context straight from the paged KV
// cache through its block table, so no per-step gathered copy of the context is made (the gather the torch
// path needs copies every context in every layer). One task per (sequence, KV head) computes the scores of the
// head's query group, a softmax, and the value sum, in fp32 whatever the cache stores (fp32 or fp16).
//
// The context is walked page by page (no division per position), each key and value row is loaded and widened
// once and used by every query head of its group, and a head size the vector width divides runs on vectors.
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <vector>

#include "cpu_kernels.h"
#include "vec_math.h"

using longserve_cpu::exp_shifted_sum;

namespace {

// Below this many score products a step runs on the calling thread: waking the pool costs more than it saves.
constexpr int64_t kInlineWork = 1 << 16;

// One lane of fp32 arithmetic: the fallback for head sizes no vector width divides.
struct ScalarOps {
  using Vec = float;
  static constexpr int kWidth = 1;
  static Vec zero() { return 0.f; }
  static Vec splat(float x) { return x; }
  static Vec load(const float* p) { return *p; }
  static Vec load(const at::Half* p) { return static_cast<float>(*p); }
  static void store(float* p, Vec x) { *p = x; }
  static Vec fma(Vec a, Vec b, Vec c) { return a * b + c; }
  static float sum(Vec x) { return x; }
};

#if defined(__AVX512F__)
struct VectorOps {
  using Vec = __m512;
  static constexpr int kWidth = 16;
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec splat(float x) { return _mm512_set1_ps(x); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec load(const at::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store(float* p, Vec x) { _mm512_storeu_ps(p, x); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(Vec x) { return _mm512_reduce_add_ps(x); }
};
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
struct VectorOps {
  using Vec = __m256;
  static constexpr int kWidth = 8;
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec splat(float x) { return _mm256_set1_ps(x); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec load(const at::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static void store(float* p, Vec x) { _mm256_storeu_ps(p, x); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(Vec x) {
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    const __m128 pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)));
  }
};
#else
using VectorOps = ScalarOps;
#endif

// The cache's rows of one (sequence, KV head) and where this task's query group and output live.
template <typename Cache>
struct HeadTask {
  const float* query;  // [group, dim], scale folded in
  const Cache* keys;   // the head's first slot; row r at keys + r * row_stride
  const Cache* values;
  int64_t row_stride;
  const int32_t* table;  // the sequence's block table
  int64_t length, page_size, group, dim;
  float* scores;  // [group, length] scratch
  float* out;     // [group, dim]
};

// Calls visit(position, slot row) for every position of the context, one page at a time.
template <typename Cache, typename Visit>
inline void for_each_slot(const HeadTask<Cache>& t, Visit visit) {
  for (int64_t start = 0, page = 0; start < t.length; start += t.page_size, ++page) {
    const int64_t first = static_cast<int64_t>(t.table[page]) * t.page_size;
    const int64_t count = std::min(t.page_size, t.length - start);
    for (int64_t i = 0; i < count; ++i) visit(start + i, first + i);
  }
}

template <typename Ops, int kChunks, typename Cache>
void attend(const HeadTask<Cache>& t) {
  using Vec = typename Ops::Vec;
  constexpr int W = Ops::kWidth;
  const int64_t chunks = kChunks > 0 ? kChunks : t.dim / W;  // a compile-time count unrolls into registers
  // Scores: each key row widened once, dotted with every query of the group.
  for_each_slot(t, [&](int64_t pos, int64_t row) {
    const Cache* key = t.keys + row * t.row_stride;
    for (int64_t g = 0; g < t.group; ++g) {
      const float* q = t.query + g * t.dim;
      Vec acc = Ops::zero();
      for (int64_t c = 0; c < chunks; ++c) acc = Ops::fma(Ops::load(q + c * W), Ops::load(key + c * W), acc);
      t.scores[g * t.length + pos] = Ops::sum(acc);
    }
  });
  std::vector<float> inverse(t.group);
  for (int64_t g = 0; g < t.group; ++g) {
    float* row = t.scores + g * t.length;
    const float peak = *std::max_element(row, row + t.length);
    inverse[g] = 1.f / exp_shifted_sum(row, t.length, -peak);
  }
  // Values: the weighted sum accumulates in the output rows (L1-resident), normalised once at the end.
  std::fill(t.out, t.out + t.group * t.dim, 0.f);
  for_each_slot(t, [&](int64_t pos, int64_t row) {
    const Cache* value = t.values + row * t.row_stride;
    for (int64_t g = 0; g < t.group; ++g) {
      const Vec weight = Ops::splat(t.scores[g * t.length + pos]);
      float* acc = t.out + g * t.dim;
      for (int64_t c = 0; c < chunks; ++c)
        Ops::store(acc + c * W, Ops::fma(weight, Ops::load(value + c * W), Ops::load(acc + c * W)));
    }
  });
  for (int64_t g = 0; g < t.group; ++g)
    for (int64_t j = 0; j < t.dim; ++j) t.out[g * t.dim + j] *= inverse[g];
}

// The instantiation for this head size: unrolled for the common sizes, a runtime loop for the rest.
template <typename Cache>
void attend_any(const HeadTask<Cache>& t) {
  if (t.dim % VectorOps::kWidth != 0) return attend<ScalarOps, 0>(t);
  switch (t.dim / VectorOps::kWidth) {
    case 4: return attend<VectorOps, 4>(t);
    case 8: return attend<VectorOps, 8>(t);
    case 16: return attend<VectorOps, 16>(t);
    default: return attend<VectorOps, 0>(t);
  }
}

void check_inputs(const torch::Tensor& q, const torch::Tensor& key_cache, const torch::Tensor& value_cache,
                  const torch::Tensor& block_tables, const torch::Tensor& context_lens) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32 && q.stride(2) == 1, "q must be [batch, heads, d] fp32");
  const auto cache_type = key_cache.scalar_type();
  TORCH_CHECK(key_cache.dim() == 3 && (cache_type == torch::kFloat32 || cache_type == torch::kFloat16) &&
                  key_cache.stride(2) == 1 && value_cache.sizes() == key_cache.sizes() &&
                  value_cache.strides() == key_cache.strides() && value_cache.scalar_type() == cache_type,
              "caches must be [slots, kv_heads, d] fp32 or fp16 with the same layout");
  TORCH_CHECK(key_cache.size(2) == q.size(2) && q.size(1) % key_cache.size(1) == 0,
              "heads must be a multiple of the KV heads, with the same head size");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == torch::kInt32 && block_tables.stride(1) == 1 &&
                  block_tables.size(0) == q.size(0),
              "block tables must be [batch, pages] int32");
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.scalar_type() == torch::kInt32 && context_lens.is_contiguous() &&
                  context_lens.size(0) == q.size(0),
              "context lengths must be [batch] int32");
}

template <typename Cache>
void run_tasks(const torch::Tensor& q, const torch::Tensor& key_cache, const torch::Tensor& value_cache,
               const torch::Tensor& block_tables, const int32_t* lens, int64_t page_size, float scale,
               int64_t work, torch::Tensor& out) {
  const int64_t heads = q.size(1), dim = q.size(2), kv_heads = key_cache.size(1);
  const int64_t group = heads / kv_heads, tasks = q.size(0) * kv_heads;
  const float* qp = q.data_ptr<float>();
  const Cache* kp = key_cache.data_ptr<Cache>();
  const Cache* vp = value_cache.data_ptr<Cache>();
  const int32_t* tp = block_tables.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, tasks, work < kInlineWork ? tasks : 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, query(group * dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, h = task % kv_heads;
      scores.resize(group * lens[b]);
      for (int64_t g = 0; g < group; ++g) {  // the scale folded into the query once
        const float* src = qp + b * q.stride(0) + (h * group + g) * q.stride(1);
        for (int64_t j = 0; j < dim; ++j) query[g * dim + j] = src[j] * scale;
      }
      const HeadTask<Cache> t{query.data(), kp + h * key_cache.stride(1), vp + h * key_cache.stride(1),
                              key_cache.stride(0), tp + b * block_tables.stride(0), lens[b], page_size, group,
                              dim, scores.data(),
                              op + (b * heads + h * group) * dim};  // out is contiguous: the group is adjacent
      attend_any(t);
    }
  });
}

}  // namespace

torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& key_cache, const torch::Tensor& value_cache,
                           const torch::Tensor& block_tables, const torch::Tensor& context_lens, int64_t page_size,
                           double scale) {
  check_inputs(q, key_cache, value_cache, block_tables, context_lens);
  const int64_t batch = q.size(0), pages = block_tables.size(1), slots = key_cache.size(0);
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const int32_t* tp = block_tables.data_ptr<int32_t>();
  int64_t work = 0;
  for (int64_t b = 0; b < batch; ++b) {  // checked here: the parallel loop below trusts every slot it forms
    TORCH_CHECK(lens[b] > 0 && lens[b] <= pages * page_size, "context length ", lens[b], " outside the block table");
    for (int64_t page = 0; page < (lens[b] + page_size - 1) / page_size; ++page) {
      const int64_t block = tp[b * block_tables.stride(0) + page];
      TORCH_CHECK(block >= 0 && (block + 1) * page_size <= slots, "block table points outside the cache");
    }
    work += lens[b];
  }
  work *= q.size(1) * q.size(2);
  auto out = torch::empty(q.sizes(), q.options());
  const float scale_f = static_cast<float>(scale);
  if (key_cache.scalar_type() == torch::kFloat16)
    run_tasks<at::Half>(q, key_cache, value_cache, block_tables, lens, page_size, scale_f, work, out);
  else
    run_tasks<float>(q, key_cache, value_cache, block_tables, lens, page_size, scale_f, work, out);
  return out;
}
