// `duplex commbench --op pairs`: runs comm/bench_pairs.hpp on the launched ranks and reports the three rank x rank
// matrices, the slow pairs with their nodes, and on request JSON, CSV and an SVG heatmap grouped by node.
#pragma once

#include <string>

#include "comm/bench_pairs.hpp"
#include "comm/launch.hpp"

namespace duplex::tools {

struct PairsCommand {
    PairsOptions pairs;
    std::string json, csv, svg;
};

// Exit code: 0, or 1 when a slow pair was found (so a script can stop on it).
int run_pairs_command(const LaunchOptions& launch, const PairsCommand& cmd);

// The heatmap: one cell per ordered pair coloured by its bandwidth against the best pair, ranks grouped by node
// (thick lines between nodes), slow pairs outlined; latency in each cell's tooltip.
std::string pairs_svg(const PairsResult& r, const std::string& title);

}  // namespace duplex::tools
