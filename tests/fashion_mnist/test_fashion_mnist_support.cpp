// Tests of the Fashion-MNIST trainer's torch-free support headers
// (examples/fashion_mnist): the IDX/gzip loader, the modeled network clock and
// the progress line.
#include <doctest/doctest.h>
#include <stdlib.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "fashion_mnist/idx.hpp"
#include "fashion_mnist/network_model.hpp"
#include "fashion_mnist/progress.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/exec/host.hpp"

namespace {

namespace fs = std::filesystem;
using bytes = std::vector<std::uint8_t>;

// The message of the gcomp::error f throws; fails the test if f throws nothing.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const gcomp::error& e) {
    return e.what();
  }
  FAIL("expected a gcomp::error");
  return {};
}

bool contains(const std::string& text, std::string_view part) {
  return text.find(part) != std::string::npos;
}

void check_mentions(const std::string& message, std::initializer_list<std::string_view> parts) {
  INFO("message: ", message);
  for (const auto part : parts) {
    INFO("expected to mention: ", std::string(part));
    CHECK(contains(message, part));
  }
}

void put_be32(bytes& out, std::uint32_t v) {
  out.push_back(std::uint8_t(v >> 24));
  out.push_back(std::uint8_t(v >> 16));
  out.push_back(std::uint8_t(v >> 8));
  out.push_back(std::uint8_t(v));
}

bytes idx_images(std::uint32_t count, std::uint32_t rows, std::uint32_t cols, const bytes& pixels,
                 std::uint32_t magic = 0x00000803) {
  bytes out;
  put_be32(out, magic);
  put_be32(out, count);
  put_be32(out, rows);
  put_be32(out, cols);
  out.insert(out.end(), pixels.begin(), pixels.end());
  return out;
}

bytes idx_labels(const bytes& values, std::uint32_t magic = 0x00000801) {
  bytes out;
  put_be32(out, magic);
  put_be32(out, std::uint32_t(values.size()));
  out.insert(out.end(), values.begin(), values.end());
  return out;
}

// A fresh directory, removed with everything in it at scope exit.
struct temp_dir {
  fs::path path;
  temp_dir() {
    std::string pattern = (fs::temp_directory_path() / "gcomp_fmnist_XXXXXX").string();
    REQUIRE(mkdtemp(pattern.data()) != nullptr);
    path = pattern;
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

// Writes `data` gzip-compressed with zlib's own gzip writer (mode "wb" or "ab").
void write_gzip(const fs::path& path, const bytes& data, const char* mode = "wb") {
  gzFile f = gzopen(path.c_str(), mode);
  REQUIRE(f != nullptr);
  if (!data.empty()) REQUIRE(gzwrite(f, data.data(), unsigned(data.size())) == int(data.size()));
  REQUIRE(gzclose(f) == Z_OK);
}

void write_raw(const fs::path& path, const bytes& data) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(data.data()), std::streamsize(data.size()));
  REQUIRE(out.good());
}

