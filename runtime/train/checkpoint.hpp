// Checkpoints: named tensors (or pieces of them) written by many ranks, one shard file each, tied together by
// a manifest that rank 0 writes last. A checkpoint lives in ROOT/step-NNNNNNNN/:
//
//   rank-00000.bin ...   each rank's shard: a header, then records (name, dtype, total, begin, count, bytes)
//   manifest.json        format, step, the run's layout, and every file's size, checksum and records
//
// Writes are atomic: a file is written to NAME.tmp, fsynced, renamed and its directory fsynced; the manifest
// comes after every shard is in place, so a directory without manifest.json is an interrupted save and is never
// loaded. A record is a piece [begin, begin + count) of a tensor of `total` elements: ZeRO-1 optimizer shards are
// pieces, so a reader with another data-parallel size assembles its own shard from whichever files hold it.
//
//   ShardWriter w;  w.add("value/L0.wq", DType::F32, n, 0, n, data);
//   FileEntry f = w.write(dir, "rank-00003.bin");              // on every rank; rank 0 gathers the entries
//   write_manifest(dir, step, layout_json, entries);            // rank 0, after the others' files are in place
//   CheckpointReader r(latest_checkpoint(root));
//   r.read("adam_m/L0.wq", DType::F32, n, begin, count, dst);  // verifies each file it touches once
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "core/dtype.hpp"
#include "core/error.hpp"

namespace duplex {

// A checkpoint that cannot be written or loaded; the message names the file and what is wrong.
class CheckpointError : public Error {
public:
    using Error::Error;
};

namespace ckpt {

struct Record {
    std::string name;
    DType dtype = DType::F32;
    int64_t total = 0;   // elements of the whole tensor
    int64_t begin = 0;   // this piece: elements [begin, begin + count)
    int64_t count = 0;
    uint64_t offset = 0; // byte offset of the piece's data in its file
};

struct FileEntry {
    std::string file;  // relative to the checkpoint directory
    uint64_t bytes = 0;
    uint64_t checksum = 0;
    std::vector<Record> records;
};

// 64-bit FNV-1a over bytes, continuing from `h`.
uint64_t checksum(const void* data, size_t bytes, uint64_t h = 0xcbf29ce484222325ull);

// Writes `bytes` to path atomically (path.tmp, fsync, rename, fsync of the directory).
void write_file_atomic(const std::string& path, const std::string& bytes);

class ShardWriter {
public:
    void add(const std::string& name, DType dtype, int64_t total, int64_t begin, int64_t count, const void* data);
    // Writes dir/file atomically; returns its entry for the manifest.
    FileEntry write(const std::string& dir, const std::string& file) const;
    // Entries serialized for gathering to rank 0, and back.
    static std::string encode(const FileEntry& e);
    static FileEntry decode(const std::string& blob);

private:
    std::string body_;
    std::vector<Record> records_;
};

// Rank 0, once every shard file is in place: dir/manifest.json (atomic). `layout` is a JSON object (text).
void write_manifest(const std::string& dir, long step, const std::string& layout_json,
                    const std::vector<FileEntry>& files);

// ROOT/step-00000042
std::string step_directory(const std::string& root, long step);
// The checkpoint to resume from: `path` itself when it holds manifest.json, else its newest step-* directory
// that does; nullopt when there is none.
std::optional<std::string> latest_checkpoint(const std::string& path);
// Removes all but the newest `keep` complete checkpoints under root, and interrupted saves older than the newest
// complete one. keep <= 0 keeps everything.
void prune_checkpoints(const std::string& root, int keep);

class CheckpointReader {
public:
    // Reads and checks dir/manifest.json (format, fields, files' records); CheckpointError naming it otherwise.
    explicit CheckpointReader(const std::string& dir);
    const std::string& directory() const { return dir_; }
    long step() const { return step_; }
    const std::string& layout_json() const { return layout_; }
    // A layout field as text ("" when absent).
    std::string layout_field(const std::string& key) const;
    bool has(const std::string& name) const { return pieces_.count(name) != 0; }
    int64_t total(const std::string& name) const;
    // Elements [begin, begin + count) of `name` (a tensor of `total` elements) into dst. Every file it reads from
    // is verified first (size and checksum against the manifest, each file once); a missing piece, another dtype
    // or size is a CheckpointError.
    void read(const std::string& name, DType dtype, int64_t total, int64_t begin, int64_t count, void* dst);
    const std::vector<FileEntry>& files() const { return files_; }

private:
    const std::string& verified(size_t file);
    std::string dir_, layout_;
    long step_ = 0;
    std::vector<FileEntry> files_;
    std::map<std::string, std::vector<std::pair<size_t, size_t>>> pieces_;  // name -> (file, record)
    std::map<size_t, std::string> contents_;                                // verified files, by index
};

}  // namespace ckpt
}  // namespace duplex
