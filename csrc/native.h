// Plain C++ cores of lingshu_fast._C, free of pybind11 so they can be read and tested on their own.
// The Python-facing wrappers (array checks, GIL release) live in module.cpp.
#pragma once

#include <cstdint>
#include <string>
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

// JSONL lines -> rendered chat-template text + image paths of the plain records (data/index.py);
// every other line comes back as a "fallback" for Python. Offsets are relative to `data`.
struct ScanResult {
  std::vector<int64_t> line, offset, nbytes, image_count;  // accepted lines
  std::vector<std::string> texts, image_paths;             // one text per accepted line; paths flat
  std::vector<int64_t> fallback_line, fallback_offset, fallback_nbytes;
  int64_t next_line = 0;  // the line number after the last line of `data`
};
ScanResult scan_jsonl(const char* data, int64_t size, int64_t first_line, const std::string& system_prompt,
                      bool prompt_mode);

}  // namespace lingshu
