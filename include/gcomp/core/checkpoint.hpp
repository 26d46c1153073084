// checkpoint: the versioned binary stream every stateful part saves to and loads from.
#pragma once

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <istream>
#include <iterator>
#include <limits>
#include <ostream>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "gcomp/core/error.hpp"

namespace gcomp {

static_assert(std::endian::native == std::endian::little,
              "gcomp checkpoints are little-endian; this platform is not");

/// The layout of the stream (header, sections, fields). A reader accepts
/// exactly this version; each part's own layout has a version of its own.
inline constexpr std::uint32_t checkpoint_format_version = 1;

namespace detail {

inline constexpr std::array<char, 8> checkpoint_magic{'G', 'C', 'O', 'M', 'P', 'C', 'K', 'P'};
// magic, format version, flags (0), body length, CRC-32 of the body, reserved (0).
inline constexpr std::size_t checkpoint_header_bytes = 8 + 4 + 4 + 8 + 4 + 4;
// Names are short identifiers; a longer length read from a file is corruption.
inline constexpr std::size_t checkpoint_max_name = 255;

/// CRC-32 (IEEE 802.3, the zlib/PNG polynomial), so a flipped bit anywhere in
/// the body is caught before any part sees a value.
inline std::uint32_t crc32(std::span<const std::byte> bytes) {
  static const auto table = [] {
    std::array<std::uint32_t, 256> t{};
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int b = 0; b < 8; ++b) c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  std::uint32_t c = 0xFFFFFFFFu;
  for (std::byte b : bytes) c = table[(c ^ std::to_integer<std::uint32_t>(b)) & 0xFFu] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

/// The type code stored with every field: a kind letter and the element size,
/// so loading a double state into a float part, or a count into a flag, fails.
template <class V>
constexpr std::uint8_t checkpoint_kind() {
  if constexpr (std::is_same_v<V, bool>)
    return 'b';
  else if constexpr (std::is_floating_point_v<V>)
    return 'f';
  else if constexpr (std::is_enum_v<V>)
    return 'e';
  else if constexpr (std::is_integral_v<V> && std::is_signed_v<V>)
    return 'i';
  else if constexpr (std::is_integral_v<V>)
    return 'u';
  else
    return 'r';  // another trivially copyable type (float16, bfloat16), by size
}

inline std::string_view checkpoint_kind_name(std::uint8_t kind) {
  switch (kind) {
    case 'b': return "bool";
    case 'f': return "floating point";
    case 'e': return "enum";
    case 'i': return "signed integer";
    case 'u': return "unsigned integer";
    case 'r': return "raw";
    default: return "unknown";
  }
}

template <class V>
inline constexpr bool checkpoint_storable = std::is_trivially_copyable_v<V> && !std::is_pointer_v<V>;

}  // namespace detail

/// Builds a checkpoint in memory: sections (one per part, nested for parts
/// that hold parts) of named, typed fields. bytes() or write() produce the
/// whole stream with its header and checksum.
///
///   checkpoint_writer out;
///   out.begin("gcomp::sgd", 1);
///   out.value("steps", steps_);
///   out.array("momentum", std::span<const float>(momentum));
///   out.end();
class checkpoint_writer {
 public:
  /// Opens the section of one part: `kind` names the part (stable across
  /// releases), `version` the layout of its fields.
  void begin(std::string_view kind, std::uint32_t version) {
    constexpr std::string_view where = "gcomp::checkpoint_writer::begin";
    require(!kind.empty() && kind.size() <= detail::checkpoint_max_name, where,
            "kind must have 1 to 255 characters, got ", kind.size());
    put_name(kind);
    put(version);
    open_.push_back(body_.size());
    put(std::uint64_t{0});  // the section's length, patched by end()
  }

