// CPU kernels of the block16-mask ops (masked_gather_block16_, masked_swap_block16_,
// sparse_adamw_block16_): OpenMP over the mask's blocks of 65536 elements; the entries of
// block b are block_starts[b] .. block_starts[b + 1] - 1 and sit at b * 65536 + offsets[j]
// (seat/block16.h). Inputs were validated by python/seat/ops; the TORCH_CHECKs here guard
// direct callers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "seat/adamw.h"
#include "seat/block16.h"

namespace {

// Entries per parallel region below which threads cost more than they save.
constexpr int64_t kParallelGrain = 1 << 15;

struct Block16Ref {
  const int32_t* starts;
  const uint16_t* offsets;
  int64_t n_blocks;
  int64_t nnz;
};

Block16Ref block16_ref(const at::Tensor& block_starts, const at::Tensor& offsets, int64_t numel, const char* who) {
  const int64_t n_blocks = seat::block16_n_blocks(numel);
  TORCH_CHECK(block_starts.device().is_cpu() && block_starts.is_contiguous() &&
                  block_starts.scalar_type() == at::kInt && block_starts.dim() == 1 &&
                  block_starts.numel() == n_blocks + 1,
              who, ": block_starts must be a contiguous int32 CPU tensor of ceil(numel / 65536) + 1 entries");
  TORCH_CHECK(offsets.device().is_cpu() && offsets.is_contiguous() && offsets.scalar_type() == at::kUInt16 &&
                  offsets.dim() == 1,
              who, ": offsets must be a contiguous 1-D uint16 CPU tensor");
  return {block_starts.data_ptr<int32_t>(), static_cast<const uint16_t*>(offsets.data_ptr()), n_blocks,
          offsets.numel()};
}

// f(position, slot) for every entry, blocks in parallel.
template <typename F>
void for_each_entry(const Block16Ref& m, F f) {
#pragma omp parallel for schedule(dynamic, 1) if (m.nnz > kParallelGrain) num_threads(at::get_num_threads())
  for (int64_t b = 0; b < m.n_blocks; ++b) {
    const int64_t base = b * seat::kBlock16;
    for (int64_t j = m.starts[b]; j < m.starts[b + 1]; ++j) f(base + m.offsets[j], j);
  }
}

void masked_gather_block16_cpu(at::Tensor out, const at::Tensor& dense, const at::Tensor& block_starts,
                               const at::Tensor& offsets) {
  TORCH_CHECK(out.device().is_cpu() && dense.device().is_cpu() && out.is_contiguous() && dense.is_contiguous(),
              "masked_gather_block16_ CPU kernel: out and dense must be contiguous CPU tensors");
  const auto m = block16_ref(block_starts, offsets, dense.numel(), "masked_gather_block16_ CPU kernel");
  TORCH_CHECK(out.dim() == 1 && out.numel() == m.nnz, "masked_gather_block16_ CPU kernel: out must have one entry "
              "per offset");
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "masked_gather_block16_cpu_out", [&] {
    using acc_t = scalar_t;
    acc_t* o = out.data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dense.scalar_type(), "masked_gather_block16_cpu_in",
                                    [&] {
      const scalar_t* d = dense.data_ptr<scalar_t>();
      for_each_entry(m, [&](int64_t pos, int64_t j) {
        seat::gather_accumulate<acc_t>(o, j, static_cast<acc_t>(d[pos]));
      });
    });
  });
}

template <typename Bits>
void swap_entries(const Block16Ref& m, Bits* param, Bits* values) {
  for_each_entry(m, [&](int64_t pos, int64_t j) { seat::swap_bits<Bits>(param + pos, values + j); });
}

void masked_swap_block16_cpu(at::Tensor param, const at::Tensor& block_starts, const at::Tensor& offsets,
                             at::Tensor values) {
  TORCH_CHECK(param.device().is_cpu() && values.device().is_cpu() && param.is_contiguous() && values.is_contiguous(),
              "masked_swap_block16_ CPU kernel: param and values must be contiguous CPU tensors");
  TORCH_CHECK(param.scalar_type() == values.scalar_type(),
              "masked_swap_block16_ CPU kernel: values must have param's dtype");
  const auto m = block16_ref(block_starts, offsets, param.numel(), "masked_swap_block16_ CPU kernel");
  TORCH_CHECK(values.dim() == 1 && values.numel() == m.nnz,
              "masked_swap_block16_ CPU kernel: values must have one entry per offset");
  // The swap moves bits, not numbers: dispatch on the element width only.
  switch (param.element_size()) {
    case 1: swap_entries(m, static_cast<uint8_t*>(param.data_ptr()), static_cast<uint8_t*>(values.data_ptr())); break;
    case 2: swap_entries(m, static_cast<uint16_t*>(param.data_ptr()), static_cast<uint16_t*>(values.data_ptr())); break;
    case 4: swap_entries(m, static_cast<uint32_t*>(param.data_ptr()), static_cast<uint32_t*>(values.data_ptr())); break;
    case 8: swap_entries(m, static_cast<uint64_t*>(param.data_ptr()), static_cast<uint64_t*>(values.data_ptr())); break;
    default: TORCH_CHECK(false, "masked_swap_block16_ CPU kernel: unsupported element size ", param.element_size());
  }
}

struct HalfIO {
  using storage = c10::Half;
  template <typename T>
  static T load(const c10::Half* p) { return static_cast<T>(static_cast<float>(*p)); }
  template <typename T>
  static void store(c10::Half* p, T w, bool, uint32_t) { *p = c10::Half(static_cast<float>(w)); }
};

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

