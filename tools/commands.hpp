// The `duplex` subcommands: each registers its options on the root app and returns the function to run.
#pragma once

#include <cstdio>
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
// Writes text to path (ConfigError naming `flag` if it cannot); "-" is standard output.
void write_text_file(const std::string& path, const std::string& text, const char* flag);

// Where a command's human-readable lines go: standard output, or standard error when its --json is "-" (so the
// JSON on standard output stays parseable). Set once per command with json_target.
std::FILE* human();
void json_target(const std::string& json_path);
// "# <what> written to <path>" unless the path is standard output.
void note_written(const char* what, const std::string& path);

// Prints every DUPLEX_* knob with its default, effective value and help (the --print-config flag).
void print_config();

}  // namespace duplex::tools
