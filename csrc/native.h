// Plain C++ cores of lingshu_fast._C, free of pybind11 so they can be read and tested on their own.
// The Python-facing wrappers (array checks, GIL release) live in module.cpp.
#pragma once

#include <cstdint>
#include <vector>

namespace lingshu {

struct PackResult {
  std::vector<int64_t> order;        // sample indices, bin after bin
  std::vector<int64_t> bin_offsets;  // [n_bins + 1]
  std::vector<int64_t> oversize;     // indices longer than the budget, ascending
};

// Best-fit-decreasing over shuffled windows; the rule is documented in lingshu_fast/data/packing.py.
// `permutation` is the shuffled order of 0..n-1 (computed in Python so both backends share it).
PackResult plan_packing(const int64_t* lengths, const int64_t* permutation, int64_t n, int64_t budget,
                        int64_t window);

// M-RoPE position ids of one unpadded sample into `out` ([3, n_tokens], row-major);
// the rule is documented in lingshu_fast/data/rope.py. Throws std::invalid_argument on bad input.
void mrope_position_ids(const int64_t* input_ids, int64_t n_tokens, const int64_t* grid_thw, int64_t n_images,
                        int64_t image_token_id, int64_t vision_start_token_id, int64_t spatial_merge_size,
                        int64_t* out);

}  // namespace lingshu
