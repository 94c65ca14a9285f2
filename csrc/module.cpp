// pybind11 bindings of lingshu_fast._C: array checks, then the GIL-free C++ cores of native.h.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

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

py::tuple scan_jsonl(const py::buffer& data, int64_t first_line, const std::string& system_prompt,
                     bool prompt_mode, lingshu::BpeCounter* counter) {
  const py::buffer_info info = data.request();
  if (info.ndim != 1 || info.itemsize != 1) throw std::invalid_argument("data must be a 1-D byte buffer");
  lingshu::ScanResult r;
  {
    py::gil_scoped_release release;
    r = lingshu::scan_jsonl(static_cast<const char*>(info.ptr), info.shape[0], first_line, system_prompt,
                            prompt_mode, counter);
  }
  py::list texts(r.texts.size()), paths(r.image_paths.size());
  for (size_t k = 0; k < r.texts.size(); ++k)
    texts[k] = r.tokens[k] < 0 ? py::object(py::str(r.texts[k])) : py::object(py::none());
  for (size_t k = 0; k < r.image_paths.size(); ++k) paths[k] = py::str(r.image_paths[k]);
  return py::make_tuple(to_array(std::move(r.line)), to_array(std::move(r.offset)), to_array(std::move(r.nbytes)),
                        to_array(std::move(r.image_count)), to_array(std::move(r.tokens)), texts, paths, to_array(std::move(r.fallback_line)),
                        to_array(std::move(r.fallback_offset)), to_array(std::move(r.fallback_nbytes)),
                        r.next_line);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lingshu_fast native CPU helpers: packing planner, M-RoPE index builder, JSONL scanner";
  m.def("plan_packing", &plan_packing, py::arg("lengths"), py::arg("permutation"), py::arg("budget"),
        py::arg("window"),
        "Best-fit-decreasing plan over shuffled windows -> (order, bin_offsets, oversize); see "
        "lingshu_fast.data.packing.");
  m.def("mrope_position_ids", &mrope_position_ids, py::arg("input_ids"), py::arg("image_grid_thw"),
        py::arg("image_token_id"), py::arg("vision_start_token_id"), py::arg("spatial_merge_size"),
        "M-RoPE position ids int64 [3, T] of one unpadded sample; see lingshu_fast.data.rope.");
  py::class_<lingshu::BpeCounter>(m, "BpeCounter", py::module_local())  // a second copy of _C may load too
      .def(py::init([](const std::vector<py::bytes>& tokens, const std::vector<int64_t>& ids,
                       const std::vector<std::pair<py::bytes, py::bytes>>& merges, const std::vector<std::string>& added,
                       bool ignore_merges) {
             std::vector<std::string> plain(tokens.begin(), tokens.end());
             std::vector<std::pair<std::string, std::string>> pairs;
             pairs.reserve(merges.size());
             for (const auto& mg : merges) pairs.emplace_back(std::string(mg.first), std::string(mg.second));
             return new lingshu::BpeCounter(plain, ids, pairs, added, ignore_merges);
           }),
           py::arg("tokens"), py::arg("ids"), py::arg("merges"), py::arg("added"), py::arg("ignore_merges"))
      .def("clone", [](const lingshu::BpeCounter& c) { return new lingshu::BpeCounter(c); },
           "An independent copy (its own word cache) for another thread.")
      .def("count", [](lingshu::BpeCounter& c, const std::string& text) { return c.count(text); }, py::arg("text"),
           "Token count of `text`, or -1 when it is not countable here; see lingshu_fast.data.bpe_count.");
  m.def("scan_jsonl", &scan_jsonl, py::arg("data"), py::arg("first_line"), py::arg("system_prompt"),
        py::arg("prompt_mode"), py::arg("counter") = nullptr,
        "JSONL bytes -> (line, offset, nbytes, image_count, tokens, texts, image_paths, fallback_line, "
        "fallback_offset, fallback_nbytes, next_line); see lingshu_fast.data.scan.");
}
