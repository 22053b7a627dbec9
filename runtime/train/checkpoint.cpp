#include "runtime/train/checkpoint.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

namespace duplex::ckpt {

namespace fs = std::filesystem;

namespace {

constexpr char kMagic[8] = {'D', 'P', 'L', 'X', 'C', 'K', 'P', 'T'};
constexpr uint32_t kFileVersion = 1;
constexpr int kManifestFormat = 1;

void fsync_path(const std::string& path, bool directory) {
    int fd = ::open(path.c_str(), directory ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
    if (fd < 0) throw CheckpointError(fmt::format("{}: cannot open to sync: {}", path, std::strerror(errno)));
    int rc = ::fsync(fd);
    ::close(fd);
    if (rc != 0) throw CheckpointError(fmt::format("{}: fsync failed: {}", path, std::strerror(errno)));
}

template <typename V>
void put(std::string& out, V v) {
    out.append(reinterpret_cast<const char*>(&v), sizeof(V));
}

template <typename V>
V get(const std::string& in, size_t& pos) {
    if (pos + sizeof(V) > in.size()) throw CheckpointError("a truncated checkpoint entry");
    V v;
    std::memcpy(&v, in.data() + pos, sizeof(V));
    pos += sizeof(V);
    return v;
}

std::string hex(uint64_t v) { return fmt::format("{:016x}", v); }

DType dtype_from_name(const std::string& s, const std::string& where) {
    for (DType t : {DType::F32, DType::F64, DType::BF16, DType::E4M3, DType::I32, DType::I64, DType::U8})
        if (dtype_name(t) == s) return t;
    throw CheckpointError(fmt::format("{}: unknown dtype '{}'", where, s));
}

}  // namespace

uint64_t checksum(const void* data, size_t bytes, uint64_t h) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
    std::string tmp = path + ".tmp";
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) throw CheckpointError(fmt::format("{}: cannot create: {}", tmp, std::strerror(errno)));
    size_t done = 0;
    while (done < bytes.size()) {
        ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            int e = errno;
            ::close(fd);
            throw CheckpointError(fmt::format("{}: write failed after {} of {} bytes: {}", tmp, done, bytes.size(),
                                              std::strerror(e)));
        }
        done += size_t(n);
    }
    if (::fsync(fd) != 0) {
        int e = errno;
        ::close(fd);
        throw CheckpointError(fmt::format("{}: fsync failed: {}", tmp, std::strerror(e)));
    }
    ::close(fd);
    if (::rename(tmp.c_str(), path.c_str()) != 0)
        throw CheckpointError(fmt::format("{}: cannot rename to {}: {}", tmp, path, std::strerror(errno)));
    fs::path parent = fs::path(path).parent_path();
    fsync_path(parent.empty() ? "." : parent.string(), true);
}

void ShardWriter::add(const std::string& name, DType dtype, int64_t total, int64_t begin, int64_t count,
                      const void* data) {
    DUPLEX_CHECK_ARG(begin >= 0 && count >= 0 && begin + count <= total, "checkpoint record",
                     "'{}': piece [{}, {}) of {} elements", name, begin, begin + count, total);
    if (body_.empty()) {
        body_.append(kMagic, sizeof(kMagic));
        put<uint32_t>(body_, kFileVersion);
        put<uint32_t>(body_, 0);
    }
    put<uint32_t>(body_, uint32_t(name.size()));
    body_.append(name);
    put<uint8_t>(body_, uint8_t(dtype));
    put<int64_t>(body_, total);
    put<int64_t>(body_, begin);
    put<int64_t>(body_, count);
    Record r{name, dtype, total, begin, count, body_.size()};
    body_.append(static_cast<const char*>(data), size_t(count) * dtype_size(dtype));
    records_.push_back(std::move(r));
}

FileEntry ShardWriter::write(const std::string& dir, const std::string& file) const {
    std::string body = body_;
    if (body.empty()) {  // a rank with nothing to save still writes a valid (empty) shard
        body.append(kMagic, sizeof(kMagic));
        put<uint32_t>(body, kFileVersion);
        put<uint32_t>(body, 0);
    }
    write_file_atomic((fs::path(dir) / file).string(), body);
    return {file, body.size(), checksum(body.data(), body.size()), records_};
}

std::string ShardWriter::encode(const FileEntry& e) {
    nlohmann::json j = {{"file", e.file}, {"bytes", e.bytes}, {"checksum", hex(e.checksum)}};
    nlohmann::json rs = nlohmann::json::array();
    for (const Record& r : e.records)
        rs.push_back({r.name, std::string(dtype_name(r.dtype)), r.total, r.begin, r.count, r.offset});
    j["records"] = rs;
    return j.dump();
}

