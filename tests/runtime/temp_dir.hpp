// A fresh directory under /tmp for one test, removed with everything in it when the test ends.
#pragma once

#include <stdlib.h>

#include <filesystem>
#include <string>

namespace duplex::testing_support {

struct TempDir {
    std::filesystem::path path;
    explicit TempDir(const char* prefix = "duplex-test") {
        std::string tmpl = std::string("/tmp/") + prefix + "-XXXXXX";
        path = ::mkdtemp(tmpl.data());
    }
    ~TempDir() { std::filesystem::remove_all(path); }
    std::string operator/(const std::string& s) const { return (path / s).string(); }
};

}  // namespace duplex::testing_support
