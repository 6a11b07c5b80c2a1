package main

import (
	"fmt"
	"image/color"
	"path/filepath"
	"slices"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// plotTimeline draws per-path and total throughput over time of one run.
func plotTimeline(dir string, sc Scenario, r Run) (string, error) {
	p := plot.New()
	p.Title.Text = fmt.Sprintf("%s: %s %s", sc, r.Impl, r.Dir)
	p.X.Label.Text = "time (s)"
	p.Y.Label.Text = "Mbit/s on the wire"
	total := make(plotter.XYs, len(r.Timeline.T))
	for k, t := range r.Timeline.T {
		total[k].X = t
	}
	for i, series := range r.Timeline.Paths {
		xy := make(plotter.XYs, len(series))
		for k, v := range series {
			xy[k].X, xy[k].Y = r.Timeline.T[k], v
			total[k].Y += v
		}
		l, err := plotter.NewLine(xy)
		if err != nil {
			return "", fmt.Errorf("plot line: %w", err)
		}
		l.Color = plotutil.Color(i)
		p.Add(l)
		p.Legend.Add(fmt.Sprintf("path %d (%s)", i, sc.Paths[i].Name), l)
	}
	l, err := plotter.NewLine(total)
	if err != nil {
		return "", fmt.Errorf("plot line: %w", err)
	}
	l.Color = color.Black
	l.Dashes = []vg.Length{vg.Points(4), vg.Points(2)}
	p.Add(l)
	p.Legend.Add("total", l)
	p.Legend.Top = true
	p.Y.Min = 0
	name := fmt.Sprintf("timeline-s%d-%s-%s.png", sc.ID, fileSafe(r.Impl), r.Dir)
	if err := p.Save(8*vg.Inch, 4*vg.Inch, filepath.Join(dir, name)); err != nil {
		return "", fmt.Errorf("save %s: %w", name, err)
	}
	return name, nil
}

// Size of the summary charts.
const (
	summaryWidth  = 11 * vg.Inch
	summaryHeight = 5 * vg.Inch
)

// plotSummary draws a grouped bar chart: goodput per scenario, one bar per
// implementation, for one direction.
func plotSummary(dir string, all []Scenario, runs []Run, d Direction) (string, error) {
	ch, err := newSummaryChart(all, runs, d)
	if err != nil || ch == nil {
		return "", err
	}
	name := fmt.Sprintf("summary-%s.png", d)
	if err := ch.p.Save(summaryWidth, summaryHeight, filepath.Join(dir, name)); err != nil {
		return "", fmt.Errorf("save %s: %w", name, err)
	}
	return name, nil
}

// summaryChart is a summary plot before it is saved: one group of bars
// per scenario (group i at x = i), one bar per implementation.
type summaryChart struct {
	p      *plot.Plot
	bars   []*plotter.BarChart
	groups int
}

// newSummaryChart builds the chart of direction d; nil when there is
// nothing to draw.
func newSummaryChart(all []Scenario, runs []Run, d Direction) (*summaryChart, error) {
	// Unshaped scenarios run at Gbit/s and would flatten every other bar.
	var scenarios []Scenario
	for _, sc := range all {
		if !sc.unlimited() {
			scenarios = append(scenarios, sc)
		}
	}
	if len(scenarios) == 0 {
		return nil, nil
	}
	var impls []string
	for _, r := range runs {
		if r.Dir == d && !slices.Contains(impls, r.Impl) && r.ScenarioID != unlimitedID(all) {
			impls = append(impls, r.Impl)
		}
	}
	if len(impls) == 0 {
		return nil, nil
	}
	ch := &summaryChart{p: plot.New(), groups: len(scenarios)}
	p := ch.p
	p.Title.Text = fmt.Sprintf("goodput by scenario (%s)", d)
	p.Y.Label.Text = "Mbit/s"
	// A group fills at most 70 % of its slot (the width less about an inch
	// of axis, split evenly), and 60 points when there is room.
	group := min(vg.Points(60), (summaryWidth-vg.Inch)/vg.Length(len(scenarios))*0.7)
	w := group / vg.Length(len(impls))
	for j, impl := range impls {
		vals := make(plotter.Values, len(scenarios))
		for i, sc := range scenarios {
			for _, r := range runs {
				if r.ScenarioID == sc.ID && r.Impl == impl && r.Dir == d {
					vals[i] = r.GoodputMbit
				}
			}
		}
		bars, err := plotter.NewBarChart(vals, w)
		if err != nil {
			return nil, fmt.Errorf("bar chart: %w", err)
		}
		bars.Color = plotutil.Color(j)
		bars.LineStyle.Width = 0
		bars.Offset = w * vg.Length(float64(j)-float64(len(impls)-1)/2)
		p.Add(bars)
		p.Legend.Add(impl, bars)
		ch.bars = append(ch.bars, bars)
	}
	// Ideal: the sum of path rates.
	ideal := make(plotter.XYs, len(scenarios))
	var names []string
	for i, sc := range scenarios {
		ideal[i].X, ideal[i].Y = float64(i), sc.pathRate()/1e6
		names = append(names, sc.String())
	}
	sp, err := plotter.NewScatter(ideal)
	if err != nil {
		return nil, fmt.Errorf("scatter: %w", err)
	}
	sp.Color = color.Black
	p.Add(sp)
	p.Legend.Add("sum of path rates", sp)
	p.Legend.Top = true
	// Head room so the legend does not cover the bars.
	var top float64
	for _, xy := range ideal {
		top = max(top, xy.Y)
	}
	p.Y.Min, p.Y.Max = 0, top*1.4
	p.NominalX(names...)
	// Each group in the middle of a slot of its own: the data range alone
	// (first to last group) put the outer groups on the plot's edges.
	p.X.Min, p.X.Max = -0.5, float64(len(scenarios))-0.5
	return ch, nil
}

func unlimitedID(scenarios []Scenario) int {
	for _, sc := range scenarios {
		if sc.unlimited() {
			return sc.ID
		}
	}
	return -1
}

// plotUnlimited draws goodput and CPU per Gbit of every implementation in
// the unshaped scenario, both directions.
func plotUnlimited(dir string, sc Scenario, runs []Run) (string, error) {
	var impls []string
	for _, r := range runs {
		if r.ScenarioID == sc.ID && !slices.Contains(impls, r.Impl) {
			impls = append(impls, r.Impl)
		}
	}
	if len(impls) == 0 {
		return "", nil
	}
	p := plot.New()
	p.Title.Text = fmt.Sprintf("%s: one connection, no rate limit", sc)
	p.Y.Label.Text = "Mbit/s"
	w := vg.Points(40)
	for j, d := range []Direction{Upload, Download} {
		vals := make(plotter.Values, len(impls))
		for i, impl := range impls {
			if r, ok := findRun(runs, sc.ID, impl, d); ok {
				vals[i] = r.GoodputMbit
			}
		}
		bars, err := plotter.NewBarChart(vals, w)
		if err != nil {
			return "", fmt.Errorf("bar chart: %w", err)
		}
		bars.Color = plotutil.Color(j)
		bars.LineStyle.Width = 0
		bars.Offset = w * vg.Length(float64(j)-0.5)
		p.Add(bars)
		p.Legend.Add(string(d), bars)
		labels, err := plotter.NewLabels(barLabels(vals, bars.Offset))
		if err != nil {
			return "", fmt.Errorf("labels: %w", err)
		}
		p.Add(labels)
	}
	p.Legend.Top = true
	p.Y.Min = 0
	p.NominalX(impls...)
	name := fmt.Sprintf("unlimited-s%d.png", sc.ID)
	if err := p.Save(10*vg.Inch, 5*vg.Inch, filepath.Join(dir, name)); err != nil {
		return "", fmt.Errorf("save %s: %w", name, err)
	}
	return name, nil
}

// barLabels puts each bar's value above it; offset is in points, the x
// axis in categories, so the label is only roughly centred.
func barLabels(vals plotter.Values, offset vg.Length) plotter.XYLabels {
	xy := plotter.XYLabels{XYs: make(plotter.XYs, len(vals)), Labels: make([]string, len(vals))}
	for i, v := range vals {
		xy.XYs[i].X = float64(i) + float64(offset)/100
		xy.XYs[i].Y = v
		xy.Labels[i] = fmt.Sprintf("%.0f", v)
	}
	return xy
}
