#include "comm/tcp_store.hpp"

#include <chrono>
#include <cstring>
#include <thread>
#include <utility>
#include <vector>

#include <boost/asio.hpp>
#include <fmt/format.h>

#include "core/clock.hpp"
#include "core/error.hpp"
#include "core/log.hpp"

namespace duplex {

namespace asio = boost::asio;
using asio::ip::tcp;

namespace {

enum Op : uint8_t { kHello = 1, kSet = 2, kGet = 3, kAdd = 4, kCompareSet = 5 };
enum Status : uint8_t { kOk = 0, kNotFound = 1, kFailed = 2 };

void put_u32(std::string& out, uint32_t v) {
    char b[4] = {char(v & 0xFF), char((v >> 8) & 0xFF), char((v >> 16) & 0xFF), char((v >> 24) & 0xFF)};
    out.append(b, 4);
}
uint32_t get_u32(const char* p) {
    auto u = reinterpret_cast<const unsigned char*>(p);
    return uint32_t(u[0]) | (uint32_t(u[1]) << 8) | (uint32_t(u[2]) << 16) | (uint32_t(u[3]) << 24);
}

std::string encode(uint8_t code, const std::vector<std::string>& fields) {
    std::string payload(1, static_cast<char>(code));
    for (const std::string& f : fields) {
        put_u32(payload, static_cast<uint32_t>(f.size()));
        payload += f;
    }
    std::string frame;
    put_u32(frame, static_cast<uint32_t>(payload.size()));
    return frame + payload;
}

// Parses the fields after the code byte; false when the payload is malformed.
bool decode_fields(const std::string& payload, std::vector<std::string>& fields) {
    size_t pos = 1;
    while (pos < payload.size()) {
        if (payload.size() - pos < 4) return false;
        uint32_t len = get_u32(payload.data() + pos);
        pos += 4;
        if (len > payload.size() - pos) return false;
        fields.emplace_back(payload.substr(pos, len));
        pos += len;
    }
    return true;
}

}  // namespace

std::pair<std::string, uint16_t> parse_host_port(const std::string& address, const char* what) {
    size_t colon = address.rfind(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 == address.size())
        throw ConfigError(what, fmt::format("expected HOST:PORT, got '{}'", address));
    std::string host = address.substr(0, colon);
    long port = -1;
    try {
        size_t used = 0;
        port = std::stol(address.substr(colon + 1), &used);
        if (used != address.size() - colon - 1) port = -1;
    } catch (const std::exception&) {
        port = -1;
    }
    if (port < 0 || port > 65535)
        throw ConfigError(what, fmt::format("port in '{}' is not a number in 0..65535", address));
    if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
    return {host, static_cast<uint16_t>(port)};
}

// ---------------------------------------------------------------------------------------------------------
// Server

struct TcpStoreServer::Impl {
    asio::io_context io;
    tcp::acceptor acceptor{io};
    std::thread thread;
    std::string token;
    size_t max_frame_bytes;
    InMemoryStore data;
    std::atomic<uint64_t> rejected{0};

    class Session : public std::enable_shared_from_this<Session> {
    public:
        Session(Impl& server, tcp::socket socket) : server_(server), socket_(std::move(socket)) {
            boost::system::error_code ec;
            auto ep = socket_.remote_endpoint(ec);
            peer_ = ec ? std::string("?") : fmt::format("{}:{}", ep.address().to_string(), ep.port());
        }
        void start() { read_header(); }

