// The in-process backend: ranks are threads of one process sharing an InprocFabric. A message is copied
// exactly once, straight from the sender's buffer into the receiver's, by whichever side arrives second;
// the only lock on the data path is the short matching section of the destination's mailbox.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "comm/transport.hpp"

namespace duplex {

constexpr int kMaxInprocRanks = 4096;
// ConfigError for a world of in-process ranks that cannot run (fewer than 1, more than kMaxInprocRanks).
void check_inproc_ranks(int world_size);

class InprocFabric : public std::enable_shared_from_this<InprocFabric> {
public:
    static std::shared_ptr<InprocFabric> create(int world_size);
    ~InprocFabric();
    int size() const;
    std::shared_ptr<Transport> transport(int rank);

    struct Impl;

private:
    InprocFabric() = default;
    std::unique_ptr<Impl> impl_;
};

}  // namespace duplex
