// pybind11 bindings of lingshu_fast._C: array checks, then the GIL-free C++ cores of native.h.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <tuple>

#include "native.h"

namespace py = pybind11;
using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

namespace {

Int64Array to_array(std::vector<int64_t>&& values) {
  auto* heap = new std::vector<int64_t>(std::move(values));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<int64_t>*>(p); });
  return Int64Array({static_cast<py::ssize_t>(heap->size())}, {sizeof(int64_t)}, heap->data(), owner);
}

std::tuple<Int64Array, Int64Array, Int64Array> plan_packing(const Int64Array& lengths, const Int64Array& permutation,
                                                            int64_t budget, int64_t window) {
  if (lengths.ndim() != 1 || permutation.ndim() != 1 || lengths.shape(0) != permutation.shape(0))
    throw std::invalid_argument("lengths and permutation must be 1-D arrays of the same size");
  lingshu::PackResult result;
  {
    py::gil_scoped_release release;
    result = lingshu::plan_packing(lengths.data(), permutation.data(), lengths.shape(0), budget, window);
  }
  return {to_array(std::move(result.order)), to_array(std::move(result.bin_offsets)),
          to_array(std::move(result.oversize))};
}

Int64Array mrope_position_ids(const Int64Array& input_ids, const Int64Array& image_grid_thw, int64_t image_token_id,
                              int64_t vision_start_token_id, int64_t spatial_merge_size) {
  if (input_ids.ndim() != 1) throw std::invalid_argument("input_ids must be 1-D (one unpadded sample)");
  if (image_grid_thw.size() % 3 != 0 || (image_grid_thw.size() > 0 && image_grid_thw.ndim() != 2))
    throw std::invalid_argument("image_grid_thw must have shape [n_images, 3]");
  const int64_t n_tokens = input_ids.shape(0);
  Int64Array out({static_cast<py::ssize_t>(3), static_cast<py::ssize_t>(n_tokens)});
  int64_t* out_data = out.mutable_data();
  {
    py::gil_scoped_release release;
    lingshu::mrope_position_ids(input_ids.data(), n_tokens, image_grid_thw.data(), image_grid_thw.size() / 3,
                                image_token_id, vision_start_token_id, spatial_merge_size, out_data);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lingshu_fast native CPU helpers: packing planner and M-RoPE index builder";
  m.def("plan_packing", &plan_packing, py::arg("lengths"), py::arg("permutation"), py::arg("budget"),
        py::arg("window"),
        "Best-fit-decreasing plan over shuffled windows -> (order, bin_offsets, oversize); see "
        "lingshu_fast.data.packing.");
  m.def("mrope_position_ids", &mrope_position_ids, py::arg("input_ids"), py::arg("image_grid_thw"),
        py::arg("image_token_id"), py::arg("vision_start_token_id"), py::arg("spatial_merge_size"),
        "M-RoPE position ids int64 [3, T] of one unpadded sample; see lingshu_fast.data.rope.");
}
