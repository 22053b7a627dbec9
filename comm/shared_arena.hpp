// Host memory the other processes of a host can map: the UCX backend's allocator (Transport::allocate_host), so a
// large same-host message is one memcpy by the receiver out of a read-only mapping of the sender's pages instead of
// a process_vm_readv, which pins every page it copies (3-8x slower per byte here, BENCHMARKS.md).
//
//   SharedArena arena(64ull << 30);                 // one memfd; pages exist once written
//   void* p = arena.allocate(bytes);                // nullptr when no free range fits
//   // another process of the host: MappedArena peer(pid, arena.fd(), arena.capacity());
//   //                               memcpy(dst, peer.at(arena.offset_of(p), bytes), bytes);
//   arena.release(p);                               // its pages go back to the system
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>

namespace duplex {

class SharedArena {
public:
    static constexpr size_t kPage = 4096;

    // A memfd of `capacity` bytes mapped read-write; Error naming the failed call otherwise. The first page is the
    // header (header()), never handed out.
    explicit SharedArena(size_t capacity);
    ~SharedArena();
    SharedArena(const SharedArena&) = delete;
    SharedArena& operator=(const SharedArena&) = delete;

    // `bytes` rounded up to pages, first fit; nullptr when no free range is large enough. Thread-safe.
    void* allocate(size_t bytes);
    // Returns an allocation's range to the free list (merged with its neighbours) and its pages to the system.
    // Error for a pointer this arena did not hand out.
    void release(void* p);

    bool contains(const void* p, size_t bytes) const;
    uint64_t offset_of(const void* p) const { return static_cast<uint64_t>(static_cast<const char*>(p) - base_); }
    char* header() const { return base_; }
    int fd() const { return fd_; }
    size_t capacity() const { return capacity_; }
    size_t bytes_in_use() const;

private:
    int fd_ = -1;
    char* base_ = nullptr;
    size_t capacity_ = 0;
    mutable std::mutex mutex_;
    std::map<size_t, size_t> free_;  // offset -> bytes, disjoint and never adjacent
    std::map<size_t, size_t> used_;  // offset -> bytes
};

// Another process's SharedArena, mapped read-only here through /proc/<pid>/fd/<fd> (the same permission as
// process_vm_readv); the mapping keeps its pages alive after that process exits.
class MappedArena {
public:
    // Error naming the path and the errno when the arena cannot be opened or mapped.
    MappedArena(pid_t pid, int fd, size_t capacity);
    ~MappedArena();
    MappedArena(const MappedArena&) = delete;
    MappedArena& operator=(const MappedArena&) = delete;

    // The bytes at [offset, offset + bytes) of the arena; nullptr when the range is outside it.
    const char* at(uint64_t offset, size_t bytes) const;
    size_t capacity() const { return capacity_; }

private:
    const char* base_ = nullptr;
    size_t capacity_ = 0;
};

}  // namespace duplex
