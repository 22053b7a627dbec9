#include "tools/sim_plots.hpp"

#include <algorithm>
#include <cmath>
#include <map>

#include <fmt/format.h>

namespace duplex::tools {

namespace {

constexpr double kWidth = 860, kHeight = 520, kLeft = 80, kRight = 200, kTop = 50, kBottom = 60;
const char* kColours[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"};

}  // namespace

std::string svg_escape(const std::string& s) {
    std::string out;
    for (char c : s) {
        if (c == '&') out += "&amp;";
        else if (c == '<') out += "&lt;";
        else if (c == '>') out += "&gt;";
        else out += c;
    }
    return out;
}

namespace {

// Tick values: 4-8 round numbers spanning [lo, hi].
std::vector<double> ticks(double lo, double hi) {
    double span = std::max(hi - lo, 1e-12), raw = span / 6, mag = std::pow(10, std::floor(std::log10(raw)));
    double step = mag;
    for (double m : {1.0, 2.0, 5.0, 10.0})
        if (raw <= m * mag) {
            step = m * mag;
            break;
        }
    std::vector<double> out;
    for (double v = std::ceil(lo / step) * step; v <= hi + 1e-9 * span; v += step) out.push_back(v);
    return out;
}

struct Frame {
    double x0, x1, y0, y1;
    bool log_x = false, log_y = false;
    double px(double x) const {
        double f = log_x ? (std::log2(x) - std::log2(x0)) / std::max(std::log2(x1) - std::log2(x0), 1e-12)
                         : (x - x0) / std::max(x1 - x0, 1e-12);
        return kLeft + f * (kWidth - kLeft - kRight);
    }
    double py(double y) const {
        double f = log_y ? (std::log10(y) - std::log10(y0)) / std::max(std::log10(y1) - std::log10(y0), 1e-12)
                         : (y - y0) / std::max(y1 - y0, 1e-12);
        return kHeight - kBottom - f * (kHeight - kTop - kBottom);
    }
};

std::string axes(const Frame& f, const std::string& title, const std::string& xlabel, const std::string& ylabel,
                 const std::vector<double>& xticks, std::string (*xname)(double) = nullptr) {
    std::string s = fmt::format(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{:.0f}\" height=\"{:.0f}\" font-family=\"Helvetica,Arial,"
        "sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        "<text x=\"{:.0f}\" y=\"28\" font-size=\"16\" font-weight=\"bold\">{}</text>\n",
        kWidth, kHeight, kLeft, svg_escape(title));
    double bottom = kHeight - kBottom, right = kWidth - kRight;
    s += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{2:.1f}\" y2=\"{1:.1f}\" stroke=\"black\"/>\n"
                     "<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{0:.1f}\" y2=\"{3:.1f}\" stroke=\"black\"/>\n",
                     kLeft, bottom, right, kTop);
    for (double x : xticks)
        s += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{0:.1f}\" y2=\"{2:.1f}\" stroke=\"#ddd\"/>"
                         "<text x=\"{0:.1f}\" y=\"{3:.1f}\" text-anchor=\"middle\">{4}</text>\n",
                         f.px(x), bottom, kTop, bottom + 16, xname ? xname(x) : fmt::format("{:g}", x));
    std::vector<double> yticks;
    if (f.log_y)
        for (double y = std::pow(10, std::ceil(std::log10(f.y0))); y <= f.y1 * 1.0001; y *= 10) yticks.push_back(y);
    else
        yticks = ticks(f.y0, f.y1);
    for (double y : yticks)
        s += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{2:.1f}\" y2=\"{1:.1f}\" stroke=\"#ddd\"/>"
                         "<text x=\"{3:.1f}\" y=\"{4:.1f}\" text-anchor=\"end\">{5:g}</text>\n",
                         kLeft, f.py(y), right, kLeft - 6, f.py(y) + 4, y);
    s += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">{}</text>\n", (kLeft + right) / 2,
                     kHeight - 18, svg_escape(xlabel));
    s += fmt::format("<text x=\"18\" y=\"{0:.1f}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {0:.1f})\">{1}</text>\n",
                     (kTop + bottom) / 2, svg_escape(ylabel));
    return s;
}

