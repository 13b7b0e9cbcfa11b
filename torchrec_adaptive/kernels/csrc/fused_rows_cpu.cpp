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
//
// The same source is compiled once per instruction set (kernels/cpu_isa.py: no
// -march=native, explicit -mavx2 / -mavx512* flags) and the variant matching
// ATen's CPU capability is loaded; the inner loops are written for the compiler's
// vectorizer (`#pragma omp simd`, restrict pointers, no aliasing).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// The variant's name and source hash, set by kernels/cpu_isa.py's flags as bare tokens.
#define TRA_STR2(x) #x
#define TRA_STR(x) TRA_STR2(x)
#ifndef TORCHREC_ADAPTIVE_SOURCE_HASH
#define TORCHREC_ADAPTIVE_SOURCE_HASH unknown
#endif
#ifndef TORCHREC_ADAPTIVE_ISA
#define TORCHREC_ADAPTIVE_ISA default
#endif

namespace {

constexpr int64_t kPrefetchRows = 8;
constexpr int64_t kHistoryPrefetch = 32;  // rows ahead in row_history_ (two 8-byte reads per row)

inline void prefetch_row(const float* base, int64_t off, int64_t D) {
  for (int64_t j = 0; j < D; j += 16) {  // one 64-byte cache line per 16 floats
    __builtin_prefetch(base + off + j, 1);
  }
}

inline void prefetch_read(const float* p, int64_t D) {
  for (int64_t j = 0; j < D; j += 16) __builtin_prefetch(p + j, 0);
}

// The gradient of touched row u, summed over its lookups: lookups [row_offsets[u],
// row_offsets[u + 1]) of the row-sorted lookup list, each adding lookup_weight[i] *
// bag_grads[bags[i]]. Summing here instead of in a separate op means the [U, D]
// coalesced gradient is never written to memory.
struct LookupGrad {
  const int64_t* row_offsets;
  const int32_t* bags;
  const float* weight;  // nullptr: every lookup weighs 1
  const float* bag_grads;

  // The bag gradients row u will read (random rows of a [bags, D] matrix larger than the caches).
  inline void prefetch(int64_t u, int64_t D) const {
    for (int64_t i = row_offsets[u]; i < row_offsets[u + 1]; ++i) {
      prefetch_read(bag_grads + static_cast<int64_t>(bags[i]) * D, D);
    }
  }

  inline void row(int64_t u, int64_t D, float* __restrict__ acc) const {
    const int64_t a = row_offsets[u], b = row_offsets[u + 1];
    const float* __restrict__ first = bag_grads + static_cast<int64_t>(bags[a]) * D;
    const float s0 = weight ? weight[a] : 1.0f;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) acc[j] = s0 * first[j];
    for (int64_t i = a + 1; i < b; ++i) {
      const float* __restrict__ src = bag_grads + static_cast<int64_t>(bags[i]) * D;
      const float s = weight ? weight[i] : 1.0f;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) acc[j] += s * src[j];
    }
  }
};

LookupGrad lookup_grad(int64_t D, const at::Tensor& rows, const at::Tensor& row_offsets, const at::Tensor& bags,
                       const at::Tensor& lookup_weight, const at::Tensor& bag_grads) {
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous(), "rows must be int64 [U]");
  TORCH_CHECK(row_offsets.scalar_type() == at::kLong && row_offsets.is_contiguous() &&
                  row_offsets.numel() == rows.numel() + 1,
              "row_offsets must be int64 [U + 1]");
  TORCH_CHECK(bags.scalar_type() == at::kInt && bags.is_contiguous(), "bags must be int32 [L]");
  TORCH_CHECK(bag_grads.dim() == 2 && bag_grads.size(1) == D && bag_grads.is_contiguous() &&
                  bag_grads.scalar_type() == at::kFloat,
              "bag_grads must be contiguous float32 [bags, D]");
  const bool weighted = lookup_weight.numel() > 0;
  TORCH_CHECK(!weighted || (lookup_weight.scalar_type() == at::kFloat && lookup_weight.is_contiguous() &&
                            lookup_weight.numel() == bags.numel()),
              "lookup_weight must be empty or contiguous float32 [L]");
  return LookupGrad{row_offsets.data_ptr<int64_t>(), bags.data_ptr<int32_t>(),
                    weighted ? lookup_weight.data_ptr<float>() : nullptr, bag_grads.data_ptr<float>()};
}