  /// Closes the innermost open section.
  void end() {
    require(!open_.empty(), "gcomp::checkpoint_writer::end", "no section is open");
    const std::size_t at = open_.back();
    open_.pop_back();
    const std::uint64_t length = body_.size() - (at + sizeof(std::uint64_t));
    std::memcpy(body_.data() + at, &length, sizeof(length));
  }

  /// One value of a trivially copyable type.
  template <class V>
    requires detail::checkpoint_storable<V>
  void value(std::string_view name, const V& v) {
    field<V>(name, 1, false);
    put(v);
  }

  /// An array of any length (the reader learns the length from the stream).
  template <class V>
    requires detail::checkpoint_storable<V>
  void array(std::string_view name, std::span<const V> values) {
    field<V>(name, values.size(), true);
    if (values.empty()) return;
    const std::size_t at = body_.size();
    body_.resize(at + values.size_bytes());
    std::memcpy(body_.data() + at, values.data(), values.size_bytes());
  }
  template <class V>
    requires detail::checkpoint_storable<V>
  void array(std::string_view name, const std::vector<V>& values) {
    array(name, std::span<const V>(values));
  }

  /// The complete checkpoint: header, body, checksum. Every section must be closed.
  std::vector<std::byte> bytes() const {
    require(open_.empty(), "gcomp::checkpoint_writer::bytes", open_.size(),
            " section(s) still open: every begin() needs its end()");
    std::vector<std::byte> out(detail::checkpoint_header_bytes + body_.size());
    std::byte* p = out.data();
    auto put_at = [&](const auto& v) {
      std::memcpy(p, &v, sizeof(v));
      p += sizeof(v);
    };
    put_at(detail::checkpoint_magic);
    put_at(checkpoint_format_version);
    put_at(std::uint32_t{0});
    put_at(static_cast<std::uint64_t>(body_.size()));
    put_at(detail::crc32(body_));
    put_at(std::uint32_t{0});
    if (!body_.empty()) std::memcpy(p, body_.data(), body_.size());
    return out;
  }

  /// Writes bytes() to a stream; a failing stream is a gcomp::error.
  void write(std::ostream& out) const {
    const auto b = bytes();
    out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
    require(static_cast<bool>(out), "gcomp::checkpoint_writer::write", "writing ", b.size(),
            " bytes to the stream failed");
  }

 private:
  template <class V>
  void put(const V& v) {
    const std::size_t at = body_.size();
    body_.resize(at + sizeof(V));
    std::memcpy(body_.data() + at, &v, sizeof(V));
  }

  void put_name(std::string_view name) {
    put(static_cast<std::uint8_t>(name.size()));
    const std::size_t at = body_.size();
    body_.resize(at + name.size());
    std::memcpy(body_.data() + at, name.data(), name.size());
  }

  template <class V>
  void field(std::string_view name, std::size_t count, bool is_array) {
    require(!open_.empty(), "gcomp::checkpoint_writer", "field '", name,
            "' written outside a section (call begin() first)");
    require(!name.empty() && name.size() <= detail::checkpoint_max_name, "gcomp::checkpoint_writer",
            "a field name must have 1 to 255 characters, got ", name.size());
    put_name(name);
    put(detail::checkpoint_kind<V>());
    put(static_cast<std::uint8_t>(is_array ? 1 : 0));
    put(static_cast<std::uint32_t>(sizeof(V)));
    put(static_cast<std::uint64_t>(count));
  }

  std::vector<std::byte> body_;
  std::vector<std::size_t> open_;
};

/// Reads a checkpoint, treating its bytes as untrusted: the constructor checks
/// the magic, the format version, the length and the CRC-32 before anything is
/// read; every section and field is then checked against what the loading part
/// expects (kind, version, name, type, count), and nothing is read past the
/// end of a section. Every failure is a gcomp::error saying what was expected
/// and what was found.
///
/// Parts read everything into temporaries and change themselves only after
/// the last read succeeded, so a rejected checkpoint leaves them unchanged;
/// load_checkpoint() extends that to several parts at once.
class checkpoint_reader {
 public:
  explicit checkpoint_reader(std::span<const std::byte> bytes) { open(bytes); }

