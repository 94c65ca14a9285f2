// Native packing planner: same plan as lingshu_fast/data/packing.py's numpy path, bit for bit.
#include <algorithm>
#include <limits>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "native.h"

namespace lingshu {
namespace {

// Two interchangeable best-fit structures, both answering "the open bin with the least remaining
// space >= len, lowest id among equals" and both giving the same plan:
//  - FlatBins: sorted vector of 64-bit keys (remaining << 32 | id); a window opens ~100 bins, so a
//    branch-free binary search plus a short memmove beats any tree. Needs remaining < 2^31 and
//    < 2^32 bins, and stays O(bins) per sample, so it is used for windows up to kFlatMaxItems.
//  - TreeBins: ordered set of (remaining, id): O(log bins), any budget, any window.
constexpr size_t kFlatMaxItems = 4096;
constexpr int64_t kFlatMaxBudget = (int64_t{1} << 31) - 1;

struct FlatBins {
  std::vector<uint64_t> keys;
  void clear() { keys.clear(); }
  static uint64_t key(int64_t remaining, int64_t id) { return (uint64_t(remaining) << 32) | uint64_t(id); }
  // Index of the first key >= target (keys.size() if none), without data-dependent branches.
  size_t lower_bound(uint64_t target) const {
    const uint64_t* base = keys.data();
    size_t n = keys.size();
    if (n == 0) return 0;
    while (n > 1) {
      const size_t half = n / 2;
      base = base[half - 1] < target ? base + half : base;
      n -= half;
    }
    return static_cast<size_t>(base - keys.data()) + (*base < target);
  }
  // Puts `len` into the best-fitting bin and returns its id, or -1 when none fits.
  int64_t place(int64_t len) {
    const size_t best = lower_bound(key(len, 0));
    if (best == keys.size()) return -1;
    const uint64_t moved = keys[best] - (uint64_t(len) << 32);
    // The bin only moves towards the front: shift the keys between its new and old place.
    size_t to = best;
    while (to > 0 && keys[to - 1] > moved) {
      keys[to] = keys[to - 1];
      --to;
    }
    keys[to] = moved;
    return int64_t(moved & 0xffffffffu);
  }
  void open(int64_t remaining, int64_t id) {
    const uint64_t k = key(remaining, id);
    keys.insert(keys.begin() + lower_bound(k), k);
  }
};

struct TreeBins {
  std::set<std::pair<int64_t, int64_t>> bins;
  void clear() { bins.clear(); }
  int64_t place(int64_t len) {
    auto best = bins.lower_bound({len, std::numeric_limits<int64_t>::min()});
    if (best == bins.end()) return -1;
    auto node = bins.extract(best);  // re-keyed in place, no reallocation
    node.value().first -= len;
    const int64_t id = node.value().second;
    bins.insert(std::move(node));
    return id;
  }
  void open(int64_t remaining, int64_t id) { bins.emplace(remaining, id); }
};

// Best fit of one window's lengths (already descending) -> local bin per item; returns the bin count.
template <class OpenBins>
int64_t best_fit(const std::vector<int64_t>& item_len, int64_t budget, OpenBins& open_bins,
                 std::vector<int64_t>& bin_of) {
  open_bins.clear();
  int64_t n_bins = 0;
  for (size_t i = 0; i < item_len.size(); ++i) {
    int64_t bin = open_bins.place(item_len[i]);
    if (bin < 0) {
      bin = n_bins++;
      open_bins.open(budget - item_len[i], bin);
    }
    bin_of[i] = bin;
  }
  return n_bins;
}

// Orders one window's (length, shuffled position) items by length descending, ties in shuffled
// order (positions are unique, so the order is total and any sort gives the same result). Packs
// each item into one 64-bit key when it fits: sorting integers is ~2x faster than sorting pairs.
void sort_decreasing(std::vector<std::pair<int64_t, int64_t>>& items, int64_t budget, int64_t window_start,
                     int64_t window_end, std::vector<int64_t>& item_len, std::vector<int64_t>& item_pos, std::vector<uint64_t>& keys) {
  item_len.resize(items.size());
  item_pos.resize(items.size());
  const bool position_fits_32_bits = window_end - window_start <= int64_t{0xffffffff};
  if (budget <= kFlatMaxBudget && position_fits_32_bits) {
    keys.resize(items.size());
    for (size_t i = 0; i < items.size(); ++i)
      keys[i] = (uint64_t(budget - items[i].first) << 32) | uint64_t(items[i].second - window_start);
    std::sort(keys.begin(), keys.end());
    for (size_t i = 0; i < keys.size(); ++i) {
      item_len[i] = budget - int64_t(keys[i] >> 32);
      item_pos[i] = window_start + int64_t(keys[i] & 0xffffffffu);
    }
    return;
  }
  std::sort(items.begin(), items.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  });
  for (size_t i = 0; i < items.size(); ++i) {
    item_len[i] = items[i].first;
    item_pos[i] = items[i].second;
  }
}

}  // namespace