void check_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == at::kFloat,
              "weight must be a contiguous float32 [R, D] tensor");
}

// A tensor of `n` elements backed by `ws` (grown, never shrunk), so a step's
// buffers are reused instead of freshly allocated: a fresh multi-MB tensor costs
// page faults on every step (docs/performance.md).
at::Tensor from_workspace(at::Tensor& ws, int64_t n) {
  if (ws.numel() < n) ws.resize_({n + n / 4});
  return ws.narrow(0, 0, n);
}

}  // namespace

// Groups one dim-group's lookups by row in one pass, as FBGEMM's CPU backward does
// (a radix sort of (row, lookup) pairs instead of a comparison sort, unique,
// repeat_interleave and gathers). In: the lookups' rows [L] (int64, < num_rows),
// their bags as offsets [B + 1], optional per-sample weights [L], mean pooling.
// Out: the unique rows [U] (ascending), their occurrence counts [U] (float32),
// row_offsets [U + 1], each row-sorted lookup's bag [L] (int32) and weight [L]
// (per-sample weight, 1 / bag length for mean pooling, or empty: 1). The offsets
// and row bounds are checked in the pass that reads them anyway. `ws` holds the
// reusable buffers (see fused_cpu.CoalesceWorkspace for their dtypes).
std::vector<at::Tensor> coalesce_lookups(at::Tensor indices, at::Tensor offsets, at::Tensor psw, bool mean,
                                         int64_t num_rows, std::vector<at::Tensor> ws) {
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kLong && indices.is_contiguous(),
              "indices must be contiguous int64 [L]");
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong && offsets.is_contiguous() &&
                  offsets.numel() >= 1,
              "offsets must be contiguous int64 [B + 1]");
  TORCH_CHECK(ws.size() == 8, "coalesce_lookups needs 8 workspace tensors");
  TORCH_CHECK(num_rows >= 0 && num_rows < (int64_t{1} << 32), "a dim group's rows must fit in 32 bits");
  const int64_t L = indices.numel(), B = offsets.numel() - 1;
  TORCH_CHECK(L < (int64_t{1} << 31) && B < (int64_t{1} << 31), "more than 2^31 lookups in one batch");
  const bool weighted = psw.numel() > 0;
  TORCH_CHECK(!weighted || (psw.scalar_type() == at::kFloat && psw.is_contiguous() && psw.numel() == L),
              "per_sample_weights must be contiguous float32 [L]");
  const int64_t* idx = indices.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[B] - off[0] == L, "offsets end at ", off[B] - off[0], " lookups, but there are ", L);

  // keys: rows (32 bit); values: the lookup's bag, or its position when a per-sample weight must follow it
  at::Tensor keys_a = from_workspace(ws[2], L), keys_b = from_workspace(ws[3], L);
  at::Tensor vals_a = from_workspace(ws[4], L), vals_b = from_workspace(ws[6], L);
  uint32_t* ka = reinterpret_cast<uint32_t*>(keys_a.data_ptr<int32_t>());
  uint32_t* kb = reinterpret_cast<uint32_t*>(keys_b.data_ptr<int32_t>());
  int32_t* va = vals_a.data_ptr<int32_t>();
  int32_t* vb = vals_b.data_ptr<int32_t>();

  int bits = 1;
  while (bits < 32 && (int64_t{1} << bits) < num_rows) ++bits;
  const int kDigit = 11, passes = (bits + kDigit - 1) / kDigit;
  const uint32_t kMask = (1u << kDigit) - 1;

  // pass 0: bags from offsets, and bounds (parallel over bags)
  at::parallel_for(0, B, 4096, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = off[b] - off[0], hi = off[b + 1] - off[0];
      TORCH_CHECK(lo <= hi && hi <= L, "offsets must be non-decreasing and end at ", L, " (bag ", b, ")");
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t r = idx[i];
        TORCH_CHECK(r >= 0 && r < num_rows, "row ", r, " of lookup ", i, " is outside the group's ", num_rows, " rows");
        ka[i] = static_cast<uint32_t>(r);
        va[i] = weighted ? static_cast<int32_t>(i) : static_cast<int32_t>(b);
      }
    }
  });
  // LSD radix passes, parallel as FBGEMM's radix_sort_parallel: each thread counts the digits
  // of its chunk, the counts are prefix-summed digit-major then chunk-major, and each thread
  // scatters its chunk in order -- so the sort stays stable (a row's lookups keep their
  // batch order) and the result does not depend on the thread count.
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), L / 32768));
  std::vector<int64_t> hist(static_cast<size_t>(nt) << kDigit);
  auto chunk_begin = [=](int64_t c) { return L * c / nt; };
  for (int p = 0; p < passes; ++p) {
    const int shift = p * kDigit;
    std::fill(hist.begin(), hist.end(), 0);
    at::parallel_for(0, nt, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t* h = hist.data() + (static_cast<size_t>(c) << kDigit);
        for (int64_t i = chunk_begin(c); i < chunk_begin(c + 1); ++i) ++h[(ka[i] >> shift) & kMask];
      }
    });
    int64_t sum = 0;
    for (uint32_t d = 0; d <= kMask; ++d) {
      for (int64_t c = 0; c < nt; ++c) {
        int64_t& h = hist[(static_cast<size_t>(c) << kDigit) + d];
        const int64_t n = h;
        h = sum;
        sum += n;
      }
    }
    at::parallel_for(0, nt, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t* h = hist.data() + (static_cast<size_t>(c) << kDigit);
        for (int64_t i = chunk_begin(c); i < chunk_begin(c + 1); ++i) {
          const int64_t dst = h[(ka[i] >> shift) & kMask]++;
          kb[dst] = ka[i];
          vb[dst] = va[i];
        }
      }
    });
    std::swap(ka, kb);
    std::swap(va, vb);
  }

  // unique rows, counts, offsets; bags and weights in row order
  int64_t U = 0;
  for (int64_t i = 0; i < L; ++i) U += (i == 0 || ka[i] != ka[i - 1]);
  at::Tensor rows = from_workspace(ws[0], U);
  at::Tensor row_offsets = from_workspace(ws[1], U + 1);
  at::Tensor occ = from_workspace(ws[5], U);
  at::Tensor bags = va == vals_a.data_ptr<int32_t>() ? vals_a : vals_b;  // where the sorted values ended
  int64_t* rp = rows.data_ptr<int64_t>();
  int64_t* op = row_offsets.data_ptr<int64_t>();
  float* cp = occ.data_ptr<float>();
  int64_t u = -1;
  for (int64_t i = 0; i < L; ++i) {
    if (i == 0 || ka[i] != ka[i - 1]) {
      if (u >= 0) cp[u] = static_cast<float>(i - op[u]);
      rp[++u] = ka[i];
      op[u] = i;
    }
  }
  if (u >= 0) cp[u] = static_cast<float>(L - op[u]);
  op[U] = L;

  at::Tensor lookup_weight;
  if (weighted || mean) {
    lookup_weight = from_workspace(ws[7], L);
    float* lw = lookup_weight.data_ptr<float>();
    int32_t* bg = va;
    if (weighted) {
      // values are lookup positions: their bag is found in the offsets, their weight in psw
      const float* pw = psw.data_ptr<float>();
      for (int64_t i = 0; i < L; ++i) {
        const int64_t pos = bg[i];
        lw[i] = pw[pos];
        const int64_t* hit = std::upper_bound(off, off + B + 1, pos + off[0]);
        bg[i] = static_cast<int32_t>((hit - off) - 1);
        // a zero-length bag shares its offset with the next: upper_bound already skips it
      }
    }
    if (mean) {
      for (int64_t i = 0; i < L; ++i) {
        const int64_t b = bg[i];
        const float w = weighted ? lw[i] : 1.0f;
        lw[i] = w / static_cast<float>(std::max<int64_t>(off[b + 1] - off[b], 1));
      }
    }
  } else {
    lookup_weight = at::empty({0}, indices.options().dtype(at::kFloat));
  }
  return {rows, occ, row_offsets, bags, lookup_weight};
}

