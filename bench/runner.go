package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/mptun/mptun/lab"
)

// Run is the measurement of one implementation, scenario and direction.
type Run struct {
	ScenarioID int       `json:"scenario_id"`
	Scenario   string    `json:"scenario"`
	Impl       string    `json:"impl"`
	Dir        Direction `json:"dir"`
	// GoodputMbit is iperf3's receiver-side rate.
	GoodputMbit float64 `json:"goodput_mbit"`
	// Ratio is goodput over the sum of the path rates.
	Ratio float64 `json:"ratio"`
	// Shares are the paths' fractions of the wire bytes in this direction.
	Shares []float64 `json:"shares"`
	// Retrans counts TCP segments (subflows included) the sender retransmitted.
	Retrans uint64 `json:"retrans"`
	// CPUPerGbit is the CPU seconds of both iperf3 processes (user and
	// system time, which includes most of the kernel TCP/MPTCP work done in
	// their context) per Gbit of goodput.
	CPUPerGbit float64 `json:"cpu_s_per_gbit"`
	// MachineCPUPerGbit is machine-wide busy CPU minus this process (the
	// emulators) per Gbit: complete, but useless on a shared machine.
	MachineCPUPerGbit float64 `json:"machine_cpu_s_per_gbit"`
	// MptunCPUPerGbit is the CPU time of the mptun processes alone (connect,
	// or tunnel client plus concentrator) per Gbit; 0 for other impls.
	MptunCPUPerGbit float64 `json:"mptun_cpu_s_per_gbit,omitempty"`
	// MPTCP is false when an mptun connection fell back to TCP.
	MPTCP *bool `json:"mptcp,omitempty"`
	// BelowHalf is, for outage scenarios, the time the total throughput
	// spent below half of the surviving paths' rate during the outage.
	BelowHalf *float64 `json:"below_half_s,omitempty"`
	Timeline  Timeline `json:"timeline"`
	Raw       string   `json:"raw,omitempty"`
	Err       string   `json:"error,omitempty"`
}

// runner executes scenarios and writes raw outputs into dir.
type runner struct {
	dir      string
	log      *slog.Logger
	progress io.Writer
	dirs     []Direction
	// implFilter keeps only implementations whose name it accepts (nil: all).
	implFilter func(string) bool
	impls      implConfig
}

func (r *runner) scenario(ctx context.Context, sc Scenario) ([]Run, error) {
	var runs []Run
	for _, impl := range implementations(sc, r.impls) {
		if r.implFilter != nil && !r.implFilter(impl.Name) {
			continue
		}
		got, err := r.impl(ctx, sc, impl)
		runs = append(runs, got...)
		if err != nil {
			if ctx.Err() != nil {
				return runs, err
			}
			// A failed set-up of one implementation is a result, not the
			// end of the run.
			fmt.Fprintf(r.progress, "  %-14s ERROR: %v\n", impl.Name, err)
			for _, d := range r.dirs[len(got):] {
				runs = append(runs, Run{ScenarioID: sc.ID, Scenario: sc.Name, Impl: impl.Name, Dir: d, Err: err.Error()})
			}
		}
	}
	return runs, nil
}

// impl runs both directions of one implementation on a fresh topology, so
// that no implementation's setup leaks into another's measurement.
func (r *runner) impl(ctx context.Context, sc Scenario, impl Impl) ([]Run, error) {
	topo, err := lab.New(ctx, lab.Spec{Prefix: "mtl", Paths: sc.Paths, Logger: r.log})
	if err != nil {
		return nil, fmt.Errorf("scenario %v: %w", sc, err)
	}
	defer func() {
		if err := topo.Close(); err != nil {
			r.log.Error("topology close", "err", err)
		}
	}()
	if impl.Teardown != nil {
		defer func() {
			if err := impl.Teardown(); err != nil {
				r.log.Error("teardown", "impl", impl.Name, "err", err)
			}
		}()
	}
	if impl.Setup != nil {
		if err := impl.Setup(ctx, topo); err != nil {
			return nil, fmt.Errorf("%s setup: %w", impl.Name, err)
		}
	}
	var runs []Run
	for _, dir := range r.dirs {
		if ctx.Err() != nil {
			return runs, ctx.Err()
		}
		run := r.transfer(ctx, topo, sc, impl, dir)
		fmt.Fprintf(r.progress, "  %-14s %-4s %7.1f Mbit/s (%3.0f%% of %.0f) shares %s retrans %d%s%s\n",
			impl.Name, dir, run.GoodputMbit, run.Ratio*100, sc.pathRate()/1e6, fmtShares(run.Shares), run.Retrans,
			fmtBelow(run.BelowHalf), fmtErr(run.Err))
		runs = append(runs, run)
	}
	return runs, nil
}

