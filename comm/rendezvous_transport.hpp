// Tagged messages over channels that only know order: how NCCL, whose point-to-point calls match strictly in
// the order both sides post them and carry no tag, becomes a Transport under the Communicator.
//
// A send announces itself to its receiver over a control transport (host messages: tag and size). The
// receiver matches the announcement against its posted receives by (peer, tag) in order, as every Transport
// must, posts the payload receive on its channel from that peer and answers "clear to send"; the sender posts
// the payload send when the answer arrives. Both ends of a channel therefore post its payloads in the order
// the receiver matched them, whatever order the tags were posted in, and a receive posted with another size
// fails both sides before any payload moves. One progress thread per transport drives the control messages
// and the channels; the caller's threads only queue work.
//
//   auto control = fabric->transport(rank);                                   // inproc, ucx or mpi
//   auto channels = make_nccl_channels(store, rank, size, device);            // comm/nccl/nccl_channels.hpp
//   auto transport = std::make_shared<RendezvousTransport>(control, channels, "nccl");
//   auto comm = Communicator::create(transport, topology);
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "comm/transport.hpp"

namespace duplex {

// Payload channels to every peer, one per direction. Sends to a peer match that peer's receives from this rank
// in the order both were posted. Every call comes from the rendezvous progress thread.
class ByteChannels {
public:
    // Called once per transfer, from poll() or fail() only (never from a post: the caller holds its lock there): an
    // empty error on success.
    using Done = std::function<void(const std::string& error)>;
    virtual ~ByteChannels() = default;
    virtual std::string describe() const = 0;
    virtual void post_send(int peer, const void* buf, size_t bytes, Done done) = 0;
    virtual void post_recv(int peer, void* buf, size_t bytes, Done done) = 0;
    // Calls `done` for the transfers that finished since the last call; true if any did.
    virtual bool poll() = 0;
    // Fails every transfer posted with `peer` (every peer when peer < 0): the peer or this rank gave up, and
    // what is in flight will not finish.
    virtual void fail(int peer, const std::string& reason) = 0;
    // Whether `buf` is device memory, which the Communicator's host-side collectives cannot touch.
    virtual bool device_memory(const void* buf) const {
        (void)buf;
        return false;
    }
};

// Channels made of another transport's messages on one tag (which keeps a pair's order): the host channels the
// rendezvous protocol is tested with, and a fallback that needs no device.
std::shared_ptr<ByteChannels> make_transport_channels(std::shared_ptr<Transport> transport, uint64_t tag);

class RendezvousTransport : public Transport {
public:
    // `control` carries the announcements (tags below 16 are this protocol's; nothing else may use `control`
    // except channels made with make_transport_channels on another tag). `name` is what name() reports.
    RendezvousTransport(std::shared_ptr<Transport> control, std::shared_ptr<ByteChannels> channels, std::string name);
    ~RendezvousTransport() override;

    const char* name() const override { return name_.c_str(); }
    int rank() const override { return control_->rank(); }
    int size() const override { return control_->size(); }
    std::shared_ptr<Request> isend(int peer, uint64_t tag, const void* buf, size_t bytes) override;
    std::shared_ptr<Request> irecv(int peer, uint64_t tag, void* buf, size_t bytes) override;
    // Withdraws a request not yet matched; one whose payload is in flight on a channel cannot be withdrawn, so the
    // transport aborts (the timeout that asks for this has already failed the operation).
    void cancel(Request& request) override;
    void abort(const std::string& reason) override;
    void close() override { control_->close(); }
    std::vector<std::string> hostnames() const override { return control_->hostnames(); }
    std::string describe() const override;
    bool device_memory(const void* buf) const override { return channels_->device_memory(buf); }

    // The control tag of this protocol (make_transport_channels must use another).
    static constexpr uint64_t kControlTag = 1;

    struct State;

private:
    std::shared_ptr<Transport> control_;
    std::shared_ptr<ByteChannels> channels_;
    std::string name_;
    std::shared_ptr<State> state_;
};

}  // namespace duplex
