// Writes the fuzz targets' seed corpus: valid encoded messages of every payload type (a few sizes and element types, made by the compressors themselves) and valid round-trip and wire inputs.
//
// Usage: make_corpus <corpus-dir>
// Writes <corpus-dir>/<target>/seed-<name> for every target, after removing
// the seed-* files already there; other files (regress-* inputs that once
// crashed a target) are kept. The output is deterministic.
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "gcomp/compress/bernoulli.hpp"
#include "gcomp/compress/cast.hpp"
#include "gcomp/compress/chain.hpp"
#include "gcomp/compress/grid_round.hpp"
#include "gcomp/compress/identity.hpp"
#include "gcomp/compress/natural.hpp"
#include "gcomp/compress/onebit.hpp"
#include "gcomp/compress/powersgd.hpp"
#include "gcomp/compress/qsgd.hpp"
#include "gcomp/compress/random_block.hpp"
#include "gcomp/compress/randomk.hpp"
#include "gcomp/compress/sign.hpp"
#include "gcomp/compress/terngrad.hpp"
#include "gcomp/compress/topk.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/core/wire.hpp"
#include "gcomp/exec/host.hpp"
#include "roundtrip_input.hpp"

namespace {

namespace fs = std::filesystem;
using namespace gcomp;
namespace rt = gcomp::fuzz::roundtrip;

fs::path root;
std::size_t written = 0, total_bytes = 0;

void write(const std::string& target, const std::string& name, std::span<const std::byte> bytes) {
  const fs::path file = root / target / ("seed-" + name);
  std::ofstream out(file, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write " + file.string());
  ++written;
  total_bytes += bytes.size();
}

void write(const std::string& target, const std::string& name, const std::vector<std::uint8_t>& bytes) {
  write(target, name, std::as_bytes(std::span<const std::uint8_t>(bytes)));
}

/// A smooth signed gradient with irregular magnitudes (every compressor accepts it).
template <class T>
std::vector<T> gradient(std::size_t n, double phase = 0.0) {
  std::vector<T> g(n);
  for (std::size_t i = 0; i < n; ++i)
    g[i] = static_cast<T>(std::sin(0.37 * double(i) + phase) * (1.0 + 0.01 * double(i % 97)) + 0.05);
  return g;
}

/// The message c makes of an n-element gradient (after `warm` earlier steps).
template <class C>
typename C::payload compressed(C& c, std::size_t n, int warm = 0) {
  using T = typename C::value_type;
  typename C::payload p;
  const rng_key key{42, 0, 1};
  for (int step = 0; step <= warm; ++step) {
    const auto g = gradient<T>(n, step);
    c.compress(host_seq{}, std::span<const T>(g), p, rng_key{key.seed, std::uint64_t(step), 1});
  }
  return p;
}

template <class P>
std::vector<std::byte> bytes_of(const P& p) {
  std::vector<std::byte> out;
  encode(p, out);
  return out;
}

template <class P>
std::vector<std::byte> support_bytes_of(const P& p) {
  std::vector<std::byte> out;
  encode_support(p, out);
  return out;
}

/// Deterministic filler bytes (splitmix64).
std::vector<std::uint8_t> noise(std::size_t count, std::uint64_t seed) {
  std::vector<std::uint8_t> out(count);
  std::uint64_t x = seed;
  for (auto& b : out) {
    x += 0x9e3779b97f4a7c15ull;
    std::uint64_t z = x;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    b = static_cast<std::uint8_t>(z ^ (z >> 31));
  }
  return out;
}

// ---------------------------------------------------------------------------
// Decoder targets: one message per file

void dense_seeds() {
  for (std::size_t n : {0u, 1u, 3u, 17u, 100u}) {
    identity<float> c;
    write("fuzz_dense", "f32-n" + std::to_string(n), bytes_of(compressed(c, n)));
  }
  for (std::size_t n : {0u, 5u, 64u}) {
    identity<double> c;
    write("fuzz_dense", "f64-n" + std::to_string(n), bytes_of(compressed(c, n)));
  }
  for (std::size_t n : {0u, 9u, 100u}) {
    fp16_cast<float> c;
    write("fuzz_dense", "f16-n" + std::to_string(n), bytes_of(compressed(c, n)));
  }
  for (std::size_t n : {7u, 100u}) {
    bf16_cast<float> c;
    write("fuzz_dense", "bf16-n" + std::to_string(n), bytes_of(compressed(c, n)));
  }
  dense_payload<std::uint8_t> bytes;
  bytes.data = {1, 2, 3, 250};
  write("fuzz_dense", "u8-n4", bytes_of(bytes));
}

template <class T, class I>
void sparse_seed(const std::string& name, std::size_t n, std::size_t k) {
  topk<T, I> c(topk_options{.k = k});
  const auto p = compressed(c, n);
  write("fuzz_sparse", name, bytes_of(p));
  write("fuzz_sparse", name + "-support", support_bytes_of(p));
}

void sparse_seeds() {
  sparse_seed<float, std::uint32_t>("f32-u32-n1-k1", 1, 1);
  sparse_seed<float, std::uint32_t>("f32-u32-n100-k10", 100, 10);
  sparse_seed<float, std::uint32_t>("f32-u32-n1000-k50", 1000, 50);
  sparse_seed<float, std::uint64_t>("f32-u64-n100-k7", 100, 7);
  sparse_seed<double, std::uint32_t>("f64-u32-n50-k5", 50, 5);
  sparse_seed<double, std::uint64_t>("f64-u64-n200-k20", 200, 20);
  topk<float> ratio(topk_options{.ratio = 0.5});
  write("fuzz_sparse", "f32-u32-n0", bytes_of(compressed(ratio, 0)));
  randomk<float> r(randomk_options{.k = 12});
  write("fuzz_sparse", "randomk-f32-n64-k12", bytes_of(compressed(r, 64)));
  bernoulli_sparsifier<double> b(0.2);
  write("fuzz_sparse", "bernoulli-f64-n80", bytes_of(compressed(b, 80)));
}

void quantized_seeds() {
  const std::string t = "fuzz_quantized";
  {
    qsgd<float> c(qsgd_options{.levels = 7, .bucket = 512});
    write(t, "qsgd-f32-s7-b512-n100", bytes_of(compressed(c, 100)));
  }
  {
    qsgd<float> c(qsgd_options{.levels = 1, .bucket = 0});
    write(t, "qsgd-f32-s1-b0-n33", bytes_of(compressed(c, 33)));
    write(t, "qsgd-f32-s1-b0-n0", bytes_of(compressed(c, 0)));
  }
  {
    qsgd<float> c(qsgd_options{.levels = 32767, .bucket = 64});
    write(t, "qsgd-f32-s32767-b64-n300", bytes_of(compressed(c, 300)));
  }
  {
    qsgd<double> c(qsgd_options{.levels = 15, .bucket = 10});
    write(t, "qsgd-f64-s15-b10-n90", bytes_of(compressed(c, 90)));
  }
  {
    terngrad<float> c(terngrad_options{.bucket = 16});
    write(t, "terngrad-f32-b16-n70", bytes_of(compressed(c, 70)));
    terngrad<double> d(terngrad_options{.bucket = 0});
    write(t, "terngrad-f64-b0-n40", bytes_of(compressed(d, 40)));
  }
  {
    natural<float> c;
    write(t, "natural-n50", bytes_of(compressed(c, 50)));
  }
  {
    sign<float> c;
    write(t, "sign-f32-n65", bytes_of(compressed(c, 65)));
    sign<float> l(layout::from_layers({{"a", 2, 10, {}}, {"b", 15, 25, {}}}, gaps::allowed));
    write(t, "sign-f32-gapped-n40", bytes_of(compressed(l, 40)));
    sign<double> d;
    write(t, "sign-f64-n10", bytes_of(compressed(d, 10)));
  }
  {
    onebit<float> c;
    write(t, "onebit-f32-n130", bytes_of(compressed(c, 130)));
    onebit<float> l(layout{20, 30});
    write(t, "onebit-f32-layers-n50", bytes_of(compressed(l, 50)));
  }
  {
    grid_round<float> c(grid_round_options{.spacing = 0.125, .bits = 5});
    write(t, "grid-f32-b5-n20", bytes_of(compressed(c, 20)));
    grid_round<double> d(grid_round_options{.spacing = 1e-3, .bits = 16});
    write(t, "grid-f64-b16-n30", bytes_of(compressed(d, 30)));
  }
}

void lowrank_seeds() {
  const std::string t = "fuzz_lowrank";
  {
    powersgd<float> c(powersgd_options{.rank = 1},
                      layout::from_layers({{"w", 0, 24, {6, 4}}}));
    write(t, "f32-6x4-r1", bytes_of(compressed(c, 24)));
  }
  {
    powersgd<float> c(powersgd_options{.rank = 2},
                      layout::from_layers({{"w", 0, 200, {20, 10}}, {"b", 200, 10, {}},
                                           {"conv", 210, 96, {8, 3, 2, 2}}}));
    write(t, "f32-three-layers-r2", bytes_of(compressed(c, 306, 1)));
  }
  {
    powersgd<float> c(powersgd_options{.rank = 1},
                      layout::from_layers({{"w", 5, 64, {8, 8}}, {"v", 80, 16, {4, 4}}}, gaps::allowed));
    write(t, "f32-gapped-r1", bytes_of(compressed(c, 96)));
  }
  {
    powersgd<double> c(powersgd_options{.rank = 3},
                       layout::from_layers({{"w", 0, 120, {12, 10}}}));
    write(t, "f64-12x10-r3", bytes_of(compressed(c, 120)));
  }
  {
    powersgd<double> c(powersgd_options{.rank = 1}, layout{7});
    write(t, "f64-dense-only", bytes_of(compressed(c, 7)));
  }
  lowrank_payload<float> empty;
  write(t, "f32-no-blocks", bytes_of(empty));
}

void block_seeds() {
  const std::string t = "fuzz_block";
  {
    random_contiguous_block<float> c(random_contiguous_block_options{.k = 3});
    const auto p = compressed(c, 10);
    write(t, "f32-n10-k3", bytes_of(p));
    write(t, "f32-n10-k3-support", support_bytes_of(p));
  }
  {
    random_contiguous_block<float, rescale::none> c(random_contiguous_block_options{.ratio = 0.1});
    const auto p = compressed(c, 100);
    write(t, "f32-n100-r0.1", bytes_of(p));
    write(t, "f32-n0", bytes_of(compressed(c, 0)));
  }
  {
    random_contiguous_block<double> c(random_contiguous_block_options{.k = 40});
    const auto p = compressed(c, 41);
    write(t, "f64-n41-k40", bytes_of(p));
    write(t, "f64-n41-k40-support", support_bytes_of(p));
  }
}

void chain_seeds() {
  const std::string t = "fuzz_chain";
  {
    chain<topk<float>, qsgd<float>> c(topk<float>(topk_options{.k = 10}),
                                      qsgd<float>(qsgd_options{.levels = 7, .bucket = 0}));
    write(t, "topk-qsgd-f32-n100", bytes_of(compressed(c, 100)));
  }
  {
    chain<topk<double, std::uint64_t>, qsgd<double>> c(
        topk<double, std::uint64_t>(topk_options{.k = 30}),
        qsgd<double>(qsgd_options{.levels = 3, .bucket = 8}));
    write(t, "topk-qsgd-f64-u64-n60", bytes_of(compressed(c, 60)));
  }
  {
    chain<shared_randomk<float, rescale::none>, terngrad<float>> c(
        shared_randomk<float, rescale::none>(randomk_options{.k = 20}),
        terngrad<float>(terngrad_options{.bucket = 0}));
    write(t, "randomk-terngrad-f32-n80", bytes_of(compressed(c, 80)));
  }
  {
    chain<random_contiguous_block<float>, identity<float>> c(
        random_contiguous_block<float>(random_contiguous_block_options{.k = 6}), identity<float>{});
    write(t, "block-identity-f32-n20", bytes_of(compressed(c, 20)));
  }
  {
    chain<topk<float>, fp16_cast<float>> c(topk<float>(topk_options{.k = 5}), fp16_cast<float>{});
    write(t, "topk-fp16-f32-n50", bytes_of(compressed(c, 50)));
  }
}

// ---------------------------------------------------------------------------
// fuzz_wire: header, reader and writer modes (see fuzz_wire.cpp)

void wire_seeds() {
  const std::string t = "fuzz_wire";
  // Header mode: expected kind and element matching the message, each dimension mode.
  auto header_seed = [&](const std::string& name, std::vector<std::byte> msg, std::uint8_t dim_mode) {
    std::vector<std::uint8_t> in = {0, std::uint8_t(msg[5]), std::uint8_t(msg[6]), dim_mode};
    for (std::byte b : msg) in.push_back(std::uint8_t(b));
    write(t, "header-" + name, in);
  };
  identity<float> id;
  header_seed("dense", bytes_of(compressed(id, 6)), 0);
  topk<float> tk(topk_options{.k = 2});
  header_seed("sparse", bytes_of(compressed(tk, 9)), 1);
  qsgd<float> q(qsgd_options{.levels = 3, .bucket = 4});
  header_seed("quantized", bytes_of(compressed(q, 11)), 2);
  powersgd<float> ps(powersgd_options{.rank = 1}, layout::from_layers({{"w", 0, 12, {4, 3}}}));
  header_seed("lowrank", bytes_of(compressed(ps, 12)), 1);
  std::vector<std::byte> cut = bytes_of(compressed(id, 6));
  cut.resize(20);
  header_seed("truncated", cut, 0);
  // Reader mode: a program of L bytes, then the buffer it reads.
  for (std::uint64_t seed = 0; seed < 6; ++seed) {
    const std::size_t program = 4 + 5 * seed, buffer = 8 * seed + 3;
    std::vector<std::uint8_t> in = {1, std::uint8_t(program)};
    for (std::uint8_t b : noise(program, seed)) in.push_back(b % 8 == 4 || b % 8 == 5 ? b : b % 8);
    for (std::uint8_t b : noise(buffer, seed + 100)) in.push_back(b);
    write(t, "reader-" + std::to_string(seed), in);
  }
  // Writer mode: values and arithmetic operands.
  for (std::uint64_t seed = 0; seed < 4; ++seed) {
    std::vector<std::uint8_t> in = {2};
    for (std::uint8_t b : noise(40 + 8 * seed, seed + 200)) in.push_back(b);
    write(t, "writer-" + std::to_string(seed), in);
  }
}

// ---------------------------------------------------------------------------
// fuzz_roundtrip: header (roundtrip_input.hpp) then values

struct roundtrip_seed {
  std::uint8_t variant;
  std::size_t n;
  rt::value_mode mode;
  std::int8_t exponent;
  std::array<std::uint8_t, rt::option_bytes> options;
};

std::vector<std::uint8_t> roundtrip_input(std::size_t compressor, const roundtrip_seed& s,
                                          std::uint64_t seed) {
  const auto v = static_cast<std::uint16_t>(s.n);  // length_from(n) == n below 8192
  std::vector<std::uint8_t> in = {std::uint8_t(compressor), s.variant, std::uint8_t(v & 0xff),
                                  std::uint8_t(v >> 8), std::uint8_t(s.mode),
                                  std::uint8_t(s.exponent), std::uint8_t(seed % 4),
                                  std::uint8_t(seed * 37)};
  in.insert(in.end(), s.options.begin(), s.options.end());
  const std::size_t value_bytes =
      s.mode == rt::value_mode::raw ? s.n * ((s.variant & rt::variant::use_double) ? 8 : 4) : s.n;
  std::vector<std::uint8_t> values = noise(value_bytes, seed);
  if (s.mode == rt::value_mode::raw) {
    // Raw bit patterns of moderate floats: random bytes would be mostly huge or tiny.
    const bool dbl = (s.variant & rt::variant::use_double) != 0;
    for (std::size_t i = 0; i < s.n; ++i) {
      const double x = (double(values[i * (dbl ? 8 : 4)]) - 128.0) / 16.0;
      if (dbl)
        std::memcpy(values.data() + 8 * i, &x, 8);
      else {
        const float f = static_cast<float>(x);
        std::memcpy(values.data() + 4 * i, &f, 4);
      }
    }
  }
  if (s.mode == rt::value_mode::mixed)
    for (auto& b : values) b = b % 0xf0;  // no special values: a valid input
  in.insert(in.end(), values.begin(), values.end());
  return in;
}

void roundtrip_seeds() {
  using rt::value_mode;
  namespace var = rt::variant;
  // Option bytes every compressor reads as valid choices (roundtrip_input.hpp,
  // fuzz_roundtrip.cpp): o0/o1 a count or levels, o2.. buckets and the
  // second part of a chain, o5..o7 a layout.
  const std::array<std::uint8_t, 8> plain = {0x02, 0x05, 0x02, 0x01, 0x03, 0x02, 0x5a, 0x9e};
  const std::array<std::uint8_t, 8> ratio = {0x01, 0x30, 0x04, 0x00, 0x07, 0x03, 0x21, 0xaa};
  const std::array<std::uint8_t, 8> wide = {0x04, 0x11, 0x06, 0x02, 0x10, 0x01, 0xc3, 0x46};
  const std::array<std::uint8_t, 8> invalid = {0xf0, 0xff, 0xf3, 0x00, 0xf1, 0x00, 0x00, 0x00};
  // Three seeds for every compressor, and a fourth taking turns among the
  // edge cases, to keep the corpus at tens of files.
  const std::vector<roundtrip_seed> common = {
      {0, 37, value_mode::scaled, -3, plain},
      {var::use_double | var::with_layout, 300, value_mode::mixed, 2, ratio},
      {var::wide_index | var::shared_key | var::with_layout | var::layout_gaps | var::resize_second,
       120, value_mode::raw, 0, wide},
  };
  const std::vector<roundtrip_seed> edges = {
      {var::no_rescale | var::resize_second, 5000, value_mode::scaled, -8, plain},
      {var::use_double, 1, value_mode::special, 0, plain},
      {0, 0, value_mode::scaled, 0, ratio},
      {0, 16, value_mode::scaled, 0, invalid},
  };
  for (std::size_t c = 0; c < rt::compressors.size(); ++c) {
    std::vector<roundtrip_seed> mine = common;
    mine.push_back(edges[c % edges.size()]);
    for (std::size_t i = 0; i < mine.size(); ++i)
      write("fuzz_roundtrip", std::string(rt::compressors[c]) + "-" + std::to_string(i),
            roundtrip_input(c, mine[i], 1000 * c + i));
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <corpus-dir>\n", argv[0]);
    return 2;
  }
  root = argv[1];
  const char* targets[] = {"fuzz_wire",    "fuzz_dense", "fuzz_sparse", "fuzz_quantized",
                           "fuzz_lowrank", "fuzz_block", "fuzz_chain",  "fuzz_roundtrip"};
  for (const char* target : targets) {
    fs::create_directories(root / target);
    // Old seeds go (a renamed one would linger); regression inputs stay.
    for (const auto& entry : fs::directory_iterator(root / target))
      if (entry.path().filename().string().rfind("seed-", 0) == 0) fs::remove(entry.path());
  }
  wire_seeds();
  dense_seeds();
  sparse_seeds();
  quantized_seeds();
  lowrank_seeds();
  block_seeds();
  chain_seeds();
  roundtrip_seeds();
  std::printf("make_corpus: wrote %zu seed files, %zu bytes, under %s\n", written, total_bytes,
              root.string().c_str());
  return 0;
}
