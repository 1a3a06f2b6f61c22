// CPU pieces shared by the kernels of every mask encoding (masked_ops.cpp for int32
// indices, block16_masks.cpp, implicit_masks.cpp; sparse_adamw.cpp takes HalfIO): the bit
// swap and the per-parameter AdamW step with its dtype dispatch, written once over
// `each`, a callable such that each(f) runs f(position, slot)
// on every entry of one parameter's mask (position in the flat param, slot in the compact
// arrays). An encoding only says how to walk its entries.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "seat/adamw.h"

namespace seat {
namespace cpu {

// fp16 params: load and store through float (no stochastic rounding for fp16).
struct HalfIO {
  using storage = c10::Half;
  template <typename T>
  static T load(const c10::Half* p) { return static_cast<T>(static_cast<float>(*p)); }
  template <typename T>
  static void store(c10::Half* p, T w, bool, uint32_t) { *p = c10::Half(static_cast<float>(w)); }
};

// Optional state travels as an empty tensor: null then.
template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

template <typename Bits, typename Each>
void swap_entries(const Each& each, void* param, void* values) {
  Bits* p = static_cast<Bits*>(param);
  Bits* v = static_cast<Bits*>(values);
  each([&](int64_t pos, int64_t slot) { seat::swap_bits<Bits>(p + pos, v + slot); });
}

// param.view(-1)[entries] <-> values, bit for bit: the swap moves bits, not numbers, so it
// dispatches on the element width only.
template <typename Each>
void swap_by_width(const Each& each, const at::Tensor& param, const at::Tensor& values, const char* who) {
  switch (param.element_size()) {
    case 1: swap_entries<uint8_t>(each, param.data_ptr(), values.data_ptr()); break;
    case 2: swap_entries<uint16_t>(each, param.data_ptr(), values.data_ptr()); break;
    case 4: swap_entries<uint32_t>(each, param.data_ptr(), values.data_ptr()); break;
    case 8: swap_entries<uint64_t>(each, param.data_ptr(), values.data_ptr()); break;
    default: TORCH_CHECK(false, who, ": unsupported element size ", param.element_size());
  }
}

template <typename ParamIO, typename T, typename G = T, typename Each>
void adamw_entries(const Each& each, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq, const at::Tensor& master, const at::Tensor& max_exp_avg_sq,
                   const seat::AdamWScalars<T>& s, bool maximize, bool stochastic, uint32_t key, bool dense_state) {
  auto* p = static_cast<typename ParamIO::storage*>(param.data_ptr());
  const G* g = static_cast<const G*>(grad.data_ptr());
  T* m = exp_avg.data_ptr<T>();
  T* v = exp_avg_sq.data_ptr<T>();
  T* w32 = data_or_null<T>(master);
  T* vmax = data_or_null<T>(max_exp_avg_sq);
  each([&](int64_t pos, int64_t slot) {
    seat::sparse_adamw_entry<ParamIO, T, G>(p, pos, g, m, v, w32, vmax, slot, s, maximize, stochastic, key,
                                            dense_state);
  });
}

// fp32 state with fp32 compact grads, or bf16 ones (uint16_t bits, upcast on load).
template <typename ParamIO, typename Each>
void adamw_fp32_state(const Each& each, const char* who, const at::Tensor& param, const at::Tensor& grad,
                      const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const at::Tensor& master,
                      const at::Tensor& max_exp_avg_sq, const seat::AdamWScalars<float>& s, bool maximize,
                      bool stochastic, uint32_t key, bool dense_state) {
  if (grad.scalar_type() == at::kBFloat16) {
    adamw_entries<ParamIO, float, uint16_t>(each, param, grad, exp_avg, exp_avg_sq, master, max_exp_avg_sq, s,
                                            maximize, stochastic, key, dense_state);
  } else {
    TORCH_CHECK(grad.scalar_type() == at::kFloat, who, ": grads must be float32 or bfloat16");
    adamw_entries<ParamIO, float>(each, param, grad, exp_avg, exp_avg_sq, master, max_exp_avg_sq, s, maximize,
                                  stochastic, key, dense_state);
  }
}

// One parameter's AdamW step on its mask's entries, dispatched on the param dtype.
// Stochastic rounding applies to bf16 params only.
template <typename Each>
void adamw_param(const Each& each, const char* who, const at::Tensor& param, const at::Tensor& grad,
                 const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const at::Tensor& master,
                 const at::Tensor& max_exp_avg_sq, const seat::AdamWScalars<float>& s32,
                 const seat::AdamWScalars<double>& s64, bool maximize, bool stochastic, uint32_t key,
                 bool dense_state) {
  const auto state = exp_avg.scalar_type();
  switch (param.scalar_type()) {
    case at::kBFloat16:
      TORCH_CHECK(state == at::kFloat, who, ": bf16 params need float32 state");
      adamw_fp32_state<seat::BF16IO>(each, who, param, grad, exp_avg, exp_avg_sq, master, max_exp_avg_sq, s32,
                                     maximize, stochastic, key, dense_state);
      break;
    case at::kHalf:
      TORCH_CHECK(state == at::kFloat, who, ": fp16 params need float32 state");
      adamw_fp32_state<HalfIO>(each, who, param, grad, exp_avg, exp_avg_sq, master, max_exp_avg_sq, s32, maximize,
                               false, key, dense_state);
      break;
    case at::kFloat:
      TORCH_CHECK(state == at::kFloat, who, ": fp32 params need float32 state");
      adamw_fp32_state<seat::PlainIO<float>>(each, who, param, grad, exp_avg, exp_avg_sq, master, max_exp_avg_sq,
                                             s32, maximize, false, key, dense_state);
      break;
    case at::kDouble:
      TORCH_CHECK(state == at::kDouble && grad.scalar_type() == at::kDouble,
                  who, ": fp64 params need float64 state and grads");
      adamw_entries<seat::PlainIO<double>, double>(each, param, grad, exp_avg, exp_avg_sq, master, max_exp_avg_sq,
                                                   s64, maximize, false, key, dense_state);
      break;
    default:
      TORCH_CHECK(false, who, ": unsupported param dtype ", param.scalar_type());
  }
}

}  // namespace cpu
}  // namespace seat
