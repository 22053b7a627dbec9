// The per-communicator thread that runs collectives (private to comm/communicator.cpp).
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

#include "comm/communicator.hpp"
#include "comm/progress_gate.hpp"

namespace duplex {

// The per-communicator progress thread for collectives: runs queued operations strictly in order. A caller
// that waits on a queued operation runs it (and whatever is queued before it) on its own thread if the worker is not
// busy: a collective waited on at once costs no thread hand-off. Queuing does not wake the worker (ProgressGate):
// it picks up an operation nobody waits on within ProgressGate::kNapMax, for overlap with the caller's computation.
struct Communicator::Worker {
    struct Task {
        uint64_t id;
        std::function<void()> run;
    };
    std::mutex mutex;
    ProgressGate gate;
    std::deque<Task> queue;
    uint64_t next_id = 0;
    bool busy = false;
    bool stopping = false;
    std::thread thread;

    uint64_t push(std::function<void()> fn) {
        uint64_t id;
        {
            std::lock_guard<std::mutex> lock(mutex);
            id = next_id++;
            queue.push_back({id, std::move(fn)});
            if (!thread.joinable()) thread = std::thread([this] { run(); });
        }
        gate.posted();
        return id;
    }
    // Runs the queued tasks up to `id` here, in order, until task `id` has run (here or before) or the worker thread
    // holds the queue (then it runs them).
    void try_run_inline(uint64_t id) {
        for (;;) {
            Task task;
            {
                std::lock_guard<std::mutex> lock(mutex);
                if (queue.empty() || queue.front().id > id || busy) return;
                task = std::move(queue.front());
                queue.pop_front();
                busy = true;
            }
            task.run();
            std::lock_guard<std::mutex> lock(mutex);
            busy = false;
        }
    }
    void run() {
        for (;;) {
            Task task;
            {
                std::unique_lock<std::mutex> lock(mutex);
                if (!gate.wait_for_work(lock, [&] { return (stopping && !busy) || (!queue.empty() && !busy); }))
                    continue;
                if (queue.empty()) return;
                task = std::move(queue.front());
                queue.pop_front();
                busy = true;
                gate.worked();
            }
            task.run();
            std::lock_guard<std::mutex> lock(mutex);
            busy = false;
        }
    }
    // Drains the queue and joins the thread; later try_run_inline calls find nothing to run.
    void shutdown() {
        {
            std::lock_guard<std::mutex> lock(mutex);
            stopping = true;
        }
        gate.wake_all();
        if (thread.joinable()) thread.join();
    }
};

}  // namespace duplex
