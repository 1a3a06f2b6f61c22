// torch side of the sparse-update CUDA kernels (sparse_update.cu): check the tensors, turn
// (encoding, mask_index, mask_offsets, mask_ints) into a MaskRef, pick the current device
// and stream, call the launchers. sparse_adamw_ groups its tensors by dtypes and launches
// once per group over a pointer table copied from pinned memory (split at 65535 tensors,
// the grid.y limit). Every check runs before the first launch, so a bad entry leaves all
// tensors untouched. Nothing here switches on the encoding: the launchers do, once.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <map>
#include <tuple>
#include <vector>

#include "seat/adamw.h"
#include "seat/masks.h"
#include "mask_bind.h"
#include "sparse_update.cuh"
#include "torch_dtype.h"

namespace {

using seat::Dtype;
using seat::Encoding;
using seat::MaskRef;
using seat::cuda::TensorRef;

constexpr int64_t kMaxTensorsPerLaunch = 65535;  // grid.y

using seat::cuda::check_launch;
using seat::cuda::is_flat;
using seat::cuda::mask_ref;
using seat::cuda::ptr_or_null;

void masked_gather_cuda(at::Tensor out, const at::Tensor& dense, int64_t encoding,
                        const at::Tensor& mask_index, const at::Tensor& mask_offsets, at::IntArrayRef mask_ints) {
  constexpr const char* who = "masked_gather_ CUDA kernel";
  TORCH_CHECK(dense.is_cuda() && dense.is_contiguous(), who, ": dense must be a contiguous CUDA tensor");
  TORCH_CHECK(is_flat(out, dense.device()), who, ": out must be a contiguous 1-D tensor on dense's device");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble ||
                  out.scalar_type() == at::kBFloat16,
              who, ": out must be float32, float64 or bfloat16, got ", out.scalar_type());
  TORCH_CHECK(mask_ints.size() == seat::kMaskInts, who, ": mask_ints needs ", seat::kMaskInts, " ints");
  const MaskRef m = mask_ref(encoding, mask_index, mask_offsets, mask_ints.data(), dense.numel(), out.numel(),
                             dense.device(), who);
  const c10::cuda::CUDAGuard guard(dense.device());
  check_launch(seat::cuda::masked_gather(static_cast<Encoding>(encoding), m, out.data_ptr(),
                                         seat::to_seat_dtype(out.scalar_type(), who), dense.data_ptr(),
                                         seat::to_seat_dtype(dense.scalar_type(), who),
                                         c10::cuda::getCurrentCUDAStream()),
               who);
}

void masked_swap_cuda(at::Tensor param, at::Tensor values, int64_t encoding,
                      const at::Tensor& mask_index, const at::Tensor& mask_offsets, at::IntArrayRef mask_ints) {
  constexpr const char* who = "masked_swap_ CUDA kernel";
  TORCH_CHECK(param.is_cuda() && param.is_contiguous(), who, ": param must be a contiguous CUDA tensor");
  TORCH_CHECK(is_flat(values, param.device()) && values.scalar_type() == param.scalar_type(), who,
              ": values must be a contiguous 1-D tensor of param's dtype on param's device");
  TORCH_CHECK(mask_ints.size() == seat::kMaskInts, who, ": mask_ints needs ", seat::kMaskInts, " ints");
  const MaskRef m = mask_ref(encoding, mask_index, mask_offsets, mask_ints.data(), param.numel(), values.numel(),
                             param.device(), who);
  const c10::cuda::CUDAGuard guard(param.device());
  check_launch(seat::cuda::masked_swap(static_cast<Encoding>(encoding), m, param.data_ptr(), values.data_ptr(),
                                       param.element_size(), c10::cuda::getCurrentCUDAStream()),
               who);
}

