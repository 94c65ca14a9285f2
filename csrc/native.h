// Plain C++ cores of lingshu_fast._C, free of pybind11 so they can be read and tested on their own.
// The Python-facing wrappers (array checks, GIL release) live in module.cpp.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <utility>
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

// Exact token counts of ASCII text under a Qwen2-style byte-level BPE (bpe.cpp); -1 = not countable
// here (the caller tokenises that text with the Rust library). Tokens are raw bytes.
class BpeCounter {
 public:
  BpeCounter(const std::vector<std::string>& tokens, const std::vector<int64_t>& ids,
             const std::vector<std::pair<std::string, std::string>>& merges, const std::vector<std::string>& added,
             bool ignore_merges);
  int64_t count(const std::string& text);

 private:
  static constexpr size_t kMaxWord = 256;  // longer words: the Rust library (BPE here is O(n^2))
  static constexpr size_t kSlotKey = 19;    // words up to this long are cached
  static constexpr size_t kSlots = 1u << 17;  // per counter (one per scanning thread): 4 MiB
  struct Slot {                                // one cached word, open addressing: 32 bytes
    uint64_t hash = 0;
    int32_t count = 0;
    uint8_t len = 0xFF;  // 0xFF: empty
    char key[kSlotKey];
  };
  int64_t plain(const unsigned char* s, size_t n);
  int64_t word(const unsigned char* w, size_t n);
  int64_t merge(const unsigned char* w, size_t n);
  bool ignore_merges_;
  std::vector<std::string> added_;
  bool first_byte_[256] = {};
  int32_t byte_id_[256];
  std::unordered_map<std::string, int32_t> vocab_;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // (left, right) -> (rank, merged)
  std::vector<Slot> slots_ = std::vector<Slot>(kSlots);
  std::vector<int32_t> symbols_;
};

// JSONL lines -> rendered chat-template text + image paths of the plain records (data/index.py);
// every other line comes back as a "fallback" for Python. Offsets are relative to `data`.
struct ScanResult {
  std::vector<int64_t> line, offset, nbytes, image_count;  // accepted lines
  std::vector<int64_t> tokens;                             // their token counts (-1: not counted)
  std::vector<std::string> texts, image_paths;             // one text per accepted line ("" when counted)
  std::vector<int64_t> fallback_line, fallback_offset, fallback_nbytes;
  int64_t next_line = 0;  // the line number after the last line of `data`
};
ScanResult scan_jsonl(const char* data, int64_t size, int64_t first_line, const std::string& system_prompt,
                      bool prompt_mode, BpeCounter* counter);

}  // namespace lingshu