    private:
        void read_header() {
            auto self = shared_from_this();
            asio::async_read(socket_, asio::buffer(header_, 4), [this, self](boost::system::error_code ec, size_t) {
                if (ec) return closed();
                uint32_t len = get_u32(header_);
                if (len == 0 || len > server_.max_frame_bytes) {
                    reject(fmt::format("frame of {} bytes (limit {})", len, server_.max_frame_bytes));
                    return;
                }
                body_.resize(len);
                read_body();
            });
        }
        void read_body() {
            auto self = shared_from_this();
            asio::async_read(socket_, asio::buffer(body_), [this, self](boost::system::error_code ec, size_t) {
                if (ec) return closed();
                std::string reply;
                if (!handle(reply)) return;
                asio::async_write(socket_, asio::buffer(reply_ = std::move(reply)),
                                  [this, self](boost::system::error_code wec, size_t) {
                                      if (!wec) read_header();
                                  });
            });
        }
        // The peer's connection ended. A rank that announced itself (kLivenessRank) and did not announce a
        // clean exit (kLivenessExited) is recorded as lost, so the others can name it.
        void closed() {
            if (rank_ < 0 || clean_exit_) return;
            server_.data.set(std::string(kStoreLostPrefix) + std::to_string(rank_), peer_);
            server_.data.add(kStoreLostCount, 1);
            log::warn("store", "rank {} ({}) closed its connection without a clean exit", rank_, peer_);
        }
        void reject(const std::string& why) {
            server_.rejected.fetch_add(1);
            log::warn("store", "closing connection from {}: {}", peer_, why);
            boost::system::error_code ec;
            socket_.close(ec);
        }
        // Builds the reply; false when the connection was closed instead.
        bool handle(std::string& reply) {
            std::vector<std::string> f;
            uint8_t op = static_cast<uint8_t>(body_[0]);
            if (!decode_fields(body_, f)) {
                reject(fmt::format("malformed frame (op {})", op));
                return false;
            }
            if (!authenticated_) {
                if (op != kHello || f.size() != 1) {
                    reject(fmt::format("first frame is op {}, expected HELLO", op));
                    return false;
                }
                if (f[0] != server_.token) {
                    reject("wrong token");
                    return false;
                }
                authenticated_ = true;
                reply = encode(kOk, {});
                return true;
            }
            try {
                switch (op) {
                    case kSet:
                        if (f.size() != 2) break;
                        if (f[0].rfind(kStoreRankPrefix, 0) == 0) rank_ = int(store_parse_int(f[0], f[1]));
                        if (f[0].rfind(kStoreExitedPrefix, 0) == 0) clean_exit_ = true;
                        server_.data.set(f[0], f[1]);
                        reply = encode(kOk, {});
                        return true;
                    case kGet: {
                        if (f.size() != 1) break;
                        auto v = server_.data.try_get(f[0]);
                        reply = v ? encode(kOk, {*v}) : encode(kNotFound, {});
                        return true;
                    }
                    case kAdd: {
                        if (f.size() != 2) break;
                        int64_t delta = store_parse_int(f[0], f[1]);
                        reply = encode(kOk, {std::to_string(server_.data.add(f[0], delta))});
                        return true;
                    }
                    case kCompareSet:
                        if (f.size() != 3) break;
                        reply = encode(kOk, {server_.data.compare_set(f[0], f[1], f[2])});
                        return true;
                    default: break;
                }
            } catch (const Error& e) {
                reply = encode(kFailed, {e.what()});
                return true;
            }
            reject(fmt::format("unknown op {} with {} fields", op, f.size()));
            return false;
        }

        Impl& server_;
        tcp::socket socket_;
        std::string peer_;
        char header_[4];
        std::string body_;
        std::string reply_;
        bool authenticated_ = false;
        int rank_ = -1;
        bool clean_exit_ = false;
    };

    void accept() {
        acceptor.async_accept([this](boost::system::error_code ec, tcp::socket socket) {
            if (ec) return;  // acceptor closed
            std::make_shared<Session>(*this, std::move(socket))->start();
            accept();
        });
    }
};

TcpStoreServer::TcpStoreServer(const std::string& host, uint16_t port, std::string token, size_t max_frame_bytes)
    : impl_(std::make_unique<Impl>()) {
    impl_->token = std::move(token);
    impl_->max_frame_bytes = max_frame_bytes;
    try {
        tcp::endpoint ep(asio::ip::make_address(host == "localhost" ? "127.0.0.1" : host), port);
        impl_->acceptor.open(ep.protocol());
        impl_->acceptor.set_option(tcp::acceptor::reuse_address(true));
        impl_->acceptor.bind(ep);
        impl_->acceptor.listen();
    } catch (const boost::system::system_error& e) {
        throw StoreError(fmt::format("store server cannot listen on {}:{}: {}", host, port, e.what()));
    }
    impl_->accept();
    impl_->thread = std::thread([this] { impl_->io.run(); });
    log::info("store", "server listening on {}:{}", host, this->port());
}

TcpStoreServer::~TcpStoreServer() {
    impl_->io.stop();
    if (impl_->thread.joinable()) impl_->thread.join();
}

uint16_t TcpStoreServer::port() const { return impl_->acceptor.local_endpoint().port(); }
uint64_t TcpStoreServer::num_rejected() const { return impl_->rejected.load(); }

// ---------------------------------------------------------------------------------------------------------
// Client

struct TcpStore::Impl {
    asio::io_context io;
    tcp::socket socket{io};
    std::mutex mutex;
    std::string where;
    double request_timeout_s;

    // Runs the io_context until `done` or the timeout; a timeout closes the socket and throws.
    void run_until(const bool& done, double timeout_s, const char* what) {
        io.restart();
        io.run_for(std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::duration<double>(timeout_s)));
        if (!done) {
            boost::system::error_code ec;
            socket.close(ec);
            throw TimeoutError(fmt::format("store {} with server {}", what, where), timeout_s);
        }
    }

