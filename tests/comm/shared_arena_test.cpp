// SharedArena's allocator (page-rounded first fit, freed ranges merged and their pages returned), MappedArena's
// view of it through /proc/<pid>/fd (here of this process's own arena), and HostBufferPool's reuse of buffers.
#include "comm/shared_arena.hpp"

#include <unistd.h>

#include <cstring>
#include <vector>

#include <gtest/gtest.h>

#include "comm/transport.hpp"
#include "core/error.hpp"

namespace duplex {
namespace {

constexpr size_t kPage = SharedArena::kPage;

TEST(SharedArena, HandsOutPagesFirstFitAndReusesFreedRanges) {
    SharedArena arena(16 * kPage);
    char* a = static_cast<char*>(arena.allocate(1));
    char* b = static_cast<char*>(arena.allocate(kPage + 1));
    char* c = static_cast<char*>(arena.allocate(kPage));
    ASSERT_TRUE(a && b && c);
    EXPECT_EQ(arena.offset_of(a), kPage);  // page 0 is the header
    EXPECT_EQ(arena.offset_of(b), 2 * kPage);
    EXPECT_EQ(arena.offset_of(c), 4 * kPage);
    EXPECT_EQ(arena.bytes_in_use(), 4 * kPage);
    arena.release(b);
    EXPECT_EQ(arena.allocate(kPage), b);  // the first range that fits is b's
    EXPECT_EQ(arena.allocate(2 * kPage), c + kPage);  // b's second page alone is too small
}

TEST(SharedArena, FreedNeighboursMergeIntoOneRange) {
    SharedArena arena(8 * kPage);
    void* p[7];
    for (auto& q : p) ASSERT_NE(q = arena.allocate(kPage), nullptr);
    EXPECT_EQ(arena.allocate(1), nullptr) << "full";
    // Freed out of order: merged with the range before, after, and both.
    for (int i : {1, 3, 2, 0, 6, 4, 5}) arena.release(p[i]);
    EXPECT_EQ(arena.bytes_in_use(), 0u);
    void* all = arena.allocate(7 * kPage);
    EXPECT_EQ(all, p[0]);
    EXPECT_EQ(arena.allocate(1), nullptr);
}

TEST(SharedArena, RefusesWhatItDidNotHandOut) {
    SharedArena arena(4 * kPage);
    char* a = static_cast<char*>(arena.allocate(kPage));
    EXPECT_THROW(arena.release(a + 64), Error);
    arena.release(a);
    EXPECT_THROW(arena.release(a), Error);
    EXPECT_THROW(SharedArena{kPage}, ConfigError);
}

TEST(SharedArena, ContainsOnlyTheAllocatablePages) {
    SharedArena arena(4 * kPage);
    EXPECT_FALSE(arena.contains(arena.header(), 8));
    EXPECT_TRUE(arena.contains(arena.header() + kPage, 3 * kPage));
    EXPECT_FALSE(arena.contains(arena.header() + kPage, 3 * kPage + 1));
    int on_stack = 0;
    EXPECT_FALSE(arena.contains(&on_stack, sizeof(on_stack)));
}

TEST(MappedArena, SeesTheOwnersBytesAndNothingPastTheEnd) {
    SharedArena arena(8 * kPage);
    char* a = static_cast<char*>(arena.allocate(3 * kPage));
    MappedArena view(getpid(), arena.fd(), arena.capacity());
    for (size_t i = 0; i < 3 * kPage; ++i) a[i] = char(i * 7 + 1);
    const char* seen = view.at(arena.offset_of(a), 3 * kPage);
    ASSERT_NE(seen, nullptr);
    EXPECT_EQ(std::memcmp(seen, a, 3 * kPage), 0);
    EXPECT_NE(view.at(8 * kPage - 8, 8), nullptr);
    EXPECT_EQ(view.at(8 * kPage - 8, 9), nullptr);
    EXPECT_EQ(view.at(8 * kPage + 1, 0), nullptr);
    // A released range's pages go back to the system: the mapping reads zeros there.
    arena.release(a);
    for (size_t i = 0; i < 3 * kPage; i += 512) EXPECT_EQ(seen[i], 0) << i;
}

TEST(MappedArena, RefusesAnArenaSmallerThanAnnouncedOrMissing) {
    SharedArena arena(4 * kPage);
    try {
        MappedArena view(getpid(), arena.fd(), 8 * kPage);
        ADD_FAILURE() << "mapped past the end of the file";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("not the 32768 its owner announced"), std::string::npos) << e.what();
    }
    EXPECT_THROW(MappedArena(getpid(), 1 << 20, 4 * kPage), Error);  // no such descriptor
}

TEST(HostBufferPool, ReusesTheSmallestFreeBufferThatFitsAndKeepsAFew) {
    int allocated = 0;
    HostBufferPool pool([&](size_t bytes) {
        ++allocated;
        return allocate_ordinary_host(bytes);
    });
    HostBuffer big = pool.take(3 * kPage), small = pool.take(kPage);
    void *big_at = big.data(), *small_at = small.data();
    pool.give(std::move(big));
    pool.give(std::move(small));
    EXPECT_EQ(allocated, 2);
    HostBuffer a = pool.take(100);
    EXPECT_EQ(a.data(), small_at) << "the smallest that fits";
    HostBuffer b = pool.take(2 * kPage);
    EXPECT_EQ(b.data(), big_at);
    HostBuffer c = pool.take(kPage);
    EXPECT_EQ(allocated, 3) << "none free: a new one";
    EXPECT_EQ(pool.take(0).data(), nullptr);
    EXPECT_EQ(allocated, 3);
    std::vector<HostBuffer> many;
    for (size_t i = 0; i < HostBufferPool::kKeep + 3; ++i) many.push_back(pool.take((i + 1) * 64));
    for (auto& m : many) pool.give(std::move(m));
    EXPECT_EQ(pool.free_buffers(), HostBufferPool::kKeep);
    // The largest stay: a request as large as the largest given is served without allocating.
    int before = allocated;
    HostBuffer largest = pool.take((HostBufferPool::kKeep + 3) * 64);
    EXPECT_EQ(allocated, before);
}

}  // namespace
}  // namespace duplex