bytes read_raw(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

bytes pattern_bytes(std::size_t n) {
  bytes out(n);
  for (std::size_t i = 0; i < n; ++i) out[i] = std::uint8_t((i * 7 + i / 251) % 256);
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------
// IDX parsing

TEST_CASE("parse_images and parse_labels read crafted files back exactly") {
  bytes pixels(3 * 2 * 5);
  for (std::size_t i = 0; i < pixels.size(); ++i) pixels[i] = std::uint8_t(255 - 7 * i);
  const fmnist::images im = fmnist::parse_images(idx_images(3, 2, 5, pixels), "imgs");
  CHECK(im.count == 3);
  CHECK(im.rows == 2);
  CHECK(im.cols == 5);
  CHECK(im.pixels == pixels);

  // Big-endian sizes: 0x00000102 images is 258, not 0x02010000.
  const bytes many(258 * 1 * 1, 9);
  const fmnist::images big = fmnist::parse_images(idx_images(0x102, 1, 1, many), "imgs");
  CHECK(big.count == 258);
  CHECK(big.pixels == many);

  const fmnist::images none = fmnist::parse_images(idx_images(0, 28, 28, {}), "imgs");
  CHECK(none.count == 0);
  CHECK(none.pixels.empty());

  const bytes values = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 9};
  CHECK(fmnist::parse_labels(idx_labels(values), "labs").values == values);
  CHECK(fmnist::parse_labels(idx_labels({}), "labs").values.empty());
}

TEST_CASE("parse_images rejects malformed files, naming the file") {
  const bytes pixels(2 * 3 * 4, 1);
  const bytes good = idx_images(2, 3, 4, pixels);
  const std::string what = "train-images-idx3-ubyte.gz";
  auto parse = [&](const bytes& b) { return [&, b] { (void)fmnist::parse_images(b, what); }; };

  check_mentions(error_of(parse(idx_images(2, 3, 4, pixels, 0x00000801))),
                 {what, "magic", "0x00000801", "0x00000803"});
  check_mentions(error_of(parse(bytes(good.begin(), good.begin() + 15))),
                 {what, "truncated header", "15 bytes"});
  check_mentions(error_of(parse({})), {what, "truncated header", "0 bytes"});
  check_mentions(error_of(parse(bytes(good.begin(), good.end() - 1))),
                 {what, "truncated", "24 bytes", "only 23"});
  bytes trailing = good;
  trailing.push_back(0);
  check_mentions(error_of(parse(trailing)), {what, "1 trailing bytes", "24 bytes but 25"});
  check_mentions(error_of(parse(idx_images(2, 0, 4, {}))), {what, "0 x 4", "must be > 0"});
  check_mentions(error_of(parse(idx_images(2, 3, 0, {}))), {what, "3 x 0", "must be > 0"});
  // 2^32-1 cubed is about 2^96: more than any size_t.
  check_mentions(error_of(parse(idx_images(0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, {}))),
                 {what, "4294967295 images of 4294967295 x 4294967295", "more bytes than memory"});
  // A product that fits but is far more than the bytes present.
  check_mentions(error_of(parse(idx_images(0xFFFFFFFFu, 28, 28, pixels))),
                 {what, "truncated", "only 24"});
}

TEST_CASE("parse_labels rejects malformed files, naming the file and the first bad label") {
  const std::string what = "t10k-labels-idx1-ubyte.gz";
  const bytes values = {1, 2, 3, 4, 5};
  const bytes good = idx_labels(values);
  auto parse = [&](const bytes& b) { return [&, b] { (void)fmnist::parse_labels(b, what); }; };

  check_mentions(error_of(parse(idx_labels(values, 0x00000803))),
                 {what, "magic", "0x00000803", "0x00000801"});
  check_mentions(error_of(parse(bytes(good.begin(), good.begin() + 7))),
                 {what, "truncated header", "7 bytes"});
  check_mentions(error_of(parse(bytes(good.begin(), good.end() - 2))),
                 {what, "truncated", "5 labels", "only 3"});
  bytes trailing = good;
  trailing.push_back(0);
  check_mentions(error_of(parse(trailing)), {what, "1 trailing bytes"});
  check_mentions(error_of(parse(idx_labels({0, 9, 9, 9, 10, 11, 200}))),
                 {what, "label 4 is 10", "0 to 9"});
  check_mentions(error_of(parse(idx_labels({255}))), {what, "label 0 is 255"});
}

// ---------------------------------------------------------------------------
// gzip

TEST_CASE("read_gzip round-trips a file written with zlib's gzwrite") {
  temp_dir dir;
  const bytes data = pattern_bytes(300000);  // several 64 KiB inflate chunks
  write_gzip(dir.path / "data.gz", data);
  CHECK(fmnist::read_gzip(dir.path / "data.gz") == data);

  write_gzip(dir.path / "empty.gz", {});
  CHECK(fmnist::read_gzip(dir.path / "empty.gz").empty());

  // Concatenated gzip members decode to the concatenation (as gunzip does).
  const bytes more = pattern_bytes(1000);
  write_gzip(dir.path / "two.gz", data);
  write_gzip(dir.path / "two.gz", more, "ab");
  bytes both = data;
  both.insert(both.end(), more.begin(), more.end());
  CHECK(fmnist::read_gzip(dir.path / "two.gz") == both);
}

TEST_CASE("read_gzip enforces its size limit exactly") {
  temp_dir dir;
  const fs::path path = dir.path / "data.gz";
  const bytes data(100000, 42);  // compresses to far less than the limits below
  write_gzip(path, data);
  CHECK(fmnist::read_gzip(path, 100000) == data);
  check_mentions(error_of([&] { (void)fmnist::read_gzip(path, 99999); }),
                 {path.string(), "more than 99999 bytes", "limit"});
  check_mentions(error_of([&] { (void)fmnist::read_gzip(path, 10); }),
                 {path.string(), "larger than 10 bytes", "limit"});
}

TEST_CASE("read_gzip rejects missing, corrupt, truncated and non-gzip files, naming them") {
  temp_dir dir;
  const bytes data = pattern_bytes(50000);
  write_gzip(dir.path / "good.gz", data);
  const bytes good = read_raw(dir.path / "good.gz");
  REQUIRE(good.size() > 40);

  const fs::path missing = dir.path / "missing.gz";
  check_mentions(error_of([&] { (void)fmnist::read_gzip(missing); }),
                 {missing.string(), "no such file"});
  check_mentions(error_of([&] { (void)fmnist::read_gzip(dir.path); }),
                 {dir.path.string(), "not a regular file"});

  auto rejected = [&](const char* name, const bytes& content) {
    const fs::path p = dir.path / name;
    write_raw(p, content);
    const std::string message = error_of([&] { (void)fmnist::read_gzip(p); });
    CHECK(contains(message, p.string()));
    return message;
  };
  // The CRC-32 of the data is the trailer's first 4 bytes.
  bytes bad_crc = good;
  bad_crc[bad_crc.size() - 8] ^= 0x01;
  check_mentions(rejected("bad_crc.gz", bad_crc), {"corrupt gzip data"});
  bytes bad_magic = good;
  bad_magic[0] = 0x00;
  check_mentions(rejected("bad_magic.gz", bad_magic), {"corrupt gzip data"});
  check_mentions(rejected("plain.gz", {'h', 'e', 'l', 'l', 'o', '\n'}), {"corrupt gzip data"});
  check_mentions(
      rejected("half.gz", bytes(good.begin(), good.begin() + std::ptrdiff_t(good.size() / 2))),
      {"truncated gzip data"});
  check_mentions(rejected("no_trailer.gz", bytes(good.begin(), good.end() - 1)),
                 {"truncated gzip data"});
  check_mentions(rejected("empty.gz", {}), {"is empty"});
  bytes garbage = good;
  garbage.insert(garbage.end(), {'j', 'u', 'n', 'k', '!', '!', '!', '!', '!', '!', '!'});
  check_mentions(rejected("garbage.gz", garbage),
                 {"corrupt gzip data after 1 complete gzip member"});
}

// ---------------------------------------------------------------------------
// load()

TEST_CASE("load reads the four files and checks them against each other") {
  temp_dir dir;
  const bytes train_pixels = pattern_bytes(5 * 3 * 2), test_pixels = pattern_bytes(2 * 3 * 2);
  const bytes train_labels = {0, 9, 4, 4, 1}, test_labels = {7, 2};
  write_gzip(dir.path / "train-images-idx3-ubyte.gz", idx_images(5, 3, 2, train_pixels));
  write_gzip(dir.path / "train-labels-idx1-ubyte.gz", idx_labels(train_labels));
  write_gzip(dir.path / "t10k-images-idx3-ubyte.gz", idx_images(2, 3, 2, test_pixels));
  write_gzip(dir.path / "t10k-labels-idx1-ubyte.gz", idx_labels(test_labels));

  const fmnist::dataset d = fmnist::load(dir.path);
  CHECK(d.train_images.count == 5);
  CHECK(d.train_images.rows == 3);
  CHECK(d.train_images.cols == 2);
  CHECK(d.train_images.pixels == train_pixels);
  CHECK(d.test_images.count == 2);
  CHECK(d.test_images.pixels == test_pixels);
  CHECK(d.train_labels.values == train_labels);
  CHECK(d.test_labels.values == test_labels);

  const std::string hint =
      "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), or pass "
      "--data DIR";
  // Counts that disagree.
  write_gzip(dir.path / "t10k-labels-idx1-ubyte.gz", idx_labels({7, 2, 3}));
  check_mentions(
      error_of([&] { (void)fmnist::load(dir.path); }),
      {"t10k-images-idx3-ubyte.gz", "2 images", "t10k-labels-idx1-ubyte.gz", "3 labels"});
  // Image sizes that disagree.
  write_gzip(dir.path / "t10k-labels-idx1-ubyte.gz", idx_labels(test_labels));
  write_gzip(dir.path / "t10k-images-idx3-ubyte.gz", idx_images(2, 2, 3, test_pixels));
  check_mentions(error_of([&] { (void)fmnist::load(dir.path); }), {"3 x 2", "2 x 3", "must match"});
  // A malformed file is named with its directory.
  write_gzip(dir.path / "t10k-images-idx3-ubyte.gz",
             idx_images(2, 3, 2, test_pixels, 0x0803u << 8));
  check_mentions(error_of([&] { (void)fmnist::load(dir.path); }),
                 {(dir.path / "t10k-images-idx3-ubyte.gz").string(), "magic"});
  // A missing file, then a missing directory.
  fs::remove(dir.path / "train-labels-idx1-ubyte.gz");
  check_mentions(error_of([&] { (void)fmnist::load(dir.path); }),
                 {(dir.path / "train-labels-idx1-ubyte.gz").string(), "missing", hint});
  const fs::path nowhere = dir.path / "nowhere";
  check_mentions(error_of([&] { (void)fmnist::load(nowhere); }),
                 {nowhere.string(), "does not exist", hint});
}

TEST_CASE("the real Fashion-MNIST: 60,000 + 10,000 images of 28 x 28, balanced classes") {
  if (!fs::is_directory(fmnist::default_dir)) {
    MESSAGE("skipped: ", fmnist::default_dir,
            " does not exist (apt-get install dataset-fashion-mnist)");
    return;
  }
  const fmnist::dataset d = fmnist::load(fmnist::default_dir);
  CHECK(d.train_images.count == 60000);
  CHECK(d.test_images.count == 10000);
  for (const fmnist::images* im : {&d.train_images, &d.test_images}) {
    CHECK(im->rows == 28);
    CHECK(im->cols == 28);
    CHECK(im->pixels.size() == im->count * 28 * 28);
  }
  std::array<std::size_t, 10> train{}, test{};
  for (const auto v : d.train_labels.values) ++train[v];  // parse_labels guarantees v < 10
  for (const auto v : d.test_labels.values) ++test[v];
  for (std::size_t c = 0; c < 10; ++c) {
    INFO("class ", c);
    CHECK(train[c] == 6000);
    CHECK(test[c] == 1000);
  }
}

// ---------------------------------------------------------------------------
// The network model

TEST_CASE("parse_link accepts exactly the three links") {
  const fmnist::link one = fmnist::parse_link("1gbit");
  CHECK(one.name == "1gbit");
  CHECK(one.latency_s == 50e-6);
  CHECK(one.bandwidth_Bps == 125e6);
  const fmnist::link ten = fmnist::parse_link("10gbit");
  CHECK(ten.name == "10gbit");
  CHECK(ten.latency_s == 20e-6);
  CHECK(ten.bandwidth_Bps == 1.25e9);
  const fmnist::link hundred = fmnist::parse_link("100gbit");
  CHECK(hundred.name == "100gbit");
  CHECK(hundred.latency_s == 5e-6);
  CHECK(hundred.bandwidth_Bps == 12.5e9);
  for (const char* bad : {"2gbit", "", "1Gbit", "1gbit ", "gbit"}) {
    INFO("link ", bad);
    check_mentions(error_of([&] { (void)fmnist::parse_link(bad); }),
                   {std::string("\"") + bad + "\"", "1gbit, 10gbit, 100gbit"});
  }
}

TEST_CASE("the ring formulas give their closed forms") {
  const fmnist::link l = fmnist::parse_link("1gbit");  // a = 50 us, b = 125 MB/s
  using doctest::Approx;
  // M = 4: 2*3*50e-6 + 2*3/4 * 1e6 / 125e6 = 3e-4 + 0.012.
  CHECK(fmnist::allreduce_seconds(l, 4, 1000000) == Approx(0.0123).epsilon(1e-12));
  // 3*50e-6 + 3 * 1e6 / 125e6 = 1.5e-4 + 0.024.
  CHECK(fmnist::allgather_seconds(l, 4, 1000000) == Approx(0.02415).epsilon(1e-12));
  // 3*50e-6 + (751000 - 0) / 125e6 = 1.5e-4 + 0.006008.
  const std::size_t counts[] = {1000, 250000, 0, 500000};
  CHECK(fmnist::allgatherv_seconds(l, 4, counts) == Approx(0.006158).epsilon(1e-12));
  // min c = 1000 (not subtracted per rank): (755000 - 1000) / 125e6 = 0.006032.
  const std::size_t shifted[] = {2000, 251000, 1000, 501000};
  CHECK(fmnist::allgatherv_seconds(l, 4, shifted) == Approx(0.000150 + 0.006032).epsilon(1e-12));
  // 3*50e-6 + 1e6 / 125e6 = 1.5e-4 + 0.008.
  CHECK(fmnist::broadcast_seconds(l, 4, 1000000) == Approx(0.00815).epsilon(1e-12));
  CHECK(fmnist::barrier_seconds(l, 4) == Approx(3e-4).epsilon(1e-12));
  // No bytes: latency only.
  CHECK(fmnist::allreduce_seconds(l, 4, 0) == Approx(3e-4).epsilon(1e-12));
  // 10 Gbit/s, M = 2, 1.25e9 bytes: 2*20e-6 + 1 * 1.25e9 / 1.25e9.
  CHECK(fmnist::allreduce_seconds(fmnist::parse_link("10gbit"), 2, 1250000000) ==
        Approx(1.00004).epsilon(1e-12));

  // One worker: nothing crosses a link.
  const std::size_t one[] = {123456};
  CHECK(fmnist::allreduce_seconds(l, 1, 1000000) == 0);
  CHECK(fmnist::allgather_seconds(l, 1, 1000000) == 0);
  CHECK(fmnist::allgatherv_seconds(l, 1, one) == 0);
  CHECK(fmnist::broadcast_seconds(l, 1, 1000000) == 0);
  CHECK(fmnist::barrier_seconds(l, 1) == 0);

  check_mentions(error_of([&] { (void)fmnist::allreduce_seconds(l, 0, 1); }), {"workers", "0"});
  check_mentions(error_of([&] { (void)fmnist::allgatherv_seconds(l, 3, counts); }),
                 {"counts has size 4", "workers has size 3"});
  const fmnist::link broken{"broken", 1e-6, 0};
  check_mentions(error_of([&] { (void)fmnist::barrier_seconds(broken, 2); }), {"bandwidth_Bps"});
}

static_assert(
    gcomp::communicator<fmnist::modeled_comm<gcomp::inproc_comm>, gcomp::host_seq, float>);
static_assert(
    gcomp::communicator<fmnist::modeled_comm<gcomp::inproc_comm>, gcomp::host_seq, double>);

namespace {

// What one rank sees of the call sequence below.
struct observed {
  std::vector<float> reduced, ireduced;
  std::vector<std::byte> gathered, gathered_v;
  std::vector<std::size_t> counts;
  std::vector<double> broadcast;
  gcomp::comm_stats stats;
};

constexpr std::size_t reduce_n = 1000, ireduce_n = 500, gather_n = 64, broadcast_n = 300;
constexpr std::size_t v_counts[4] = {5, 42, 3, 17};

// allreduce, allgather, allgatherv (unequal counts), broadcast, barrier, then
// a non-blocking allreduce, on any communicator.
template <class Comm>
observed run_sequence(Comm& c) {
  const gcomp::host_seq policy;
  const auto r = std::size_t(c.rank());
  observed o;
  o.reduced.resize(reduce_n);
  for (std::size_t i = 0; i < reduce_n; ++i)
    o.reduced[i] = float(r + 1) * 0.1f + float(i) * 1.37e-3f - float(r * i % 7) * 3.3e-4f;
  c.allreduce_sum(policy, std::span<float>(o.reduced));

  std::vector<std::byte> in(gather_n);
  for (std::size_t i = 0; i < gather_n; ++i) in[i] = std::byte((r * 31 + i) & 0xFF);
  o.gathered.resize(gather_n * std::size_t(c.size()));
  c.allgather(policy, std::span<const std::byte>(in), std::span<std::byte>(o.gathered));

  std::vector<std::byte> vin(v_counts[r]);
  for (std::size_t i = 0; i < vin.size(); ++i) vin[i] = std::byte((r * 59 + i * 3) & 0xFF);
  o.counts.assign(std::size_t(c.size()), 0);
  c.allgatherv(policy, std::span<const std::byte>(vin), o.gathered_v,
               std::span<std::size_t>(o.counts));

  o.broadcast.assign(broadcast_n, 0.0);
  for (std::size_t i = 0; i < broadcast_n; ++i) o.broadcast[i] = double(r) * 1e3 + double(i) / 3;
  c.broadcast(policy, std::span<double>(o.broadcast), std::min(2, c.size() - 1));

  c.barrier();

  o.ireduced.resize(ireduce_n);
  for (std::size_t i = 0; i < ireduce_n; ++i) o.ireduced[i] = float(i) / float(r + 3);
  auto request = c.iallreduce_sum(policy, std::span<float>(o.ireduced));
  request.wait();
  o.stats = c.stats();
  return o;
}

template <class T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

}  // namespace

TEST_CASE("modeled_comm forwards to the inner communicator and models the sequence's time") {
  constexpr int workers = 4;
  std::vector<observed> direct(workers), modeled(workers);
  gcomp::inproc_group plain(workers);
  plain.run([&](gcomp::inproc_comm& c) { direct[std::size_t(c.rank())] = run_sequence(c); });

  const fmnist::link l = fmnist::parse_link("1gbit");
  std::vector<double> blocking(workers), background(workers), measured(workers), elapsed(workers);
  std::vector<gcomp::comm_stats> inner_stats(workers);
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& c) {
    const auto r = std::size_t(c.rank());
    fmnist::modeled_comm<gcomp::inproc_comm> m(c, l);
    CHECK(m.rank() == c.rank());
    CHECK(m.size() == workers);
    const auto start = std::chrono::steady_clock::now();
    modeled[r] = run_sequence(m);
    elapsed[r] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    blocking[r] = m.modeled_seconds();
    background[r] = m.background_modeled_seconds();
    measured[r] = m.measured_comm_seconds();
    inner_stats[r] = c.stats();
  });

  // The closed forms, written out: M = 4, a = 50e-6, b = 125e6.
  const double a = 50e-6, b = 125e6;
  const double expected = (6 * a + 1.5 * 4000 / b)            // allreduce of 1000 floats
                          + (3 * a + 3 * 64.0 / b)            // allgather of 64 bytes per rank
                          + (3 * a + (67 - 3) / b)            // allgatherv of 5 + 42 + 3 + 17 bytes
                          + (3 * a + 2400 / b)                // broadcast of 300 doubles
                          + 6 * a;                            // barrier
  const double expected_background = 6 * a + 1.5 * 2000 / b;  // iallreduce of 500 floats
  for (std::size_t r = 0; r < workers; ++r) {
    INFO("rank ", r);
    CHECK(bitwise_equal(modeled[r].reduced, direct[r].reduced));
    CHECK(bitwise_equal(modeled[r].ireduced, direct[r].ireduced));
    CHECK(bitwise_equal(modeled[r].gathered, direct[r].gathered));
    CHECK(bitwise_equal(modeled[r].gathered_v, direct[r].gathered_v));
    CHECK(modeled[r].counts == std::vector<std::size_t>(std::begin(v_counts), std::end(v_counts)));
    CHECK(bitwise_equal(modeled[r].broadcast, direct[r].broadcast));
    CHECK(modeled[r].stats == direct[r].stats);
    CHECK(modeled[r].stats == inner_stats[r]);
    CHECK(modeled[r].stats.collectives == 6);
    CHECK(blocking[r] == doctest::Approx(expected).epsilon(1e-12));
    CHECK(blocking[r] == blocking[0]);  // every rank models the same time
    CHECK(background[r] == doctest::Approx(expected_background).epsilon(1e-12));
    CHECK(measured[r] > 0);
    CHECK(measured[r] <= elapsed[r]);
  }
}

