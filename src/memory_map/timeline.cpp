// The server's timeline, drawn (ADR 0025): a Chrome trace for Perfetto, and a page of stacked
// step charts, one per device and buffer type.
module;
#include <algorithm>
#include <cctype>
#include <cstddef>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <tl/expected.hpp>

module meshrt.memory_map;

import meshrt.core;
import :drawing;

namespace meshrt {
namespace {

using nlohmann::json;

// The trace's own "processes": the moments' track, and one per device.
constexpr std::uint32_t moments_track = 1;
constexpr std::uint32_t first_device_track = 1000;

constexpr double page_width = 1000;
constexpr double plot_left = 80;
constexpr double plot_right = 20;
constexpr double chart_height = 150;
constexpr double chart_gap = 60;  // title and axis labels around each chart

// A series' points: bytes from time_ns until the next point. In time order (the server's).
struct Point {
  std::int64_t time_ns{};
  std::uint64_t bytes{};
};
using Series = std::vector<Point>;

// One device's use of one buffer type.
struct Chart {
  std::uint32_t device{};
  std::string type;
  std::map<std::uint32_t, Series> processes;  // by pid
  std::map<std::string, Series> categories;   // every process's, by category
};

struct Mark {
  std::int64_t time_ns{};
  std::string kind;
  std::uint32_t pid{};
  std::string process;
  std::uint64_t buffers{};
  std::uint64_t bytes{};
  std::string detail;
};

struct Timeline {
  std::int64_t start_ns{};
  std::int64_t end_ns{};
  std::map<std::uint32_t, std::string> names;
  std::map<std::pair<std::uint32_t, std::string>, Chart> charts;
  std::vector<Mark> moments;
  std::uint64_t samples_dropped{};
};

tl::unexpected<Error> not_a_timeline(std::string_view why) {
  return fail(ErrorCode::invalid_argument, fmt::format("the server's timeline is not what meshrt-smi expects: {}", why));
}

Result<Timeline> parse(std::string_view text) {
  const json root = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded() || !root.is_object() || !root.contains("timeline") || !root["timeline"].is_object()) {
    return not_a_timeline("no \"timeline\" object");
  }
  try {
    const json& t = root["timeline"];
    Timeline out;
    out.end_ns = t.at("now_ns").get<std::int64_t>();
    out.samples_dropped = t.value("samples_dropped", std::uint64_t{0});
    for (const json& process : t.at("processes")) {
      out.names[process.at("pid").get<std::uint32_t>()] = process.at("name").get<std::string>();
    }
    std::int64_t first = out.end_ns;
    std::int64_t last = out.end_ns;
    for (const json& sample : t.at("samples")) {
      if (!sample.is_array() || sample.size() != 6) return not_a_timeline("a sample is not [time, pid, device, type, category, bytes]");
      const Point point{sample[0].get<std::int64_t>(), sample[5].get<std::uint64_t>()};
      const auto pid = sample[1].get<std::uint32_t>();
      const auto device = sample[2].get<std::uint32_t>();
      auto type = sample[3].get<std::string>();
      const auto category = sample[4].get<std::string>();
      Chart& chart = out.charts[{device, type}];
      chart.device = device;
      chart.type = std::move(type);
      if (category == "all") {
        chart.processes[pid].push_back(point);
      } else {
        chart.categories[category].push_back(point);
      }
      first = std::min(first, point.time_ns);
      last = std::max(last, point.time_ns);
    }
    for (const json& moment : t.at("moments")) {
      Mark mark{.time_ns = moment.at("time_ns").get<std::int64_t>(),
                .kind = moment.at("kind").get<std::string>(),
                .pid = moment.at("pid").get<std::uint32_t>(),
                .process = moment.value("process", std::string{}),
                .buffers = moment.value("buffers", std::uint64_t{0}),
                .bytes = moment.value("bytes", std::uint64_t{0}),
                .detail = moment.value("detail", std::string{})};
      first = std::min(first, mark.time_ns);
      last = std::max(last, mark.time_ns);
      out.moments.push_back(std::move(mark));
    }
    out.start_ns = first;
    out.end_ns = last;
    return out;
  } catch (const json::exception& error) {
    return not_a_timeline(error.what());
  }
}

std::uint64_t value_at(const Series& series, std::int64_t time_ns) {
  std::uint64_t bytes = 0;
  for (const Point& point : series) {
    if (point.time_ns > time_ns) break;
    bytes = point.bytes;
  }
  return bytes;
}

// Every time any of the series changes, and the end: where a stacked chart has a corner.
template <class Map>
std::vector<std::int64_t> change_times(const Map& series, std::int64_t end_ns) {
  std::set<std::int64_t> times;
  for (const auto& [key, points] : series) {
    for (const Point& point : points) times.insert(point.time_ns);
  }
  times.insert(end_ns);
  return {times.begin(), times.end()};
}

std::string upper(std::string_view text) {
  std::string out(text);
  for (char& c : out) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return out;
}

std::string process_label(const Timeline& timeline, std::uint32_t pid) {
  const auto found = timeline.names.find(pid);
  return found == timeline.names.end() || found->second.empty() ? fmt::format("pid {}", pid)
                                                                 : fmt::format("{} (pid {})", found->second, pid);
}

std::string moment_label(const Mark& mark) {
  std::string label = fmt::format("{}: {}", mark.kind, mark.process.empty() ? fmt::format("pid {}", mark.pid)
                                                                             : fmt::format("{} (pid {})", mark.process, mark.pid));
  if (mark.buffers > 0) label += fmt::format(", {} buffers, {}", mark.buffers, drawing::bytes_text(mark.bytes));
  return label;
}

// One process's series values at `times`, for each process of a chart, by pid.
std::map<std::uint32_t, std::vector<std::uint64_t>> values_at(const Chart& chart, const std::vector<std::int64_t>& times) {
  std::map<std::uint32_t, std::vector<std::uint64_t>> values;
  for (const auto& [pid, series] : chart.processes) {
    std::vector<std::uint64_t>& row = values[pid];
    row.reserve(times.size());
    std::size_t next = 0;
    std::uint64_t bytes = 0;
    for (const std::int64_t time : times) {
      while (next < series.size() && series[next].time_ns <= time) bytes = series[next++].bytes;
      row.push_back(bytes);
    }
  }
  return values;
}

}  // namespace

