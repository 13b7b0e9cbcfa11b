// Fused per-row optimizer updates on CPU, in place on the full buffers.
//
// Why hand-written: the eager chain gathers each touched row of the weights and of
// every per-element state, runs ~8 elementwise passes, and scatters them back; on
// CPU that is ~3x the memory traffic of FBGEMM's fused kernels. No torch or FBGEMM
// op fuses gather + Adam + scatter on CPU (FBGEMM refuses fused Adam on CPU), so
// these loops read and write each touched row once. Per-row factors (learning rate
// after FAL, decay multipliers) are computed by the eager transforms on [U] vectors
// and passed in, so the rules stay defined in rules/transforms.py; this file only
// owns the [U, D] arithmetic, and tests compare it with the eager chain.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>

namespace {

void check_rows(const at::Tensor& weight, const at::Tensor& rows, const at::Tensor& grad) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == at::kFloat,
              "weight must be a contiguous float32 [R, D] tensor");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous(), "rows must be int64 [U]");
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == rows.size(0) && grad.size(1) == weight.size(1) &&
                  grad.scalar_type() == at::kFloat,
              "grad must be float32 [U, D]");
}

}  // namespace

// w <- keep_r * w - lr_r * (m_hat / (sqrt(v_hat) + eps)), with the moments updated first.
void adam_rows_(at::Tensor weight, at::Tensor exp_avg, at::Tensor exp_avg_sq, at::Tensor rows, at::Tensor grad,
                at::Tensor lr, at::Tensor keep, double beta1, double beta2, double eps, double bc1, double bc2_sqrt) {
  check_rows(weight, rows, grad);
  TORCH_CHECK(exp_avg.sizes() == weight.sizes() && exp_avg_sq.sizes() == weight.sizes() && exp_avg.is_contiguous() &&
                  exp_avg_sq.is_contiguous(),
              "moments must be contiguous and shaped like the weights");
  auto g = grad.contiguous();
  auto lr_c = lr.contiguous();
  const bool has_keep = keep.defined() && keep.numel() > 0;
  auto keep_c = has_keep ? keep.contiguous() : keep;
  const int64_t U = rows.size(0), D = weight.size(1);
  float* w = weight.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  const int64_t* r = rows.data_ptr<int64_t>();
  const float* gp = g.data_ptr<float>();
  const float* lp = lr_c.data_ptr<float>();
  const float* kp = has_keep ? keep_c.data_ptr<float>() : nullptr;
  const float b1 = beta1, b2 = beta2, one_b1 = 1.0 - beta1, one_b2 = 1.0 - beta2;
  const float inv_bc1 = 1.0 / bc1, inv_bc2s = 1.0 / bc2_sqrt, e = eps;
  at::parallel_for(0, U, 256, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t off = r[u] * D;
      float* __restrict__ wr = w + off;
      float* __restrict__ mr = m + off;
      float* __restrict__ vr = v + off;
      const float* __restrict__ gr = gp + u * D;
      const float step = lp[u] * inv_bc1;
      const float k = kp ? kp[u] : 1.0f;
      for (int64_t j = 0; j < D; ++j) {
        const float gj = gr[j];
        const float mj = mr[j] + one_b1 * (gj - mr[j]);
        const float vj = b2 * vr[j] + one_b2 * gj * gj;
        mr[j] = mj;
        vr[j] = vj;
        wr[j] = k * wr[j] - step * mj / (std::sqrt(vj) * inv_bc2s + e);
      }
    }
  });
}

// FBGEMM's EXACT_ROWWISE_ADAGRAD with optional coupled L2 (g += l2 * w) and a per-row keep factor.
void rowwise_adagrad_rows_(at::Tensor weight, at::Tensor momentum, at::Tensor rows, at::Tensor grad, at::Tensor lr,
                           at::Tensor keep, double eps, double l2) {
  check_rows(weight, rows, grad);
  TORCH_CHECK(momentum.dim() == 1 && momentum.size(0) == weight.size(0) && momentum.is_contiguous() &&
                  momentum.scalar_type() == at::kFloat,
              "momentum must be float32 [R]");
  auto g = grad.contiguous();
  auto lr_c = lr.contiguous();
  const bool has_keep = keep.defined() && keep.numel() > 0;
  auto keep_c = has_keep ? keep.contiguous() : keep;
  const int64_t U = rows.size(0), D = weight.size(1);
  float* w = weight.data_ptr<float>();
  float* acc = momentum.data_ptr<float>();
  const int64_t* r = rows.data_ptr<int64_t>();
  const float* gp = g.data_ptr<float>();
  const float* lp = lr_c.data_ptr<float>();
  const float* kp = has_keep ? keep_c.data_ptr<float>() : nullptr;
  const float e = eps, wd = l2;
  at::parallel_for(0, U, 256, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t row = r[u];
      float* __restrict__ wr = w + row * D;
      const float* __restrict__ gr = gp + u * D;
      float sq = 0.0f;
      for (int64_t j = 0; j < D; ++j) {
        const float gj = gr[j] + wd * wr[j];
        sq += gj * gj;
      }
      const float a = acc[row] + sq / D;
      acc[row] = a;
      const float mult = lp[u] / (std::sqrt(a) + e);
      const float k = kp ? kp[u] : 1.0f;
      for (int64_t j = 0; j < D; ++j) {
        const float gj = gr[j] + wd * wr[j];
        wr[j] = k * wr[j] - mult * gj;
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("adam_rows_", &adam_rows_, "fused lazy Adam on rows (in place)");
  m.def("rowwise_adagrad_rows_", &rowwise_adagrad_rows_, "fused row-wise Adagrad on rows (in place)");
}
