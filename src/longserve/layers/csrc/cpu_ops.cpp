// The small per-layer ops of a CPU decode step as single compiled calls: each replaces several torch ops,
// and at a few rows per step a torch op's fixed cost (dispatch, thread wake-up) is what dominates. Also the
// module's Python bindings, for these and for the GGUF matmuls and the paged decode attention.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <vector>

#include "cpu_kernels.h"
#include "vec_math.h"

// RMSNorm of fp32 rows, optionally after the residual add (summed = x + residual, then normalised).
std::vector<torch::Tensor> rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                                    const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.stride(1) == 1, "x must be [rows, dim] fp32");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.scalar_type() == torch::kFloat32 &&
                  weight.is_contiguous(),
              "weight must be [dim] fp32");
  const int64_t rows = x.size(0), dim = x.size(1);
  auto out = torch::empty({rows, dim}, x.options());
  torch::Tensor summed;
  const float* rp = nullptr;
  int64_t r_stride = 0;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == torch::kFloat32 && residual->stride(1) == 1,
                "residual must match x");
    summed = torch::empty({rows, dim}, x.options());
    rp = residual->data_ptr<float>();
    r_stride = residual->stride(0);
  }
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* sp = summed.defined() ? summed.data_ptr<float>() : nullptr;
  const int64_t x_stride = x.stride(0);
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * x_stride;
      float* s = sp ? sp + r * dim : nullptr;
      if (s) {
        for (int64_t j = 0; j < dim; ++j) s[j] = rp[r * r_stride + j] + row[j];
        row = s;
      }
      double squares = 0.0;  // in double: the mean of squares is exact to float precision whatever the dim
      for (int64_t j = 0; j < dim; ++j) squares += static_cast<double>(row[j]) * row[j];
      const float rstd = static_cast<float>(1.0 / std::sqrt(squares / dim + eps));
      float* o = op + r * dim;
      for (int64_t j = 0; j < dim; ++j) o[j] = row[j] * rstd * wp[j];
    }
  });
  if (summed.defined()) return {out, summed};
  return {out};
}

// silu(gate) * up for fp32 [rows, 2 * width] (gate | up): one pass instead of split, silu and mul.
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.scalar_type() == torch::kFloat32 && gate_up.stride(1) == 1 &&
                  gate_up.size(1) % 2 == 0,
              "gate_up must be [rows, 2 * width] fp32");
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2, stride = gate_up.stride(0);
  auto out = torch::empty({rows, width}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      longserve_cpu::silu_mul_row(gp + r * stride, gp + r * stride + width, op + r * width, width);
    }
  });
  return out;
}

// In place, HF's rotate-half layout: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) for the two halves of each
// head, x [tokens, heads, d] (rows may be strided: q and k are views into the fused QKV output), cos/sin
// [tokens, 1, d / 2].
void rotary_(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == torch::kFloat32 && x.stride(2) == 1 && x.size(2) % 2 == 0,
              "x must be [tokens, heads, d] fp32");
  const int64_t tokens = x.size(0), heads = x.size(1), half = x.size(2) / 2;
  for (const auto* table : {&cos, &sin}) {
    TORCH_CHECK(table->dim() == 3 && table->size(0) == tokens && table->size(1) == 1 && table->size(2) == half &&
                    table->scalar_type() == torch::kFloat32 && table->stride(2) == 1,
                "cos and sin must be [tokens, 1, d / 2] fp32");
  }
  TORCH_CHECK(cos.strides() == sin.strides(), "cos and sin must share a layout");
  float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t x_s0 = x.stride(0), x_s1 = x.stride(1), t_s0 = cos.stride(0);
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + t * t_s0;
      const float* s = sp + t * t_s0;
      for (int64_t h = 0; h < heads; ++h) {
        float* x1 = xp + t * x_s0 + h * x_s1;
        float* x2 = x1 + half;
        for (int64_t j = 0; j < half; ++j) {
          const float a = x1[j], b = x2[j];
          x1[j] = a * c[j] - b * s[j];
          x2[j] = b * c[j] + a * s[j];
        }
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "rms_norm(x [+ residual]) * weight, fp32 rows -> [out] or [out, summed]");
  m.def("silu_mul", &silu_mul, "silu(gate) * up over [rows, 2 * width] fp32");
  m.def("rotary_", &rotary_, "rotate x [tokens, heads, d] in place by cos/sin [tokens, 1, d / 2] (rotate-half)");
  m.def("lora_add_", &lora_add_, "y += each row's own LoRA update (rows with slot -1 unchanged)");
  m.def("packed_linear", &packed_linear, "x [rows, in] fp32 @ tiled blocks^T -> [rows, out], integer dot products",
        py::arg("x"), py::arg("codes"), py::arg("scale"), py::arg("minimum"), py::arg("out_features"),
        py::arg("activation_bits"));
  m.def("paged_decode", &paged_decode,
        "q [batch, heads, d] attends its paged context: caches [slots, kv_heads, d], int32 block tables and lengths");
  // module_local: the tests load builds for other instruction sets beside this one, each with these types.
  py::class_<PackedProjection>(m, "PackedProjection", py::module_local())
      .def(py::init<torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, int64_t, c10::optional<torch::Tensor>>(),
           py::arg("codes"), py::arg("scale"), py::arg("minimum"), py::arg("out_features"), py::arg("bias"));
  py::class_<DecoderLayerCpu>(m, "DecoderLayerCpu", py::module_local())
      .def(py::init<torch::Tensor, torch::Tensor, double, PackedProjection, PackedProjection, PackedProjection,
                    PackedProjection, int64_t, int64_t, int64_t, double, int64_t>(),
           py::arg("input_norm"), py::arg("post_norm"), py::arg("eps"), py::arg("qkv"), py::arg("o"),
           py::arg("gate_up"), py::arg("down"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"),
           py::arg("scale"), py::arg("activation_bits"))
      .def("set_lora_rows", &DecoderLayerCpu::set_lora_rows, "each row's adapter slot (int32), slots, rank")
      .def("set_lora", &DecoderLayerCpu::set_lora, "a projection's (0 qkv, 1 o, 2 gate_up, 3 down) LoRA A and Bs")
      .def("forward", &DecoderLayerCpu::forward, "a decode step's layer: [feed-forward output, residual]");
}
