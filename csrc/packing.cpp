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

using Bin = std::pair<int64_t, int64_t>;  // (remaining tokens, bin id): ordered = best fit first

// Open bins as a sorted flat vector: a window opens ~100 bins, so binary search plus a short
// memmove beats a node-based tree. Used up to kFlatMaxItems items per window.
struct FlatBins {
  std::vector<Bin> bins;
  void clear() { bins.clear(); }
  // Puts `len` into the best-fitting bin and returns its id, or returns -1 when none fits.
  int64_t place(int64_t len) {
    auto best = std::lower_bound(bins.begin(), bins.end(), Bin{len, std::numeric_limits<int64_t>::min()});
    if (best == bins.end()) return -1;
    const Bin moved{best->first - len, best->second};
    // The bin only moves towards the front: shift the bins between its new and old place.
    auto to = std::lower_bound(bins.begin(), best, moved);
    std::move_backward(to, best, best + 1);
    *to = moved;
    return moved.second;
  }
  void open(int64_t remaining, int64_t id) {
    bins.insert(std::lower_bound(bins.begin(), bins.end(), Bin{remaining, id}), Bin{remaining, id});
  }
};

// Same contract on an ordered set: O(log bins) per sample for very large windows.
struct TreeBins {
  std::set<Bin> bins;
  void clear() { bins.clear(); }
  int64_t place(int64_t len) {
    auto best = bins.lower_bound(Bin{len, std::numeric_limits<int64_t>::min()});
    if (best == bins.end()) return -1;
    auto node = bins.extract(best);  // re-keyed in place, no reallocation
    node.value().first -= len;
    const int64_t id = node.value().second;
    bins.insert(std::move(node));
    return id;
  }
  void open(int64_t remaining, int64_t id) { bins.emplace(remaining, id); }
};

constexpr size_t kFlatMaxItems = 4096;

// Best fit of one window's items (already length-descending) -> local bin per item; returns bins.
template <class OpenBins>
int64_t best_fit(const std::vector<Bin>& items, int64_t budget, OpenBins& open_bins, std::vector<int64_t>& bin_of) {
  open_bins.clear();
  int64_t n_bins = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const int64_t len = items[i].first;
    int64_t bin = open_bins.place(len);
    if (bin < 0) {
      bin = n_bins++;
      open_bins.open(budget - len, bin);
    }
    bin_of[i] = bin;
  }
  return n_bins;
}

}  // namespace

PackResult plan_packing(const int64_t* lengths, const int64_t* permutation, int64_t n, int64_t budget,
                        int64_t window) {
  if (budget < 1) throw std::invalid_argument("budget must be >= 1");
  if (window < 1) throw std::invalid_argument("window must be >= 1");
  PackResult result;
  result.order.reserve(static_cast<size_t>(n));
  result.bin_offsets.push_back(0);

  std::vector<Bin> items;           // this window's packable samples as (length, sample index)
  std::vector<int64_t> bin_of;      // local bin of each item, in processing order
  std::vector<int64_t> bin_counts;  // items per local bin, then running offsets
  std::vector<char> seen(static_cast<size_t>(n), 0);
  FlatBins flat;
  TreeBins tree;

  for (int64_t start = 0; start < n; start += window) {
    const int64_t end = std::min(n, start + window);
    items.clear();
    for (int64_t p = start; p < end; ++p) {
      const int64_t s = permutation[p];
      if (s < 0 || s >= n || seen[s]) throw std::invalid_argument("permutation is not a permutation of 0..n-1");
      seen[s] = 1;
      if (lengths[s] < 0) throw std::invalid_argument("lengths must be >= 0");
      if (lengths[s] > budget) {
        result.oversize.push_back(s);
      } else {
        items.emplace_back(lengths[s], s);
      }
    }
    // Length descending; stable, so equal lengths keep their shuffled order.
    std::stable_sort(items.begin(), items.end(), [](const Bin& a, const Bin& b) { return a.first > b.first; });

    bin_of.resize(items.size());
    const int64_t n_bins = items.size() <= kFlatMaxItems ? best_fit(items, budget, flat, bin_of)
                                                         : best_fit(items, budget, tree, bin_of);
    // Counting sort by bin keeps each bin's samples in placement order.
    bin_counts.assign(static_cast<size_t>(n_bins) + 1, 0);
    for (int64_t b : bin_of) ++bin_counts[b + 1];
    for (int64_t b = 0; b < n_bins; ++b) bin_counts[b + 1] += bin_counts[b];
    const int64_t base = static_cast<int64_t>(result.order.size());
    for (int64_t b = 1; b <= n_bins; ++b) result.bin_offsets.push_back(base + bin_counts[b]);
    result.order.resize(result.order.size() + items.size());
    for (size_t i = 0; i < items.size(); ++i) result.order[base + bin_counts[bin_of[i]]++] = items[i].second;
  }
  std::sort(result.oversize.begin(), result.oversize.end());
  return result;
}

}  // namespace lingshu
