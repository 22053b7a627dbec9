// Timelines for people: SVG in the style of the DualPipe figure, and plain text for terminals.
#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "parallel/schedule.hpp"

namespace duplex::sched {

namespace {

// Fill colours: forward, input-grad backward, weight grad; the reverse direction uses the darker variant.
struct Palette {
    const char* f[2] = {"#F6C85F", "#E08E0B"};
    const char* b[2] = {"#6FB1E6", "#1F6FB2"};
    const char* w[2] = {"#9BD39B", "#3E9B4F"};
};

std::string label(const Chunk& c) { return std::to_string(c.mb); }

}  // namespace

std::string render_svg(const Schedule& s, const Replay& r, const Costs& c) {
    const Palette pal;
    const double unit = std::clamp(1100.0 / std::max(r.makespan, 1.0), 6.0, 40.0);  // pixels per time unit
    const double row_h = 30, left = 70, top = 58, legend_h = 46;
    const double width = left + r.makespan * unit + 20;
    const double height = top + s.num_ranks * row_h + legend_h + 10;
    std::string out = fmt::format(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{:.0f}\" height=\"{:.0f}\" font-family=\"Helvetica,Arial,"
        "sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        width, height);
    double worst_idle = r.idle.empty() ? 0 : *std::max_element(r.idle.begin(), r.idle.end());
    out += fmt::format(
        "<text x=\"{}\" y=\"22\" font-size=\"16\" font-weight=\"bold\">{} — PP={} ({} ranks), {} microbatches</text>\n",
        left, kind_name(s.kind), s.pp, s.num_ranks, s.num_microbatches);
    out += fmt::format(
        "<text x=\"{}\" y=\"42\" font-size=\"12\" fill=\"#444\">costs F={:.3g} B={:.3g} W={:.3g} F&amp;B={:.3g} · makespan {:.4g} · "
        "max idle per rank {:.4g} (formula {:.4g})</text>\n",
        left, c.f, c.b, c.w, c.fb_cost(), r.makespan, worst_idle, formula_bubble(s.kind, s.pp, c, s.vpp));
    for (int rank = 0; rank < s.num_ranks; ++rank) {
        double y = top + rank * row_h;
        out += fmt::format("<text x=\"{}\" y=\"{:.1f}\" font-size=\"12\" text-anchor=\"end\">rank {}</text>\n",
                           left - 8, y + row_h / 2 + 4, rank);
        out += fmt::format("<rect x=\"{}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"#f2f2f2\"/>\n", left,
                           y + 2, r.makespan * unit, row_h - 4);
        for (size_t i = 0; i < s.ranks[rank].size(); ++i) {
            const Instr& in = s.ranks[rank][i];
            const Span& sp = r.spans[rank][i];
            double x = left + sp.start * unit, w = (sp.end - sp.start) * unit;
            auto box = [&](double bx, double by, double bw, double bh, const char* fill, const std::string& text,
                           bool bold) {
                out += fmt::format(
                    "<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"{}\" stroke=\"#333\" "
                    "stroke-width=\"0.6\"/>\n",
                    bx, by, bw, bh, fill);
                if (bw >= 9)
                    out += fmt::format(
                        "<text x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"{:.0f}\" text-anchor=\"middle\"{}>{}</text>\n",
                        bx + bw / 2, by + bh / 2 + 4, std::min(11.0, bh - 3), bold ? " font-weight=\"bold\"" : "",
                        text);
            };
            double y0 = y + 2, h = row_h - 4;
            switch (in.op) {
                case Op::F: box(x, y0, w, h, pal.f[in.f.dir], label(in.f), false); break;
                case Op::B: box(x, y0, w, h, pal.b[in.b.dir], label(in.b), false); break;
                case Op::W: box(x, y0, w, h, pal.w[in.b.dir], label(in.b), false); break;
                case Op::BW: {
                    double bpart = c.b > 0 ? (c.b - c.w) / c.b : 0.5;
                    box(x, y0, w * bpart, h, pal.b[in.b.dir], label(in.b), false);
                    box(x + w * bpart, y0, w * (1 - bpart), h, pal.w[in.b.dir], label(in.b), false);
                    break;
                }
                case Op::FB:
                    // The overlapped pair: forward on top, full backward below, one box wide.
                    box(x, y0, w, h / 2, pal.f[in.f.dir], label(in.f), true);
                    box(x, y0 + h / 2, w, h / 2, pal.b[in.b.dir], label(in.b), true);
                    break;
            }
        }
    }
    // Legend.
    double ly = top + s.num_ranks * row_h + 18;
    double lx = left;
    auto legend = [&](const char* fill, const std::string& text) {
        out += fmt::format("<rect x=\"{:.0f}\" y=\"{:.0f}\" width=\"14\" height=\"14\" fill=\"{}\" stroke=\"#333\" "
                           "stroke-width=\"0.6\"/>\n<text x=\"{:.0f}\" y=\"{:.0f}\" font-size=\"12\">{}</text>\n",
                           lx, ly, fill, lx + 18, ly + 11, text);
        lx += 18 + 7.0 * static_cast<double>(text.size()) + 16;
    };
    bool two = s.num_directions == 2;
    legend(pal.f[0], two ? "forward (down)" : "forward");
    if (two) legend(pal.f[1], "forward (up)");
    legend(pal.b[0], two ? "backward (down)" : "backward");
    if (two) legend(pal.b[1], "backward (up)");
    legend(pal.w[0], two ? "weight grad (down)" : "weight grad");
    if (two) legend(pal.w[1], "weight grad (up)");
    if (s.kind == ScheduleKind::DualPipe || s.kind == ScheduleKind::DualPipeV)
        out += fmt::format("<text x=\"{:.0f}\" y=\"{:.0f}\" font-size=\"12\" fill=\"#444\">split boxes (bold): "
                           "forward and backward overlapped (F&amp;B); numbers are microbatches</text>\n",
                           left, ly + 30);
    out += "</svg>\n";
    return out;
}

std::string render_text(const Schedule& s, const Replay& r) {
    // One character per time unit of the smallest instruction cost.
    double unit = r.makespan;
    for (const auto& spans : r.spans)
        for (const Span& sp : spans)
            if (sp.end - sp.start > 1e-12) unit = std::min(unit, sp.end - sp.start);
    if (unit <= 0) unit = 1;
    int cols = static_cast<int>(std::ceil(r.makespan / unit - 1e-9));
    std::string out = fmt::format("time unit = {:g}; F/B/W forward, input-grad, weight-grad; '=' full backward; "
                                  "X overlapped F&B; lower case: reverse direction; '.' idle\n",
                                  unit);
    for (int rank = 0; rank < s.num_ranks; ++rank) {
        std::string row(static_cast<size_t>(cols), '.');
        for (size_t i = 0; i < s.ranks[rank].size(); ++i) {
            const Instr& in = s.ranks[rank][i];
            const Span& sp = r.spans[rank][i];
            int a = static_cast<int>(std::lround(sp.start / unit)), b = static_cast<int>(std::lround(sp.end / unit));
            char ch = '?';
            bool up = (in.op == Op::F ? in.f.dir : in.b.dir) == 1;
            switch (in.op) {
                case Op::F: ch = 'F'; break;
                case Op::B: ch = 'B'; break;
                case Op::W: ch = 'W'; break;
                case Op::BW: ch = '='; break;
                case Op::FB: ch = 'X'; break;
            }
            if (up && ch >= 'A' && ch <= 'Z') ch = static_cast<char>(ch - 'A' + 'a');
            for (int t = a; t < b && t < cols; ++t) row[static_cast<size_t>(t)] = ch;
        }
        out += fmt::format("rank {:>3} |{}| idle {:g}\n", rank, row, r.idle[rank]);
    }
    return out;
}

}  // namespace duplex::sched
