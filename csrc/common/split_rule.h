// The sequence split's segment count, shared by the v7 backwards of the mixer scan (scan_api.cpp) and of the generic
// selective scan (sscan_api.cpp). Host only.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

namespace apriel {

// A split backward runs `blocks` blocks per segment (2 resident per SM: `slots` = 2 x SMs) in waves of equal-length
// blocks, so its time is ~ waves(S) / S of the unsplit one-wave time; the carry pre-pass adds ~(S - 1) / S of a
// readout-free scan over the sequence (pre_pass: its cost relative to one main-kernel wave over the same tokens, per
// block-fill). The S in 1 .. max_s with the least estimate wins; a split must win by 3 % (session 7's rule).
inline int best_segments(double blocks, double slots, int64_t max_s, double pre_pass) {
  int best = 1;
  double best_cost = 1e30;
  for (int64_t s = 1; s <= max_s; ++s) {
    const double cost = std::ceil(blocks * s / slots) / s + pre_pass * (blocks / slots) * (s - 1) / s;
    if (cost < best_cost * 0.97) {
      best = static_cast<int>(s);
      best_cost = cost;
    }
  }
  return best;
}

// The segment count an environment variable forces (capped at max_s), or 0 where it is unset / empty. *bad: set to
// the variable's value where it is not a positive integer (the caller raises its error).
inline int64_t forced_segments(const char* env_name, int64_t max_s, std::string* bad) {
  const char* env = std::getenv(env_name);
  if (env == nullptr || *env == '\0') return 0;
  const int64_t n = std::atoll(env);
  if (n < 1) {
    *bad = env;
    return 0;
  }
  return std::min<int64_t>(n, max_s);
}

// A split of `tiles` tiles into about `requested` segments: seg_tiles = ceil(tiles / requested), then segments =
// ceil(tiles / seg_tiles), so that no segment is empty (1 segment where there are no tiles).
inline void split_tiles(int64_t tiles, int requested, int& segments, int& seg_tiles) {
  seg_tiles = static_cast<int>((tiles + requested - 1) / requested);
  segments = tiles > 0 ? static_cast<int>((tiles + seg_tiles - 1) / seg_tiles) : 1;
}

}  // namespace apriel