  /// Reads the whole stream (up to its end) first.
  explicit checkpoint_reader(std::istream& in) {
    constexpr std::string_view where = "gcomp::checkpoint_reader";
    std::vector<std::byte> all;
    char buffer[1 << 16];
    while (in) {
      in.read(buffer, sizeof(buffer));
      const auto got = static_cast<std::size_t>(in.gcount());
      const std::size_t at = all.size();
      all.resize(at + got);
      if (got > 0) std::memcpy(all.data() + at, buffer, got);
    }
    require(in.eof() && !in.bad(), where, "reading the checkpoint stream failed after ",
            all.size(), " bytes");
    owned_ = std::move(all);
    open(owned_);
  }

  checkpoint_reader(const checkpoint_reader&) = delete;
  checkpoint_reader& operator=(const checkpoint_reader&) = delete;

  /// Opens the next section, which must be `kind` with a version in
  /// [1, max_version]; returns the version found (for parts that read older
  /// layouts).
  std::uint32_t begin(std::string_view kind, std::uint32_t max_version) {
    constexpr std::string_view where = "gcomp::checkpoint_reader::begin";
    const std::size_t section_start = pos_;
    const std::string found = get_name(where, "section kind");
    const auto version = get<std::uint32_t>(where, "section version");
    const auto length = get<std::uint64_t>(where, "section length");
    if (found != kind)
      fail(where, "expected the state of ", kind, " but the checkpoint holds ", found,
           " at byte ", section_start, " (a checkpoint of another pipeline or method?)");
    if (version < 1 || version > max_version)
      fail(where, kind, " state has layout version ", version, "; this build reads versions 1 to ",
           max_version);
    require(length <= limit() - pos_, where, kind, " section claims ", length, " bytes but only ",
            limit() - pos_, " remain");
    ends_.push_back(pos_ + static_cast<std::size_t>(length));
    kinds_.emplace_back(kind);
    return version;
  }

  /// Closes the innermost section; every one of its bytes must have been read.
  void end() {
    constexpr std::string_view where = "gcomp::checkpoint_reader::end";
    require(!ends_.empty(), where, "no section is open");
    if (pos_ != ends_.back())
      fail(where, kinds_.back(), " section has ", ends_.back() - pos_,
           " unread bytes: the checkpoint holds more state than this part has");
    ends_.pop_back();
    kinds_.pop_back();
  }

  /// One value written by checkpoint_writer::value.
  template <class V>
    requires detail::checkpoint_storable<V>
  V value(std::string_view name) {
    const std::uint64_t count = field<V>(name, false);
    if (count != 1) fail(where(), "field '", name, "' holds ", count, " values, expected 1");
    return get<V>(where(), name);
  }

  /// An array that must have exactly out.size() elements (a state sized by the model).
  template <class V>
    requires detail::checkpoint_storable<V>
  void array(std::string_view name, std::span<V> out) {
    const std::uint64_t count = field<V>(name, true);
    if (count != out.size())
      fail(where(), "field '", name, "' holds ", count, " elements but this part expects ",
           out.size(), " (a checkpoint of another model size?)");
    copy_out(name, out.data(), out.size());
  }

  /// An array of the length the stream says (bounded by the section's bytes).
  template <class V>
    requires detail::checkpoint_storable<V>
  std::vector<V> vector(std::string_view name) {
    const std::uint64_t count = field<V>(name, true);
    if (count > (limit() - pos_) / sizeof(V))
      fail(where(), "field '", name, "' claims ", count, " elements of ", sizeof(V),
           " bytes but only ", limit() - pos_, " bytes remain");
    std::vector<V> out(static_cast<std::size_t>(count));
    copy_out(name, out.data(), out.size());
    return out;
  }

