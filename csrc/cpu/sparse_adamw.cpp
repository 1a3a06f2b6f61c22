// CPU kernel of sparse_adamw_: per tensor, an OpenMP loop over the compact entries
// running the shared per-element step (seat/adamw.h). The compact arrays are walked
// contiguously; only the param is touched at idx[i].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "seat/adamw.h"
#include "masked_entries.h"

namespace {

constexpr int64_t kParallelGrain = 1 << 14;
constexpr int64_t kPrefetchAhead = 16;

using seat::cpu::HalfIO;
using seat::cpu::data_or_null;

template <typename ParamIO, typename T, typename G = T>
void update_tensor(const at::Tensor& param, const at::Tensor& idx, const at::Tensor& grad, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq, const at::Tensor& master, const at::Tensor& max_exp_avg_sq,
                   const seat::AdamWScalars<T>& s, bool maximize, bool stochastic, uint32_t key, bool dense_state) {
  auto* p = static_cast<typename ParamIO::storage*>(param.data_ptr());
  const int32_t* ix = idx.data_ptr<int32_t>();
  const G* g = static_cast<const G*>(grad.data_ptr());
  T* m = exp_avg.data_ptr<T>();
  T* v = exp_avg_sq.data_ptr<T>();
  T* w32 = data_or_null<T>(master);
  T* vmax = data_or_null<T>(max_exp_avg_sq);
  const int64_t nnz = idx.numel();
#pragma omp parallel for schedule(static) if (nnz > kParallelGrain) num_threads(at::get_num_threads())
  for (int64_t i = 0; i < nnz; ++i) {
    // the param is touched at scattered positions: ask for lines a few entries ahead
    if (i + kPrefetchAhead < nnz) __builtin_prefetch(p + ix[i + kPrefetchAhead], 1);
    seat::sparse_adamw_element<ParamIO, T, G>(p, ix, g, m, v, w32, vmax, i, s, maximize, stochastic, key, dense_state);
  }
}

// fp32 state with fp32 compact grads, or bf16 ones (uint16_t bits, upcast on load).
template <typename ParamIO>
void update_fp32_state(const at::Tensor& param, const at::Tensor& idx, const at::Tensor& grad,
                       const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const at::Tensor& master,
                       const at::Tensor& max_exp_avg_sq, const seat::AdamWScalars<float>& s, bool maximize,
                       bool stochastic, uint32_t key, bool dense_state) {
  TORCH_CHECK(exp_avg.scalar_type() == at::kFloat, "sparse_adamw_ CPU kernel: ", param.scalar_type(),
              " params need float32 state");
  if (grad.scalar_type() == at::kBFloat16) {
    update_tensor<ParamIO, float, uint16_t>(param, idx, grad, exp_avg, exp_avg_sq, master, max_exp_avg_sq, s,
                                            maximize, stochastic, key, dense_state);
  } else {
    TORCH_CHECK(grad.scalar_type() == at::kFloat, "sparse_adamw_ CPU kernel: grads must be float32 or bfloat16");
    update_tensor<ParamIO, float>(param, idx, grad, exp_avg, exp_avg_sq, master, max_exp_avg_sq, s, maximize,
                                  stochastic, key, dense_state);
  }
}

void sparse_adamw_cpu(at::TensorList params, at::TensorList idxs, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList masters, at::TensorList max_exp_avg_sqs,
                      at::ArrayRef<double> scalars, bool maximize, bool stochastic, int64_t step_key,
                      bool dense_state) {
  TORCH_CHECK(scalars.size() == seat::kAdamWScalars, "sparse_adamw_ CPU kernel: expected 7 scalars");
  const auto s32 = seat::adamw_scalars<float>(scalars.data());
  const auto s64 = seat::adamw_scalars<double>(scalars.data());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& param = params[i];
    TORCH_CHECK(param.device().is_cpu() && param.is_contiguous(), "sparse_adamw_ CPU kernel: params[", i,
                "] must be a contiguous CPU tensor");
    if (idxs[i].numel() == 0) continue;
    const uint32_t key = seat::tensor_key(static_cast<uint32_t>(step_key), static_cast<uint32_t>(i));
    switch (param.scalar_type()) {
      case at::kBFloat16:
        update_fp32_state<seat::BF16IO>(param, idxs[i], grads[i], exp_avgs[i], exp_avg_sqs[i], masters[i],
                                        max_exp_avg_sqs[i], s32, maximize, stochastic, key, dense_state);
        break;
      case at::kHalf:
        update_fp32_state<HalfIO>(param, idxs[i], grads[i], exp_avgs[i], exp_avg_sqs[i], masters[i],
                                  max_exp_avg_sqs[i], s32, maximize, false, key, dense_state);
        break;
      case at::kFloat:
        update_fp32_state<seat::PlainIO<float>>(param, idxs[i], grads[i], exp_avgs[i], exp_avg_sqs[i], masters[i],
                                                max_exp_avg_sqs[i], s32, maximize, false, key, dense_state);
        break;
      case at::kDouble:
        TORCH_CHECK(exp_avgs[i].scalar_type() == at::kDouble && grads[i].scalar_type() == at::kDouble,
                    "sparse_adamw_ CPU kernel: fp64 params need float64 state and grads");
        update_tensor<seat::PlainIO<double>, double>(param, idxs[i], grads[i], exp_avgs[i], exp_avg_sqs[i],
                                                     masters[i], max_exp_avg_sqs[i], s64, maximize, false, key, dense_state);
        break;
      default:
        TORCH_CHECK(false, "sparse_adamw_ CPU kernel: unsupported param dtype ", param.scalar_type());
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(seat_C, CPU, m) { m.impl("sparse_adamw_", &sparse_adamw_cpu); }
