// Native M-RoPE index builder for one unpadded sample: same ids and same validation as
// lingshu_fast/data/rope.py's numpy path.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "native.h"

namespace lingshu {

void mrope_position_ids(const int64_t* input_ids, int64_t n_tokens, const int64_t* grid_thw, int64_t n_images,
                        int64_t image_token_id, int64_t vision_start_token_id, int64_t spatial_merge_size,
                        int64_t* out) {
  if (spatial_merge_size < 1) throw std::invalid_argument("spatial_merge_size must be >= 1");
  const int64_t merge_area = spatial_merge_size * spatial_merge_size;
  int64_t expected_tokens = 0;
  for (int64_t k = 0; k < n_images; ++k) {
    const int64_t* g = grid_thw + 3 * k;
    if (g[0] <= 0 || g[1] <= 0 || g[2] <= 0) throw std::invalid_argument("image_grid_thw entries must be positive");
    if (g[1] % spatial_merge_size || g[2] % spatial_merge_size)
      throw std::invalid_argument("image_grid_thw heights/widths must be multiples of spatial_merge_size=" +
                                  std::to_string(spatial_merge_size));
    expected_tokens += g[0] * g[1] * g[2] / merge_area;
  }
  const int64_t found_tokens = std::count(input_ids, input_ids + n_tokens, image_token_id);
  if (found_tokens != expected_tokens)
    throw std::invalid_argument("the sample has " + std::to_string(found_tokens) +
                                " image placeholder tokens but image_grid_thw describes " +
                                std::to_string(n_images) + " image(s) needing " + std::to_string(expected_tokens));

  int64_t* out_t = out;
  int64_t* out_h = out + n_tokens;
  int64_t* out_w = out + 2 * n_tokens;
  int64_t next_pos = 0;  // position of the next text token
  int64_t image = 0;
  for (int64_t i = 0; i < n_tokens;) {
    if (input_ids[i] != image_token_id) {
      out_t[i] = out_h[i] = out_w[i] = next_pos++;
      ++i;
      continue;
    }
    const int64_t* g = grid_thw + 3 * image;
    const int64_t h = g[1] / spatial_merge_size, w = g[2] / spatial_merge_size;
    const int64_t count = g[0] * h * w;
    if (i + count > n_tokens || std::count(input_ids + i, input_ids + i + count, image_token_id) != count)
      throw std::invalid_argument("image " + std::to_string(image) + "'s " + std::to_string(count) +
                                  " placeholder tokens are not contiguous from token " + std::to_string(i));
    if (i == 0 || input_ids[i - 1] != vision_start_token_id)
      throw std::invalid_argument("image " + std::to_string(image) + "'s placeholder run at token " +
                                  std::to_string(i) + " is not preceded by the vision-start token");
    int64_t j = i;
    for (int64_t t = 0; t < g[0]; ++t)
      for (int64_t y = 0; y < h; ++y)
        for (int64_t x = 0; x < w; ++x, ++j) {
          out_t[j] = next_pos + t;
          out_h[j] = next_pos + y;
          out_w[j] = next_pos + x;
        }
    next_pos += std::max(h, w);  // the text after an image resumes max(h, w) further on
    i += count;
    ++image;
  }
}

}  // namespace lingshu
