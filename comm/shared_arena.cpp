#include "comm/shared_arena.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <iterator>

#include <fmt/format.h>

#include "core/error.hpp"

namespace duplex {

namespace {

[[noreturn]] void throw_errno(const std::string& what, int err) {
    throw Error(fmt::format("{}: {}", what, std::strerror(err)));
}

size_t round_up_pages(size_t bytes) { return (bytes + SharedArena::kPage - 1) / SharedArena::kPage * SharedArena::kPage; }

}  // namespace

SharedArena::SharedArena(size_t capacity) : capacity_(round_up_pages(capacity)) {
    if (capacity_ < 2 * kPage)
        throw ConfigError("shared arena size", fmt::format("{} bytes is less than two pages", capacity));
    fd_ = memfd_create("duplex-arena", MFD_CLOEXEC);
    if (fd_ < 0) throw_errno("memfd_create", errno);
    if (ftruncate(fd_, static_cast<off_t>(capacity_)) != 0) {
        int err = errno;
        close(fd_);
        throw_errno(fmt::format("ftruncate of the shared arena to {} bytes", capacity_), err);
    }
    void* p = mmap(nullptr, capacity_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd_, 0);
    if (p == MAP_FAILED) {
        int err = errno;
        close(fd_);
        throw_errno(fmt::format("mmap of the shared arena ({} bytes)", capacity_), err);
    }
    base_ = static_cast<char*>(p);
    free_[kPage] = capacity_ - kPage;
}

SharedArena::~SharedArena() {
    munmap(base_, capacity_);
    close(fd_);
}

void* SharedArena::allocate(size_t bytes) {
    size_t want = round_up_pages(bytes == 0 ? 1 : bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->second < want) continue;
        size_t offset = it->first, left = it->second - want;
        free_.erase(it);
        if (left > 0) free_[offset + want] = left;
        used_[offset] = want;
        return base_ + offset;
    }
    return nullptr;
}

void SharedArena::release(void* p) {
    size_t offset = offset_of(p);
    std::lock_guard<std::mutex> lock(mutex_);
    auto used = used_.find(offset);
    if (used == used_.end()) throw Error(fmt::format("shared arena: {} was not allocated here", p));
    size_t bytes = used->second;
    used_.erase(used);
    // NOTE: the pages go back now; a peer's mapping of them reads zeros from here on.
    fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset), static_cast<off_t>(bytes));
    auto next = free_.lower_bound(offset);
    if (next != free_.end() && offset + bytes == next->first) {
        bytes += next->second;
        next = free_.erase(next);
    }
    if (next != free_.begin()) {
        auto prev = std::prev(next);
        if (prev->first + prev->second == offset) {
            prev->second += bytes;
            return;
        }
    }
    free_[offset] = bytes;
}

bool SharedArena::contains(const void* p, size_t bytes) const {
    auto c = static_cast<const char*>(p);
    return c >= base_ + kPage && c <= base_ + capacity_ && bytes <= static_cast<size_t>(base_ + capacity_ - c);
}

size_t SharedArena::bytes_in_use() const {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t sum = 0;
    for (auto& [offset, bytes] : used_) sum += bytes;
    return sum;
}

MappedArena::MappedArena(pid_t pid, int fd, size_t capacity) : capacity_(capacity) {
    std::string path = fmt::format("/proc/{}/fd/{}", pid, fd);
    int local = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (local < 0) throw_errno(fmt::format("opening {}", path), errno);
    struct stat st {};
    if (fstat(local, &st) != 0 || static_cast<size_t>(st.st_size) < capacity_) {
        close(local);
        throw Error(fmt::format("{} holds {} bytes, not the {} its owner announced", path, st.st_size, capacity_));
    }
    void* p = mmap(nullptr, capacity_, PROT_READ, MAP_SHARED | MAP_NORESERVE, local, 0);
    int err = errno;
    close(local);  // the mapping holds the file
    if (p == MAP_FAILED) throw_errno(fmt::format("mapping {} ({} bytes)", path, capacity_), err);
    base_ = static_cast<const char*>(p);
}

MappedArena::~MappedArena() { munmap(const_cast<char*>(base_), capacity_); }

const char* MappedArena::at(uint64_t offset, size_t bytes) const {
    if (offset > capacity_ || bytes > capacity_ - offset) return nullptr;
    return base_ + offset;
}

}  // namespace duplex