// w <- keep_r * w - lr_r * (m_hat / (sqrt(v_hat) + eps)), with the moments updated first.
void adam_rows_(at::Tensor weight, at::Tensor exp_avg, at::Tensor exp_avg_sq, at::Tensor rows, at::Tensor row_offsets,
                at::Tensor bags, at::Tensor lookup_weight, at::Tensor bag_grads, at::Tensor lr, at::Tensor keep,
                double beta1, double beta2, double eps, double bc1, double bc2_sqrt) {
  check_weight(weight);
  const LookupGrad lg = lookup_grad(weight.size(1), rows, row_offsets, bags, lookup_weight, bag_grads);
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
  const float b2 = beta2, one_b1 = 1.0 - beta1, one_b2 = 1.0 - beta2;
  const float inv_bc1 = 1.0 / bc1, inv_bc2s = 1.0 / bc2_sqrt, e = eps;
  at::parallel_for(0, U, 256, [=](int64_t begin, int64_t end) {
    std::vector<float> acc(D);
    float* __restrict__ gr = acc.data();
    for (int64_t u = begin; u < end; ++u) {
      if (u + kPrefetchRows < end) {  // rows are random: hide the DRAM latency of the next ones
        prefetch_row(w, r[u + kPrefetchRows] * D, D);
        prefetch_row(m, r[u + kPrefetchRows] * D, D);
        prefetch_row(v, r[u + kPrefetchRows] * D, D);
        lg.prefetch(u + kPrefetchRows, D);
      }
      const int64_t off = r[u] * D;
      float* __restrict__ wr = w + off;
      float* __restrict__ mr = m + off;
      float* __restrict__ vr = v + off;
      lg.row(u, D, gr);
      const float step = lp[u] * inv_bc1;
      const float k = kp ? kp[u] : 1.0f;
#pragma omp simd
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
  check_weight(weight);
  const LookupGrad lg = lookup_grad(weight.size(1), rows, row_offsets, bags, lookup_weight, bag_grads);
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
        lg.prefetch(u + kPrefetchRows, D);
      }
      const int64_t row = r[u];
      float* __restrict__ wr = w + row * D;
      lg.row(u, D, gr);
      float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
      for (int64_t j = 0; j < D; ++j) {
        const float gj = gr[j] + wd * wr[j];
        sq += gj * gj;
      }
      // Adagrad: a = acc + mean(g^2) (ad = ss = 1, exact); RMSprop: a = beta acc + (1 - beta) mean(g^2)
      const float a = ad * acc[row] + ss * (sq / D);
      acc[row] = a;
      const float mult = lp[u] / (std::sqrt(a) + e);
      const float k = kp ? kp[u] : 1.0f;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) {
        const float gj = gr[j] + wd * wr[j];
        wr[j] = k * wr[j] - mult * gj;
      }
    }
  });
}

