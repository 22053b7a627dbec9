// A Store over TCP on Boost.Asio: one rank runs TcpStoreServer, every rank (the server's too) talks to it
// through a TcpStore client.
//
// Wire format: each frame is a 4-byte little-endian payload length, then the payload: one op byte and
// length-prefixed fields. The first frame of a connection must be HELLO carrying the shared token; a wrong
// token, a malformed frame or one larger than max_frame_bytes closes that connection with a logged reason,
// and the server keeps serving everyone else.
//
//   TcpStoreServer server("127.0.0.1", 0, "secret");          // port 0: pick a free one
//   TcpStore store("127.0.0.1", server.port(), "secret");
//   store.set("k", "v");
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "comm/store.hpp"

namespace duplex {

constexpr size_t kStoreDefaultMaxFrameBytes = 64u << 20;

// Liveness: a rank's client sets kStoreRankPrefix + rank (value: the rank) on its connection, and
// kStoreExitedPrefix + rank before it disconnects cleanly. When a connection that announced a rank ends without
// that, the server sets kStoreLostPrefix + rank (value: the peer address) and adds 1 to kStoreLostCount.
constexpr const char* kStoreRankPrefix = "liveness/rank/";
constexpr const char* kStoreExitedPrefix = "liveness/exited/";
constexpr const char* kStoreLostPrefix = "liveness/lost/";
constexpr const char* kStoreLostCount = "liveness/lost";

class TcpStoreServer {
public:
    // Binds host:port (port 0 picks a free port). Throws StoreError when it cannot bind.
    TcpStoreServer(const std::string& host, uint16_t port, std::string token,
                   size_t max_frame_bytes = kStoreDefaultMaxFrameBytes);
    ~TcpStoreServer();
    TcpStoreServer(const TcpStoreServer&) = delete;
    TcpStoreServer& operator=(const TcpStoreServer&) = delete;

    uint16_t port() const;
    // Connections closed for a bad token, a malformed or an oversized frame.
    uint64_t num_rejected() const;

    struct Impl;

private:
    std::unique_ptr<Impl> impl_;
};

class TcpStore : public Store {
public:
    // Connects, retrying until connect_timeout_s (the server may start later), then sends HELLO.
    TcpStore(const std::string& host, uint16_t port, std::string token, double connect_timeout_s = 60.0,
             double request_timeout_s = 60.0);
    ~TcpStore() override;

    void set(const std::string& key, const std::string& value) override;
    std::optional<std::string> try_get(const std::string& key) override;
    int64_t add(const std::string& key, int64_t delta) override;
    std::string compare_set(const std::string& key, const std::string& expected, const std::string& desired) override;

    struct Impl;

protected:
    void wait_for_change(const std::string& key, double remaining_s, int attempt) override;

private:
    std::unique_ptr<Impl> impl_;
};

// "host:port" → (host, port); throws ConfigError naming the bad address.
std::pair<std::string, uint16_t> parse_host_port(const std::string& address, const char* what);

}  // namespace duplex
