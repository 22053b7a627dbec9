#include "comm/mpi/mpi_transport.hpp"

#include <mpi.h>

#include <atomic>
#include <climits>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <unistd.h>

#include "comm/in_flight.hpp"
#include "comm/progress_gate.hpp"
#include "comm/topology.hpp"
#include "core/error.hpp"
#include "core/log.hpp"

#define DUPLEX_MPI_CHECK(call)                                                                  \
    do {                                                                                        \
        int duplex_mpi_rc_ = (call);                                                            \
        if (duplex_mpi_rc_ != MPI_SUCCESS) {                                                    \
            char duplex_mpi_msg_[MPI_MAX_ERROR_STRING];                                         \
            int duplex_mpi_len_ = 0;                                                            \
            MPI_Error_string(duplex_mpi_rc_, duplex_mpi_msg_, &duplex_mpi_len_);                \
            ::duplex::throw_api_error("MPI", #call, duplex_mpi_rc_, duplex_mpi_msg_, __FILE__, __LINE__); \
        }                                                                                       \
    } while (0)

namespace duplex {

namespace {

// MPI tags hold 31 bits here: 8 bits of group context, the collective bit and 22 bits of tag.
int mpi_tag(uint64_t wire_tag) {
    uint64_t context = (wire_tag >> 33) & 0xFF;
    uint64_t kind = (wire_tag >> 32) & 1;
    return static_cast<int>((context << 23) | (kind << 22) | (wire_tag & 0x3FFFFF));
}

void finalize_at_exit() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
}

}  // namespace

void mpi_ensure_initialized() {
    static std::once_flag once;
    std::call_once(once, [] {
        int initialized = 0;
        MPI_Initialized(&initialized);
        if (!initialized) {
            int provided = 0;
            DUPLEX_MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided));
            if (provided < MPI_THREAD_MULTIPLE)
                throw CommError(fmt::format("MPI provides thread level {}, Duplex needs MPI_THREAD_MULTIPLE", provided));
            std::atexit(finalize_at_exit);
        }
        int* tag_ub = nullptr;
        int flag = 0;
        MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &tag_ub, &flag);
        if (flag && *tag_ub < INT_MAX)
            throw CommError(fmt::format("MPI_TAG_UB is {}, Duplex needs 2^31-1", *tag_ub));
    });
}