// track_row_history (rules/transforms.py) for the touched rows, without a count half-life,
// in one pass: s_r and c_r are read and written once per row, in place, instead of two
// gathers, four elementwise ops and two scatters over [U] vectors (at pooling 8 those cost
// as much as the Adam loop). Out: skipped [U] = k - s_r - 1 (before s_r moves to k) and
// count [U] = c_r + occurrences, what the transform publishes for the later ones.
void row_history_(at::Tensor last, at::Tensor count, at::Tensor rows, at::Tensor occurrences, int64_t step,
                  at::Tensor skipped, at::Tensor count_out) {
  const int64_t U = rows.numel();
  TORCH_CHECK(last.scalar_type() == at::kLong && last.is_contiguous() && count.scalar_type() == at::kDouble &&
                  count.is_contiguous() && last.numel() == count.numel(),
              "last step must be int64 [R] and count float64 [R]");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous() && occurrences.scalar_type() == at::kFloat &&
                  occurrences.is_contiguous() && occurrences.numel() == U,
              "rows must be int64 [U], occurrences float32 [U]");
  TORCH_CHECK(skipped.scalar_type() == at::kLong && skipped.numel() == U && count_out.scalar_type() == at::kDouble &&
                  count_out.numel() == U && skipped.is_contiguous() && count_out.is_contiguous(),
              "outputs must be int64 [U] and float64 [U]");
  int64_t* s = last.data_ptr<int64_t>();
  double* c = count.data_ptr<double>();
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t R = last.numel();
  const float* occ = occurrences.data_ptr<float>();
  int64_t* sk = skipped.data_ptr<int64_t>();
  double* co = count_out.data_ptr<double>();
  at::parallel_for(0, U, 4096, [=](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      if (u + kHistoryPrefetch < end) {  // random rows of two [R] vectors: hide the misses
        const int64_t ahead = r[u + kHistoryPrefetch];
        if (ahead >= 0 && ahead < R) {
          __builtin_prefetch(s + ahead, 1);
          __builtin_prefetch(c + ahead, 1);
        }
      }
      const int64_t row = r[u];
      TORCH_CHECK(row >= 0 && row < R, "row ", row, " is outside the state's ", R, " rows");
      sk[u] = step - s[row] - 1;
      s[row] = step;
      const double v = c[row] + static_cast<double>(occ[u]);
      c[row] = v;
      co[u] = v;
    }
  });
}

