// Native JSONL scanner of the data index: lines -> rendered chat-template text + image paths.
//
// A line is "accepted" only when it is one of the plain record shapes of lingshu_fast/data/formats.py
// (messages / ShareGPT conversations with string contents, or an image-caption pair) AND passes the
// same checks; everything else (content part lists, any JSON this parser is not sure about, any
// error) goes back to Python as a "fallback" line, so error reasons and messages have one home
// (formats.py) and an accepted line always means exactly what Python would make of it.
// The rendered text is ChatTemplate._layout's (data/template.py): the caller tokenises it.
#include <cstring>
#include <string>
#include <vector>

#include "json_line.h"
#include "native.h"

namespace lingshu {
namespace {

const char kVision[] = "<|vision_start|><|image_pad|><|vision_end|>";
const char kCaptionPrompt[] = "Describe this image.";

struct Message {
  std::string role, content;
};

bool has_visible_ascii(const std::string& s) {  // formats.is_blank is False for sure
  for (char c : s)
    if (c > ' ' && c < 0x7F) return true;
  return false;
}

size_t count_of(const std::string& s, const char* needle) {
  const size_t n = std::strlen(needle);
  size_t count = 0;
  for (size_t at = s.find(needle); at != std::string::npos; at = s.find(needle, at + n)) ++count;
  return count;
}

// One message object -> (role, content) as formats._normalise_messages reads it; false otherwise.
bool parse_message(LineParser& in, Message* m) {
  if (!in.eat('{')) return false;
  bool has_role = false, has_content = false, has_from = false, has_value = false;
  std::string role, content, from, value;
  if (!in.eat('}')) {
    std::string key;
    do {
      if (!in.string(&key) || !in.eat(':')) return false;
      bool* seen = nullptr;
      std::string* slot = nullptr;
      if (key == "role") seen = &has_role, slot = &role;
      else if (key == "content") seen = &has_content, slot = &content;
      else if (key == "from") seen = &has_from, slot = &from;
      else if (key == "value") seen = &has_value, slot = &value;
      if (!seen) {
        if (!in.skip()) return false;
        continue;
      }
      if (*seen || in.kind() != '"' || !in.string(slot)) return false;  // duplicates, non-strings: Python
      *seen = true;
    } while (in.eat(','));
    if (!in.eat('}')) return false;
  }
  if (has_from && !has_role) {  // a ShareGPT turn
    if (from == "human" || from == "user") m->role = "user";
    else if (from == "gpt" || from == "assistant") m->role = "assistant";
    else m->role = from;
    if (!has_value) return false;
    m->content = std::move(value);
  } else {
    if (!has_role || !has_content) return false;
    m->role = std::move(role);
    m->content = std::move(content);
  }
  return m->role == "system" || m->role == "user" || m->role == "assistant";
}

bool parse_messages(LineParser& in, std::vector<Message>* out) {
  if (!in.eat('[')) return false;
  out->clear();
  if (in.eat(']')) return false;  // an empty list is an error: Python says which
  do {
    out->emplace_back();
    if (!parse_message(in, &out->back())) return false;
  } while (in.eat(','));
  return in.eat(']');
}

bool parse_images(LineParser& in, std::vector<std::string>* out) {
  out->clear();
  const char k = in.kind();
  if (k == 'n') return in.skip();  // null: no images
  if (k == '"') {
    out->emplace_back();
    return in.string(&out->back());
  }
  if (!in.eat('[')) return false;
  if (in.eat(']')) return true;
  do {
    out->emplace_back();
    if (in.kind() == '"') {
      if (!in.string(&out->back())) return false;
      continue;
    }
    // ms-swift's {"path": "..."}: exactly one string "path" among the keys
    if (!in.eat('{')) return false;
    bool found = false;
    std::string key;
    if (!in.eat('}')) {
      do {
        if (!in.string(&key) || !in.eat(':')) return false;
        if (key == "path") {
          if (found || in.kind() != '"' || !in.string(&out->back())) return false;
          found = true;
        } else if (!in.skip()) {
          return false;
        }
      } while (in.eat(','));
      if (!in.eat('}')) return false;
    }
    if (!found) return false;
  } while (in.eat(','));
  return in.eat(']');
}

struct Record {
  bool has_messages = false, has_conversations = false, has_images = false, has_system = false;
  bool has_image = false, has_caption = false, has_prompt = false, has_answer = false;
  bool image_str = false, caption_str = false, prompt_str = false, system_str = false;
  std::vector<Message> messages, conversations;
  std::vector<std::string> images;
  std::string system, image, caption, prompt;
};

// The top-level object; false for anything Python must look at.
bool parse_record(LineParser& in, Record* r) {
  if (!in.eat('{')) return false;
  if (in.eat('}')) return false;
  std::string key;
  do {
    if (!in.string(&key) || !in.eat(':')) return false;
    auto take_string = [&](bool* seen, bool* is_str, std::string* slot) {
      if (*seen) return false;
      *seen = true;
      *is_str = in.kind() == '"';
      return *is_str ? in.string(slot) : in.skip();
    };
    bool ok;
    if (key == "messages") {
      if (r->has_messages) return false;
      r->has_messages = true;
      ok = parse_messages(in, &r->messages);
    } else if (key == "conversations") {
      if (r->has_conversations) return false;
      r->has_conversations = true;
      ok = parse_messages(in, &r->conversations);
    } else if (key == "images") {
      if (r->has_images) return false;
      r->has_images = true;
      ok = parse_images(in, &r->images);
    } else if (key == "system") {
      ok = take_string(&r->has_system, &r->system_str, &r->system);
    } else if (key == "image") {
      ok = take_string(&r->has_image, &r->image_str, &r->image);
    } else if (key == "caption") {
      ok = take_string(&r->has_caption, &r->caption_str, &r->caption);
    } else if (key == "prompt") {
      ok = take_string(&r->has_prompt, &r->prompt_str, &r->prompt);
    } else {
      if (key == "answer") {
        if (r->has_answer) return false;
        r->has_answer = true;
      }
      ok = in.skip();
    }
    if (!ok) return false;
  } while (in.eat(','));
  return in.eat('}') && in.at_end();
}

// Record -> normalised messages and images, mirroring formats.parse_record; false = Python decides.
bool normalise(Record& r, bool prompt_mode, std::vector<Message>* messages, std::vector<std::string>* images) {
  if (r.has_messages || r.has_conversations) {
    // "messages" wins over "conversations" (obj.get("messages", obj.get("conversations")))
    if (r.has_messages && r.messages.empty()) return false;
    *messages = std::move(r.has_messages ? r.messages : r.conversations);
    if (r.has_system && r.system_str && (*messages)[0].role != "system")
      messages->insert(messages->begin(), Message{"system", r.system});
    *images = std::move(r.images);
  } else if (r.has_image || r.has_caption) {
    if (!r.image_str || !r.caption_str || (r.has_prompt && !r.prompt_str)) return false;
    messages->clear();
    messages->push_back(Message{"user", "<image>" + (r.has_prompt ? r.prompt : std::string(kCaptionPrompt))});
    messages->push_back(Message{"assistant", r.caption});
    images->assign(1, r.image);
  } else {
    return false;
  }
  bool has_assistant = false;
  size_t markers = 0;
  for (size_t k = 0; k < messages->size(); ++k) {
    const Message& m = (*messages)[k];
    if (m.role == "system" && k > 0) return false;
    if (m.role == "assistant") {
      if (!has_visible_ascii(m.content)) return false;  // maybe blank: Python decides
      has_assistant = true;
    }
    if (m.content.find("<|image_pad|>") != std::string::npos) return false;  // pad count: Python decides
    markers += count_of(m.content, "<image>");
  }
  if (markers != images->size()) return false;
  if (!prompt_mode) return has_assistant;
  // RL prompts (rl/rollout.py): an answer for the verifiers; trailing assistant turns dropped
  if (!r.has_answer) return false;
  while (!messages->empty() && messages->back().role == "assistant") {
    if (messages->back().content.find("<image>") != std::string::npos) return false;
    messages->pop_back();
  }
  return !messages->empty() && messages->back().role == "user";
}

void render(const std::vector<Message>& messages, const std::string& system_prompt, bool generation_prompt,
            std::string* out) {
  out->clear();
  if (messages.empty() || messages[0].role != "system") {
    out->append("<|im_start|>system\n").append(system_prompt).append("<|im_end|>\n");
  }
  for (const Message& m : messages) {
    out->append("<|im_start|>").append(m.role).append("\n");
    size_t from = 0;
    for (size_t at = m.content.find("<image>"); at != std::string::npos; at = m.content.find("<image>", from)) {
      out->append(m.content, from, at - from).append(kVision);
      from = at + 7;
    }
    out->append(m.content, from, std::string::npos).append("<|im_end|>\n");
  }
  if (generation_prompt) out->append("<|im_start|>assistant\n");
}

bool blank(const char* b, const char* e) {
  for (; b < e; ++b)
    if (*b != ' ' && *b != '\t' && *b != '\r') return false;
  return true;
}

}  // namespace

ScanResult scan_jsonl(const char* data, int64_t size, int64_t first_line, const std::string& system_prompt,
                      bool prompt_mode, BpeCounter* counter) {
  ScanResult result;
  Record record;
  std::vector<Message> messages;
  std::vector<std::string> images;
  std::string text;
  int64_t line = first_line;
  for (int64_t start = 0; start < size; ++line) {
    const char* begin = data + start;
    const char* nl = static_cast<const char*>(std::memchr(begin, '\n', size_t(size - start)));
    const char* end = nl ? nl : data + size;
    const int64_t nbytes = end - begin;
    const int64_t offset = start;
    start = nl ? (nl - data) + 1 : size;
    const char* body = begin;
    if (line == 1 && nbytes >= 3 && std::memcmp(begin, "\xEF\xBB\xBF", 3) == 0) body += 3;  // the BOM
    if (blank(body, end)) continue;
    LineParser in(body, end);
    record = Record();
    if (!parse_record(in, &record) || !normalise(record, prompt_mode, &messages, &images)) {
      result.fallback_line.push_back(line);
      result.fallback_offset.push_back(offset);
      result.fallback_nbytes.push_back(nbytes);
      continue;
    }
    render(messages, system_prompt, prompt_mode, &text);
    result.line.push_back(line);
    result.offset.push_back(offset);
    result.nbytes.push_back(nbytes);
    result.image_count.push_back(int64_t(images.size()));
    const int64_t tokens = counter ? counter->count(text) : -1;
    result.tokens.push_back(tokens);
    result.texts.push_back(tokens < 0 ? text : std::string());
    for (auto& path : images) result.image_paths.push_back(std::move(path));
  }
  result.next_line = line;
  return result;
}

}  // namespace lingshu