Result<std::string> render_timeline_trace(std::string_view timeline_json) {
  auto parsed = parse(timeline_json);
  if (!parsed) return tl::unexpected(std::move(parsed.error()));
  const Timeline& timeline = *parsed;
  const auto ts = [&](std::int64_t time_ns) { return static_cast<double>(time_ns - timeline.start_ns) / 1000.0; };
  json events = json::array();
  events.push_back({{"name", "process_name"}, {"ph", "M"}, {"pid", moments_track}, {"tid", 0},
                    {"args", {{"name", "meshrt: processes starting, ending, leaking, out of memory"}}}});
  std::set<std::uint32_t> devices;
  for (const auto& [key, chart] : timeline.charts) devices.insert(chart.device);
  for (const std::uint32_t device : devices) {
    events.push_back({{"name", "process_name"}, {"ph", "M"}, {"pid", first_device_track + device}, {"tid", 0},
                      {"args", {{"name", fmt::format("device {}", device)}}}});
    events.push_back({{"name", "process_sort_index"}, {"ph", "M"}, {"pid", first_device_track + device}, {"tid", 0},
                      {"args", {{"sort_index", device}}}});
  }
  for (const auto& [key, chart] : timeline.charts) {
    const std::uint32_t track = first_device_track + chart.device;
    // Each counter event states every series of its counter: a process that went to zero says 0.
    if (!chart.processes.empty()) {
      const std::string name = fmt::format("{} used bytes, by process", upper(chart.type));
      for (const std::int64_t time : change_times(chart.processes, timeline.end_ns)) {
        json args = json::object();
        for (const auto& [pid, series] : chart.processes) args[process_label(timeline, pid)] = value_at(series, time);
        events.push_back({{"name", name}, {"ph", "C"}, {"ts", ts(time)}, {"pid", track}, {"tid", 0}, {"args", args}});
      }
    }
    if (!chart.categories.empty()) {
      const std::string name = fmt::format("{} used bytes, by category", upper(chart.type));
      for (const std::int64_t time : change_times(chart.categories, timeline.end_ns)) {
        json args = json::object();
        for (const auto& [category, series] : chart.categories) args[category] = value_at(series, time);
        events.push_back({{"name", name}, {"ph", "C"}, {"ts", ts(time)}, {"pid", track}, {"tid", 0}, {"args", args}});
      }
    }
  }
  for (const Mark& mark : timeline.moments) {
    events.push_back({{"name", moment_label(mark)},
                      {"cat", "meshrt"},
                      {"ph", "i"},
                      {"s", "g"},
                      {"ts", ts(mark.time_ns)},
                      {"pid", moments_track},
                      {"tid", 0},
                      {"args",
                       {{"kind", mark.kind},
                        {"pid", mark.pid},
                        {"process", mark.process},
                        {"buffers", mark.buffers},
                        {"bytes", mark.bytes},
                        {"detail", mark.detail}}}});
  }
  const json trace{{"traceEvents", std::move(events)},
                   {"displayTimeUnit", "ms"},
                   {"otherData",
                    {{"generator", "meshrt-smi --timeline"},
                     {"start_unix_ns", timeline.start_ns},
                     {"samples_dropped", timeline.samples_dropped}}}};
  return trace.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
}

