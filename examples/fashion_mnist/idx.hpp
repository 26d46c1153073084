// Fashion-MNIST loader: gzip'd IDX files (zlib), parsed as untrusted bytes.
//
// IDX is big-endian: a 4-byte magic (0x00000803 for unsigned-byte images with
// 3 dimensions, 0x00000801 for unsigned-byte labels with 1), one 4-byte size
// per dimension, then the values. Every size is checked against the bytes
// present (overflow-safe products), truncated and trailing bytes are
// rejected, and every error names the file.
#pragma once

#include <zlib.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <gcomp/core/error.hpp>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace fmnist {

/// Where Debian's dataset-fashion-mnist package installs the four files.
inline const char* default_dir = "/usr/share/datasets/fashion-mnist";

/// The largest file read_gzip accepts, compressed or decompressed (256 MiB;
/// the largest Fashion-MNIST file decompresses to 47,040,016 bytes).
inline constexpr std::size_t default_max_gzip_bytes = std::size_t(256) << 20;

/// Decompresses gzip data held in memory (one or more concatenated members;
/// anything that is not gzip, corrupt or truncated data, trailing garbage
/// and output over max_bytes all throw gcomp::error naming `what`).
inline std::vector<std::uint8_t> gunzip(std::span<const std::uint8_t> compressed,
                                        std::string_view what,
                                        std::size_t max_bytes = default_max_gzip_bytes) {
  constexpr std::string_view where = "fmnist::gunzip";
  if (compressed.empty()) gcomp::fail(where, what, ": is empty, not gzip data");
  z_stream zs{};
  if (inflateInit2(&zs, 15 + 16) != Z_OK)  // 15-bit window, gzip wrapper only
    gcomp::fail(where, what, ": zlib could not start inflating (out of memory?)");
  struct end_guard {
    z_stream* zs;
    ~end_guard() { inflateEnd(zs); }
  } guard{&zs};

  std::vector<std::uint8_t> out;
  std::size_t produced = 0, consumed = 0, members = 0;
  constexpr std::size_t chunk = std::size_t(1) << 16;
  for (;;) {
    if (zs.avail_in == 0 && consumed < compressed.size()) {
      const std::size_t n = std::min<std::size_t>(compressed.size() - consumed, UINT_MAX);
      // zlib's next_in is not const-qualified, but inflate never writes through it.
      zs.next_in = const_cast<Bytef*>(compressed.data() + consumed);
      zs.avail_in = static_cast<uInt>(n);
      consumed += n;
    }
    // One byte of room past the limit, so that exceeding it is detected.
    const std::size_t room = max_bytes - produced;  // produced <= max_bytes here
    const std::size_t want = room < chunk ? room + 1 : chunk;
    out.resize(produced + want);
    zs.next_out = out.data() + produced;
    zs.avail_out = static_cast<uInt>(want);
    const int ret = inflate(&zs, Z_NO_FLUSH);
    produced += want - zs.avail_out;
    if (produced > max_bytes)
      gcomp::fail(where, what, ": decompresses to more than ", max_bytes,
                  " bytes, the limit for one file; it is not a Fashion-MNIST file");
    const bool input_left = zs.avail_in != 0 || consumed < compressed.size();
    if (ret == Z_STREAM_END) {
      ++members;
      if (!input_left) break;
      if (inflateReset(&zs) != Z_OK) gcomp::fail(where, what, ": zlib could not restart inflating");
      continue;  // another gzip member follows (or garbage, which the next inflate rejects)
    }
    if (ret == Z_OK) continue;
    if (ret == Z_BUF_ERROR && !input_left)
      gcomp::fail(where, what, ": truncated gzip data (the stream ends after ", compressed.size(),
                  " compressed bytes without its end marker)");
    if (members > 0)
      gcomp::fail(where, what, ": corrupt gzip data after ", members,
                  " complete gzip member(s), e.g. trailing garbage (zlib: ",
                  zs.msg ? zs.msg : zError(ret), ")");
    gcomp::fail(where, what, ": corrupt gzip data (zlib: ", zs.msg ? zs.msg : zError(ret), ")");
  }
  out.resize(produced);
  return out;
}