    // One request/response round trip; returns (status, fields).
    std::pair<uint8_t, std::vector<std::string>> request(uint8_t op, const std::vector<std::string>& fields,
                                                         const char* what) {
        std::lock_guard<std::mutex> lock(mutex);
        if (!socket.is_open()) throw StoreError(fmt::format("store {}: connection to {} is closed", what, where));
        std::string frame = encode(op, fields);
        boost::system::error_code error;
        bool done = false;
        char header[4];
        std::string body;
        asio::async_write(socket, asio::buffer(frame), [&](boost::system::error_code ec, size_t) {
            if (ec) {
                error = ec;
                done = true;
                return;
            }
            asio::async_read(socket, asio::buffer(header, 4), [&](boost::system::error_code ec2, size_t) {
                if (ec2) {
                    error = ec2;
                    done = true;
                    return;
                }
                body.resize(get_u32(header));
                if (body.empty()) {
                    error = asio::error::invalid_argument;
                    done = true;
                    return;
                }
                asio::async_read(socket, asio::buffer(body), [&](boost::system::error_code ec3, size_t) {
                    error = ec3;
                    done = true;
                });
            });
        });
        run_until(done, request_timeout_s, what);
        if (error)
            throw StoreError(fmt::format("store {} with server {} failed: {}", what, where, error.message()));
        std::vector<std::string> out;
        if (!decode_fields(body, out)) throw StoreError(fmt::format("store {}: malformed reply from {}", what, where));
        uint8_t status = static_cast<uint8_t>(body[0]);
        if (status == kFailed)
            throw StoreError(fmt::format("store {} rejected by server: {}", what, out.empty() ? "" : out[0]));
        return {status, std::move(out)};
    }
};

TcpStore::TcpStore(const std::string& host, uint16_t port, std::string token, double connect_timeout_s,
                   double request_timeout_s)
    : impl_(std::make_unique<Impl>()) {
    impl_->where = fmt::format("{}:{}", host, port);
    impl_->request_timeout_s = request_timeout_s;
    Deadline deadline(connect_timeout_s);
    tcp::resolver resolver(impl_->io);
    boost::system::error_code last;
    for (int attempt = 0;; ++attempt) {
        boost::system::error_code ec;
        auto endpoints = resolver.resolve(host, std::to_string(port), ec);
        if (!ec) {
            asio::connect(impl_->socket, endpoints, ec);
            if (!ec) break;
        }
        last = ec;
        impl_->socket.close(ec);
        if (deadline.expired())
            throw TimeoutError(fmt::format("connecting to store at {} (last error: {})", impl_->where, last.message()),
                               connect_timeout_s);
        std::this_thread::sleep_for(std::chrono::milliseconds(std::min(100, 5 << std::min(attempt, 5))));
    }
    impl_->socket.set_option(tcp::no_delay(true));
    impl_->request(kHello, {token}, "hello");
}

TcpStore::~TcpStore() = default;

void TcpStore::set(const std::string& key, const std::string& value) { impl_->request(kSet, {key, value}, "set"); }

std::optional<std::string> TcpStore::try_get(const std::string& key) {
    auto [status, fields] = impl_->request(kGet, {key}, "get");
    if (status == kNotFound) return std::nullopt;
    if (fields.size() != 1) throw StoreError(fmt::format("store get '{}': malformed reply", key));
    return fields[0];
}

int64_t TcpStore::add(const std::string& key, int64_t delta) {
    auto [status, fields] = impl_->request(kAdd, {key, std::to_string(delta)}, "add");
    if (fields.size() != 1) throw StoreError(fmt::format("store add '{}': malformed reply", key));
    return store_parse_int(key, fields[0]);
}

std::string TcpStore::compare_set(const std::string& key, const std::string& expected, const std::string& desired) {
    auto [status, fields] = impl_->request(kCompareSet, {key, expected, desired}, "compare_set");
    if (fields.size() != 1) throw StoreError(fmt::format("store compare_set '{}': malformed reply", key));
    return fields[0];
}

void TcpStore::wait_for_change(const std::string&, double remaining_s, int attempt) {
    // NOTE: polling with a capped exponential backoff keeps the server free of per-waiter state.
    double pause = std::min({remaining_s, 0.05, 0.0005 * double(1 << std::min(attempt, 10))});
    std::this_thread::sleep_for(std::chrono::duration<double>(std::max(pause, 0.0)));
}

}  // namespace duplex