// Helen's capture: each touched row's gradient g_r, summed from its lookups as the
// update loops do, written into `grad` [U, D] (a buffer reused from step to step), and
// ||g_r||. Keeping g_r instead of the lookups lets the [bags, D] output gradient (larger:
// one row per bag) be freed with the backward, and the perturbation read g_r in order.
at::Tensor row_grad_norms(at::Tensor rows, at::Tensor row_offsets, at::Tensor bags, at::Tensor lookup_weight,
                          at::Tensor bag_grads, at::Tensor grad) {
  const int64_t D = bag_grads.size(1), U = rows.size(0);
  const LookupGrad lg = lookup_grad(D, rows, row_offsets, bags, lookup_weight, bag_grads);
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.is_contiguous() && grad.dim() == 2 && grad.size(0) == U &&
                  grad.size(1) == D,
              "grad must be float32 [U, D]");
  at::Tensor out = at::empty({U}, bag_grads.options());
  float* np = out.data_ptr<float>();
  float* gp = grad.data_ptr<float>();
  at::parallel_for(0, U, 256, [=](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      if (u + kPrefetchRows < end) lg.prefetch(u + kPrefetchRows, D);
      float* __restrict__ gr = gp + u * D;
      lg.row(u, D, gr);
      float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
      for (int64_t j = 0; j < D; ++j) sq += gr[j] * gr[j];
      np[u] = std::sqrt(sq);
    }
  });
  return out;
}

// Helen's perturbation in place: saved[u] <- w[rows[u]], then w[rows[u]] += scale[u] * grad[u].
void perturb_rows_(at::Tensor weight, at::Tensor rows, at::Tensor grad, at::Tensor scale, at::Tensor saved) {
  check_weight(weight);
  const int64_t D = weight.size(1), U = rows.size(0), R = weight.size(0);
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous(), "rows must be int64 [U]");
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.is_contiguous() && grad.dim() == 2 && grad.size(0) == U &&
                  grad.size(1) == D,
              "grad must be float32 [U, D]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == U,
              "scale must be float32 [U]");
  TORCH_CHECK(saved.scalar_type() == at::kFloat && saved.is_contiguous() && saved.dim() == 2 && saved.size(0) == U &&
                  saved.size(1) == D,
              "saved must be float32 [U, D]");
  float* w = weight.data_ptr<float>();
  float* sv = saved.data_ptr<float>();
  const float* gp = grad.data_ptr<float>();
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t u = 0; u < U; ++u) TORCH_CHECK(r[u] >= 0 && r[u] < R, "row ", r[u], " is outside the ", R, " rows");
  const float* sp = scale.data_ptr<float>();
  at::parallel_for(0, U, 256, [=](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      if (u + kPrefetchRows < end) prefetch_row(w, r[u + kPrefetchRows] * D, D);  // rows are random
      float* __restrict__ wr = w + r[u] * D;
      float* __restrict__ so = sv + u * D;
      const float* __restrict__ gr = gp + u * D;
      const float s = sp[u];
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) {
        so[j] = wr[j];
        wr[j] += s * gr[j];
      }
    }
  });
}