/// Reads a gzip file and returns its decompressed bytes. Throws gcomp::error
/// naming the path when it is missing, unreadable, not gzip, corrupt or
/// truncated, or larger than max_bytes (compressed or decompressed).
inline std::vector<std::uint8_t> read_gzip(const std::filesystem::path& path,
                                           std::size_t max_bytes = default_max_gzip_bytes) {
  constexpr std::string_view where = "fmnist::read_gzip";
  const std::string name = path.string();
  std::error_code ec;
  const auto st = std::filesystem::status(path, ec);
  if (!std::filesystem::exists(st)) gcomp::fail(where, name, ": no such file");
  if (!std::filesystem::is_regular_file(st)) gcomp::fail(where, name, ": is not a regular file");
  std::ifstream in(path, std::ios::binary);
  if (!in) gcomp::fail(where, name, ": cannot be opened for reading");
  std::vector<std::uint8_t> compressed;
  constexpr std::size_t chunk = std::size_t(1) << 20;
  for (;;) {
    const std::size_t old = compressed.size();
    if (old > max_bytes)
      gcomp::fail(where, name, ": the compressed file is larger than ", max_bytes,
                  " bytes, the limit for one file");
    compressed.resize(old + chunk);
    in.read(reinterpret_cast<char*>(compressed.data() + old), static_cast<std::streamsize>(chunk));
    const auto got = static_cast<std::size_t>(in.gcount());
    compressed.resize(old + got);
    if (in.bad()) gcomp::fail(where, name, ": read error after ", compressed.size(), " bytes");
    if (in.eof()) break;
  }
  if (compressed.size() > max_bytes)
    gcomp::fail(where, name, ": the compressed file is larger than ", max_bytes,
                " bytes, the limit for one file");
  return gunzip(compressed, name, max_bytes);
}

/// count images of rows x cols pixels, row-major, one byte per pixel.
struct images {
  std::size_t count = 0, rows = 0, cols = 0;
  std::vector<std::uint8_t> pixels;  // count * rows * cols bytes
};

/// One class index in [0, 10) per image.
struct labels {
  std::vector<std::uint8_t> values;
};

namespace detail {

inline std::uint32_t read_be32(std::span<const std::uint8_t> bytes, std::size_t at) {
  return (std::uint32_t(bytes[at]) << 24) | (std::uint32_t(bytes[at + 1]) << 16) |
         (std::uint32_t(bytes[at + 2]) << 8) | std::uint32_t(bytes[at + 3]);
}

inline std::string hex32(std::uint32_t v) {
  char text[16];
  std::snprintf(text, sizeof text, "0x%08X", static_cast<unsigned>(v));
  return text;
}

// Checks the header size and magic of an IDX file.
inline void check_idx_header(std::span<const std::uint8_t> bytes, std::string_view what,
                             std::string_view where, std::size_t header, std::uint32_t magic,
                             std::string_view kind) {
  if (bytes.size() < header)
    gcomp::fail(where, what, ": truncated header: ", bytes.size(), " bytes, but an IDX ", kind,
                " file starts with a ", header, "-byte header");
  const std::uint32_t got = read_be32(bytes, 0);
  if (got != magic)
    gcomp::fail(where, what, ": magic number is ", hex32(got), " but an IDX ", kind, " file has ",
                hex32(magic));
}

// The body must be exactly `expected` bytes after the header.
inline void check_idx_body(std::span<const std::uint8_t> bytes, std::string_view what,
                           std::string_view where, std::size_t header, std::size_t expected,
                           std::string_view described) {
  const std::size_t body = bytes.size() - header;
  if (body < expected)
    gcomp::fail(where, what, ": truncated: the header says ", described, " = ", expected,
                " bytes but only ", body, " follow the header");
  if (body > expected)
    gcomp::fail(where, what, ": ", body - expected, " trailing bytes: the header says ", described,
                " = ", expected, " bytes but ", body, " follow the header");
}

}  // namespace detail