func (r *runner) transfer(ctx context.Context, topo *lab.Topology, sc Scenario, impl Impl, dir Direction) Run {
	run := Run{ScenarioID: sc.ID, Scenario: sc.Name, Impl: impl.Name, Dir: dir}
	fail := func(err error) Run { run.Err = err.Error(); return run }
	sender := topo.Client
	if dir == Download {
		sender = topo.Server
	}
	re0, err := retransSegs(sender)
	if err != nil {
		return fail(err)
	}
	busy0, err1 := cpuBusy()
	self0, err2 := selfCPU()
	if err := errors.Join(err1, err2); err != nil {
		return fail(err)
	}
	tctx, cancel := context.WithTimeout(ctx, sc.Duration+60*time.Second)
	defer cancel()
	sctx, stopSampling := context.WithCancel(tctx)
	start := topo.StartClock()
	type sampled struct {
		s   []Sample
		err error
	}
	sc1 := make(chan sampled, 1)
	go func() {
		s, err := sampleCounters(sctx, topo, start, 100*time.Millisecond)
		sc1 <- sampled{s, err}
	}()
	raw, terr := impl.Transfer(tctx, Env{Topo: topo, Scenario: sc, Dir: dir, Duration: sc.Duration, Port: 5201})
	stopSampling()
	smp := <-sc1
	busy1, err1 := cpuBusy()
	self1, err2 := selfCPU()
	re1, err3 := retransSegs(sender)
	if len(raw) > 0 {
		name := fmt.Sprintf("s%d-%s-%s.json", sc.ID, fileSafe(impl.Name), dir)
		if err := os.WriteFile(filepath.Join(r.dir, "raw", name), raw, 0o644); err != nil {
			return fail(fmt.Errorf("save raw: %w", err))
		}
		run.Raw = "raw/" + name
	}
	if err := errors.Join(terr, smp.err, err1, err2, err3); err != nil {
		return fail(err)
	}
	res, err := parseIperf(raw)
	if err != nil {
		return fail(err)
	}
	run.GoodputMbit = res.End.SumReceived.BitsPerSecond / 1e6
	if pr := sc.pathRate(); pr > 0 {
		run.Ratio = res.End.SumReceived.BitsPerSecond / pr
	}
	run.Shares = shares(smp.s, dir)
	run.Timeline = timeline(smp.s, dir)
	run.Retrans = re1 - re0
	if m := res.Mptun; m != nil {
		// gVisor's retransmissions never reach the kernel counters.
		run.Retrans += m.Retrans
		run.MPTCP = &m.MPTCP
	}
	if gbit := res.End.SumReceived.Bytes * 8 / 1e9; gbit > 0 {
		secs := res.End.SumReceived.Seconds
		run.CPUPerGbit = (res.End.CPU.HostTotal + res.End.CPU.RemoteTotal) / 100 * secs / gbit
		if m := res.Mptun; m != nil {
			run.MptunCPUPerGbit = m.CPUSeconds / gbit
			run.CPUPerGbit += run.MptunCPUPerGbit
		}
		run.MachineCPUPerGbit = max(0, (busy1-busy0-(self1-self0)).Seconds()) / gbit
	}
	if pi, o, ok := sc.outage(); ok {
		var surviving float64
		for i, p := range sc.Paths {
			if i != pi {
				surviving += float64(p.Rate) / 1e6
			}
		}
		b := belowHalf(run.Timeline, o.Start, o.Start+o.Duration, surviving).Seconds()
		run.BelowHalf = &b
	}
	return run
}

func fmtShares(s []float64) string {
	out := ""
	for i, v := range s {
		if i > 0 {
			out += "/"
		}
		out += fmt.Sprintf("%.0f", v*100)
	}
	if out == "" {
		return "-"
	}
	return out
}

func fmtBelow(b *float64) string {
	if b == nil {
		return ""
	}
	return fmt.Sprintf(" below-50%% %.1fs", *b)
}

func fmtErr(e string) string {
	if e == "" {
		return ""
	}
	return " ERROR: " + e
}

// fileSafe is an implementation name usable in a file name
// ("mptun-engine/bbr" -> "mptun-engine-bbr").
func fileSafe(name string) string { return strings.ReplaceAll(name, "/", "-") }