Result<std::string> render_timeline_page(std::string_view timeline_json) {
  auto parsed = parse(timeline_json);
  if (!parsed) return tl::unexpected(std::move(parsed.error()));
  const Timeline& timeline = *parsed;
  std::map<std::uint32_t, std::string_view> colours;
  for (const auto& [key, chart] : timeline.charts) {
    for (const auto& [pid, series] : chart.processes) colours.emplace(pid, "");
  }
  for (auto& [pid, colour] : colours) {
    colour = drawing::palette[static_cast<std::size_t>(std::distance(colours.begin(), colours.find(pid))) %
                              drawing::palette.size()];
  }
  const double span_ns = std::max<double>(1.0, static_cast<double>(timeline.end_ns - timeline.start_ns));
  const double plot_width = page_width - plot_left - plot_right;
  const auto x_of = [&](std::int64_t time_ns) {
    return plot_left + static_cast<double>(time_ns - timeline.start_ns) / span_ns * plot_width;
  };

  std::string charts;
  json hover = json::array();  // per chart: times (seconds) and each process's bytes, for the hover read-out
  std::size_t drawn = 0;
  for (const auto& [key, chart] : timeline.charts) {
    if (chart.processes.empty()) continue;
    const std::vector<std::int64_t> times = change_times(chart.processes, timeline.end_ns);
    const auto values = values_at(chart, times);
    std::uint64_t most = 1;
    for (std::size_t i = 0; i < times.size(); ++i) {
      std::uint64_t total = 0;
      for (const auto& [pid, row] : values) total += row[i];
      most = std::max(most, total);
    }
    const double top = 30;
    const auto y_of = [&](std::uint64_t bytes) {
      return top + chart_height - static_cast<double>(bytes) / static_cast<double>(most) * chart_height;
    };
    std::string svg = fmt::format(
        "<svg class=\"chart\" data-chart=\"{}\" data-device=\"{}\" data-type=\"{}\" width=\"{}\" height=\"{}\" "
        "xmlns=\"http://www.w3.org/2000/svg\">\n"
        "<text x=\"{}\" y=\"18\" class=\"title\">device {} {}: up to {}</text>\n"
        "<rect x=\"{}\" y=\"{}\" width=\"{:.1f}\" height=\"{}\" class=\"plot\"/>\n",
        drawn, chart.device, chart.type, page_width, top + chart_height + chart_gap - 10, plot_left, chart.device,
        upper(chart.type), drawing::bytes_text(most), plot_left, top, plot_width, chart_height);
    // Stacked by pid: each process's area lies on the ones of lower pids.
    std::vector<std::uint64_t> below(times.size(), 0);
    json processes = json::array();
    for (const auto& [pid, row] : values) {
      const std::uint64_t peak = *std::ranges::max_element(row);
      std::string path;
      for (std::size_t i = 0; i + 1 < times.size() || (i == 0 && times.size() == 1); ++i) {
        const std::size_t next = std::min(i + 1, times.size() - 1);
        path += fmt::format("{}{:.1f},{:.1f} L{:.1f},{:.1f} ", path.empty() ? "M" : "L", x_of(times[i]),
                            y_of(below[i] + row[i]), x_of(times[next]), y_of(below[i] + row[i]));
      }
      for (std::size_t i = times.size() - 1; i-- > 0;) {
        path += fmt::format("L{:.1f},{:.1f} L{:.1f},{:.1f} ", x_of(times[i + 1]), y_of(below[i]), x_of(times[i]),
                            y_of(below[i]));
      }
      if (peak > 0) {
        svg += fmt::format(
            "<path class=\"area\" data-pid=\"{}\" d=\"{}Z\" fill=\"{}\"><title>{}: at most {}</title></path>\n", pid,
            path, colours[pid], drawing::escape(process_label(timeline, pid)), drawing::bytes_text(peak));
      }
      for (std::size_t i = 0; i < times.size(); ++i) below[i] += row[i];
      processes.push_back({{"label", process_label(timeline, pid)}, {"colour", colours[pid]}, {"bytes", row}});
    }
    for (const Mark& mark : timeline.moments) {
      const double x = x_of(mark.time_ns);
      svg += fmt::format(
          "<line class=\"moment\" data-kind=\"{}\" x1=\"{:.1f}\" x2=\"{:.1f}\" y1=\"{}\" y2=\"{}\"><title>{}{}</title></line>\n",
          drawing::escape(mark.kind), x, x, top, top + chart_height, drawing::escape(moment_label(mark)),
          mark.detail.empty() ? "" : "\n" + drawing::escape(mark.detail));
    }
    svg += fmt::format(
        "<text x=\"{}\" y=\"{}\" class=\"axis\" text-anchor=\"end\">{}</text>\n"
        "<text x=\"{}\" y=\"{}\" class=\"axis\" text-anchor=\"end\">0</text>\n"
        "<text x=\"{}\" y=\"{}\" class=\"axis\">0 s</text>\n"
        "<text x=\"{}\" y=\"{}\" class=\"axis\" text-anchor=\"end\">{:.3f} s</text>\n"
        "<line class=\"cursor\" x1=\"0\" x2=\"0\" y1=\"{}\" y2=\"{}\" visibility=\"hidden\"/>\n</svg>\n",
        plot_left - 6, top + 10, drawing::bytes_text(most), plot_left - 6, top + chart_height, plot_left,
        top + chart_height + 16, plot_left + plot_width, top + chart_height + 16, span_ns / 1e9, top, top + chart_height);
    charts += svg;
    json seconds = json::array();
    for (const std::int64_t time : times) seconds.push_back(static_cast<double>(time - timeline.start_ns) / 1e9);
    hover.push_back({{"times", std::move(seconds)}, {"processes", std::move(processes)}});
    ++drawn;
  }

  std::string legend;
  for (const auto& [pid, colour] : colours) {
    legend += fmt::format("<span class=\"key\"><span class=\"swatch\" style=\"background:{}\"></span>{}</span>\n",
                          colour, drawing::escape(process_label(timeline, pid)));
  }
  std::string moments;
  for (const Mark& mark : timeline.moments) {
    moments += fmt::format("<li data-kind=\"{}\">{:.3f} s: {}{}</li>\n", drawing::escape(mark.kind),
                           static_cast<double>(mark.time_ns - timeline.start_ns) / 1e9,
                           drawing::escape(moment_label(mark)), mark.detail.empty() ? "" : " — " + drawing::escape(mark.detail));
  }
  // The hover data goes in a JSON script element: "</" cannot end it early once escaped.
  std::string data = hover.dump(-1, ' ', false, json::error_handler_t::replace);
  for (std::size_t at = data.find("</"); at != std::string::npos; at = data.find("</", at + 3)) data.replace(at, 2, "<\\/");
  return fmt::format(R"(<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>meshrt memory timeline</title>
<style>
body {{ font: 13px system-ui, sans-serif; margin: 16px; color: #222; }}
.title {{ font-weight: 600; font-size: 13px; }}
.axis {{ font-size: 11px; fill: #555; }}
.plot {{ fill: #f7f8fa; stroke: #ccd; }}
.moment {{ stroke: #c22; stroke-width: 1.5; stroke-dasharray: 4 3; }}
.cursor {{ stroke: #333; stroke-width: 1; }}
.key {{ margin-right: 16px; white-space: nowrap; }}
.swatch {{ display: inline-block; width: 12px; height: 12px; margin-right: 4px; vertical-align: -2px; }}
#readout {{ position: fixed; pointer-events: none; background: #fff; border: 1px solid #999; padding: 4px 8px;
  font-size: 12px; display: none; box-shadow: 0 1px 4px #0003; }}
</style></head>
<body>
<h1 style="font-size:18px">meshrt memory timeline</h1>
<p>{} charts (device and buffer type), used bytes stacked by process over {:.3f} s; dashed lines are moments.{}</p>
<div class="legend">{}</div>
{}
<h2 style="font-size:15px">Moments</h2>
<ul id="moments">{}</ul>
<div id="readout"></div>
<script type="application/json" id="timeline-data">{}</script>
<script>
const charts = JSON.parse(document.getElementById('timeline-data').textContent);
const readout = document.getElementById('readout');
const left = {}, width = {};
function bytes(n) {{
  const units = ['B', 'KiB', 'MiB', 'GiB']; let u = 0;
  while (n >= 1024 && u < units.length - 1) {{ n /= 1024; ++u; }}
  return u === 0 ? n + ' B' : n.toFixed(1) + ' ' + units[u];
}}
for (const svg of document.querySelectorAll('svg.chart')) {{
  const chart = charts[Number(svg.dataset.chart)];
  const cursor = svg.querySelector('.cursor');
  const span = chart.times[chart.times.length - 1] || 1;
  svg.addEventListener('mousemove', (event) => {{
    const box = svg.getBoundingClientRect();
    const x = Math.min(Math.max(event.clientX - box.left, left), left + width);
    const t = (x - left) / width * span;
    let i = 0;
    while (i + 1 < chart.times.length && chart.times[i + 1] <= t) ++i;
    let total = 0, rows = '';
    for (const p of chart.processes) {{
      total += p.bytes[i];
      if (p.bytes[i] > 0) rows += `<div><span class="swatch" style="background:${{p.colour}}"></span>${{p.label}}: ${{bytes(p.bytes[i])}}</div>`;
    }}
    readout.innerHTML = `<b>${{t.toFixed(3)}} s</b>, ${{bytes(total)}} in use${{rows}}`;
    readout.style.left = (event.clientX + 14) + 'px';
    readout.style.top = (event.clientY + 14) + 'px';
    readout.style.display = 'block';
    cursor.setAttribute('x1', x); cursor.setAttribute('x2', x); cursor.setAttribute('visibility', 'visible');
  }});
  svg.addEventListener('mouseleave', () => {{ readout.style.display = 'none'; cursor.setAttribute('visibility', 'hidden'); }});
}}
document.body.dataset.ready = String(charts.length);
</script>
</body></html>
)",
                     drawn, span_ns / 1e9,
                     timeline.samples_dropped > 0
                         ? fmt::format(" The server's ring dropped its oldest {} samples.", timeline.samples_dropped)
                         : std::string{},
                     legend, charts, moments, data, plot_left, plot_width);
}

}  // namespace meshrt
