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
#include <vector>

namespace {

constexpr int64_t kPrefetchRows = 8;

inline void prefetch_row(const float* base, int64_t off, int64_t D) {
  for (int64_t j = 0; j < D; j += 16) {  // one 64-byte cache line per 16 floats
    __builtin_prefetch(base + off + j, 1);
  }
}

// The gradient of touched row u, summed over its lookups: lookups [row_offsets[u],
// row_offsets[u + 1]) of the row-sorted lookup list, each adding lookup_weight[i] *
// bag_grads[bags[i]]. Summing here instead of in a separate op means the [U, D]
// coalesced gradient is never written to memory.
struct LookupGrad {
  const int64_t* row_offsets;
  const int64_t* bags;
  const float* weight;  // nullptr: every lookup weighs 1
  const float* bag_grads;

  inline void row(int64_t u, int64_t D, float* __restrict__ acc) const {
    for (int64_t j = 0; j < D; ++j) acc[j] = 0.0f;
    for (int64_t i = row_offsets[u]; i < row_offsets[u + 1]; ++i) {
      const float* __restrict__ src = bag_grads + bags[i] * D;
      const float s = weight ? weight[i] : 1.0f;
      for (int64_t j = 0; j < D; ++j) acc[j] += s * src[j];
    }
  }
};

LookupGrad lookup_grad(const at::Tensor& weight, const at::Tensor& rows, const at::Tensor& row_offsets,
                       const at::Tensor& bags, const at::Tensor& lookup_weight, const at::Tensor& bag_grads) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == at::kFloat,
              "weight must be a contiguous float32 [R, D] tensor");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous(), "rows must be int64 [U]");
  TORCH_CHECK(row_offsets.scalar_type() == at::kLong && row_offsets.is_contiguous() &&
                  row_offsets.numel() == rows.numel() + 1,
              "row_offsets must be int64 [U + 1]");
  TORCH_CHECK(bags.scalar_type() == at::kLong && bags.is_contiguous(), "bags must be int64 [L]");
  TORCH_CHECK(bag_grads.dim() == 2 && bag_grads.size(1) == weight.size(1) && bag_grads.is_contiguous() &&
                  bag_grads.scalar_type() == at::kFloat,
              "bag_grads must be contiguous float32 [bags, D]");
  const bool weighted = lookup_weight.numel() > 0;
  TORCH_CHECK(!weighted || (lookup_weight.scalar_type() == at::kFloat && lookup_weight.is_contiguous() &&
                            lookup_weight.numel() == bags.numel()),
              "lookup_weight must be empty or contiguous float32 [L]");
  return LookupGrad{row_offsets.data_ptr<int64_t>(), bags.data_ptr<int64_t>(),
                    weighted ? lookup_weight.data_ptr<float>() : nullptr, bag_grads.data_ptr<float>()};
}

}  // namespace

// w <- keep_r * w - lr_r * (m_hat / (sqrt(v_hat) + eps)), with the moments updated first.
void adam_rows_(at::Tensor weight, at::Tensor exp_avg, at::Tensor exp_avg_sq, at::Tensor rows, at::Tensor row_offsets,
                at::Tensor bags, at::Tensor lookup_weight, at::Tensor bag_grads, at::Tensor lr, at::Tensor keep,
                double beta1, double beta2, double eps, double bc1, double bc2_sqrt) {
  const LookupGrad lg = lookup_grad(weight, rows, row_offsets, bags, lookup_weight, bag_grads);
  TORCH_CHECK(exp_avg.sizes() == weight.sizes() && exp_avg_sq.sizes() == weight.sizes() && exp_avg.is_contiguous() &&
                  exp_avg_sq.is_contiguous(),
              "moments must be contiguous and shaped like the weights");
  auto lr_c = lr.contiguous();
  const bool has_keep = keep.defined() && keep.numel() > 0;
  auto keep_c = has_keep ? keep.contiguous() : keep;
  const int64_t U = rows.size(0), D = weight.size(1);
  float* w = weight.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  const int64_t* r = rows.data_ptr<int64_t>();
  const float* lp = lr_c.data_ptr<float>();
  const float* kp = has_keep ? keep_c.data_ptr<float>() : nullptr;
  const float b1 = beta1, b2 = beta2, one_b1 = 1.0 - beta1, one_b2 = 1.0 - beta2;
  const float inv_bc1 = 1.0 / bc1, inv_bc2s = 1.0 / bc2_sqrt, e = eps;
  at::parallel_for(0, U, 256, [=](int64_t begin, int64_t end) {
    std::vector<float> acc(D);
    float* __restrict__ gr = acc.data();
    for (int64_t u = begin; u < end; ++u) {
      if (u + kPrefetchRows < end) {  // rows are random: hide the DRAM latency of the next ones
        prefetch_row(w, r[u + kPrefetchRows] * D, D);
        prefetch_row(m, r[u + kPrefetchRows] * D, D);
        prefetch_row(v, r[u + kPrefetchRows] * D, D);
      }
      const int64_t off = r[u] * D;
      float* __restrict__ wr = w + off;
      float* __restrict__ mr = m + off;
      float* __restrict__ vr = v + off;
      lg.row(u, D, gr);
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
void rowwise_adagrad_rows_(at::Tensor weight, at::Tensor momentum, at::Tensor rows, at::Tensor row_offsets,
                           at::Tensor bags, at::Tensor lookup_weight, at::Tensor bag_grads, at::Tensor lr,
                           at::Tensor keep, double eps, double l2, double acc_decay, double sq_scale) {
  const LookupGrad lg = lookup_grad(weight, rows, row_offsets, bags, lookup_weight, bag_grads);
  TORCH_CHECK(momentum.dim() == 1 && momentum.size(0) == weight.size(0) && momentum.is_contiguous() &&
                  momentum.scalar_type() == at::kFloat,
              "momentum must be float32 [R]");
  auto lr_c = lr.contiguous();
  const bool has_keep = keep.defined() && keep.numel() > 0;
  auto keep_c = has_keep ? keep.contiguous() : keep;
  const int64_t U = rows.size(0), D = weight.size(1);
  float* w = weight.data_ptr<float>();
  float* acc = momentum.data_ptr<float>();
  const int64_t* r = rows.data_ptr<int64_t>();
  const float* lp = lr_c.data_ptr<float>();
  const float* kp = has_keep ? keep_c.data_ptr<float>() : nullptr;
  const float e = eps, wd = l2, ad = acc_decay, ss = sq_scale;
  at::parallel_for(0, U, 256, [=](int64_t begin, int64_t end) {
    std::vector<float> buf(D);
    float* __restrict__ gr = buf.data();
    for (int64_t u = begin; u < end; ++u) {
      if (u + kPrefetchRows < end) {
        prefetch_row(w, r[u + kPrefetchRows] * D, D);
      }
      const int64_t row = r[u];
      float* __restrict__ wr = w + row * D;
      lg.row(u, D, gr);
      float sq = 0.0f;
      for (int64_t j = 0; j < D; ++j) {
        const float gj = gr[j] + wd * wr[j];
        sq += gj * gj;
      }
      // Adagrad: a = acc + mean(g^2) (ad = ss = 1, exact); RMSprop: a = beta acc + (1 - beta) mean(g^2)
      const float a = ad * acc[row] + ss * (sq / D);
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
  m.def("rowwise_adagrad_rows_", &rowwise_adagrad_rows_, "fused row-wise Adagrad / RMSprop on rows (in place)");
}