namespace {

FileEntry entry_from_json(const nlohmann::json& j, const std::string& where) {
    FileEntry e;
    try {
        e.file = j.at("file").get<std::string>();
        e.bytes = j.at("bytes").get<uint64_t>();
        e.checksum = std::stoull(j.at("checksum").get<std::string>(), nullptr, 16);
        for (const auto& r : j.at("records")) {
            Record rec;
            rec.name = r.at(0).get<std::string>();
            rec.dtype = dtype_from_name(r.at(1).get<std::string>(), where);
            rec.total = r.at(2).get<int64_t>();
            rec.begin = r.at(3).get<int64_t>();
            rec.count = r.at(4).get<int64_t>();
            rec.offset = r.at(5).get<uint64_t>();
            if (rec.begin < 0 || rec.count < 0 || rec.begin + rec.count > rec.total ||
                rec.offset + uint64_t(rec.count) * dtype_size(rec.dtype) > e.bytes)
                throw CheckpointError(fmt::format("{}: record '{}' of {} does not fit the file", where, rec.name, e.file));
            e.records.push_back(std::move(rec));
        }
    } catch (const nlohmann::json::exception& x) {
        throw CheckpointError(fmt::format("{}: a malformed file entry: {}", where, x.what()));
    } catch (const std::invalid_argument&) {
        throw CheckpointError(fmt::format("{}: a malformed checksum", where));
    }
    if (e.file.empty() || e.file.find('/') != std::string::npos)
        throw CheckpointError(fmt::format("{}: file name '{}' is not a plain name", where, e.file));
    return e;
}

}  // namespace

FileEntry ShardWriter::decode(const std::string& blob) {
    return entry_from_json(nlohmann::json::parse(blob), "a shard entry");
}

void write_manifest(const std::string& dir, long step, const std::string& layout_json,
                    const std::vector<FileEntry>& files) {
    nlohmann::json j = {{"format", kManifestFormat}, {"step", step}, {"layout", nlohmann::json::parse(layout_json)}};
    nlohmann::json fl = nlohmann::json::array();
    for (const FileEntry& e : files) fl.push_back(nlohmann::json::parse(ShardWriter::encode(e)));
    j["files"] = fl;
    write_file_atomic((fs::path(dir) / "manifest.json").string(), j.dump(1) + "\n");
}

std::string step_directory(const std::string& root, long step) {
    return (fs::path(root) / fmt::format("step-{:08d}", step)).string();
}

namespace {

// step-* directories under root: (step, path, complete)
struct Found {
    long step;
    fs::path path;
    bool complete;
};

std::vector<Found> scan(const std::string& root) {
    std::vector<Found> out;
    std::error_code ec;
    if (!fs::is_directory(root, ec)) return out;
    for (const auto& d : fs::directory_iterator(root, ec)) {
        std::string n = d.path().filename().string();
        if (!d.is_directory() || n.rfind("step-", 0) != 0 || n.size() <= 5) continue;
        if (!std::all_of(n.begin() + 5, n.end(), [](char c) { return c >= '0' && c <= '9'; })) continue;
        out.push_back({std::stol(n.substr(5)), d.path(), fs::exists(d.path() / "manifest.json")});
    }
    std::sort(out.begin(), out.end(), [](const Found& a, const Found& b) { return a.step < b.step; });
    return out;
}

}  // namespace

std::optional<std::string> latest_checkpoint(const std::string& path) {
    if (fs::exists(fs::path(path) / "manifest.json")) return path;
    std::vector<Found> all = scan(path);
    for (auto it = all.rbegin(); it != all.rend(); ++it)
        if (it->complete) return it->path.string();
    return std::nullopt;
}

void prune_checkpoints(const std::string& root, int keep) {
    if (keep <= 0) return;
    std::vector<Found> all = scan(root);
    long newest_complete = -1;
    int complete = 0;
    for (auto it = all.rbegin(); it != all.rend(); ++it) {
        if (it->complete && newest_complete < 0) newest_complete = it->step;
        bool drop = it->complete ? ++complete > keep : (newest_complete >= 0 && it->step < newest_complete);
        if (drop) {
            std::error_code ec;
            fs::remove_all(it->path, ec);
        }
    }
}

