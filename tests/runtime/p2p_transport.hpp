// A RowTransport for the exchange tests: a communicator of its own and point-to-point messages, so an exchange that
// bypassed it would show as bytes on the group's communicator.
#pragma once

#include <memory>
#include <vector>

#include "comm/communicator.hpp"
#include "runtime/model/expert_exchange.hpp"

namespace duplex::test_support {

template <typename T>
class PointToPointTransport : public RowTransport<T> {
public:
    explicit PointToPointTransport(std::shared_ptr<Communicator> comm) : comm_(std::move(comm)) {}
    std::vector<std::vector<T>> exchange(const std::vector<std::vector<T>>& per_peer, int width) override {
        ++calls;
        int n = comm_->size();
        std::vector<int64_t> send_rows(n), recv_rows(n);
        for (int p = 0; p < n; ++p) send_rows[p] = int64_t(per_peer[p].size()) / width;
        comm_->all_to_all(send_rows.data(), recv_rows.data(), sizeof(int64_t))->wait();
        std::vector<std::vector<T>> got(n);
        std::vector<WorkPtr> work;
        for (int p = 0; p < n; ++p) {
            got[p].resize(size_t(recv_rows[p]) * width);
            if (!got[p].empty()) work.push_back(comm_->irecv(got[p].data(), got[p].size() * sizeof(T), p, 7));
            if (!per_peer[p].empty()) work.push_back(comm_->isend(per_peer[p].data(), per_peer[p].size() * sizeof(T), p, 7));
        }
        wait_all(work);
        return got;
    }
    int calls = 0;

protected:
    std::shared_ptr<Communicator> comm_;
};

}  // namespace duplex::test_support
