// The `duplex` subcommands: each registers its options on the root app and returns the function to run.
#pragma once

#include <functional>

#include <CLI/CLI.hpp>

namespace duplex::tools {

using Command = std::function<int()>;

Command add_commbench(CLI::App& app);
Command add_schedule(CLI::App& app);
Command add_train(CLI::App& app);

// Prints every DUPLEX_* knob with its default, effective value and help (the --print-config flag).
void print_config();

}  // namespace duplex::tools
