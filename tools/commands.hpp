// The `duplex` subcommands: each registers its options on the root app and returns the function to run.
#pragma once

#include <functional>
#include <string>

#include <CLI/CLI.hpp>

namespace duplex::tools {

using Command = std::function<int()>;

Command add_commbench(CLI::App& app);
Command add_schedule(CLI::App& app);
Command add_train(CLI::App& app);
Command add_simulate(CLI::App& app);

// Fails now, with a ConfigError naming `flag`, if `path` cannot be written: a long run must not end with its
// results unwritable. An empty path is fine (no output asked for).
void check_writable(const std::string& path, const char* flag);
// Writes text to path (ConfigError naming `flag` if it cannot).
void write_text_file(const std::string& path, const std::string& text, const char* flag);

// Prints every DUPLEX_* knob with its default, effective value and help (the --print-config flag).
void print_config();

}  // namespace duplex::tools
