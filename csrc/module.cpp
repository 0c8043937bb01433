// The Python module aclip_kernels._C. Importing it runs the static TORCH_LIBRARY_IMPL registrations
// of the CPU (cpu/) and CUDA (cuda/) kernels; the op schemas they implement are defined once, in
// Python (aclip_kernels/ops/<op>.py), as are the fake kernels and autograd.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}
