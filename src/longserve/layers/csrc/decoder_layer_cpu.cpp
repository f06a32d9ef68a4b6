// One pre-norm decoder layer of a CPU decode step in a single call (layers/cpu_decoder_layer.py builds it):
// norm, QKV, rotary, KV write, paged attention, output projection, residual norm, gate|up, SiLU·mul, down,
// each projection with its rows' LoRA updates when the engine serves adapters.
// It runs the very kernels the Python modules call, in the same order on the same values, so a step through
// here gives exactly what the modules give; what it saves is their per-layer Python and dispatch (~100 µs a
// layer, a third of a single-stream step on the default model).
#include <torch/types.h>

#include "cpu_kernels.h"

PackedProjection::PackedProjection(torch::Tensor codes, torch::Tensor scale, c10::optional<torch::Tensor> minimum,
                                   int64_t out_features, c10::optional<torch::Tensor> bias)
    : codes(std::move(codes)),
      scale(std::move(scale)),
      minimum(std::move(minimum)),
      out_features(out_features),
      bias(std::move(bias)) {}

torch::Tensor DecoderLayerCpu::project(const PackedProjection& p, const torch::Tensor& x, bool lora) const {
  auto y = packed_linear(x, p.codes, p.scale, p.minimum, p.out_features, activation_bits_);  // [rows, out]
  if (p.bias.has_value()) y.add_(*p.bias);
  if (lora && p.lora_a.has_value()) lora_add_(y, x, *p.lora_a, p.lora_bt, lora_rows_, lora_slots_, lora_rank_);
  return y;
}

void DecoderLayerCpu::set_lora_rows(torch::Tensor row_slots, int64_t num_slots, int64_t rank) {
  lora_rows_ = std::move(row_slots);
  lora_slots_ = num_slots;
  lora_rank_ = rank;
}

void DecoderLayerCpu::set_lora(int64_t projection, torch::Tensor a, std::vector<torch::Tensor> bts) {
  PackedProjection* targets[] = {&qkv_, &o_, &gate_up_, &down_};
  TORCH_CHECK(projection >= 0 && projection < 4, "projection must be 0 (qkv), 1 (o), 2 (gate_up) or 3 (down)");
  targets[projection]->lora_a = std::move(a);
  targets[projection]->lora_bt = std::move(bts);
}

DecoderLayerCpu::DecoderLayerCpu(torch::Tensor input_norm, torch::Tensor post_norm, double eps, PackedProjection qkv,
                                 PackedProjection o, PackedProjection gate_up, PackedProjection down, int64_t heads,
                                 int64_t kv_heads, int64_t head_dim, double scale, int64_t activation_bits)
    : input_norm_(std::move(input_norm)),
      post_norm_(std::move(post_norm)),
      eps_(eps),
      qkv_(std::move(qkv)),
      o_(std::move(o)),
      gate_up_(std::move(gate_up)),
      down_(std::move(down)),
      heads_(heads),
      kv_heads_(kv_heads),
      head_dim_(head_dim),
      scale_(scale),
      activation_bits_(activation_bits) {
  TORCH_CHECK(qkv_.out_features == (heads + 2 * kv_heads) * head_dim, "qkv must project to q | k | v");
  TORCH_CHECK(gate_up_.out_features % 2 == 0, "gate_up must project to gate | up");
}

std::vector<torch::Tensor> DecoderLayerCpu::forward(const torch::Tensor& hidden,
                                                    const c10::optional<torch::Tensor>& residual,
                                                    const torch::Tensor& cos, const torch::Tensor& sin,
                                                    const torch::Tensor& slot_mapping, const torch::Tensor& key_cache,
                                                    const torch::Tensor& value_cache, const torch::Tensor& block_tables,
                                                    const torch::Tensor& context_lens, int64_t page_size,
                                                    bool lora) const {
  const int64_t rows = hidden.size(0), q_size = heads_ * head_dim_, kv_size = kv_heads_ * head_dim_;
  torch::Tensor normed, summed;  // [rows, hidden]: the attention's input, the residual stream after the add
  if (residual.has_value()) {
    auto both = rms_norm(hidden, residual, input_norm_, eps_);
    normed = both[0], summed = both[1];
  } else {  // the first layer: the embeddings are the residual stream
    normed = rms_norm(hidden, c10::nullopt, input_norm_, eps_)[0];
    summed = hidden;
  }
  const auto qkv = project(qkv_, normed, lora);  // [rows, q | k | v]
  const auto qk = qkv.narrow(1, 0, q_size + kv_size).view({rows, heads_ + kv_heads_, head_dim_});
  rotary_(qk, cos, sin);
  const auto key = qk.narrow(1, heads_, kv_heads_);  // [rows, kv_heads, head_dim]
  const auto value = qkv.narrow(1, q_size + kv_size, kv_size).view({rows, kv_heads_, head_dim_});
  // The cache write as LayerKVCache.write does it: rounded to the cache's type, copied to each slot.
  key_cache.index_copy_(0, slot_mapping, key.to(key_cache.scalar_type()));
  value_cache.index_copy_(0, slot_mapping, value.to(value_cache.scalar_type()));
  const auto attention = paged_decode(qk.narrow(1, 0, heads_), key_cache, value_cache, block_tables, context_lens,
                                      page_size, scale_);  // [rows, heads, head_dim], contiguous
  const auto out = project(o_, attention.view({rows, q_size}), lora);
  auto post = rms_norm(out, summed, post_norm_, eps_);  // [normed, summed]
  const auto gate_up = project(gate_up_, post[0], lora);
  return {project(down_, silu_mul(gate_up), lora), post[1]};
}
