// The pieces of the small-message path: a Request completes once and wakes a waiter without a lost wake-up; the
// intrusive in-flight list; the progress gate's naps, deep sleep and wake-up by a post.
#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>

#include <gtest/gtest.h>

#include "comm/in_flight.hpp"
#include "comm/progress_gate.hpp"
#include "comm/transport.hpp"
#include "core/clock.hpp"
#include "core/error.hpp"

namespace duplex {
namespace {

TEST(Request, TheFirstCompletionWinsAndItsErrorStays) {
    Request r(1, 7, 64, false);
    EXPECT_FALSE(r.done());
    EXPECT_FALSE(r.failed());
    EXPECT_EQ(r.error(), "");
    EXPECT_TRUE(r.complete("lost rank 1"));
    EXPECT_FALSE(r.complete());
    EXPECT_FALSE(r.complete("another reason"));
    EXPECT_TRUE(r.done());
    EXPECT_TRUE(r.failed());
    EXPECT_EQ(r.error(), "lost rank 1");
    EXPECT_THROW(r.rethrow(), CommError);
    Request ok(1, 7, 64, true);
    EXPECT_TRUE(ok.complete());
    EXPECT_FALSE(ok.failed());
    EXPECT_NO_THROW(ok.rethrow());
}

TEST(Request, ACompletionBeforeAnyoneSawItIsFinalToo) {
    Request failed(1, 7, 64, false);
    failed.complete_unshared("size mismatch");
    EXPECT_TRUE(failed.done());
    EXPECT_TRUE(failed.failed());
    EXPECT_EQ(failed.error(), "size mismatch");
    EXPECT_FALSE(failed.complete()) << "completed once already";
    EXPECT_EQ(failed.error(), "size mismatch");
    EXPECT_TRUE(failed.wait_until(Deadline(0)));
    Request sent(1, 7, 64, true);
    sent.complete_unshared();
    EXPECT_TRUE(sent.done());
    EXPECT_FALSE(sent.failed());
    EXPECT_FALSE(sent.complete("late error"));
    EXPECT_NO_THROW(sent.rethrow());
}

TEST(Request, ACompletionFromAnotherThreadWakesEveryWaiterEveryTime) {
    // A lost wake-up (complete() missing a waiter between its check and its sleep) leaves wait_until to its deadline.
    for (int i = 0; i < 2000; ++i) {
        Request r(0, 0, 0, false);
        std::atomic<int> woken{0};
        auto waiter = [&] {
            if (r.wait_until(Deadline(10))) woken.fetch_add(1);
        };
        std::thread a(waiter), b(waiter);
        if (i % 2) std::this_thread::yield();
        r.complete();
        a.join();
        b.join();
        ASSERT_EQ(woken.load(), 2) << "iteration " << i;
    }
    Request never(0, 0, 0, false);
    EXPECT_FALSE(never.wait_until(Deadline(0.01)));
}

TEST(Request, ConcurrentCompletersCompleteItOnce) {
    for (int i = 0; i < 500; ++i) {
        Request r(0, 0, 0, false);
        std::atomic<int> won{0};
        std::thread a([&] { won += r.complete("a"); }), b([&] { won += r.complete("b"); });
        a.join();
        b.join();
        EXPECT_EQ(won.load(), 1);
        EXPECT_TRUE(r.error() == "a" || r.error() == "b");
    }
}

struct Listed : Request, InFlightLinks<Listed> {
    using Request::Request;
};

// A transport whose requests stay pending until cancelled, and whose `fail_at`-th post throws.
class PendingTransport : public Transport {
public:
    explicit PendingTransport(int fail_at) : fail_at_(fail_at) {}
    const char* name() const override { return "pending"; }
    int rank() const override { return 0; }
    int size() const override { return 2; }
    std::shared_ptr<Request> isend(int peer, uint64_t tag, const void*, size_t bytes) override {
        return make(peer, tag, bytes, true);
    }
    std::shared_ptr<Request> irecv(int peer, uint64_t tag, void*, size_t bytes) override {
        return make(peer, tag, bytes, false);
    }
    bool wait(Request& r, const Deadline&) override { return r.done(); }
    void cancel(Request& r) override {
        if (r.complete("cancelled")) ++cancelled;
    }
    void abort(const std::string&) override {}
    std::vector<std::string> hostnames() const override { return {"a", "a"}; }
    int cancelled = 0;

private:
    std::shared_ptr<Request> make(int peer, uint64_t tag, size_t bytes, bool is_send) {
        if (++posts_ == fail_at_) throw CommError("the transport refused the post");
        return std::make_shared<Request>(peer, tag, bytes, is_send);
    }
    int fail_at_, posts_ = 0;
};

// Transport::post's default: a post that fails part-way withdraws what it had posted (the caller frees the buffers
// when the error reaches it), and a round that does not complete by its deadline names its first pending message
// with every message withdrawn. Bug it catches: a half-posted batch left in flight (no destructor runs for it).
TEST(MessageBatch, AFailedPostWithdrawsWhatWasPostedAndATimeoutEverything) {
    std::vector<Message> round = {{1, 5, nullptr, 8, false}, {1, 5, nullptr, 8, true}, {1, 6, nullptr, 8, false}};
    PendingTransport failing(3);
    EXPECT_THROW(failing.post(round), CommError);
    EXPECT_EQ(failing.cancelled, 2);

    PendingTransport pending(0);
    auto batch = pending.post(round);
    EXPECT_EQ(batch->wait(Deadline(1e-3)), 0);
    EXPECT_EQ(pending.cancelled, 3);
    EXPECT_EQ(batch->messages().size(), 3u);
}

TEST(InFlight, ListsUnlistsAndReleasesWhatIsLeft) {
    std::weak_ptr<Listed> left_behind;
    {
        InFlight<Listed> list;
        auto a = std::make_shared<Listed>(0, 1, 8, true), b = std::make_shared<Listed>(0, 2, 8, true),
             c = std::make_shared<Listed>(0, 3, 8, true);
        list.add(a);
        list.add(b);
        list.add(c);
        EXPECT_EQ(list.size(), 3u);
        EXPECT_EQ(list.remove(*b), b);  // the middle one
        EXPECT_EQ(list.remove(*b), nullptr);  // not listed any more
        std::vector<uint64_t> tags;
        for (auto& r : list.list()) tags.push_back(r->tag);
        EXPECT_EQ(tags, (std::vector<uint64_t>{3, 1}));
        EXPECT_EQ(list.remove(*c), c);  // the head
        EXPECT_EQ(list.remove(*a), a);  // the last
        EXPECT_TRUE(list.empty());
        auto d = std::make_shared<Listed>(0, 4, 8, true);
        list.add(d);
        left_behind = d;
        d.reset();
        EXPECT_FALSE(left_behind.expired());  // the list keeps it alive while listed
    }
    EXPECT_TRUE(left_behind.expired());  // and lets it go with itself
}

// A thread that waits on the gate for `pending` work and takes it, as a backend's progress thread does.
struct GatedThread {
    std::mutex mutex;
    ProgressGate gate;
    int pending = 0;
    bool stopping = false;
    std::atomic<int> taken{0};
    std::thread thread{[this] {
        for (;;) {
            std::unique_lock<std::mutex> lock(mutex);
            if (!gate.wait_for_work(lock, [&] { return stopping || pending > 0; })) continue;
            if (stopping) return;
            pending = 0;
            taken.fetch_add(1);
            gate.worked();
        }
    }};
    void post() {
        {
            std::lock_guard<std::mutex> lock(mutex);
            ++pending;
        }
        gate.posted();
    }
    bool taken_within(int want, double seconds) {
        Deadline d(seconds);
        while (taken.load() < want && !d.expired()) std::this_thread::sleep_for(std::chrono::microseconds(100));
        return taken.load() >= want;
    }
    ~GatedThread() {
        {
            std::lock_guard<std::mutex> lock(mutex);
            stopping = true;
        }
        gate.wake_all();
        thread.join();
    }
};

TEST(ProgressGate, PostsAreTakenWhileNappingAndAfterDeepSleep) {
    GatedThread t;
    t.post();
    EXPECT_TRUE(t.taken_within(1, 5));
    t.post();  // while it naps: seen at its next look, at most kNapMax later
    EXPECT_TRUE(t.taken_within(2, 5));
    // Past kDeepAfter without a post the thread sleeps until a post wakes it: one that did not would never be seen.
    std::this_thread::sleep_for(ProgressGate::kDeepAfter * 3);
    t.post();
    EXPECT_TRUE(t.taken_within(3, 5));
}

TEST(ProgressGate, ACallerDrivingNowOrSinceTheLastLookKeepsTheThreadOff) {
    ProgressGate gate;
    EXPECT_FALSE(gate.driven());
    {
        ProgressGate::Driving driving(gate);
        EXPECT_TRUE(gate.driven());
        EXPECT_TRUE(gate.driven());  // still driving
    }
    EXPECT_FALSE(gate.driven());  // seen at the looks above, and gone
    { ProgressGate::Driving brief(gate); }
    EXPECT_TRUE(gate.driven());  // came and went since the last look
    EXPECT_FALSE(gate.driven());
}

}  // namespace
}  // namespace duplex
