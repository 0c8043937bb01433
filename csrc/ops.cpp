// Schemas of the aclip_kernels ops. The CPU kernels register in cpu/, the CUDA kernels in cuda/;
// fake (meta) kernels and autograd are registered from Python (aclip_kernels/ops/).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing aclip_kernels._C runs the static registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(aclip_kernels, m) {
  m.def("cls_attention(Tensor q, Tensor k, int num_prefix_tokens, float scale, Tensor? prior) -> Tensor");
  m.def(
      "attentive_mask(Tensor x, Tensor? scores, Tensor? q, Tensor? k, Tensor? prior, Tensor? boxes, "
      "int num_prefix_tokens, int[] score_grid, int[] grid, int block, int num_units, float scale) "
      "-> (Tensor, Tensor)");
  m.def("attentive_mask_backward(Tensor grad_kept, Tensor idx, int num_prefix_tokens, int num_patches) -> Tensor");
}
