// Loss curves on uPlot (vendored under /dashboard/assets/vendor/uplot, MIT): canvas drawing that stays
// smooth with tens of thousands of points and redraws in place as points stream in.

const uPlot = window.uPlot;

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

export const SERIES_COLOURS = ["--series-1", "--series-2", "--series-3", "--series-4", "--series-5"];

/**
 * A chart of values against step. `series` is [{label, colour (a CSS variable), dashed}]; points arrive with
 * add(seriesIndex, step, value) in any order and are drawn once per animation frame.
 */
export class LossChart {
  constructor(container, series, { title = "Loss" } = {}) {
    this.container = container;
    this.series = series;
    this.title = title; // null: the section's heading names the chart
    this.values = series.map(() => new Map()); // step → value, one map per series
    this.steps = new Set();
    this.points = 0;
    this.frame = 0;
    this.plot = null;
    this.resize = new ResizeObserver(() => this.plot && this.plot.setSize(this.size()));
    this.resize.observe(container);
    this.onTheme = () => this.rebuild();
    window.addEventListener("llmos:theme", this.onTheme);
    this.rebuild();
  }

  size() {
    return { width: Math.max(this.container.clientWidth - 2, 280), height: 300 };
  }

  rebuild() {
    if (this.plot) this.plot.destroy();
    const axis = { stroke: cssVar("--muted"), grid: { stroke: cssVar("--border"), width: 1 },
                   ticks: { stroke: cssVar("--border"), width: 1 } };
    const options = {
      ...this.size(),
      ...(this.title ? { title: this.title } : {}),
      cursor: { drag: { x: true, y: false } },
      scales: { x: { time: false } },
      axes: [{ ...axis, label: "step" }, { ...axis, label: "loss" }],
      series: [
        { label: "step" },
        ...this.series.map((s) => ({
          label: s.label,
          stroke: cssVar(s.colour),
          width: 2,
          dash: s.dashed ? [6, 4] : undefined,
          points: { show: s.dashed }, // evaluations are few: mark each one
          spanGaps: true,
          value: (_, v) => (v === null || v === undefined ? "—" : v.toPrecision(4)),
        })),
      ],
    };
    this.plot = new uPlot(options, this.aligned(), this.container);
    const canvas = this.plot.ctx.canvas;
    canvas.dataset.testid = "loss-chart";
    canvas.setAttribute("role", "img");
    this.describe();
  }

  add(index, step, value) {
    if (typeof value !== "number" || !Number.isFinite(value)) return;
    if (!this.values[index].has(step)) this.points += 1;
    this.values[index].set(step, value);
    this.steps.add(step);
    if (!this.frame) this.frame = requestAnimationFrame(() => this.draw());
  }

  aligned() {
    const steps = [...this.steps].sort((a, b) => a - b);
    return [steps, ...this.values.map((values) => steps.map((s) => (values.has(s) ? values.get(s) : null)))];
  }

  draw() {
    this.frame = 0;
    this.plot.setData(this.aligned());
    this.describe();
  }

  // What the canvas shows, for screen readers and for scripts (data-points, data-last-step).
  describe() {
    const canvas = this.plot.ctx.canvas;
    const steps = [...this.steps];
    const last = steps.length ? Math.max(...steps) : null;
    canvas.dataset.points = String(this.points);
    canvas.dataset.lastStep = last === null ? "" : String(last);
    const latest = this.series.map((s, i) => {
      const v = last === null ? undefined : this.values[i].get(last);
      return v === undefined ? null : `${s.label} ${v.toPrecision(4)}`;
    }).filter(Boolean);
    const name = this.title || "Loss";
    canvas.setAttribute("aria-label", last === null ? `${name}: no points yet`
      : `${name}: ${this.points} points up to step ${last}${latest.length ? `; ${latest.join(", ")}` : ""}`);
  }

  destroy() {
    cancelAnimationFrame(this.frame);
    this.resize.disconnect();
    window.removeEventListener("llmos:theme", this.onTheme);
    if (this.plot) this.plot.destroy();
  }
}
