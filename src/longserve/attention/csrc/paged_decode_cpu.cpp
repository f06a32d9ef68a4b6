// Paged decode attention on the CPU: each new token attends its whole context straight from the paged KV
// cache through its block table, so no per-step gathered copy of the context is made (the gather the torch
// path needs copies every context in every layer). One task per (sequence, KV head) computes the scores of the
// head's query group, a softmax, and the value sum, in fp32.
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "cpu_kernels.h"
#include "vec_math.h"

using longserve_cpu::dot;
using longserve_cpu::exp_shifted_sum;

namespace {

// Below this many score products a step runs on the calling thread: waking the pool costs more than it saves.
constexpr int64_t kInlineWork = 1 << 16;

void check_inputs(const torch::Tensor& q, const torch::Tensor& key_cache, const torch::Tensor& value_cache,
                  const torch::Tensor& block_tables, const torch::Tensor& context_lens) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32 && q.stride(2) == 1, "q must be [batch, heads, d] fp32");
  TORCH_CHECK(key_cache.dim() == 3 && key_cache.scalar_type() == torch::kFloat32 && key_cache.stride(2) == 1 &&
                  value_cache.sizes() == key_cache.sizes() && value_cache.strides() == key_cache.strides() &&
                  value_cache.scalar_type() == torch::kFloat32,
              "caches must be [slots, kv_heads, d] fp32 with the same layout");
  TORCH_CHECK(key_cache.size(2) == q.size(2) && q.size(1) % key_cache.size(1) == 0,
              "heads must be a multiple of the KV heads, with the same head size");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == torch::kInt32 && block_tables.stride(1) == 1 &&
                  block_tables.size(0) == q.size(0),
              "block tables must be [batch, pages] int32");
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.scalar_type() == torch::kInt32 && context_lens.is_contiguous() &&
                  context_lens.size(0) == q.size(0),
              "context lengths must be [batch] int32");
}

}  // namespace

torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& key_cache, const torch::Tensor& value_cache,
                           const torch::Tensor& block_tables, const torch::Tensor& context_lens, int64_t page_size,
                           double scale) {
  check_inputs(q, key_cache, value_cache, block_tables, context_lens);
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = key_cache.size(1);
  const int64_t group = heads / kv_heads, pages = block_tables.size(1), slots = key_cache.size(0);
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  int64_t work = 0;
  const int32_t* tp = block_tables.data_ptr<int32_t>();
  const int64_t t_s0 = block_tables.stride(0);
  for (int64_t b = 0; b < batch; ++b) {  // checked here: the parallel loop below trusts every slot it forms
    TORCH_CHECK(lens[b] > 0 && lens[b] <= pages * page_size, "context length ", lens[b], " outside the block table");
    for (int64_t page = 0; page < (lens[b] + page_size - 1) / page_size; ++page) {
      const int64_t block = tp[b * t_s0 + page];
      TORCH_CHECK(block >= 0 && (block + 1) * page_size <= slots, "block table points outside the cache");
    }
    work += lens[b];
  }
  work *= heads * dim;
  auto out = torch::empty({batch, heads, dim}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = key_cache.data_ptr<float>();
  const float* vp = value_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t q_s0 = q.stride(0), q_s1 = q.stride(1), c_s0 = key_cache.stride(0), c_s1 = key_cache.stride(1);
  const int64_t tasks = batch * kv_heads;
  const float scale_f = static_cast<float>(scale);
  at::parallel_for(0, tasks, work < kInlineWork ? tasks : 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;  // [group, context]
    std::vector<float> query(group * dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, h = task % kv_heads;
      const int64_t length = lens[b];
      const int32_t* table = tp + b * t_s0;
      scores.resize(group * length);
      for (int64_t g = 0; g < group; ++g) {  // the scale folded into the query once
        const float* src = qp + b * q_s0 + (h * group + g) * q_s1;
        for (int64_t j = 0; j < dim; ++j) query[g * dim + j] = src[j] * scale_f;
      }
      for (int64_t pos = 0; pos < length; ++pos) {
        const int64_t slot = static_cast<int64_t>(table[pos / page_size]) * page_size + pos % page_size;
        const float* key = kp + slot * c_s0 + h * c_s1;
        for (int64_t g = 0; g < group; ++g) scores[g * length + pos] = dot(query.data() + g * dim, key, dim);
      }
      for (int64_t g = 0; g < group; ++g) {
        float* row = scores.data() + g * length;
        const float peak = *std::max_element(row, row + length);
        const float inverse = 1.f / exp_shifted_sum(row, length, -peak);
        for (int64_t pos = 0; pos < length; ++pos) row[pos] *= inverse;
      }
      float* result = op + (b * heads + h * group) * dim;  // out is contiguous: the group's heads are adjacent
      std::fill(result, result + group * dim, 0.f);
      for (int64_t pos = 0; pos < length; ++pos) {
        const int64_t slot = static_cast<int64_t>(table[pos / page_size]) * page_size + pos % page_size;
        const float* value = vp + slot * c_s0 + h * c_s1;
        for (int64_t g = 0; g < group; ++g) {
          const float weight = scores[g * length + pos];
          float* acc = result + g * dim;
          for (int64_t j = 0; j < dim; ++j) acc[j] += weight * value[j];  // vectorised by the compiler
        }
      }
    }
  });
  return out;
}