template <typename ParamIO, typename T, typename G = T>
void update_tensor(const Block16Ref& mask, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq, const at::Tensor& master, const at::Tensor& max_exp_avg_sq,
                   const seat::AdamWScalars<T>& s, bool maximize, bool stochastic, uint32_t key, bool dense_state) {
  auto* p = static_cast<typename ParamIO::storage*>(param.data_ptr());
  const G* g = static_cast<const G*>(grad.data_ptr());
  T* m = exp_avg.data_ptr<T>();
  T* v = exp_avg_sq.data_ptr<T>();
  T* w32 = data_or_null<T>(master);
  T* vmax = data_or_null<T>(max_exp_avg_sq);
  for_each_entry(mask, [&](int64_t pos, int64_t j) {
    seat::sparse_adamw_entry<ParamIO, T, G>(p, pos, g, m, v, w32, vmax, j, s, maximize, stochastic, key, dense_state);
  });
}

// fp32 state with fp32 compact grads, or bf16 ones (uint16_t bits, upcast on load).
template <typename ParamIO>
void update_fp32_state(const Block16Ref& mask, const at::Tensor& param, const at::Tensor& grad,
                       const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const at::Tensor& master,
                       const at::Tensor& max_exp_avg_sq, const seat::AdamWScalars<float>& s, bool maximize,
                       bool stochastic, uint32_t key, bool dense_state) {
  if (grad.scalar_type() == at::kBFloat16) {
    update_tensor<ParamIO, float, uint16_t>(mask, param, grad, exp_avg, exp_avg_sq, master, max_exp_avg_sq, s,
                                            maximize, stochastic, key, dense_state);
  } else {
    TORCH_CHECK(grad.scalar_type() == at::kFloat,
                "sparse_adamw_block16_ CPU kernel: grads must be float32 or bfloat16");
    update_tensor<ParamIO, float>(mask, param, grad, exp_avg, exp_avg_sq, master, max_exp_avg_sq, s, maximize,
                                  stochastic, key, dense_state);
  }
}

void sparse_adamw_block16_cpu(at::TensorList params, at::TensorList block_starts, at::TensorList offsets,
                              at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                              at::TensorList masters, at::TensorList max_exp_avg_sqs, at::ArrayRef<double> scalars,
                              bool maximize, bool stochastic, int64_t step_key, bool dense_state) {
  TORCH_CHECK(scalars.size() == seat::kAdamWScalars, "sparse_adamw_block16_ CPU kernel: expected 7 scalars");
  const auto s32 = seat::adamw_scalars<float>(scalars.data());
  const auto s64 = seat::adamw_scalars<double>(scalars.data());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& param = params[i];
    TORCH_CHECK(param.device().is_cpu() && param.is_contiguous(), "sparse_adamw_block16_ CPU kernel: params[", i,
                "] must be a contiguous CPU tensor");
    if (offsets[i].numel() == 0) continue;
    const auto mask = block16_ref(block_starts[i], offsets[i], param.numel(), "sparse_adamw_block16_ CPU kernel");
    const uint32_t key = seat::tensor_key(static_cast<uint32_t>(step_key), static_cast<uint32_t>(i));
    const auto state = exp_avgs[i].scalar_type();
    switch (param.scalar_type()) {
      case at::kBFloat16:
        TORCH_CHECK(state == at::kFloat, "sparse_adamw_block16_ CPU kernel: bf16 params need float32 state");
        update_fp32_state<seat::BF16IO>(mask, param, grads[i], exp_avgs[i], exp_avg_sqs[i], masters[i],
                                           max_exp_avg_sqs[i], s32, maximize, stochastic, key, dense_state);
        break;
      case at::kHalf:
        TORCH_CHECK(state == at::kFloat, "sparse_adamw_block16_ CPU kernel: fp16 params need float32 state");
        update_fp32_state<HalfIO>(mask, param, grads[i], exp_avgs[i], exp_avg_sqs[i], masters[i],
                                     max_exp_avg_sqs[i], s32, maximize, false, key, dense_state);
        break;
      case at::kFloat:
        TORCH_CHECK(state == at::kFloat, "sparse_adamw_block16_ CPU kernel: fp32 params need float32 state");
        update_fp32_state<seat::PlainIO<float>>(mask, param, grads[i], exp_avgs[i], exp_avg_sqs[i], masters[i],
                                                   max_exp_avg_sqs[i], s32, maximize, false, key, dense_state);
        break;
      case at::kDouble:
        TORCH_CHECK(state == at::kDouble && grads[i].scalar_type() == at::kDouble,
                    "sparse_adamw_block16_ CPU kernel: fp64 params need float64 state and grads");
        update_tensor<seat::PlainIO<double>, double>(mask, param, grads[i], exp_avgs[i], exp_avg_sqs[i], masters[i],
                                                     max_exp_avg_sqs[i], s64, maximize, false, key, dense_state);
        break;
      default:
        TORCH_CHECK(false, "sparse_adamw_block16_ CPU kernel: unsupported param dtype ", param.scalar_type());
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(seat_C, CPU, m) {
  m.impl("masked_gather_block16_", &masked_gather_block16_cpu);
  m.impl("masked_swap_block16_", &masked_swap_block16_cpu);
  m.impl("sparse_adamw_block16_", &sparse_adamw_block16_cpu);
}