TEST_CASE("modeled_comm: a failed collective adds no modeled time; reset_clock; one worker") {
  constexpr int workers = 3;
  const fmnist::link l = fmnist::parse_link("100gbit");
  gcomp::inproc_group group(workers);
  std::vector<std::string> messages(workers);
  std::vector<double> after_fail(workers), after_reset(workers), measured_after_fail(workers);
  group.run([&](gcomp::inproc_comm& c) {
    const auto r = std::size_t(c.rank());
    fmnist::modeled_comm<gcomp::inproc_comm> m(c, l);
    std::vector<float> data(r == 1 ? 3 : 4, 1.0f);  // sizes disagree: every rank throws
    messages[r] = error_of([&] { m.allreduce_sum(gcomp::host_seq{}, std::span<float>(data)); });
    after_fail[r] = m.modeled_seconds() + m.background_modeled_seconds();
    measured_after_fail[r] = m.measured_comm_seconds();
    m.barrier();
    CHECK(m.modeled_seconds() == doctest::Approx(2 * 2 * 5e-6).epsilon(1e-12));
    m.reset_clock();
    after_reset[r] =
        m.modeled_seconds() + m.background_modeled_seconds() + m.measured_comm_seconds();
  });
  for (std::size_t r = 0; r < workers; ++r) {
    CHECK(contains(messages[r], "allreduce_sum"));
    CHECK(after_fail[r] == 0);
    CHECK(measured_after_fail[r] > 0);  // the failed call's wall time is still measured
    CHECK(after_reset[r] == 0);
  }

  gcomp::inproc_group single(1);
  single.run([&](gcomp::inproc_comm& c) {
    fmnist::modeled_comm<gcomp::inproc_comm> m(c, l);
    (void)run_sequence(m);  // rank 0 of 1: allgatherv sends v_counts[0] bytes
    CHECK(m.modeled_seconds() == 0);
    CHECK(m.background_modeled_seconds() == 0);
    CHECK(m.stats().bytes_sent == 0);
    CHECK(m.stats().collectives == 6);
  });
}