Frame frame_of(const std::vector<PlotPoint>& pts, double extra_x, bool log_x) {
    Frame f{1e300, -1e300, 0, -1e300, log_x, false};
    for (const PlotPoint& p : pts) f.x0 = std::min(f.x0, p.x), f.x1 = std::max(f.x1, p.x), f.y1 = std::max(f.y1, p.y);
    if (extra_x > 0) f.x1 = std::max(f.x1, extra_x);
    if (pts.empty()) f = {0, 1, 0, 1, false, false};
    if (!log_x) f.x0 = std::max(0.0, f.x0 - 0.05 * (f.x1 - f.x0)), f.x1 += 0.05 * (f.x1 - f.x0);
    if (log_x) f.x0 /= 1.5, f.x1 *= 1.5;  // room for the labels of the end points
    f.y1 *= 1.08;
    if (f.x1 <= f.x0) f.x1 = f.x0 + 1;
    if (f.y1 <= 0) f.y1 = 1;
    return f;
}

}  // namespace

std::vector<size_t> pareto_front(const std::vector<PlotPoint>& points) {
    std::vector<size_t> idx;
    for (size_t i = 0; i < points.size(); ++i)
        if (points[i].fits) idx.push_back(i);
    std::sort(idx.begin(), idx.end(), [&](size_t a, size_t b) {
        return points[a].x != points[b].x ? points[a].x < points[b].x : points[a].y > points[b].y;
    });
    std::vector<size_t> front;
    double best = -1e300;
    for (size_t i : idx)
        if (points[i].y > best) front.push_back(i), best = points[i].y;
    return front;
}

std::string layouts_svg(const std::string& title, const std::vector<PlotPoint>& points, double capacity_gb) {
    Frame f = frame_of(points, capacity_gb * 1.02, false);
    std::string s = axes(f, title, "memory per GPU (GB)", "tokens/s per GPU", ticks(f.x0, f.x1));
    if (capacity_gb > 0)
        s += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{0:.1f}\" y2=\"{2:.1f}\" stroke=\"#888\" "
                         "stroke-dasharray=\"6,4\"/><text x=\"{3:.1f}\" y=\"{4:.1f}\" fill=\"#666\">{5:g} GB</text>\n",
                         f.px(capacity_gb), kHeight - kBottom, kTop, f.px(capacity_gb) + 4, kTop + 12, capacity_gb);
    std::map<std::string, const char*> colour;
    for (const PlotPoint& p : points)
        if (!colour.count(p.group)) colour[p.group] = kColours[colour.size() % 8];
    for (const PlotPoint& p : points)
        s += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3.5\" fill=\"{}\" stroke=\"{}\" fill-opacity=\"{}\">"
                         "<title>{} {} — {:.0f} tokens/s/GPU, {:.1f} GB</title></circle>\n",
                         f.px(p.x), f.py(p.y), p.fits ? colour[p.group] : "none", colour[p.group],
                         p.fits ? "0.75" : "1", svg_escape(p.group), svg_escape(p.label), p.y, p.x);
    std::vector<size_t> front = pareto_front(points);
    std::string path;
    for (size_t i : front) path += fmt::format("{}{:.1f},{:.1f}", path.empty() ? "" : " ", f.px(points[i].x), f.py(points[i].y));
    if (!path.empty())
        s += fmt::format("<polyline points=\"{}\" fill=\"none\" stroke=\"black\" stroke-width=\"1.5\"/>\n", path);
    if (!front.empty()) {
        size_t best = *std::max_element(front.begin(), front.end(), [&](size_t a, size_t b) { return points[a].y < points[b].y; });
        const PlotPoint& p = points[best];
        // The label in the plot's lower right corner, where a throughput plot has no points; the circle marks it.
        s += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"7\" fill=\"none\" stroke=\"black\" stroke-width=\"2\"/>"
                         "<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"end\" font-weight=\"bold\">chosen (circled): {} {}"
                         "</text><text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"end\">{:.0f} tokens/s/GPU, {:.1f} GB per GPU"
                         "</text>\n",
                         f.px(p.x), f.py(p.y), kWidth - kRight - 8, kHeight - kBottom - 28, svg_escape(p.group),
                         svg_escape(p.label), kWidth - kRight - 8, kHeight - kBottom - 12, p.y, p.x);
    }
    double ly = kTop + 10;
    for (auto& [group, c] : colour) {
        s += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"5\" fill=\"{}\"/><text x=\"{:.1f}\" y=\"{:.1f}\">{}</text>\n",
                         kWidth - kRight + 20, ly, c, kWidth - kRight + 30, ly + 4, svg_escape(group));
        ly += 18;
    }
    s += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" fill=\"#444\">— Pareto front</text>\n"
                     "<text x=\"{:.1f}\" y=\"{:.1f}\" fill=\"#444\">hollow: does not fit</text>\n</svg>\n",
                     kWidth - kRight + 14, ly + 10, kWidth - kRight + 14, ly + 28);
    return s;
}