// The forward's input pass, in one C++ pass instead of ~15 torch ops over every lookup
// (offset checks, a per-lookup feature index, bounds checks, the block-row shift and the
// batch-major reorder each read or write all L lookups; at one ID per bag they cost more
// than the pooling itself). In: the KJT's feature-major lookups (indices [L], offsets
// [F * B + 1], optional per-sample weights [L]), per feature its table's row count and its
// table's first row in its dim group's block, and per dim group the features it looks up.
// Out, per group: the block rows [L_g], bag offsets and bag lengths, and the per-sample
// weights in the same order -- bags batch-major (b, f) when `batch_major` (one group: the
// pooled output is then the [B, F * D] result itself), else feature-major within the group.
// Last, a status [5] int64: {0} fine; {1, first, last} offsets that do not start at 0 or end
// at L; {2, bag} a negative bag length; {3, lookup, feature, id, count} IDs out of range
// (first of `count`, in input order; the outputs hold them clamped: the caller warns, or
// raises and drops the outputs). `bounds` false:
// IDs are taken as they are (the "off" mode). The offsets are always checked: the pass
// reads through them.
std::vector<at::Tensor> prepare_lookups(at::Tensor indices, at::Tensor offsets, at::Tensor psw,
                                        at::Tensor feature_rows, at::Tensor feature_row_offset,
                                        std::vector<at::Tensor> group_features, bool batch_major, bool bounds) {
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kLong && indices.is_contiguous(),
              "indices must be contiguous int64 [L]");
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong && offsets.is_contiguous() &&
                  offsets.numel() >= 1,
              "offsets must be contiguous int64 [F * B + 1]");
  const int64_t F = feature_rows.numel(), L = indices.numel(), nb = offsets.numel() - 1;
  TORCH_CHECK(F > 0 && nb % F == 0, "offsets must have F * B + 1 entries");
  TORCH_CHECK(feature_rows.scalar_type() == at::kLong && feature_row_offset.scalar_type() == at::kLong &&
                  feature_row_offset.numel() == F && feature_rows.is_contiguous() && feature_row_offset.is_contiguous(),
              "feature_rows and feature_row_offset must be int64 [F]");
  const bool weighted = psw.numel() > 0;
  TORCH_CHECK(!weighted || (psw.scalar_type() == at::kFloat && psw.is_contiguous() && psw.numel() == L),
              "per_sample_weights must be contiguous float32 [L]");
  const int64_t B = nb / F;
  const int64_t* idx = indices.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* limit = feature_rows.data_ptr<int64_t>();
  const int64_t* shift = feature_row_offset.data_ptr<int64_t>();
  const float* pw = weighted ? psw.data_ptr<float>() : nullptr;
  auto i64 = indices.options();
  at::Tensor status = at::zeros({5}, i64);
  int64_t* st = status.data_ptr<int64_t>();
  std::vector<at::Tensor> out;
  if (off[0] != 0 || off[nb] != L) {  // checked before any lookup is read
    st[0] = 1, st[1] = off[0], st[2] = off[nb];
    return {status};
  }
  for (int64_t k = 0; k < nb; ++k) {
    if (off[k + 1] < off[k]) {
      st[0] = 2, st[1] = k;
      return {status};
    }
  }
  std::atomic<bool> any_bad{false};
  for (const at::Tensor& feats_t : group_features) {
    TORCH_CHECK(feats_t.scalar_type() == at::kLong && feats_t.is_contiguous(), "group features must be int64");
    const int64_t Fg = feats_t.numel();
    const int64_t* feats = feats_t.data_ptr<int64_t>();
    for (int64_t j = 0; j < Fg; ++j) TORCH_CHECK(feats[j] >= 0 && feats[j] < F, "group feature out of range");
    // bag k of the group is input bag feats[j] * B + b, with (b, j) = divmod(k, Fg) batch-major and
    // (j, b) = divmod(k, B) otherwise, walked with a cursor: at one ID per bag, two integer
    // divisions per bag cost more than the copy itself.
    struct Cursor {
      int64_t j, b;
    };
    auto cursor_at = [=](int64_t k) { return batch_major ? Cursor{k % Fg, k / Fg} : Cursor{k / B, k % B}; };
    auto advance = [=](Cursor& c) {
      if (batch_major) {
        if (++c.j == Fg) c.j = 0, ++c.b;
      } else if (++c.b == B) {
        c.b = 0, ++c.j;
      }
    };
    const int64_t bags = Fg * B;
    at::Tensor g_off = at::empty({bags + 1}, i64), g_len = at::empty({bags}, i64);
    int64_t* go = g_off.data_ptr<int64_t>();
    int64_t* gl = g_len.data_ptr<int64_t>();
    at::parallel_for(0, bags, 8192, [&](int64_t begin, int64_t end) {  // lengths: strided reads of the offsets
      Cursor c = cursor_at(begin);
      for (int64_t k = begin; k < end; ++k, advance(c)) {
        const int64_t s = feats[c.j] * B + c.b;
        gl[k] = off[s + 1] - off[s];
      }
    });
    go[0] = 0;
    for (int64_t k = 0; k < bags; ++k) go[k + 1] = go[k] + gl[k];
    const int64_t Lg = go[bags];
    at::Tensor g_idx = at::empty({Lg}, i64);
    at::Tensor g_psw = weighted ? at::empty({Lg}, psw.options()) : at::empty({0}, psw.options());
    int64_t* gi = g_idx.data_ptr<int64_t>();
    float* gp = weighted ? g_psw.data_ptr<float>() : nullptr;
    at::parallel_for(0, bags, 4096, [&](int64_t begin, int64_t end) {
      bool bad = false;
      Cursor c = cursor_at(begin);
      for (int64_t k = begin; k < end; ++k, advance(c)) {
        const int64_t f = feats[c.j], s = f * B + c.b;
        const int64_t lim = limit[f], sh = shift[f];
        const int64_t a = off[s], n = gl[k], o = go[k];
        for (int64_t i = 0; i < n; ++i) {
          int64_t r = idx[a + i];
          if (bounds && (r < 0 || r >= lim)) {
            bad = true;
            r = r < 0 ? 0 : lim - 1;
          }
          gi[o + i] = r + sh;
          if (gp) gp[o + i] = pw[a + i];
        }
      }
      if (bad) any_bad.store(true, std::memory_order_relaxed);
    });
    out.push_back(g_idx);
    out.push_back(g_off);
    out.push_back(g_len);
    out.push_back(g_psw);
  }
  if (any_bad.load()) {  // rare: find the first bad ID in input order and count them all
    int64_t count = 0;
    for (int64_t f = 0; f < F; ++f) {
      for (int64_t i = off[f * B]; i < off[(f + 1) * B]; ++i) {
        if (idx[i] < 0 || idx[i] >= limit[f]) {
          if (count++ == 0) st[0] = 3, st[1] = i, st[2] = f, st[3] = idx[i];
        }
      }
    }
    st[4] = count;
  }
  out.push_back(status);
  return out;
}

