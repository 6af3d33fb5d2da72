// pybind11 module smsd._C: one line per kernel, declared in smsd.h.
#include <ATen/Parallel.h>

#include "cpu_isa.h"
#include "smsd.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "smsd C++ CPU kernels";
  m.def("num_threads", &at::get_num_threads, "threads used by at::parallel_for");
  m.def("cpu_isa", [] { return std::string(smsd::isa_name(smsd::cpu_isa())); },
        "vector instruction set of the row loops: avx512, avx2 or baseline (SMSD_CPU_ISA caps it)");
  m.def("masked_sample_forward", &smsd::masked_sample_forward, "masked_sample forward (CPU)",
        py::arg("x"), py::arg("index"), py::arg("perm") = py::none());
  m.def("masked_sample_backward", &smsd::masked_sample_backward, "masked_sample backward (CPU)",
        py::arg("grad_out"), py::arg("index"), py::arg("perm") = py::none(),
        py::arg("n_tokens"));
  m.def("dino_loss_teacher_stats", &smsd::dino_loss_teacher_stats,
        "dino_loss: teacher softmax max, 1/sum and column sums (CPU)", py::arg("teacher"),
        py::arg("center"), py::arg("teacher_temp"));
  m.def("dino_loss_student", &smsd::dino_loss_student,
        "dino_loss: per-row loss and scaled student gradient (CPU)", py::arg("student"),
        py::arg("teacher"), py::arg("center"), py::arg("teacher_max"),
        py::arg("teacher_inv_sum"), py::arg("grad"), py::arg("row_offset"), py::arg("batch"),
        py::arg("n_teacher_views"), py::arg("student_temp"), py::arg("teacher_temp"),
        py::arg("grad_scale"));
  m.def("attention_forward", &smsd::attention_forward,
        "attention forward (CPU): (out, lse)", py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("index") = py::none(), py::arg("cu_seqlens") = py::none(), py::arg("scale"));
  m.def("attention_backward", &smsd::attention_backward,
        "attention backward (CPU): (dq, dk, dv)", py::arg("grad_out"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("index") = py::none(),
        py::arg("cu_seqlens") = py::none(), py::arg("scale"));
}
