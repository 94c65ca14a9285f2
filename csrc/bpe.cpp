// Exact token counts of ASCII text under a Qwen2-style byte-level BPE tokenizer, for the data index.
//
// The index needs only how many tokens each rendered record has; the Rust `tokenizers` library
// computes them at a few thousand records per second per core, this at tens of thousands, by
// doing only what a count needs and caching per word. It is used only when it is exact:
// lingshu_fast/data/bpe_count.py enables it for tokenizers of exactly the supported shape (added
// tokens matched on the raw text, an ASCII-invariant Unicode normaliser, Qwen2's split regex then
// byte-level mapping, a BPE model without dropout, prefixes or byte fallback), and `count` returns
// -1 for any text it cannot count exactly (non-ASCII bytes, control characters other than \t \n \r,
// a very long word), which the caller then tokenises with the Rust library. Tests compare every
// count with the Rust tokenizer's.
//
// Steps, as the Rust library runs them on one text (tokenizers' AddedVocabulary, Split, BPE):
// 1. split off added tokens, leftmost-longest; each counts 1;
// 2. pre-tokenise each remaining piece with Qwen2's regex (hand-written below for ASCII):
//    (?i:'s|'t|'re|'ve|'m|'ll|'d) | [^\r\n\p{L}\p{N}]?\p{L}+ | \p{N} | ' '?[^\s\p{L}\p{N}]+[\r\n]*
//    | \s*[\r\n]+ | \s+(?!\S) | \s+   (first alternative that matches at the position wins);
// 3. BPE each piece's bytes: repeatedly merge the adjacent pair of lowest merge rank (leftmost
//    among equals); the count is the number of symbols left.
#include <algorithm>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

#include "native.h"

