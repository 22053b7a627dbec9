#include <utility>  // before Boost.Asio 1.74, whose awaitable.hpp uses std::exchange without it
#include <thread>

#include <boost/asio.hpp>
#include <gtest/gtest.h>

#include "comm/store.hpp"
#include "comm/tcp_store.hpp"
#include "core/clock.hpp"
#include "core/error.hpp"

namespace duplex {
namespace {

// The same behaviour from both stores.
class StoreTest : public ::testing::TestWithParam<std::string> {
protected:
    void SetUp() override {
        if (GetParam() == "memory") {
            store_ = std::make_shared<InMemoryStore>();
        } else {
            server_ = std::make_unique<TcpStoreServer>("127.0.0.1", 0, "tok");
            store_ = std::make_shared<TcpStore>("127.0.0.1", server_->port(), "tok");
        }
    }
    std::shared_ptr<Store> other() {
        if (!server_) return store_;
        return std::make_shared<TcpStore>("127.0.0.1", server_->port(), "tok");
    }
    std::unique_ptr<TcpStoreServer> server_;
    std::shared_ptr<Store> store_;
};

TEST_P(StoreTest, SetGetAndBinaryValues) {
    std::string binary("a\0b\xff", 4);
    store_->set("k", binary);
    EXPECT_EQ(other()->get("k", 5), binary);
    EXPECT_FALSE(store_->try_get("missing"));
    store_->set("k", "");
    EXPECT_EQ(store_->get("k", 5), "");
}

TEST_P(StoreTest, GetWaitsForALaterSet) {
    auto writer = other();
    std::thread t([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        writer->set("late", "here");
    });
    EXPECT_EQ(store_->get("late", 10), "here");
    t.join();
}

TEST_P(StoreTest, GetTimesOutNamingTheKey) {
    Stopwatch sw;
    try {
        store_->get("never", 0.2);
        FAIL();
    } catch (const TimeoutError& e) {
        EXPECT_NE(std::string(e.what()).find("never"), std::string::npos);
    }
    EXPECT_LT(sw.seconds(), 3.0);
    try {
        store_->set("a", "1");
        store_->wait({"a", "b", "c"}, 0.2);
        FAIL();
    } catch (const TimeoutError& e) {
        EXPECT_NE(std::string(e.what()).find("b, c"), std::string::npos) << e.what();
    }
}

TEST_P(StoreTest, AddIsAtomicAcrossClients) {
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t)
        threads.emplace_back([&, s = other()] {
            for (int i = 0; i < 50; ++i) s->add("counter", 1);
        });
    for (auto& t : threads) t.join();
    EXPECT_EQ(store_->add("counter", 0), 200);
    EXPECT_EQ(store_->add("counter", -10), 190);
    store_->set("text", "abc");
    EXPECT_THROW(store_->add("text", 1), StoreError);
}

TEST_P(StoreTest, CompareSet) {
    EXPECT_EQ(store_->compare_set("cas", "", "first"), "first");  // absent matches empty
    EXPECT_EQ(store_->compare_set("cas", "wrong", "second"), "first");
    EXPECT_EQ(store_->compare_set("cas", "first", "second"), "second");
    EXPECT_EQ(store_->compare_set("absent", "x", "y"), "");
    EXPECT_FALSE(store_->try_get("absent"));
}

INSTANTIATE_TEST_SUITE_P(Both, StoreTest, ::testing::Values("memory", "tcp"));

namespace asio = boost::asio;

// Sends raw bytes to the server and reports whether it closed the connection.
bool server_closes_after(uint16_t port, const std::string& bytes) {
    asio::io_context io;
    asio::ip::tcp::socket s(io);
    s.connect({asio::ip::make_address("127.0.0.1"), port});
    asio::write(s, asio::buffer(bytes));
    char c[64];
    boost::system::error_code ec;
    while (!ec) s.read_some(asio::buffer(c), ec);  // replies (to HELLO) first, then EOF when closed
    return ec == asio::error::eof || ec == asio::error::connection_reset;
}

std::string frame(const std::string& payload) {
    uint32_t n = static_cast<uint32_t>(payload.size());
    return std::string(reinterpret_cast<const char*>(&n), 4) + payload;
}
std::string field(const std::string& f) {
    uint32_t n = static_cast<uint32_t>(f.size());
    return std::string(reinterpret_cast<const char*>(&n), 4) + f;
}

TEST(TcpStore, RejectsBadFramesAndKeepsServing) {
    TcpStoreServer server("127.0.0.1", 0, "secret", 1024);
    TcpStore good("127.0.0.1", server.port(), "secret");
    good.set("alive", "yes");
    EXPECT_TRUE(server_closes_after(server.port(), frame("\x01" + field("wrong"))));           // wrong token
    EXPECT_TRUE(server_closes_after(server.port(), frame("\x02" + field("k") + field("v"))));  // SET before HELLO
    EXPECT_TRUE(server_closes_after(server.port(), std::string("\xff\xff\xff\x7f", 4)));       // oversized length
    EXPECT_TRUE(server_closes_after(server.port(), std::string("\0\0\0\0", 4)));               // empty frame
    EXPECT_TRUE(server_closes_after(server.port(), frame("\x01\x10\x00\x00\x00shor")));       // field overruns
    std::string hello = frame("\x01" + field("secret"));
    EXPECT_TRUE(server_closes_after(server.port(), hello + frame(std::string("\x63", 1))));  // unknown op
    EXPECT_EQ(server.num_rejected(), 6u);
    EXPECT_EQ(good.get("alive", 5), "yes");
    TcpStore again("127.0.0.1", server.port(), "secret");
    EXPECT_EQ(again.get("alive", 5), "yes");
}

TEST(TcpStore, WrongTokenFailsTheClient) {
    TcpStoreServer server("127.0.0.1", 0, "secret");
    EXPECT_THROW(TcpStore("127.0.0.1", server.port(), "guess", 5, 5), StoreError);
}

TEST(TcpStore, ConnectTimesOutWhenNoServer) {
    uint16_t port;
    {
        TcpStoreServer probe("127.0.0.1", 0, "x");
        port = probe.port();
    }
    EXPECT_THROW(TcpStore("127.0.0.1", port, "x", 0.3), TimeoutError);
}

TEST(TcpStore, ParsesAddresses) {
    EXPECT_EQ(parse_host_port("10.0.0.1:29500", "addr"), std::make_pair(std::string("10.0.0.1"), uint16_t(29500)));
    EXPECT_EQ(parse_host_port("[::1]:80", "addr").first, "::1");
    EXPECT_THROW(parse_host_port("nohost", "addr"), ConfigError);
    EXPECT_THROW(parse_host_port("h:99999", "addr"), ConfigError);
    EXPECT_THROW(parse_host_port("h:12x", "addr"), ConfigError);
}

}  // namespace
}  // namespace duplex