  /// The kind of the next section, without consuming it (empty at the end).
  std::string peek_kind() {
    if (pos_ >= limit()) return {};
    const std::size_t at = pos_;
    std::string kind = get_name("gcomp::checkpoint_reader::peek_kind", "section kind");
    pos_ = at;
    return kind;
  }

  /// Every byte must have been read and every section closed.
  void finish() const {
    constexpr std::string_view where = "gcomp::checkpoint_reader::finish";
    require(ends_.empty(), where, "section ", ends_.empty() ? std::string() : kinds_.back(),
            " was not closed");
    require(pos_ == body_.size(), where, "the checkpoint has ", body_.size() - pos_,
            " bytes of state that no part read (it holds more parts than were loaded)");
  }

 private:
  void open(std::span<const std::byte> bytes) {
    constexpr std::string_view where = "gcomp::checkpoint_reader";
    require(bytes.size() >= detail::checkpoint_header_bytes, where, "a checkpoint has at least ",
            detail::checkpoint_header_bytes, " bytes of header, got ", bytes.size());
    std::array<char, 8> magic{};
    std::memcpy(magic.data(), bytes.data(), magic.size());
    require(magic == detail::checkpoint_magic, where,
            "not a gcomp checkpoint (the first 8 bytes are not \"GCOMPCKP\")");
    std::uint32_t version = 0, flags = 0, crc = 0, reserved = 0;
    std::uint64_t length = 0;
    std::memcpy(&version, bytes.data() + 8, 4);
    std::memcpy(&flags, bytes.data() + 12, 4);
    std::memcpy(&length, bytes.data() + 16, 8);
    std::memcpy(&crc, bytes.data() + 24, 4);
    std::memcpy(&reserved, bytes.data() + 28, 4);
    require(version == checkpoint_format_version, where, "checkpoint format version ", version,
            " is not supported; this build reads version ", checkpoint_format_version);
    require(flags == 0, where, "unknown checkpoint flags ", flags);
    require(reserved == 0, where, "reserved header word is ", reserved, ", not 0");
    const std::size_t present = bytes.size() - detail::checkpoint_header_bytes;
    require(length == present, where, "the header says the body has ", length,
            " bytes but ", present, " follow it (truncated or padded)");
    body_ = bytes.subspan(detail::checkpoint_header_bytes);
    const std::uint32_t actual = detail::crc32(body_);
    require(actual == crc, where, "checksum mismatch: the header says CRC-32 ", crc,
            " but the body has ", actual, " (the checkpoint is corrupt)");
  }

  std::size_t limit() const { return ends_.empty() ? body_.size() : ends_.back(); }

  std::string where() const {
    return kinds_.empty() ? std::string("gcomp::checkpoint_reader")
                          : detail::concat("gcomp::checkpoint_reader (", kinds_.back(), ")");
  }

  void need(std::size_t bytes, std::string_view where, std::string_view what) const {
    if (bytes > limit() - pos_)
      fail(where, "truncated: ", what, " needs ", bytes, " bytes but ", limit() - pos_,
           " remain in the section");
  }

  template <class V>
  V get(std::string_view where, std::string_view what) {
    need(sizeof(V), where, what);
    V v;
    std::memcpy(&v, body_.data() + pos_, sizeof(V));
    pos_ += sizeof(V);
    return v;
  }

  std::string get_name(std::string_view where, std::string_view what) {
    const auto length = get<std::uint8_t>(where, what);
    need(length, where, what);
    std::string name(reinterpret_cast<const char*>(body_.data() + pos_), length);
    pos_ += length;
    return name;
  }

