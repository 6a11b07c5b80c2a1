package main

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// TestSummaryGroupsEvenlySpaced renders the summary chart with 1, 2 and 7
// scenarios (as `make bench SCENARIO=...` runs subsets) and checks that
// the groups of bars lie inside the plot area, evenly spaced, with half a
// gap at either edge: not pressed against the edges.
func TestSummaryGroupsEvenlySpaced(t *testing.T) {
	base := Scenarios(10 * time.Second)[0]
	for _, n := range []int{1, 2, 7} {
		t.Run(fmt.Sprintf("%d scenarios", n), func(t *testing.T) {
			var scenarios []Scenario
			var runs []Run
			for i := range n {
				sc := base
				sc.ID, sc.Name = i+1, fmt.Sprintf("s%d", i+1)
				scenarios = append(scenarios, sc)
				for j, impl := range []string{"tcp-p0", "tcp-p1", "kernel-mptcp", "mptun-engine", "mptun-tunnel"} {
					runs = append(runs, Run{ScenarioID: sc.ID, Impl: impl, Dir: Upload, GoodputMbit: float64(40 + 10*j + i)})
				}
			}
			ch, err := newSummaryChart(scenarios, runs, Upload)
			require.NoError(t, err)
			require.Equal(t, n, ch.groups)

			dc := draw.New(vgimg.New(summaryWidth, summaryHeight))
			ch.p.Draw(dc)
			area := ch.p.DataCanvas(dc)
			x, _ := ch.p.Transforms(&area)
			// lo and hi are the outer edges of each group's bars.
			var lo, hi []vg.Length
			for i := range n {
				l, h := vg.Length(math.Inf(1)), vg.Length(math.Inf(-1))
				for _, b := range ch.bars {
					c := x(b.XMin+float64(i)) + b.Offset
					l, h = min(l, c-b.Width/2), max(h, c+b.Width/2)
				}
				require.GreaterOrEqual(t, l, area.Min.X, "group %d starts inside the plot area", i)
				require.LessOrEqual(t, h, area.Max.X, "group %d ends inside the plot area", i)
				lo, hi = append(lo, l), append(hi, h)
			}
			left, right := lo[0]-area.Min.X, area.Max.X-hi[n-1]
			require.Greater(t, left, vg.Points(5), "room before the first group")
			require.InDelta(t, float64(left), float64(right), 1, "the same room after the last group")
			for i := 1; i < n; i++ {
				require.InDelta(t, float64(hi[i]-lo[i]), float64(hi[0]-lo[0]), 0.01, "groups are equally wide")
				require.InDelta(t, float64(2*left), float64(lo[i]-hi[i-1]), 1, "gap before group %d: two edge gaps", i)
			}

			dir := t.TempDir()
			name, err := plotSummary(dir, scenarios, runs, Upload)
			require.NoError(t, err)
			st, err := os.Stat(filepath.Join(dir, name))
			require.NoError(t, err)
			require.Greater(t, st.Size(), int64(1000))
		})
	}
}
