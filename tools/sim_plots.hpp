// Duplex's SVG charts: `duplex simulate` sweeps (every layout's throughput against its memory per GPU with the
// Pareto front and the chosen layout marked; the best throughput against cluster size) and `duplex commbench`
// size sweeps (bus bandwidth and latency against message size).
//
//   std::vector<PlotPoint> pts = {{.x = 62.1, .y = 1717, .group = "dualpipev", .label = "tp 2 pp 8 ep 64", .fits = true}};
//   std::string svg = layouts_svg("deepseek-v3 on h800x2048", pts, /*capacity=*/80);
#pragma once

#include <string>
#include <vector>

namespace duplex::tools {

struct PlotPoint {
    double x = 0, y = 0;
    std::string group;  // the colour (a schedule)
    std::string label;  // the layout, for the chosen point and the tooltips
    bool fits = true;
};

// Throughput (y) against memory per GPU (x, GB): fitting layouts filled, the others hollow; the Pareto front of the
// fitting ones (no other layout both smaller and faster) joined by a line; the fastest fitting one labelled; the
// device's memory as a dashed vertical line (capacity_gb <= 0: none).
std::string layouts_svg(const std::string& title, const std::vector<PlotPoint>& points, double capacity_gb);

// The best fitting throughput (y) against the cluster's GPUs (x, log2 axis), each point labelled with its layout.
std::string scaling_svg(const std::string& title, const std::vector<PlotPoint>& points);

// Line charts against message size (a log2 axis labelled 1K, 1M, ...): one polyline per series (dashed: a ceiling),
// bandwidth on a linear axis or latency on a log10 one; stack_svg puts several charts one under the other.
struct Series {
    std::string name;
    std::vector<std::pair<double, double>> points;  // (bytes, value)
    bool dashed = false;
};
std::string lines_svg(const std::string& title, const std::string& ylabel, const std::vector<Series>& series,
                      bool log_y);
std::string stack_svg(const std::vector<std::string>& charts);
std::string size_name(double bytes);  // 1024 -> "1K"
std::string svg_escape(const std::string& text);  // &, <, > as SVG text needs them

// Indices of the Pareto front of the fitting points (smaller x, larger y), by increasing x.
std::vector<size_t> pareto_front(const std::vector<PlotPoint>& points);

}  // namespace duplex::tools
