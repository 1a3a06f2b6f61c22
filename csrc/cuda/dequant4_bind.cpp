// torch side of the dequant4_delta CUDA kernel (dequant4.cu): check the tensors, turn the
// mask into a MaskRef (mask_bind.h), pick the device and stream, launch. Every check runs
// before the launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "dequant4.cuh"
#include "mask_bind.h"
#include "seat/dequant4.h"
#include "torch_dtype.h"

namespace {

void check_sized(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const at::Device& device, const char* name,
                 const char* who) {
  TORCH_CHECK(t.device() == device && t.is_contiguous() && t.scalar_type() == dtype && t.numel() == numel, who, ": ",
              name, " must be a contiguous ", dtype, " tensor of ", numel, " elements on ", device, "; got ",
              t.numel(), " ", t.scalar_type(), " on ", t.device());
}

void dequant4_delta_cuda(at::Tensor out, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                         int64_t blocksize, const std::optional<at::Tensor>& nested_absmax,
                         const std::optional<at::Tensor>& nested_code, int64_t nested_blocksize, double offset,
                         const at::Tensor& delta, int64_t encoding, const at::Tensor& mask_index,
                         const at::Tensor& mask_offsets, at::IntArrayRef mask_ints) {
  constexpr const char* who = "dequant4_delta_ CUDA kernel";
  TORCH_CHECK(out.is_cuda() && out.is_contiguous(), who, ": out must be a contiguous CUDA tensor");
  const at::Device device = out.device();
  const auto dtype = out.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, who,
              ": out must be float32, float16 or bfloat16");
  TORCH_CHECK(blocksize >= seat::kMinQuantBlock && blocksize <= seat::kMaxQuantBlock &&
                  (blocksize & (blocksize - 1)) == 0,
              who, ": blocksize must be a power of two in [32, 4096]; got ", blocksize);
  const int64_t numel = out.numel();
  const int64_t n_blocks = seat::n_quant_blocks(numel, blocksize);
  const bool nested = nested_absmax.has_value();
  check_sized(packed, at::kByte, (numel + 1) / 2, device, "packed", who);
  check_sized(absmax, nested ? at::kByte : at::kFloat, n_blocks, device, "absmax", who);
  check_sized(code, at::kFloat, 16, device, "code", who);
  seat::Quant4Ref q{packed.data_ptr<uint8_t>(), absmax.data_ptr(), code.data_ptr<float>(), nullptr, nullptr, numel,
                    blocksize, 1, static_cast<float>(offset)};
  if (nested) {
    TORCH_CHECK(nested_code.has_value() && nested_blocksize > 0, who,
                ": double quantization needs nested_code and a positive nested_blocksize");
    check_sized(*nested_absmax, at::kFloat, seat::n_quant_blocks(n_blocks, nested_blocksize), device,
                "nested_absmax", who);
    check_sized(*nested_code, at::kFloat, 256, device, "nested_code", who);
    q.nested_absmax = nested_absmax->data_ptr<float>();
    q.nested_code = nested_code->data_ptr<float>();
    q.nested_blocksize = nested_blocksize;
  }
  TORCH_CHECK(seat::cuda::is_flat(delta, device) && delta.scalar_type() == dtype, who,
              ": delta must be a contiguous 1-D tensor of out's dtype on ", device);
  TORCH_CHECK(mask_ints.size() == seat::kMaskInts, who, ": mask_ints needs ", seat::kMaskInts, " ints");
  const seat::MaskRef m = seat::cuda::mask_ref(encoding, mask_index, mask_offsets, mask_ints.data(), numel,
                                               delta.numel(), device, who);
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  seat::cuda::check_launch(
      seat::cuda::dequant4_delta(static_cast<seat::Encoding>(encoding), m, q, out.data_ptr(),
                                 seat::cuda::ptr_or_null(delta), seat::to_seat_dtype(dtype, who), nested,
                                 c10::cuda::getCurrentCUDAStream()),
      who);
}

}  // namespace

TORCH_LIBRARY_IMPL(seat_C, CUDA, m) { m.impl("dequant4_delta_", &dequant4_delta_cuda); }