CheckpointReader::CheckpointReader(const std::string& dir) : dir_(dir) {
    std::string path = (fs::path(dir) / "manifest.json").string();
    std::ifstream in(path);
    if (!in) throw CheckpointError(fmt::format("{}: no manifest (not a checkpoint, or a save that did not finish)", path));
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& x) {
        throw CheckpointError(fmt::format("{}: not valid JSON: {}", path, x.what()));
    }
    try {
        int format = j.at("format").get<int>();
        if (format != kManifestFormat)
            throw CheckpointError(fmt::format("{}: format {}, this build reads format {}", path, format, kManifestFormat));
        step_ = j.at("step").get<long>();
        if (!j.at("layout").is_object()) throw CheckpointError(fmt::format("{}: 'layout' is not an object", path));
        layout_ = j.at("layout").dump();
        for (const auto& f : j.at("files")) files_.push_back(entry_from_json(f, path));
    } catch (const nlohmann::json::exception& x) {
        throw CheckpointError(fmt::format("{}: a malformed manifest: {}", path, x.what()));
    }
    for (size_t f = 0; f < files_.size(); ++f)
        for (size_t r = 0; r < files_[f].records.size(); ++r) pieces_[files_[f].records[r].name].push_back({f, r});
}

std::string CheckpointReader::layout_field(const std::string& key) const {
    nlohmann::json j = nlohmann::json::parse(layout_);
    if (!j.contains(key)) return "";
    return j[key].is_string() ? j[key].get<std::string>() : j[key].dump();
}

int64_t CheckpointReader::total(const std::string& name) const {
    auto it = pieces_.find(name);
    if (it == pieces_.end()) throw CheckpointError(fmt::format("{}/manifest.json: no record '{}'", dir_, name));
    return files_[it->second.front().first].records[it->second.front().second].total;
}

const std::string& CheckpointReader::verified(size_t f) {
    auto it = contents_.find(f);
    if (it != contents_.end()) return it->second;
    const FileEntry& e = files_[f];
    std::string path = (fs::path(dir_) / e.file).string();
    std::ifstream in(path, std::ios::binary);
    if (!in) throw CheckpointError(fmt::format("{}: missing (listed in the manifest)", path));
    std::string body((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (body.size() != e.bytes)
        throw CheckpointError(fmt::format("{}: {} bytes, the manifest says {} (truncated or overwritten)", path,
                                          body.size(), e.bytes));
    uint64_t sum = checksum(body.data(), body.size());
    if (sum != e.checksum)
        throw CheckpointError(fmt::format("{}: checksum {} does not match the manifest's {} (the file is corrupt)", path,
                                          hex(sum), hex(e.checksum)));
    if (body.size() < sizeof(kMagic) || std::memcmp(body.data(), kMagic, sizeof(kMagic)) != 0)
        throw CheckpointError(fmt::format("{}: not a Duplex shard file", path));
    return contents_.emplace(f, std::move(body)).first->second;
}

void CheckpointReader::read(const std::string& name, DType dtype, int64_t total, int64_t begin, int64_t count,
                            void* dst) {
    auto it = pieces_.find(name);
    if (it == pieces_.end())
        throw CheckpointError(fmt::format("{}/manifest.json: no record '{}' (the checkpoint is of another model or "
                                          "layout)", dir_, name));
    int64_t covered = 0;
    size_t elem = dtype_size(dtype);
    for (auto [f, r] : it->second) {
        const Record& rec = files_[f].records[r];
        if (rec.dtype != dtype)
            throw CheckpointError(fmt::format("{}/{}: '{}' is {}, this run needs {}", dir_, files_[f].file, name,
                                              dtype_name(rec.dtype), dtype_name(dtype)));
        if (rec.total != total)
            throw CheckpointError(fmt::format("{}/{}: '{}' has {} elements, this run's has {}", dir_, files_[f].file,
                                              name, rec.total, total));
        int64_t lo = std::max(begin, rec.begin), hi = std::min(begin + count, rec.begin + rec.count);
        if (lo >= hi) continue;
        const std::string& body = verified(f);
        std::memcpy(static_cast<char*>(dst) + size_t(lo - begin) * elem,
                    body.data() + rec.offset + size_t(lo - rec.begin) * elem, size_t(hi - lo) * elem);
        covered += hi - lo;
    }
    if (covered != count)  // pieces of one tensor never overlap: each element is written by exactly one rank
        throw CheckpointError(fmt::format("{}: '{}' elements [{}, {}): the files hold {} of {}", dir_, name, begin,
                                          begin + count, covered, count));
}

}  // namespace duplex::ckpt
