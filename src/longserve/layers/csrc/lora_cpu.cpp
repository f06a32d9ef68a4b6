// LoRA updates on the CPU, one call per projection and step: each row runs only its own adapter's A and B
// (a gathered, BGMV-style update), where the masked torch form multiplies every row by every slot.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "cpu_kernels.h"
#include "vec_math.h"

// y [rows, out] += B_k[slot] (A_k[slot] x) for each shard k, for every row whose slot is >= 0.
// a: [shards * slots * rank, in], row (k * slots + s) * rank + j; bts[k]: B_k transposed, [slots * rank, out_k],
// row s * rank + j, so each rank's weights for a run of outputs are contiguous and the update vectorizes over
// the outputs. Every row's update is computed alone, in a fixed order: batch- and thread-count-invariant.
void lora_add_(const torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& a,
               const std::vector<torch::Tensor>& bts, const torch::Tensor& row_slots, int64_t num_slots,
               int64_t rank) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be [rows, in] fp32");
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == torch::kFloat32 && y.stride(1) == 1 && y.size(0) == x.size(0),
              "y must be [rows, out] fp32");
  TORCH_CHECK(a.scalar_type() == torch::kFloat32 && a.is_contiguous() && a.size(1) == x.size(1), "a must match x");
  TORCH_CHECK(row_slots.scalar_type() == torch::kInt32 && row_slots.numel() >= x.size(0), "row_slots: int32 [rows]");
  const int64_t rows = x.size(0), in = x.size(1), shards = static_cast<int64_t>(bts.size());
  TORCH_CHECK(a.size(0) == shards * num_slots * rank, "a has the wrong number of rows");
  const float* X = x.data_ptr<float>();
  const float* A = a.data_ptr<float>();
  const int32_t* slot = row_slots.data_ptr<int32_t>();
  float* Y = y.data_ptr<float>();
  const int64_t y_stride = y.stride(0);
  std::vector<float> t(rows * shards * rank, 0.f);  // [rows, shards, rank]: each row's A x
  at::parallel_for(0, rows * shards * rank, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / (shards * rank), k = (i / rank) % shards, j = i % rank;
      if (slot[r] < 0) continue;
      const float* a_row = A + ((k * num_slots + slot[r]) * rank + j) * in;
      t[i] = longserve_cpu::dot(a_row, X + r * in, in);
    }
  });
  constexpr int64_t kOutputs = 256;  // outputs a task updates: its accumulators stay in L1
  int64_t offset = 0;
  for (int64_t k = 0; k < shards; ++k) {
    const torch::Tensor& bt = bts[k];
    TORCH_CHECK(bt.scalar_type() == torch::kFloat32 && bt.is_contiguous() && bt.dim() == 2 &&
                    bt.size(0) == num_slots * rank,
                "b must be [slots * rank, out] fp32 (B transposed)");
    const float* BT = bt.data_ptr<float>();
    const int64_t out = bt.size(1);
    at::parallel_for(0, out, kOutputs, [&](int64_t begin, int64_t end) {
      float acc[kOutputs];
      for (int64_t first = begin; first < end; first += kOutputs) {  // a task may get several runs
        const int64_t n = std::min(kOutputs, end - first);
        for (int64_t r = 0; r < rows; ++r) {
          if (slot[r] < 0) continue;
          const float* tv = t.data() + (r * shards + k) * rank;
          std::fill(acc, acc + n, 0.f);
          for (int64_t j = 0; j < rank; ++j) {
            const float w = tv[j];
            const float* column = BT + (slot[r] * rank + j) * out + first;
            for (int64_t o = 0; o < n; ++o) acc[o] += w * column[o];  // vectorised by the compiler
          }
          float* y_row = Y + r * y_stride + offset + first;
          for (int64_t o = 0; o < n; ++o) y_row[o] += acc[o];
        }
      }
    });
    offset += out;
  }
  TORCH_CHECK(offset <= y.size(1), "the shards' rows exceed y's columns");
}