// ---------------------------------------------------------------------------
// progress

namespace {

std::string contents(std::FILE* f) {
  std::fflush(f);
  std::rewind(f);
  std::string text;
  for (int ch; (ch = std::fgetc(f)) != EOF;) text.push_back(char(ch));
  return text;
}

std::size_t count_of(const std::string& text, char c) {
  std::size_t n = 0;
  for (const char x : text) n += x == c;
  return n;
}

struct temp_file {
  std::FILE* f = std::tmpfile();
  temp_file() { REQUIRE(f != nullptr); }
  temp_file(const temp_file&) = delete;
  temp_file& operator=(const temp_file&) = delete;
  ~temp_file() {
    if (f) std::fclose(f);
  }
};

}  // namespace

TEST_CASE("progress off a terminal: nothing on update, one line per epoch") {
  temp_file out;
  CHECK_FALSE(fmnist::is_terminal(out.f));
  fmnist::progress p(out.f, false);
  p.update({1, 2, 5, 10, 0.9, -1, 1.5, 2.0});
  p.update({1, 2, 9, 10, 0.8, -1, 2.5, 3.0});
  CHECK(contents(out.f).empty());
  std::fseek(out.f, 0, SEEK_END);
  p.end_epoch({1, 2, 10, 10, 0.71234, 0.8421, 3.31, 4.0});
  p.update({2, 2, 3, 10, 0.6, 0.8421, 4.0, 5.0});
  p.end_epoch({2, 2, 10, 10, 0.5, -1, 6.5, 8.0});
  const std::string text = contents(out.f);
  CHECK(count_of(text, '\n') == 2);
  CHECK(count_of(text, '\r') == 0);
  CHECK(text.back() == '\n');
  const std::string first = text.substr(0, text.find('\n'));
  check_mentions(first, {"epoch 1/2", "0.7123", "84.21%", "3.3 MB", "4.0 s"});
  const std::string second = text.substr(text.find('\n') + 1);
  check_mentions(second, {"epoch 2/2", "0.5000", "accuracy -", "6.5 MB"});
}

