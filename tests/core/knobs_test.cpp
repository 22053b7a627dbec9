#include "core/knobs.hpp"

#include <cstdlib>

#include <gtest/gtest.h>

#include "core/error.hpp"

namespace duplex {
namespace {

const Knob<int> kTestInt("DUPLEX_TEST_INT_KNOB", 7, "an integer knob for tests");
const Knob<bool> kTestBool("DUPLEX_TEST_BOOL_KNOB", false, "a boolean knob for tests");

TEST(Knobs, DefaultThenEnvironment) {
    unsetenv("DUPLEX_TEST_INT_KNOB");
    EXPECT_EQ(kTestInt.get(), 7);
    setenv("DUPLEX_TEST_INT_KNOB", "42", 1);
    EXPECT_EQ(kTestInt.get(), 42);
    unsetenv("DUPLEX_TEST_INT_KNOB");
}

TEST(Knobs, MalformedValueNamesTheVariable) {
    setenv("DUPLEX_TEST_INT_KNOB", "forty", 1);
    try {
        kTestInt.get();
        FAIL() << "no error";
    } catch (const ConfigError& e) {
        EXPECT_NE(std::string(e.what()).find("DUPLEX_TEST_INT_KNOB"), std::string::npos);
        EXPECT_NE(std::string(e.what()).find("forty"), std::string::npos);
    }
    unsetenv("DUPLEX_TEST_INT_KNOB");
    setenv("DUPLEX_TEST_BOOL_KNOB", "maybe", 1);
    EXPECT_THROW(kTestBool.get(), ConfigError);
    setenv("DUPLEX_TEST_BOOL_KNOB", "on", 1);
    EXPECT_TRUE(kTestBool.get());
    unsetenv("DUPLEX_TEST_BOOL_KNOB");
}

TEST(Knobs, Registered) {
    bool found = false;
    for (const KnobInfo& k : all_knobs())
        if (k.name == "DUPLEX_TEST_INT_KNOB") {
            found = true;
            EXPECT_EQ(k.default_value, "7");
            EXPECT_EQ(k.help, "an integer knob for tests");
        }
    EXPECT_TRUE(found);
}

}  // namespace
}  // namespace duplex