PackResult plan_packing(const int64_t* lengths, const int64_t* permutation, int64_t n, int64_t budget,
                        int64_t window) {
  if (budget < 1) throw std::invalid_argument("budget must be >= 1");
  if (window < 1) throw std::invalid_argument("window must be >= 1");
  PackResult result;
  result.order.reserve(static_cast<size_t>(n));
  result.bin_offsets.push_back(0);

  std::vector<std::pair<int64_t, int64_t>> items;  // (length, shuffled position) of this window's packable samples
  std::vector<int64_t> item_len, item_pos, bin_of; // per item in BFD order
  std::vector<uint64_t> sort_keys;
  std::vector<int64_t> bin_counts;                 // items per local bin, then running offsets
  std::vector<char> seen(static_cast<size_t>(n), 0);
  FlatBins flat;
  TreeBins tree;
  constexpr int64_t kPrefetchAhead = 16;  // the gather lengths[permutation[p]] is random access

  for (int64_t start = 0; start < n; start += window) {
    const int64_t end = std::min(n, start + window);
    items.clear();
    for (int64_t p = start; p < end; ++p) {
      if (p + kPrefetchAhead < n) {
        const int64_t ahead = permutation[p + kPrefetchAhead];
#if defined(__GNUC__) || defined(__clang__)
        if (ahead >= 0 && ahead < n) __builtin_prefetch(lengths + ahead);
#else
        (void)ahead;
#endif
      }
      const int64_t s = permutation[p];
      if (s < 0 || s >= n || seen[s]) throw std::invalid_argument("permutation is not a permutation of 0..n-1");
      seen[s] = 1;
      if (lengths[s] < 0) throw std::invalid_argument("lengths must be >= 0");
      if (lengths[s] > budget) {
        result.oversize.push_back(s);
      } else {
        items.emplace_back(lengths[s], p);
      }
    }
    sort_decreasing(items, budget, start, end, item_len, item_pos, sort_keys);

    bin_of.resize(items.size());
    const bool flat_fits = items.size() <= kFlatMaxItems && budget <= kFlatMaxBudget;
    const int64_t n_bins = flat_fits ? best_fit(item_len, budget, flat, bin_of) : best_fit(item_len, budget, tree, bin_of);
    // Counting sort by bin keeps each bin's samples in placement order.
    bin_counts.assign(static_cast<size_t>(n_bins) + 1, 0);
    for (int64_t b : bin_of) ++bin_counts[b + 1];
    for (int64_t b = 0; b < n_bins; ++b) bin_counts[b + 1] += bin_counts[b];
    const int64_t base = static_cast<int64_t>(result.order.size());
    for (int64_t b = 1; b <= n_bins; ++b) result.bin_offsets.push_back(base + bin_counts[b]);
    result.order.resize(result.order.size() + items.size());
    for (size_t i = 0; i < items.size(); ++i)
      result.order[base + bin_counts[bin_of[i]]++] = permutation[item_pos[i]];
  }
  std::sort(result.oversize.begin(), result.oversize.end());
  return result;
}

}  // namespace lingshu