TEST_CASE("progress on a terminal: one line redrawn with \\r, ended by \\n") {
  temp_file out;
  fmnist::progress p(out.f, true, 0.0);  // no rate limit: every update draws
  p.update({1, 3, 5, 10, 0.9, -1, 1.5, 2.0});
  p.update({1, 3, 6, 10, 0.85, 0.5, 1.75, 2.5});
  p.end_epoch({1, 3, 10, 10, 0.8, 0.75, 2.0, 3.0});
  const std::string text = contents(out.f);
  CHECK(count_of(text, '\r') == 3);
  CHECK(count_of(text, '\n') == 1);
  CHECK(text.back() == '\n');
  check_mentions(text,
                 {"[##########..........] 5/10", "[############........] 6/10",
                  "[####################] 10/10", "epoch 1/3", "acc -", "acc 75.00%", "2.0 MB"});
}

TEST_CASE("progress on a terminal redraws at most once per interval") {
  temp_file out;
  fmnist::progress p(out.f, true, 3600.0);
  for (std::size_t i = 1; i <= 5; ++i) p.update({1, 1, i, 10, 0.5, -1, 0.0, 0.0});
  CHECK(count_of(contents(out.f), '\r') == 1);  // the first update draws, the rest are too soon
  std::fseek(out.f, 0, SEEK_END);
  p.end_epoch({1, 1, 10, 10, 0.5, -1, 0.0, 0.0});  // the end of an epoch always draws
  const std::string text = contents(out.f);
  CHECK(count_of(text, '\r') == 2);
  CHECK(text.back() == '\n');
  check_mentions(text, {"1/10", "10/10"});

  CHECK(contains(error_of([] { fmnist::progress bad(nullptr, true); }), "null"));
}
