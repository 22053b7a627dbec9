// duplex: the command-line front end. Thin mains over the library; see `duplex --help`.
#include <cstdio>
#include <fstream>
#include <map>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "core/error.hpp"
#include "core/knobs.hpp"
#include "tools/commands.hpp"

namespace duplex::tools {

namespace {
std::FILE* human_stream = stdout;
}

std::FILE* human() { return human_stream; }
void json_target(const std::string& json_path) { human_stream = json_path == "-" ? stderr : stdout; }
void note_written(const char* what, const std::string& path) {
    if (path != "-") fmt::print(human(), "# {} written to {}\n", what, path);
}

void check_writable(const std::string& path, const char* flag) {
    if (path.empty() || path == "-") return;
    std::ofstream probe(path, std::ios::app);
    if (!probe) throw ConfigError(flag, fmt::format("cannot write '{}'", path));
}

void write_text_file(const std::string& path, const std::string& text, const char* flag) {
    if (path == "-") {
        std::fwrite(text.data(), 1, text.size(), stdout);
        std::fflush(stdout);
        return;
    }
    std::ofstream out(path);
    if (!out || !(out << text)) throw ConfigError(flag, fmt::format("cannot write '{}'", path));
}

void print_config() {
    fmt::print("{:<28} {:<12} {:<12} {}\n", "# knob", "default", "value", "help");
    for (const KnobInfo& k : all_knobs())
        fmt::print("{:<28} {:<12} {:<12} {}\n", k.name, k.default_value.empty() ? "\"\"" : k.default_value,
                   k.value.empty() ? "\"\"" : k.value, k.help);
}

}  // namespace duplex::tools

int main(int argc, char** argv) {
    CLI::App app{
        "Duplex: DeepSeek-V3-style distributed training runtime (DualPipe, expert parallelism, ZeRO-1).\n"
        "Ranks run as threads (--backend inproc, the default) or as processes under mpirun (mpi, ucx)."};
    app.require_subcommand(0, 1);
    app.fallthrough();  // global flags (--print-config) also after a subcommand
    bool print = false;
    app.add_flag("--print-config", print, "print every DUPLEX_* environment knob with its effective value");
    app.set_config("--config", "",
                   "read options from a TOML or INI file: a [train], [simulate], ... section per command, one "
                   "`option = value` per line (names without the dashes: steps = 100, schedule = \"dualpipe\"); "
                   "options on the command line override the file");
    app.allow_config_extras(CLI::config_extras_mode::error);  // a misspelt option in the file is an error
    std::map<CLI::App*, duplex::tools::Command> commands;
    auto add = [&](auto registrar) {
        size_t before = app.get_subcommands({}).size();
        auto cmd = registrar(app);
        commands[app.get_subcommands({})[before]] = cmd;
    };
    add(duplex::tools::add_commbench);
    add(duplex::tools::add_schedule);
    add(duplex::tools::add_train);
    add(duplex::tools::add_simulate);
    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        int rc = app.exit(e);  // prints help, or the error and "Run with --help"
        return rc == 0 ? 0 : 2;  // bad input: exit code 2, as for every other refused input
    }
    if (print) {
        duplex::tools::print_config();
        return 0;
    }
    for (auto& [sub, run] : commands) {
        if (!sub->parsed()) continue;
        try {
            return run();
        } catch (const duplex::DivergenceError& e) {
            fmt::print(stderr, "duplex {}: diverged: {}\n", sub->get_name(), e.what());
            return 4;
        } catch (const duplex::Error& e) {
            fmt::print(stderr, "duplex {}: error: {}\n", sub->get_name(), e.what());
            return 2;
        } catch (const std::exception& e) {
            fmt::print(stderr, "duplex {}: unexpected error: {}\n", sub->get_name(), e.what());
            return 3;
        }
    }
    fmt::print("{}", app.help());
    return 0;
}