namespace lingshu {
namespace {

inline bool letter(unsigned char c) { return (c | 0x20) >= 'a' && (c | 0x20) <= 'z'; }
inline bool digit(unsigned char c) { return c >= '0' && c <= '9'; }
inline bool space(unsigned char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
inline bool newline(unsigned char c) { return c == '\n' || c == '\r'; }
inline bool punct(unsigned char c) { return !space(c) && !letter(c) && !digit(c); }
inline unsigned char lower(unsigned char c) { return letter(c) ? (c | 0x20) : c; }

// Length of the pre-token starting at s[i] (s[0..n) is ASCII without other control characters).
size_t pretoken(const unsigned char* s, size_t n, size_t i) {
  const unsigned char c = s[i];
  if (c == '\'' && i + 1 < n) {  // contractions, case-insensitive, in the regex's order
    const unsigned char a = lower(s[i + 1]);
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if (i + 2 < n) {
      const unsigned char b = lower(s[i + 2]);
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    }
  }
  if (letter(c) || (!newline(c) && !digit(c) && i + 1 < n && letter(s[i + 1]))) {
    size_t j = i + 1;
    while (j < n && letter(s[j])) ++j;
    return j - i;
  }
  if (digit(c)) return 1;
  if (punct(c) || (c == ' ' && i + 1 < n && punct(s[i + 1]))) {
    size_t j = c == ' ' ? i + 1 : i;
    while (j < n && punct(s[j])) ++j;
    while (j < n && newline(s[j])) ++j;
    return j - i;
  }
  size_t q = i;  // a whitespace run [i, q)
  while (q < n && space(s[q])) ++q;
  for (size_t j = q; j > i; --j)
    if (newline(s[j - 1])) return j - i;  // \s*[\r\n]+ : up to the run's last newline
  if (q == n || q - i == 1) return q - i;  // \s+(?!\S) at the end, else \s+
  return q - i - 1;                        // \s+(?!\S): leave one space for the next word
}

}  // namespace

BpeCounter::BpeCounter(const std::vector<std::string>& tokens, const std::vector<int64_t>& ids,
                       const std::vector<std::pair<std::string, std::string>>& merges,
                       const std::vector<std::string>& added, bool ignore_merges)
    : ignore_merges_(ignore_merges), added_(added) {
  for (size_t k = 0; k < tokens.size(); ++k) vocab_.emplace(tokens[k], int32_t(ids[k]));
  for (int b = 0; b < 256; ++b) {
    auto it = vocab_.find(std::string(1, char(b)));
    byte_id_[b] = it == vocab_.end() ? -1 : it->second;
  }
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    auto a = vocab_.find(merges[rank].first), b = vocab_.find(merges[rank].second);
    auto ab = vocab_.find(merges[rank].first + merges[rank].second);
    if (a == vocab_.end() || b == vocab_.end() || ab == vocab_.end()) continue;
    const uint64_t key = (uint64_t(uint32_t(a->second)) << 32) | uint32_t(b->second);
    merges_.emplace(key, std::make_pair(int32_t(rank), ab->second));  // the first (lowest) rank wins
  }
  std::sort(added_.begin(), added_.end(), [](const std::string& x, const std::string& y) {
    return x.size() > y.size();  // longest first: the first match at a position is the longest
  });
  for (const auto& token : added_)
    if (!token.empty()) first_byte_[static_cast<unsigned char>(token[0])] = true;
}

int64_t BpeCounter::merge(const unsigned char* w, size_t n) {
  if (ignore_merges_ && vocab_.count(std::string(reinterpret_cast<const char*>(w), n))) return 1;
  symbols_.resize(n);
  for (size_t k = 0; k < n; ++k) {
    symbols_[k] = byte_id_[w[k]];
    if (symbols_[k] < 0) return -1;
  }
  while (symbols_.size() > 1) {
    int32_t best_rank = -1, best_id = 0;
    size_t best_at = 0;
    for (size_t k = 0; k + 1 < symbols_.size(); ++k) {
      auto m = merges_.find((uint64_t(uint32_t(symbols_[k])) << 32) | uint32_t(symbols_[k + 1]));
      if (m != merges_.end() && (best_rank < 0 || m->second.first < best_rank)) {
        best_rank = m->second.first;
        best_id = m->second.second;
        best_at = k;
      }
    }
    if (best_rank < 0) break;
    symbols_[best_at] = best_id;
    symbols_.erase(symbols_.begin() + best_at + 1);
  }
  return int64_t(symbols_.size());
}

// Count of one pre-token, through a small open-addressing cache (words repeat: most are hits).
int64_t BpeCounter::word(const unsigned char* w, size_t n) {
  if (n > kMaxWord) return -1;
  if (n > kSlotKey) return merge(w, n);
  uint64_t hash = 1469598103934665603ull;  // FNV-1a
  for (size_t k = 0; k < n; ++k) hash = (hash ^ w[k]) * 1099511628211ull;
  const size_t mask = kSlots - 1;
  size_t at = size_t(hash) & mask;
  for (size_t probe = 0; probe < 4; ++probe, at = (at + 1) & mask) {
    Slot& slot = slots_[at];
    if (slot.len == 0xFF) break;
    if (slot.hash == hash && slot.len == n && std::memcmp(slot.key, w, n) == 0) return slot.count;
  }
  const int64_t count = merge(w, n);
  if (count >= 0) {
    Slot& slot = slots_[size_t(hash) & mask];  // (re)place at the home slot: stale entries just miss
    for (size_t probe = 0, i = size_t(hash) & mask; probe < 4; ++probe, i = (i + 1) & mask) {
      if (slots_[i].len == 0xFF) {
        slots_[i].hash = hash, slots_[i].len = uint8_t(n), slots_[i].count = int32_t(count);
        std::memcpy(slots_[i].key, w, n);
        return count;
      }
    }
    slot.hash = hash, slot.len = uint8_t(n), slot.count = int32_t(count);
    std::memcpy(slot.key, w, n);
  }
  return count;
}

int64_t BpeCounter::plain(const unsigned char* s, size_t n) {
  for (size_t k = 0; k < n; ++k) {
    const unsigned char c = s[k];
    if (c >= 0x7F || (c < 0x20 && c != '\t' && c != '\n' && c != '\r')) return -1;
  }
  int64_t total = 0;
  for (size_t i = 0; i < n;) {
    const size_t len = pretoken(s, n, i);
    const int64_t c = word(s + i, len);
    if (c < 0) return -1;
    total += c;
    i += len;
  }
  return total;
}

int64_t BpeCounter::count(const std::string& text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  int64_t total = 0;
  size_t piece = 0;
  for (size_t i = 0; i < n;) {
    size_t matched = 0;
    if (first_byte_[s[i]]) {
      for (const auto& token : added_) {
        if (token.size() <= n - i && std::memcmp(s + i, token.data(), token.size()) == 0) {
          matched = token.size();
          break;
        }
      }
    }
    if (!matched) {
      ++i;
      continue;
    }
    const int64_t c = plain(s + piece, i - piece);
    if (c < 0) return -1;
    total += c + 1;
    i += matched;
    piece = i;
  }
  const int64_t c = plain(s + piece, n - piece);
  return c < 0 ? -1 : total + c;
}

}  // namespace lingshu
