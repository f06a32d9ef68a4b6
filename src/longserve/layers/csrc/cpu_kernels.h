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
               const std::vector<torch::Tensor>& bs, const torch::Tensor& row_slots, int64_t num_slots,
               int64_t rank);

// attention/csrc/paged_decode_cpu.cpp: decode attention over the paged KV cache.
torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& key_cache, const torch::Tensor& value_cache,
                           const torch::Tensor& block_tables, const torch::Tensor& context_lens, int64_t page_size,
                           double scale);
