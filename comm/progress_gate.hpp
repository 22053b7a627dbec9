// How a backend's progress thread (MPI, UCX) or a communicator's collective worker waits for work without charging a
// thread wake-up to every message.
//
// A caller waiting on a request drives the backend itself (Transport::wait) and a caller waiting on a collective runs
// it itself, so the thread only matters for work nobody waits on yet (a transfer overlapping computation). Posting
// therefore does not wake it: while posts keep coming the thread naps and looks again, each nap twice the last (kNapMin
// up to kNapMax) until it finds work itself (worked()); only after kDeepAfter without a post does it sleep until a
// post wakes it.
// A message stream thus costs no system call per message on the posting side, an idle rank no wake-ups, and work nobody
// waits on is picked up within kNapMax. (On glibc every timed wait costs two system calls, its wait and the wake of the
// re-locked mutex: naps that stay short would cost a busy rank more than its messages do.)
//
//   // posting thread, after making the work visible under `mutex`:
//   gate.posted();
//   // the thread, `lock` held on `mutex`:
//   if (!gate.wait_for_work(lock, [&] { return stopping || !in_flight.empty(); })) continue;  // napped: look again
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <condition_variable>
#include <mutex>

namespace duplex {

class ProgressGate {
public:
    static constexpr std::chrono::microseconds kNapMin{200};
    static constexpr std::chrono::microseconds kNapMax{3200};
    static constexpr std::chrono::milliseconds kDeepAfter{50};

    // After a post became visible under the mutex the thread waits with: wakes it only from deep sleep.
    void posted() {
        posted_.store(true, std::memory_order_relaxed);  // a plain store: the thread reads the clock, posters do not
        if (deep_.load()) cv_.notify_one();
    }
    // Wakes the thread whatever it does (stopping, aborting).
    void wake_all() { cv_.notify_all(); }

    // The thread (`lock` held): true when `ready()` holds; false after a nap without it, so the caller can do its
    // periodic chores and ask again. Deep sleep (until posted()) once kDeepAfter passed without a post.
    template <typename Ready>
    bool wait_for_work(std::unique_lock<std::mutex>& lock, Ready ready) {
        if (ready()) return true;
        Clock::time_point now = Clock::now();
        if (posted_.exchange(false, std::memory_order_relaxed)) last_post_ = now;
        if (now - last_post_ < kDeepAfter) {
            nap(lock);
            return ready();
        }
        // NOTE: the flag is set under the mutex before ready() is checked again inside wait(), and a poster reads it
        // after publishing its work under the same mutex: either the thread sees the work or the poster sees the flag.
        deep_.store(true);
        cv_.wait(lock, ready);
        deep_.store(false);
        nap_ = kNapMin;
        last_post_ = Clock::now();
        return true;
    }

    // A caller driving the backend itself (Transport::wait) holds one of these meanwhile: the thread keeps off the
    // backend (its lock, the library's own locks) while one does and until a whole nap passed without one. A waiting
    // caller at a time in a collective's waits thus never meets the thread between two of them.
    class Driving {
    public:
        explicit Driving(ProgressGate& g) : g_(g) {
            g_.drivers_.fetch_add(1, std::memory_order_relaxed);
            g_.drives_.fetch_add(1, std::memory_order_relaxed);
        }
        ~Driving() { g_.drivers_.fetch_sub(1, std::memory_order_relaxed); }
        Driving(const Driving&) = delete;
        Driving& operator=(const Driving&) = delete;

    private:
        ProgressGate& g_;
    };
    // The thread: whether a caller drives the backend now or did since the thread last asked.
    bool driven() {
        uint64_t drives = drives_.load(std::memory_order_relaxed);
        bool recent = drives != seen_drives_;
        seen_drives_ = drives;
        return recent || drivers_.load(std::memory_order_relaxed) > 0;
    }

    // The thread found work to do itself: its naps start short again.
    void worked() { nap_ = kNapMin; }

    // The thread (`lock` held): a nap while others do the work (a waiting caller drives the backend), each twice as
    // long as the last up to kNapMax.
    void nap(std::unique_lock<std::mutex>& lock) {
        cv_.wait_for(lock, nap_);
        nap_ = std::min(2 * nap_, std::chrono::duration_cast<std::chrono::microseconds>(kNapMax));
    }

private:
    using Clock = std::chrono::steady_clock;
    std::condition_variable cv_;
    std::atomic<bool> deep_{false};
    std::atomic<int> drivers_{0};        // callers driving the backend now
    std::atomic<uint64_t> drives_{0};    // callers that started driving, ever
    uint64_t seen_drives_ = 0;           // drives_ when the thread last asked
    std::atomic<bool> posted_{false};           // a post since the thread last looked
    Clock::time_point last_post_ = Clock::now();  // when the thread last saw one (its own)
    std::chrono::microseconds nap_ = kNapMin;
};

}  // namespace duplex