/// Parses an IDX image file (magic 0x00000803: count, rows, cols, pixels).
/// rows and cols must be > 0; count may be 0. `what` (the file's name)
/// appears in every error.
inline images parse_images(std::span<const std::uint8_t> bytes, std::string_view what) {
  constexpr std::string_view where = "fmnist::parse_images";
  constexpr std::size_t header = 16;
  detail::check_idx_header(bytes, what, where, header, 0x00000803u, "image");
  images im;
  im.count = detail::read_be32(bytes, 4);
  im.rows = detail::read_be32(bytes, 8);
  im.cols = detail::read_be32(bytes, 12);
  if (im.rows == 0 || im.cols == 0)
    gcomp::fail(where, what, ": images are ", im.rows, " x ", im.cols,
                " pixels; rows and columns must be > 0");
  constexpr std::size_t max = std::numeric_limits<std::size_t>::max();
  const bool overflow = im.rows > max / im.cols ||
                        (im.count != 0 && im.rows * im.cols > max / im.count) ||
                        im.count * im.rows * im.cols > max - header;
  if (overflow)
    gcomp::fail(where, what, ": ", im.count, " images of ", im.rows, " x ", im.cols,
                " pixels is more bytes than memory can address");
  const std::size_t n = im.count * im.rows * im.cols;
  detail::check_idx_body(bytes, what, where, header, n,
                         gcomp::detail::concat(im.count, " images of ", im.rows, " x ", im.cols));
  im.pixels.assign(bytes.begin() + header, bytes.end());
  return im;
}

/// Parses an IDX label file (magic 0x00000801: count, labels); every label
/// must be < 10. `what` (the file's name) appears in every error.
inline labels parse_labels(std::span<const std::uint8_t> bytes, std::string_view what) {
  constexpr std::string_view where = "fmnist::parse_labels";
  constexpr std::size_t header = 8;
  detail::check_idx_header(bytes, what, where, header, 0x00000801u, "label");
  const std::size_t count = detail::read_be32(bytes, 4);
  detail::check_idx_body(bytes, what, where, header, count,
                         gcomp::detail::concat(count, " labels"));
  labels l;
  l.values.assign(bytes.begin() + header, bytes.end());
  for (std::size_t i = 0; i < l.values.size(); ++i)
    if (l.values[i] >= 10)
      gcomp::fail(where, what, ": label ", i, " is ", unsigned(l.values[i]),
                  " but Fashion-MNIST has classes 0 to 9");
  return l;
}

/// The four Fashion-MNIST files, parsed.
struct dataset {
  images train_images, test_images;
  labels train_labels, test_labels;
};

/// Loads train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
/// t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from `dir`.
/// Image and label counts must match, and train and test images must have
/// the same size. A missing directory or file is reported with how to get
/// the data set.
inline dataset load(const std::filesystem::path& dir = default_dir) {
  constexpr std::string_view where = "fmnist::load";
  constexpr std::string_view hint =
      "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), or pass "
      "--data DIR";
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec))
    gcomp::fail(where, "the Fashion-MNIST directory ", dir.string(), " does not exist; ", hint);
  auto read = [&](std::string_view file) {
    const std::filesystem::path path = dir / file;
    if (!std::filesystem::exists(path, ec))
      gcomp::fail(where, path.string(), " is missing; ", hint);
    return read_gzip(path);
  };
  constexpr std::string_view files[4] = {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"};
  dataset d;
  d.train_images = parse_images(read(files[0]), (dir / files[0]).string());
  d.train_labels = parse_labels(read(files[1]), (dir / files[1]).string());
  d.test_images = parse_images(read(files[2]), (dir / files[2]).string());
  d.test_labels = parse_labels(read(files[3]), (dir / files[3]).string());
  auto same_count = [&](const images& im, const labels& l, std::string_view a, std::string_view b) {
    if (im.count != l.values.size())
      gcomp::fail(where, (dir / a).string(), " holds ", im.count, " images but ",
                  (dir / b).string(), " holds ", l.values.size(), " labels; they must match");
  };
  same_count(d.train_images, d.train_labels, files[0], files[1]);
  same_count(d.test_images, d.test_labels, files[2], files[3]);
  if (d.train_images.rows != d.test_images.rows || d.train_images.cols != d.test_images.cols)
    gcomp::fail(where, (dir / files[0]).string(), " holds ", d.train_images.rows, " x ",
                d.train_images.cols, " images but ", (dir / files[2]).string(), " holds ",
                d.test_images.rows, " x ", d.test_images.cols, "; they must match");
  return d;
}

}  // namespace fmnist