// Helen's restore: w[rows[u]] <- saved[u], bit-exact (index_copy_ with the next rows
// prefetched and the rows split over the threads: the rows are random, so the
// latency of each row's first touch, not the bytes, is what a plain copy waits on).
void restore_rows_(at::Tensor weight, at::Tensor rows, at::Tensor saved) {
  check_weight(weight);
  const int64_t D = weight.size(1), U = rows.numel(), R = weight.size(0);
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous(), "rows must be int64 [U]");
  TORCH_CHECK(saved.scalar_type() == at::kFloat && saved.is_contiguous() && saved.dim() == 2 && saved.size(0) == U &&
                  saved.size(1) == D,
              "saved must be float32 [U, D]");
  float* w = weight.data_ptr<float>();
  const float* sv = saved.data_ptr<float>();
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t u = 0; u < U; ++u) TORCH_CHECK(r[u] >= 0 && r[u] < R, "row ", r[u], " is outside the ", R, " rows");
  at::parallel_for(0, U, 256, [=](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      if (u + kPrefetchRows < end) prefetch_row(w, r[u + kPrefetchRows] * D, D);
      std::memcpy(w + r[u] * D, sv + u * D, sizeof(float) * D);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("prepare_lookups", &prepare_lookups, "the forward's checks, block rows and bag order in one pass");
  m.def("row_history_", &row_history_, "s_r and c_r of the touched rows (track_row_history) in place");
  m.def("coalesce_lookups", &coalesce_lookups, "group lookups by row in one radix pass");
  m.def("adam_rows_", &adam_rows_, "fused lazy Adam on rows (in place)");
  m.def("rowwise_adagrad_rows_", &rowwise_adagrad_rows_, "fused row-wise Adagrad / RMSprop on rows (in place)");
  m.def("row_grad_norms", &row_grad_norms, "g_r and ||g_r|| of each touched row (Helen's capture)");
  m.def("perturb_rows_", &perturb_rows_, "w_r += scale_r g_r, saving the originals (Helen)");
  m.def("restore_rows_", &restore_rows_, "w_r <- saved_r (Helen's restore)");
  m.attr("source_hash") = TRA_STR(TORCHREC_ADAPTIVE_SOURCE_HASH);
  m.attr("isa") = TRA_STR(TORCHREC_ADAPTIVE_ISA);
}