std::string scaling_svg(const std::string& title, const std::vector<PlotPoint>& points) {
    Frame f = frame_of(points, 0, true);
    std::vector<double> xt;
    for (const PlotPoint& p : points) xt.push_back(p.x);
    std::string s = axes(f, title, "GPUs", "best tokens/s per GPU (fitting layouts)", xt);
    std::string path;
    for (const PlotPoint& p : points) {
        path += fmt::format("{}{:.1f},{:.1f}", path.empty() ? "" : " ", f.px(p.x), f.py(p.y));
        s += fmt::format("<circle cx=\"{0:.1f}\" cy=\"{1:.1f}\" r=\"4\" fill=\"{2}\"/><text x=\"{0:.1f}\" y=\"{3:.1f}\" "
                         "text-anchor=\"middle\" font-size=\"10\">{4}</text><text x=\"{0:.1f}\" y=\"{5:.1f}\" "
                         "text-anchor=\"middle\" font-size=\"10\">{6}</text>\n",
                         f.px(p.x), f.py(p.y), kColours[0], f.py(p.y) - 22, svg_escape(p.group), f.py(p.y) - 10,
                         svg_escape(p.label));
    }
    if (!path.empty())
        s += fmt::format("<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"/>\n", path, kColours[0]);
    return s + "</svg>\n";
}

std::string size_name(double bytes) {
    const char* units[] = {"", "K", "M", "G", "T"};
    int u = 0;
    while (bytes >= 1024 && u < 4) bytes /= 1024, ++u;
    return fmt::format("{:g}{}", bytes, units[u]);
}

std::string lines_svg(const std::string& title, const std::string& ylabel, const std::vector<Series>& series,
                      bool log_y) {
    Frame f{1e300, -1e300, log_y ? 1e300 : 0.0, -1e300, true, log_y};
    for (const Series& sr : series)
        for (auto [x, y] : sr.points) {
            f.x0 = std::min(f.x0, x), f.x1 = std::max(f.x1, x), f.y1 = std::max(f.y1, y);
            if (log_y && y > 0) f.y0 = std::min(f.y0, y);
        }
    if (f.x0 > f.x1) f = {1, 2, log_y ? 1.0 : 0.0, 10, true, log_y};
    if (f.x1 <= f.x0) f.x1 = f.x0 * 2;
    f.y1 = log_y ? std::pow(10, std::ceil(std::log10(f.y1))) : f.y1 * 1.1;
    if (log_y) f.y0 = std::pow(10, std::floor(std::log10(f.y0)));
    std::vector<double> xt;
    for (double x = f.x0; x <= f.x1 * 1.0001; x *= 4) xt.push_back(x);
    std::string s = axes(f, title, "message size (bytes)", ylabel, xt, size_name);
    double ly = kTop + 10;
    for (size_t i = 0; i < series.size(); ++i) {
        const Series& sr = series[i];
        const char* c = sr.dashed ? "#555" : kColours[i % 8];
        std::string path;
        for (auto [x, y] : sr.points)
            if (!log_y || y > 0) path += fmt::format("{}{:.1f},{:.1f}", path.empty() ? "" : " ", f.px(x), f.py(y));
        s += fmt::format("<polyline class=\"series\" points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{}>"
                         "<title>{}</title></polyline>\n",
                         path, c, sr.dashed ? " stroke-dasharray=\"6,4\"" : "", svg_escape(sr.name));
        for (auto [x, y] : sr.points)
            if (!sr.dashed && (!log_y || y > 0))
                s += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3\" fill=\"{}\"/>\n", f.px(x), f.py(y), c);
        s += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{2:.1f}\" y2=\"{1:.1f}\" stroke=\"{3}\" "
                         "stroke-width=\"2\"{4}/><text x=\"{5:.1f}\" y=\"{6:.1f}\">{7}</text>\n",
                         kWidth - kRight + 14, ly, kWidth - kRight + 34, c,
                         sr.dashed ? " stroke-dasharray=\"6,4\"" : "", kWidth - kRight + 40, ly + 4, svg_escape(sr.name));
        ly += 18;
    }
    return s + "</svg>\n";
}

std::string stack_svg(const std::vector<std::string>& charts) {
    std::string s = fmt::format("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{:.0f}\" height=\"{:.0f}\">\n",
                                kWidth, kHeight * double(charts.size()));
    for (size_t i = 0; i < charts.size(); ++i)
        s += fmt::format("<g transform=\"translate(0 {:.0f})\">\n{}</g>\n", kHeight * double(i), charts[i]);
    return s + "</svg>\n";
}

}  // namespace duplex::tools
