// One JSONL line's JSON, parsed strictly as Python's json.loads would accept it (see jsonl.cpp):
// anything it is unsure of returns false, and the line goes back to Python.
#pragma once

#include <cstring>
#include <string>

namespace lingshu {

class LineParser {
 public:
  LineParser(const char* begin, const char* end) : p_(begin), end_(end) {}

  void ws() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\r' || *p_ == '\n')) ++p_;
  }
  bool at_end() {
    ws();
    return p_ == end_;
  }
  bool peek(char c) {
    ws();
    return p_ < end_ && *p_ == c;
  }
  bool eat(char c) {
    if (!peek(c)) return false;
    ++p_;
    return true;
  }
  char kind() {  // the first byte of the next value
    ws();
    return p_ < end_ ? *p_ : '\0';
  }

  // A JSON string into `out` (UTF-8), validating escapes, raw UTF-8 and raw control bytes as
  // Python's json.loads on the decoded line does; false on anything it would reject or that
  // this scanner leaves to Python (lone surrogate escapes).
  bool string(std::string* out) {
    if (!eat('"')) return false;
    if (out) out->clear();
    while (p_ < end_) {
      const unsigned char c = static_cast<unsigned char>(*p_);
      if (c == '"') {
        ++p_;
        return true;
      }
      if (c < 0x20) return false;
      if (c == '\\') {
        if (!escape(out)) return false;
        continue;
      }
      if (c < 0x80) {
        const char* run = p_;
        while (p_ < end_ && static_cast<unsigned char>(*p_) >= 0x20 && *p_ != '"' && *p_ != '\\' &&
               static_cast<unsigned char>(*p_) < 0x80)
          ++p_;
        if (out) out->append(run, p_ - run);
        continue;
      }
      const int len = utf8_length(p_, end_);
      if (len == 0) return false;
      if (out) out->append(p_, len);
      p_ += len;
    }
    return false;
  }

  // Any JSON value, not kept.
  bool skip(int depth = 0) {
    if (depth > 64) return false;  // Python's json would recurse on; leave deep values to it
    switch (kind()) {
      case '"':
        return string(nullptr);
      case '{': {
        ++p_;
        if (eat('}')) return true;
        do {
          if (!string(nullptr) || !eat(':') || !skip(depth + 1)) return false;
        } while (eat(','));
        return eat('}');
      }
      case '[': {
        ++p_;
        if (eat(']')) return true;
        do {
          if (!skip(depth + 1)) return false;
        } while (eat(','));
        return eat(']');
      }
      case 't':
        return literal("true");
      case 'f':
        return literal("false");
      case 'n':
        return literal("null");
      default:
        return number();
    }
  }

 private:
  static int hex(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }
  bool hex4(unsigned* value) {
    if (end_ - p_ < 4) return false;
    unsigned v = 0;
    for (int k = 0; k < 4; ++k) {
      const int h = hex(p_[k]);
      if (h < 0) return false;
      v = v * 16 + unsigned(h);
    }
    p_ += 4;
    *value = v;
    return true;
  }
  static void put_utf8(std::string* out, unsigned cp) {
    if (!out) return;
    if (cp < 0x80) {
      out->push_back(char(cp));
    } else if (cp < 0x800) {
      out->push_back(char(0xC0 | (cp >> 6)));
      out->push_back(char(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      out->push_back(char(0xE0 | (cp >> 12)));
      out->push_back(char(0x80 | ((cp >> 6) & 0x3F)));
      out->push_back(char(0x80 | (cp & 0x3F)));
    } else {
      out->push_back(char(0xF0 | (cp >> 18)));
      out->push_back(char(0x80 | ((cp >> 12) & 0x3F)));
      out->push_back(char(0x80 | ((cp >> 6) & 0x3F)));
      out->push_back(char(0x80 | (cp & 0x3F)));
    }
  }
  bool escape(std::string* out) {
    if (end_ - p_ < 2) return false;
    const char e = p_[1];
    p_ += 2;
    char plain = 0;
    switch (e) {
      case '"': plain = '"'; break;
      case '\\': plain = '\\'; break;
      case '/': plain = '/'; break;
      case 'b': plain = '\b'; break;
      case 'f': plain = '\f'; break;
      case 'n': plain = '\n'; break;
      case 'r': plain = '\r'; break;
      case 't': plain = '\t'; break;
      case 'u': {
        unsigned cp = 0;
        if (!hex4(&cp)) return false;
        if (cp >= 0xDC00 && cp <= 0xDFFF) return false;  // lone low surrogate
        if (cp >= 0xD800 && cp <= 0xDBFF) {
          unsigned low = 0;
          if (end_ - p_ < 2 || p_[0] != '\\' || p_[1] != 'u') return false;
          p_ += 2;
          if (!hex4(&low) || low < 0xDC00 || low > 0xDFFF) return false;
          cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
        }
        put_utf8(out, cp);
        return true;
      }
      default:
        return false;
    }
    if (out) out->push_back(plain);
    return true;
  }
  // Length of one well-formed UTF-8 sequence at p (2-4 bytes), or 0 (what Python's strict decoder
  // rejects: overlongs, surrogates, > U+10FFFF, truncation).
  static int utf8_length(const char* p, const char* end) {
    const unsigned char c = static_cast<unsigned char>(p[0]);
    int len;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return 0;
    }
    if (end - p < len) return 0;
    const unsigned c1 = static_cast<unsigned char>(p[1]);
    if (c1 < lo || c1 > hi) return 0;
    for (int k = 2; k < len; ++k) {
      const unsigned ck = static_cast<unsigned char>(p[k]);
      if (ck < 0x80 || ck > 0xBF) return 0;
    }
    return len;
  }
  bool literal(const char* word) {
    const size_t n = std::strlen(word);
    if (size_t(end_ - p_) < n || std::memcmp(p_, word, n) != 0) return false;
    p_ += n;
    return true;
  }
  static bool digit(char c) { return c >= '0' && c <= '9'; }
  bool number() {  // JSON's grammar exactly (NaN / Infinity, which Python accepts, go to Python)
    if (p_ < end_ && *p_ == '-') ++p_;
    if (p_ >= end_ || !digit(*p_)) return false;
    if (*p_ == '0') {
      ++p_;
    } else {
      while (p_ < end_ && digit(*p_)) ++p_;
    }
    if (p_ < end_ && *p_ == '.') {
      ++p_;
      if (p_ >= end_ || !digit(*p_)) return false;
      while (p_ < end_ && digit(*p_)) ++p_;
    }
    if (p_ < end_ && (*p_ == 'e' || *p_ == 'E')) {
      ++p_;
      if (p_ < end_ && (*p_ == '+' || *p_ == '-')) ++p_;
      if (p_ >= end_ || !digit(*p_)) return false;
      while (p_ < end_ && digit(*p_)) ++p_;
    }
    return p_ == end_ || *p_ == ',' || *p_ == '}' || *p_ == ']' || *p_ == ' ' || *p_ == '\t' || *p_ == '\r' ||
           *p_ == '\n';
  }

  const char* p_;
  const char* end_;
};

}  // namespace lingshu