namespace {

struct MpiRequest : Request, InFlightLinks<MpiRequest> {
    using Request::Request;
    MPI_Request handle = MPI_REQUEST_NULL;
};

class MpiTransport : public Transport {
public:
    MpiTransport() {
        mpi_ensure_initialized();
        DUPLEX_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &comm_));
        MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
        MPI_Comm_rank(comm_, &rank_);
        MPI_Comm_size(comm_, &size_);
        char host[256] = {};
        gethostname(host, sizeof(host) - 1);
        std::vector<char> all(256 * size_t(size_));
        DUPLEX_MPI_CHECK(MPI_Allgather(host, 256, MPI_CHAR, all.data(), 256, MPI_CHAR, comm_));
        for (int r = 0; r < size_; ++r) hostnames_.emplace_back(all.data() + 256 * size_t(r));
        oversubscribed_ = ranks_outnumber_cores(hostnames_, hostnames_[rank_]);
        progress_ = std::thread([this] { progress_loop(); });
    }
    ~MpiTransport() override {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            stopping_ = true;
        }
        gate_.wake_all();
        progress_.join();
        MPI_Comm_free(&comm_);
    }

    const char* name() const override { return "mpi"; }
    int rank() const override { return rank_; }
    int size() const override { return size_; }
    std::vector<std::string> hostnames() const override { return hostnames_; }

    std::shared_ptr<Request> isend(int peer, uint64_t tag, const void* buf, size_t bytes) override {
        auto req = std::make_shared<MpiRequest>(peer, tag, bytes, true);
        check_size(bytes, "isend");
        DUPLEX_MPI_CHECK(MPI_Isend(buf, static_cast<int>(bytes), MPI_BYTE, peer, mpi_tag(tag), comm_, &req->handle));
        // A small send is usually out already (copied eagerly): then nothing is left to track. NOTE: not with more
        // ranks than cores on this host: a test that finds the send still going drives MPI once, and Open MPI then
        // yields the core (mpi_yield_when_idle); an all-to-all's seven sends gave it away seven times in a row
        // (2.5x Open MPI's own all-to-all at 512 B per peer on 8 ranks and 2 cores).
        if (!oversubscribed_) {
            int flag = 0;
            MPI_Status status{};
            if (MPI_Test(&req->handle, &flag, &status) == MPI_SUCCESS && flag) {
                req->complete_unshared(outcome(message_of(*req), status, false));
                return req;
            }
        }
        track(req);
        return req;
    }

    std::shared_ptr<Request> irecv(int peer, uint64_t tag, void* buf, size_t bytes) override {
        auto req = std::make_shared<MpiRequest>(peer, tag, bytes, false);
        check_size(bytes, "irecv");
        DUPLEX_MPI_CHECK(MPI_Irecv(buf, static_cast<int>(bytes), MPI_BYTE, peer, mpi_tag(tag), comm_, &req->handle));
        track(req);
        return req;
    }

    // Tests the request from the waiting thread (under the same lock as the progress thread, which naps while a
    // caller waits), which saves two thread hand-offs per message; backs off like the progress thread when nothing
    // moves.
    bool wait(Request& request, const Deadline& deadline) override {
        auto& r = static_cast<MpiRequest&>(request);
        if (r.done()) return true;
        ProgressGate::Driving driving(gate_);
        for (int round = 0; !r.done(); ++round) {
            if (round % kRoundsPerClock == kRoundsPerClock - 1 && deadline.expired()) return false;
            // NOTE: never block on the progress thread's lock: it is testing (and so progressing) MPI meanwhile, and
            // on a full machine it may have lost its core while holding the lock.
            if (std::unique_lock<std::mutex> lock(mutex_, std::try_to_lock); lock.owns_lock()) {
                if (r.handle != MPI_REQUEST_NULL) {
                    int flag = 0;
                    MPI_Status status{};
                    int rc = MPI_Test(&r.handle, &flag, &status);
                    if (rc != MPI_SUCCESS) {
                        r.complete(failure(message_of(r), rc));
                    } else if (flag) {
                        finish(r, status, false);
                    }
                }
                if (r.done()) in_flight_.remove(r);
            }
            if (!r.done()) backoff(round);
        }
        return true;
    }

    void cancel(Request& request) override {
        if (request.done()) return;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            auto& r = static_cast<MpiRequest&>(request);
            if (r.handle != MPI_REQUEST_NULL) MPI_Cancel(&r.handle);
        }
        request.wait_until(Deadline(0));
    }

    // A collective's round as one array of MPI requests, tested together by the caller that waits (MPI_Testsome);
    // none is listed for the progress thread, and no Request exists per message.
    class MpiBatch final : public MessageBatch {
    public:
        MpiBatch(MpiTransport& t, std::vector<Message> messages)
            : MessageBatch(std::move(messages)),
              t_(t),
              handles_(messages_.size(), MPI_REQUEST_NULL),
              indices_(messages_.size()),
              statuses_(messages_.size()) {}
        ~MpiBatch() override { withdraw(); }

        void post() {
            for (const Message& m : messages_) t_.check_size(m.bytes, m.is_send ? "isend" : "irecv");
            for (size_t i = 0; i < messages_.size(); ++i) {
                const Message& m = messages_[i];
                int count = static_cast<int>(m.bytes);
                if (m.is_send)
                    DUPLEX_MPI_CHECK(MPI_Isend(m.buf, count, MPI_BYTE, m.peer, mpi_tag(m.tag), t_.comm_, &handles_[i]));
                else
                    DUPLEX_MPI_CHECK(MPI_Irecv(m.buf, count, MPI_BYTE, m.peer, mpi_tag(m.tag), t_.comm_, &handles_[i]));
            }
        }

        int wait(const Deadline& deadline) override {
            size_t n = handles_.size(), left = n;
            ProgressGate::Driving driving(t_.gate_);
            for (int idle = 0; left > 0;) {
                int count = 0;
                int rc = MPI_Testsome(static_cast<int>(n), handles_.data(), &count, indices_.data(), statuses_.data());
                if (rc != MPI_SUCCESS && rc != MPI_ERR_IN_STATUS) {
                    std::string error = t_.failure(messages_[first_pending()], rc);
                    withdraw();
                    throw CommError(error);
                }
                if (count == MPI_UNDEFINED) break;  // every handle is null
                for (int k = 0; k < count; ++k) {
                    std::string error = t_.outcome(messages_[indices_[k]], statuses_[k], rc == MPI_ERR_IN_STATUS);
                    if (error.empty()) continue;
                    withdraw();
                    throw CommError(error);
                }
                left -= static_cast<size_t>(count);
                if (count > 0) {
                    idle = 0;
                    continue;
                }
                if (idle % kRoundsPerClock == kRoundsPerClock - 1 && deadline.expired()) {
                    int late = first_pending();
                    withdraw();
                    return late;
                }
                backoff(idle++);
            }
            return -1;
        }

    private:
        int first_pending() const {
            for (size_t i = 0; i < handles_.size(); ++i)
                if (handles_[i] != MPI_REQUEST_NULL) return static_cast<int>(i);
            return 0;
        }
        // Cancels what is still in flight and waits until MPI let go of its buffers.
        void withdraw() {
            bool pending = false;
            for (MPI_Request& h : handles_)
                if (h != MPI_REQUEST_NULL) {
                    MPI_Cancel(&h);
                    pending = true;
                }
            if (pending) MPI_Waitall(static_cast<int>(handles_.size()), handles_.data(), MPI_STATUSES_IGNORE);
        }

        MpiTransport& t_;
        std::vector<MPI_Request> handles_;
        std::vector<int> indices_;         // MPI_Testsome's answers
        std::vector<MPI_Status> statuses_;
    };

    std::unique_ptr<MessageBatch> post(std::vector<Message> messages) override {
        auto batch = std::make_unique<MpiBatch>(*this, std::move(messages));
        batch->post();
        return batch;
    }

    void abort(const std::string& reason) override {
        log::error("comm", "rank {} aborting the MPI job: {}", rank_, reason);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }

