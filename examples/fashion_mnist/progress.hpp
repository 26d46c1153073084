// The trainer's progress output: on a terminal, one line redrawn in place
// (at most ~10 times a second); otherwise one plain line per epoch.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <gcomp/core/error.hpp>
#include <string>

namespace fmnist {

/// Where training stands.
struct status {
  std::size_t epoch = 0, epochs = 0;                   // 1-based epoch of `epochs`
  std::size_t step_in_epoch = 0, steps_per_epoch = 0;  // 1-based step of the epoch
  double loss = 0;
  double accuracy = -1;  // test accuracy as a fraction in [0, 1]; < 0: not yet measured
  double megabytes_sent = 0;
  double seconds = 0;
};

/// Whether `f` is a terminal (isatty(fileno(f))).
inline bool is_terminal(std::FILE* f) { return f != nullptr && isatty(fileno(f)) == 1; }

class progress {
 public:
  /// terminal: redraw one line with '\r'; otherwise print one line per epoch.
  /// min_interval_s: the least time between two redraws by update().
  progress(std::FILE* out, bool terminal, double min_interval_s = 0.1)
      : out_(out), terminal_(terminal), min_interval_s_(min_interval_s) {
    if (out == nullptr) gcomp::fail("fmnist::progress::progress", "out is a null FILE*");
    gcomp::check_non_negative("fmnist::progress::progress", "min_interval_s", min_interval_s);
  }

  /// Redraws the line (terminal only; skipped if the last redraw was less
  /// than min_interval_s ago).
  void update(const status& s) {
    if (!terminal_) return;
    const auto now = std::chrono::steady_clock::now();
    if (drawn_ && std::chrono::duration<double>(now - last_).count() < min_interval_s_) return;
    draw(s);
    last_ = now;
    drawn_ = true;
  }

  /// Finishes the epoch: the final line and '\n' on a terminal, one plain
  /// line otherwise.
  void end_epoch(const status& s) {
    if (terminal_) {
      draw(s);
      std::fputc('\n', out_);
      width_ = 0;
      drawn_ = false;
    } else {
      std::fprintf(out_, "epoch %zu/%zu: loss %.4f, test accuracy %s, %.1f MB sent, %.1f s\n",
                   s.epoch, s.epochs, s.loss, accuracy_text(s.accuracy).c_str(), s.megabytes_sent,
                   s.seconds);
    }
    std::fflush(out_);
  }

 private:
  static std::string accuracy_text(double accuracy) {
    if (!(accuracy >= 0)) return "-";
    char text[32];
    std::snprintf(text, sizeof text, "%.2f%%", 100 * accuracy);
    return text;
  }

  void draw(const status& s) {
    constexpr std::size_t bar = 20;
    const std::size_t filled =
        s.steps_per_epoch == 0 ? 0 : std::min(bar, bar * s.step_in_epoch / s.steps_per_epoch);
    std::string line = "epoch " + std::to_string(s.epoch) + "/" + std::to_string(s.epochs) + " [" +
                       std::string(filled, '#') + std::string(bar - filled, '.') + "] " +
                       std::to_string(s.step_in_epoch) + "/" + std::to_string(s.steps_per_epoch);
    char tail[160];
    std::snprintf(tail, sizeof tail, "  loss %.4f  acc %s  %.1f MB sent  %.1f s", s.loss,
                  accuracy_text(s.accuracy).c_str(), s.megabytes_sent, s.seconds);
    line += tail;
    const std::size_t width = line.size();
    if (width < width_) line.append(width_ - width, ' ');  // blank what the last line left
    width_ = width;
    std::fprintf(out_, "\r%s", line.c_str());
    std::fflush(out_);
  }

  std::FILE* out_;
  bool terminal_;
  double min_interval_s_;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point last_{};
  std::size_t width_ = 0;
};

}  // namespace fmnist