void sparse_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList masters, at::TensorList max_exp_avg_sqs,
                       int64_t encoding, at::TensorList mask_indices, at::TensorList mask_offsets,
                       at::IntArrayRef mask_ints, at::ArrayRef<double> scalars, bool maximize, bool stochastic,
                       int64_t step_key, bool dense_state) {
  constexpr const char* who = "sparse_adamw_ CUDA kernel";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && masters.size() == n &&
                  max_exp_avg_sqs.size() == n && mask_indices.size() == n && mask_offsets.size() == n,
              who, ": every tensor list needs one entry per param");
  TORCH_CHECK(mask_ints.size() == n * seat::kMaskInts, who, ": mask_ints needs ", seat::kMaskInts, " ints per param");
  TORCH_CHECK(scalars.size() == seat::kAdamWScalars, who, ": expected ", seat::kAdamWScalars, " scalars");
  if (n == 0) return;
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), who, ": params must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(device);

  std::map<std::tuple<Dtype, Dtype, Dtype>, std::vector<TensorRef>> groups;  // (param, state, grad) dtypes
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& param = params[i];
    const at::Tensor& grad = grads[i];
    TORCH_CHECK(param.device() == device && param.is_contiguous(), who, ": params[", i, "] must be contiguous on ",
                device);
    const int64_t nnz = grad.numel();
    if (nnz == 0) continue;
    TORCH_CHECK(is_flat(grad, device), who, ": grads[", i, "] must be a contiguous 1-D tensor on ", device);
    // State is compact (one per entry) or, with dense_state, full-size (one per element).
    const int64_t state_numel = dense_state ? param.numel() : nnz;
    const at::ScalarType state = exp_avgs[i].scalar_type();
    const auto state_ok = [&](const at::Tensor& t, bool optional) {
      return (optional && t.numel() == 0) ||
             (t.device() == device && t.is_contiguous() && t.scalar_type() == state && t.numel() == state_numel);
    };
    TORCH_CHECK(state_ok(exp_avgs[i], false) && state_ok(exp_avg_sqs[i], false) && state_ok(masters[i], true) &&
                    state_ok(max_exp_avg_sqs[i], true),
                who, ": exp_avgs[", i, "], exp_avg_sqs[", i, "] and (when not empty) masters[", i,
                "], max_exp_avg_sqs[", i, "] must be contiguous tensors of one dtype with ", state_numel,
                " elements on ", device);
    const auto dtypes = std::make_tuple(seat::to_seat_dtype(param.scalar_type(), who),
                                        seat::to_seat_dtype(state, who),
                                        seat::to_seat_dtype(grad.scalar_type(), who));
    TORCH_CHECK(seat::cuda::sparse_adamw_supports(std::get<0>(dtypes), std::get<1>(dtypes), std::get<2>(dtypes)),
                who, ": unsupported dtypes at ", i, ": param ", param.scalar_type(), ", state ", state, ", grad ",
                grad.scalar_type());
    const MaskRef mask = mask_ref(encoding, mask_indices[i], mask_offsets[i], mask_ints.data() + i * seat::kMaskInts,
                                  param.numel(), nnz, device, who);
    groups[dtypes].push_back({param.data_ptr(), grad.data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
                              ptr_or_null(masters[i]), ptr_or_null(max_exp_avg_sqs[i]), mask,
                              static_cast<int64_t>(i)});
  }

  const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  for (const auto& [dtypes, refs] : groups) {
    const auto [param_dtype, state_dtype, grad_dtype] = dtypes;
    for (size_t first = 0; first < refs.size(); first += kMaxTensorsPerLaunch) {
      const int64_t count = std::min<int64_t>(kMaxTensorsPerLaunch, static_cast<int64_t>(refs.size() - first));
      const int64_t bytes = count * static_cast<int64_t>(sizeof(TensorRef));
      at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
      std::memcpy(host.data_ptr(), refs.data() + first, bytes);
      // Stream-ordered: the copy, the kernel and any reuse of `table`'s memory after it is
      // freed all run on `stream`.
      const at::Tensor table = host.to(device, /*non_blocking=*/true);
      check_launch(seat::cuda::sparse_adamw(static_cast<Encoding>(encoding), refs.data() + first,
                                            static_cast<const TensorRef*>(table.data_ptr()), count, param_dtype,
                                            state_dtype, grad_dtype, scalars.data(), maximize, stochastic,
                                            static_cast<uint32_t>(step_key), dense_state, stream),
                   who);
    }
  }
}

void implicit_block_counts_cuda(at::Tensor counts, int64_t numel, int64_t key, int64_t threshold,
                                int64_t block) {
  constexpr const char* who = "implicit_block_counts_ CUDA kernel";
  TORCH_CHECK(block > 0 && numel >= 0, who, ": block must be > 0 and numel >= 0");
  TORCH_CHECK(key >= 0 && key <= std::numeric_limits<uint32_t>::max(), who, ": key must be a uint32, got ", key);
  TORCH_CHECK(counts.is_cuda() && counts.is_contiguous() && counts.scalar_type() == at::kInt &&
                  counts.numel() == seat::n_blocks_of(numel, block),
              who, ": counts must be a contiguous int32 CUDA tensor of ceil(numel / block) entries");
  const c10::cuda::CUDAGuard guard(counts.device());
  check_launch(seat::cuda::implicit_block_counts(counts.data_ptr<int32_t>(), numel, static_cast<uint32_t>(key),
                                                 threshold, block, c10::cuda::getCurrentCUDAStream()),
               who);
}

}  // namespace

TORCH_LIBRARY_IMPL(seat_C, CUDA, m) {
  m.impl("masked_gather_", &masked_gather_cuda);
  m.impl("masked_swap_", &masked_swap_cuda);
  m.impl("sparse_adamw_", &sparse_adamw_cuda);
  m.impl("implicit_block_counts_", &implicit_block_counts_cuda);
}
