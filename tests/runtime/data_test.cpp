// Batch sources: the token-file reader against the bytes it was given, and its refusals.
#include "runtime/train/data.hpp"

#include <cstdio>
#include <fstream>

#include <gtest/gtest.h>

#include "core/error.hpp"

namespace duplex {
namespace {

std::string write_ids(const std::string& name, const std::vector<uint32_t>& ids, int bytes) {
    std::string path = ::testing::TempDir() + name;
    std::ofstream out(path, std::ios::binary);
    for (uint32_t v : ids) {
        if (bytes == 2) {
            uint16_t h = uint16_t(v);
            out.write(reinterpret_cast<const char*>(&h), 2);
        } else {
            out.write(reinterpret_cast<const char*>(&v), 4);
        }
    }
    return path;
}

TEST(TokenFile, WindowsAreContiguousRunsWithNextTokenTargets) {
    std::vector<uint32_t> ids(500);
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = uint32_t(i % 61);
    for (int bytes : {2, 4}) {
        std::string path = write_ids(bytes == 2 ? "ids16.bin" : "ids32.bin", ids, bytes);
        TokenFileBatches src(path, bytes, 64, 16, 3, 9);
        EXPECT_EQ(src.num_tokens(), ids.size());
        Batch b = src.batch(2, 5);
        ASSERT_EQ(b.tokens.size(), 48u);
        for (int s = 0; s < 3; ++s) {
            int first = b.tokens[size_t(s) * 16];
            for (int t = 0; t < 16; ++t) {
                EXPECT_EQ(b.tokens[size_t(s) * 16 + t], (first + t) % 61);
                EXPECT_EQ(b.targets[size_t(s) * 16 + t], (first + t + 1) % 61);
            }
        }
        // Same (step, microbatch): same batch; another microbatch: other windows.
        EXPECT_EQ(src.batch(2, 5).tokens, b.tokens);
        EXPECT_NE(src.batch(2, 6).tokens, b.tokens);
    }
}

TEST(TokenFile, RefusesWhatItCannotRead) {
    std::vector<uint32_t> ids(100, 3);
    std::string ok = write_ids("ok.bin", ids, 2);
    EXPECT_THROW(TokenFileBatches("/nonexistent/ids.bin", 2, 64, 16, 1, 1), ConfigError);
    EXPECT_THROW(TokenFileBatches(ok, 2, 64, 200, 1, 1), ConfigError);  // fewer ids than a window
    ids[57] = 64;
    std::string big = write_ids("big.bin", ids, 2);
    try {
        TokenFileBatches(big, 2, 64, 16, 1, 1);
        FAIL();
    } catch (const ConfigError& e) {
        EXPECT_NE(std::string(e.what()).find("token 64 at position 57"), std::string::npos) << e.what();
    }
    std::string odd = ::testing::TempDir() + "odd.bin";
    std::ofstream(odd, std::ios::binary).write("abc", 3);
    EXPECT_THROW(TokenFileBatches(odd, 2, 64, 1, 1, 1), ConfigError);
    EXPECT_EQ(make_batch_source(ok + ":u16", 64, 16, 1, 1, 0)->describe().find(ok), 0u);
}

TEST(Synthetic, TheBatchSeedIsOneFormula) {
    SyntheticBatches s(64, 16, 2, 5);
    Batch a = s.batch(3, 7);
    Batch b = s.task().batch(2, batch_seed(5, 3, 7));
    EXPECT_EQ(a.tokens, b.tokens);
    EXPECT_NE(batch_seed(5, 3, 7), batch_seed(5, 7, 3));
}

}  // namespace
}  // namespace duplex
