// The CPU kernels compiled into one extension module (see layers/cpu_kernels.py); bound in cpu_ops.cpp.
#pragma once

#include <torch/types.h>

#include <vector>

// ggml_packed.cpp: y = x W^T over GGUF blocks repacked in tiles of 16 columns (layers/packed_blocks.py), with
// int8 activation blocks and integer dot products; a minimum marks q4 blocks.
torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scale,
                            const c10::optional<torch::Tensor>& minimum, int64_t out_features,
                            int64_t activation_bits);

// cpu_ops.cpp: the small per-layer ops of a decode step.
std::vector<torch::Tensor> rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                                    const torch::Tensor& weight, double eps);
torch::Tensor silu_mul(const torch::Tensor& gate_up);
void rotary_(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);

// lora_cpu.cpp: each row's own LoRA adapter update, added into y in place.
void lora_add_(const torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& a,
               const std::vector<torch::Tensor>& bts, const torch::Tensor& row_slots, int64_t num_slots,
               int64_t rank);

// attention/csrc/paged_decode_cpu.cpp: decode attention over the paged KV cache.
torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& key_cache, const torch::Tensor& value_cache,
                           const torch::Tensor& block_tables, const torch::Tensor& context_lens, int64_t page_size,
                           double scale);

// decoder_layer_cpu.cpp: a projection's tiles (packed_linear's arguments), optional bias and LoRA slots
// (lora_add_'s A and per-shard B transposed, once the engine serves adapters).
struct PackedProjection {
  PackedProjection(torch::Tensor codes, torch::Tensor scale, c10::optional<torch::Tensor> minimum,
                   int64_t out_features, c10::optional<torch::Tensor> bias);

  torch::Tensor codes, scale;
  c10::optional<torch::Tensor> minimum;
  int64_t out_features;
  c10::optional<torch::Tensor> bias;
  c10::optional<torch::Tensor> lora_a;
  std::vector<torch::Tensor> lora_bt;
};

// decoder_layer_cpu.cpp: one pre-norm decoder layer of a decode step (GQA attention, SwiGLU) in one call.
class DecoderLayerCpu {
 public:
  DecoderLayerCpu(torch::Tensor input_norm, torch::Tensor post_norm, double eps, PackedProjection qkv,
                  PackedProjection o, PackedProjection gate_up, PackedProjection down, int64_t heads,
                  int64_t kv_heads, int64_t head_dim, double scale, int64_t activation_bits);
  // Adapter slots: the step's slot per row (int32, refreshed in place each step) and each projection's
  // (0 qkv, 1 o, 2 gate_up, 3 down) A and B, which never move once allocated.
  void set_lora_rows(torch::Tensor row_slots, int64_t num_slots, int64_t rank);
  void set_lora(int64_t projection, torch::Tensor a, std::vector<torch::Tensor> bts);
  // [feed-forward output, residual stream], as PreNormDecoderLayer.forward returns them; ``lora``: some row of
  // this step has an adapter.
  std::vector<torch::Tensor> forward(const torch::Tensor& hidden, const c10::optional<torch::Tensor>& residual,
                                     const torch::Tensor& cos, const torch::Tensor& sin,
                                     const torch::Tensor& slot_mapping, const torch::Tensor& key_cache,
                                     const torch::Tensor& value_cache, const torch::Tensor& block_tables,
                                     const torch::Tensor& context_lens, int64_t page_size, bool lora) const;

 private:
  // y = x W^T (+ bias) (+ each row's adapter update): what Linear.forward computes.
  torch::Tensor project(const PackedProjection& p, const torch::Tensor& x, bool lora) const;

  torch::Tensor input_norm_, post_norm_;
  double eps_;
  PackedProjection qkv_, o_, gate_up_, down_;
  int64_t heads_, kv_heads_, head_dim_;
  double scale_;
  int64_t activation_bits_;
  torch::Tensor lora_rows_;
  int64_t lora_slots_ = 0, lora_rank_ = 0;
};