  template <class V>
  std::uint64_t field(std::string_view name, bool is_array) {
    const std::string w = where();
    require(!ends_.empty(), w, "field '", name, "' read outside a section");
    const std::string found = get_name(w, "field name");
    if (found != name)
      fail(w, "expected field '", name, "' but the checkpoint has '", found, "'");
    const auto kind = get<std::uint8_t>(w, "field type");
    const auto arr = get<std::uint8_t>(w, "field shape");
    const auto size = get<std::uint32_t>(w, "field element size");
    const auto count = get<std::uint64_t>(w, "field count");
    if (kind != detail::checkpoint_kind<V>() || size != sizeof(V))
      fail(w, "field '", name, "' holds ", detail::checkpoint_kind_name(kind), " elements of ",
           size, " bytes, expected ", detail::checkpoint_kind_name(detail::checkpoint_kind<V>()),
           " of ", sizeof(V), " bytes (another element type?)");
    if (arr != (is_array ? 1 : 0))
      fail(w, "field '", name, "' is ", arr ? "an array" : "a value", ", expected ",
           is_array ? "an array" : "a value");
    return count;
  }

  template <class V>
  void copy_out(std::string_view name, V* out, std::size_t count) {
    const std::size_t bytes = count * sizeof(V);  // count was bounded by the bytes present
    need(bytes, where(), name);
    if (bytes > 0) std::memcpy(static_cast<void*>(out), body_.data() + pos_, bytes);
    pos_ += bytes;
  }

  std::vector<std::byte> owned_;
  std::span<const std::byte> body_;
  std::size_t pos_ = 0;
  std::vector<std::size_t> ends_;
  std::vector<std::string> kinds_;
};

/// A part with state: save(writer) writes one section; load(policy, reader)
/// reads it back into the memory `policy` uses (device memory for cuda_par),
/// changing the part only when every read succeeded.
template <class P, class Policy>
concept checkpointable = requires(const P& cp, P& p, checkpoint_writer& w, checkpoint_reader& r,
                                  const Policy& policy) {
  cp.save(w);
  p.load(policy, r);
};

/// Saves `part` if it has state; a stateless part (top-k, an all-reduce) writes nothing.
template <class P>
void save_state(checkpoint_writer& out, const P& part) {
  if constexpr (requires { part.save(out); }) part.save(out);
}

/// Loads `part` if it has state (the counterpart of save_state).
template <class Policy, class P>
void load_state(const Policy& policy, checkpoint_reader& in, P& part) {
  if constexpr (requires { part.load(policy, in); }) part.load(policy, in);
}

/// Saves the state of every part, in order, as one checkpoint.
template <class... Parts>
void save_checkpoint(std::ostream& out, const Parts&... parts) {
  checkpoint_writer w;
  (save_state(w, parts), ...);
  w.write(out);
}

/// The checkpoint's bytes, for callers that store or send them themselves.
template <class... Parts>
std::vector<std::byte> checkpoint_bytes(const Parts&... parts) {
  checkpoint_writer w;
  (save_state(w, parts), ...);
  return w.bytes();
}

/// Loads every part, in the order they were saved. All or nothing: the parts
/// are loaded into copies, which replace the originals only when the whole
/// checkpoint was read without error, so a corrupt or mismatched checkpoint
/// leaves every part as it was.
template <class Policy, class... Parts>
void load_checkpoint(const Policy& policy, checkpoint_reader& in, Parts&... parts) {
  std::tuple<Parts...> copies(parts...);
  std::apply([&](auto&... c) { (load_state(policy, in, c), ...); }, copies);
  in.finish();
  std::apply([&](auto&... c) { ((parts = std::move(c)), ...); }, copies);
}

template <class Policy, class... Parts>
void load_checkpoint(const Policy& policy, std::istream& in, Parts&... parts) {
  checkpoint_reader r(in);
  load_checkpoint(policy, r, parts...);
}

template <class Policy, class... Parts>
void load_checkpoint(const Policy& policy, std::span<const std::byte> bytes, Parts&... parts) {
  checkpoint_reader r(bytes);
  load_checkpoint(policy, r, parts...);
}

}  // namespace gcomp