private:
    void check_size(size_t bytes, const char* op) const {
        if (bytes > static_cast<size_t>(INT_MAX))
            throw CommError(fmt::format("{}: {} bytes exceed one MPI message (2^31-1)", comm_context(rank_, op), bytes));
    }

    void track(const std::shared_ptr<MpiRequest>& req) {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            in_flight_.add(req);
        }
        gate_.posted();
    }

    // Tests outstanding requests nobody waits on; waits on the gate when none are in flight (ProgressGate), naps
    // while a caller drives MPI itself, and backs off from spinning to short sleeps while transfers are slow
    // (oversubscribed ranks need the core back).
    void progress_loop() {
        std::vector<MpiRequest*> active;
        std::vector<MPI_Request> handles;
        std::vector<int> indices;
        std::vector<MPI_Status> statuses;
        int idle_rounds = 0;
        for (;;) {
            std::unique_lock<std::mutex> lock(mutex_);
            if (!gate_.wait_for_work(lock, [&] { return stopping_ || !in_flight_.empty(); })) continue;
            if (stopping_ && in_flight_.empty()) return;
            if (gate_.driven()) {
                gate_.nap(lock);
                continue;
            }
            active.clear();
            in_flight_.for_each([&](MpiRequest& r) { active.push_back(&r); });
            handles.resize(active.size());
            for (size_t i = 0; i < active.size(); ++i) handles[i] = active[i]->handle;
            indices.resize(active.size());
            statuses.resize(active.size());
            int count = 0;
            int rc = MPI_Testsome(static_cast<int>(handles.size()), handles.data(), &count, indices.data(),
                                  statuses.data());
            bool errors_in_status = rc == MPI_ERR_IN_STATUS;
            if (rc != MPI_SUCCESS && !errors_in_status) count = MPI_UNDEFINED;
            for (size_t i = 0; i < active.size(); ++i) active[i]->handle = handles[i];
            bool moved = count != MPI_UNDEFINED && count > 0;
            if (moved)
                for (int k = 0; k < count; ++k) finish(*active[indices[k]], statuses[k], errors_in_status);
            // Unlisted last: a request's last reference may be its own.
            for (MpiRequest* r : active)
                if (r->done()) in_flight_.remove(*r);
            if (!moved) {
                lock.unlock();
                backoff(idle_rounds++);
                continue;
            }
            idle_rounds = 0;
            gate_.worked();
        }
    }

    void finish(MpiRequest& r, const MPI_Status& status, bool errors_in_status) {
        r.complete(outcome(message_of(r), status, errors_in_status));
    }

    // A request as the message it carries (what outcome() and failure() name).
    static Message message_of(const Request& r) { return {r.peer, r.tag, nullptr, r.bytes, r.is_send}; }

    // What a finished request failed with ("" for success): a cancel, an error of MPI, a size that differs from the
    // posted one.
    std::string outcome(const Message& r, const MPI_Status& status, bool errors_in_status) const {
        int cancelled = 0;
        MPI_Test_cancelled(&status, &cancelled);
        if (cancelled)
            return fmt::format("rank {}: {} to/from rank {} cancelled", rank_, r.is_send ? "send" : "receive", r.peer);
        if (errors_in_status && status.MPI_ERROR != MPI_SUCCESS) return failure(r, status.MPI_ERROR);
        if (!r.is_send) {
            int count = 0;
            MPI_Get_count(&status, MPI_BYTE, &count);
            if (static_cast<size_t>(count) != r.bytes)
                return size_mismatch_error(r.peer, fmt::format("{} bytes", count), rank_, r.bytes);
        }
        return {};
    }

    // What a message failed with when MPI returned `rc` for it.
    std::string failure(const Message& m, int rc) const {
        char msg[MPI_MAX_ERROR_STRING];
        int len = 0;
        MPI_Error_string(rc, msg, &len);
        return fmt::format("rank {}: {} rank {} failed ({} bytes): {}", rank_, m.is_send ? "send to" : "receive from",
                           m.peer, m.bytes, std::string(msg, len));
    }

    // A waiting caller reads the clock (its deadline) once per this many rounds.
    static constexpr int kRoundsPerClock = 8;

    // Spin, then yield (oversubscribed ranks get the core back), then sleep when a transfer stays quiet.
    static void backoff(int round) {
        if (round < 16) return;
        if (round < 4096) {
            std::this_thread::yield();
            return;
        }
        std::this_thread::sleep_for(std::chrono::microseconds(50));
    }

    MPI_Comm comm_ = MPI_COMM_NULL;
    int rank_ = 0, size_ = 1;
    std::vector<std::string> hostnames_;
    bool oversubscribed_ = false;  // more ranks on this host than cores
    std::mutex mutex_;
    ProgressGate gate_;  // the progress thread's waits (with mutex_)
    InFlight<MpiRequest> in_flight_;  // what MPI holds and nobody has seen complete (mutex_)
    bool stopping_ = false;
    std::thread progress_;
};

}  // namespace

std::shared_ptr<Transport> make_mpi_transport() { return std::make_shared<MpiTransport>(); }

}  // namespace duplex
