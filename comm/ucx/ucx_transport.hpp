// The UCX backend: UCP tagged messages over whatever transports UCX finds (shared memory and TCP on one
// machine, InfiniBand on a cluster). Ranks exchange worker addresses through the Store at start-up; a
// progress thread drives the worker and sleeps on its event descriptor when nothing moves.
#pragma once

#include <memory>

#include "comm/store.hpp"
#include "comm/transport.hpp"

namespace duplex {

std::shared_ptr<Transport> make_ucx_transport(std::shared_ptr<Store> store, int rank, int world_size);

}  // namespace duplex
