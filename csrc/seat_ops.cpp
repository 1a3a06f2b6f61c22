// Schemas of the native kernels (namespace seat_C) and the Python module seat._C.
//
// The public ops (seat::*) are defined in python/seat/ops with validation and backend
// selection; they call these native kernels for the "cpu" and "cuda" backends. The
// module itself exports no functions: importing it runs the static registrations below
// and exposes build facts that python/seat/ops/_native.py uses to detect a stale build.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(seat_C, m) {
  // The sparse-update family. A mask is passed as (encoding, mask_index, mask_offsets,
  // mask_ints) (seat/masks.h): encoding 0 = int32 indices (mask_index = idx), 1 = block16
  // (mask_index = block_starts, mask_offsets = uint16 offsets), 2 = hash (mask_index =
  // block_offsets, mask_ints = key, threshold, block), 3 = full (every element: mask_index
  // empty, the compact arrays one entry per element); an unused tensor is empty, unused
  // ints are 0. mask_ints holds 3 ints per mask.
  // out[slot] += dense.view(-1)[position] over the mask's entries
  m.def(
      "masked_gather_(Tensor(a!) out, Tensor dense, int encoding, Tensor mask_index, Tensor mask_offsets, "
      "int[] mask_ints) -> ()");
  // param.view(-1)[position] <-> values[slot], bit for bit
  m.def(
      "masked_swap_(Tensor(a!) param, Tensor(b!) values, int encoding, Tensor mask_index, Tensor mask_offsets, "
      "int[] mask_ints) -> ()");
  // AdamW on the masked entries of params[i] with compact state; every mask of a call has
  // one encoding; empty masters[i] / max_exp_avg_sqs[i] mean none; scalars: the 7 of
  // seat/adamw.h; step_key: the 32-bit key of stochastic rounding
  // (python/seat/ops/_adamw.py); dense_state: state is full-size and indexed by position.
  m.def(
      "sparse_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] masters, Tensor(e!)[] max_exp_avg_sqs, int encoding, Tensor[] mask_indices, "
      "Tensor[] mask_offsets, int[] mask_ints, float[] scalars, bool maximize, bool stochastic, int step_key, "
      "bool dense_state) -> ()");
  // out = a bitsandbytes 4-bit weight (packed, absmax, code, blocksize; with double
  // quantization nested_absmax, nested_code, nested_blocksize, offset) dequantized into
  // out's dtype, plus delta (out's dtype, one value per mask entry) at the mask's entries
  // (seat/dequant4.h; encoding 3 = full: every element, empty mask_index).
  m.def(
      "dequant4_delta_(Tensor(a!) out, Tensor packed, Tensor absmax, Tensor code, int blocksize, "
      "Tensor? nested_absmax, Tensor? nested_code, int nested_blocksize, float offset, Tensor delta, int encoding, "
      "Tensor mask_index, Tensor mask_offsets, int[] mask_ints) -> ()");
  // counts[b] = members of block b of the hash mask (key, threshold) over numel elements.
  m.def("implicit_block_counts_(Tensor(a!) counts, int numel, int key, int threshold, int block) -> ()");
  // Fused log-softmax losses, per row (kl_div, paired_loss, fused_linear_paired_loss):
  // the first labels.numel() rows of logits are cross-entropy rows against labels (0 loss
  // and gradient where label == ignore_index), the rest KL rows against the matching
  // rows of ref_logits (KL(p_ref || p_cur), reverse: KL(p_cur || p_ref), p = softmax(x /
  // temperature); 0 where kl_valid is False; empty kl_valid = all valid). scales: 2
  // values of the accumulation dtype multiplying the gradient of CE rows and KL rows
  // (the caller folds 1/denominator and 1/temperature in). Returns the per-row losses
  // (float32, float64 for float64 inputs) and the gradient w.r.t. logits in logits'
  // dtype (empty unless compute_grad).
  m.def(
      "paired_rows(Tensor logits, Tensor labels, Tensor ref_logits, Tensor kl_valid, Tensor scales, "
      "float temperature, int ignore_index, bool reverse, bool compute_grad) -> (Tensor, Tensor)");
}

#ifndef SEAT_CUDA_ARCHS
#define SEAT_CUDA_ARCHS ""
#endif

static PyModuleDef seat_c_module = {PyModuleDef_HEAD_INIT, "_C", "seat native kernels (CPU, CUDA)", -1,
                                    nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&seat_c_module);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "__version__", SEAT_VERSION);
  PyModule_AddStringConstant(m, "source_hash", SEAT_SOURCE_HASH);
  PyModule_AddStringConstant(m, "torch_version", SEAT_TORCH_VERSION);
  PyModule_AddStringConstant(m, "cuda_archs", SEAT_CUDA_ARCHS);
#ifdef SEAT_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
#ifdef _OPENMP
  PyModule_AddIntConstant(m, "openmp", _OPENMP);
#else
  PyModule_AddIntConstant(m, "openmp", 0);
#endif
  return m;
}
