package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// Meta records how and where a report was produced.
type Meta struct {
	Date     time.Time     `json:"date"`
	Command  string        `json:"command"`
	Duration time.Duration `json:"duration"`
	Machine  string        `json:"machine"`
	Kernel   string        `json:"kernel"`
	Note     string        `json:"note"`
}

// writeMarkdown renders the summary table; link is prefixed to file links.
func writeMarkdown(w io.Writer, meta Meta, scenarios []Scenario, runs []Run, plots []string, link string) error {
	var b strings.Builder
	fmt.Fprintf(&b, "# mptun lab benchmark %s\n\n", meta.Date.UTC().Format("2006-01-02 15:04 UTC"))
	fmt.Fprintf(&b, "- Command: `%s`\n- Transfer duration: %v (failover: 1.5x)\n- Machine: %s\n- Kernel: %s\n", meta.Command, meta.Duration, meta.Machine, meta.Kernel)
	if meta.Note != "" {
		fmt.Fprintf(&b, "- Note: %s\n", meta.Note)
	}
	b.WriteString("\nGoodput is iperf3's receiver rate; ratio is goodput over the sum of the path rates; shares are each path's part of the wire bytes in the transfer direction (client interface counters); retrans are the sender's TCP RetransSegs (subflows included); CPU is the user+system time of both iperf3 processes per Gbit of goodput (results.json also has machine-wide CPU minus the emulator, which is meaningless while others share the machine). Failover: time the total throughput spent below 50% of the surviving path's rate during the outage.\n\n")
	b.WriteString("## Scenarios\n\n| # | name | paths (rate, one-way delay, loss, outages) |\n|---|---|---|\n")
	for _, s := range scenarios {
		var ps []string
		for _, p := range s.Paths {
			d := fmt.Sprintf("%s: %g Mbit/s %v", p.Name, float64(p.Rate)/1e6, p.Delay)
			if p.Loss > 0 {
				d += fmt.Sprintf(" %g%% loss", p.Loss*100)
			}
			for _, o := range p.Outages {
				d += fmt.Sprintf(" down %v for %v", o.Start, o.Duration)
			}
			ps = append(ps, d)
		}
		fmt.Fprintf(&b, "| %d | %s | %s |\n", s.ID, s.Name, strings.Join(ps, "; "))
	}
	b.WriteString("\n## Results\n\n| # | scenario | impl | dir | goodput Mbit/s | ratio | path shares % | retrans | CPU s/Gbit | below 50% (s) | raw |\n|---|---|---|---|---:|---:|---|---:|---:|---:|---|\n")
	for _, r := range runs {
		below := ""
		if r.BelowHalf != nil {
			below = fmt.Sprintf("%.1f", *r.BelowHalf)
		}
		raw := ""
		if r.Raw != "" {
			raw = fmt.Sprintf("[json](%s%s)", link, r.Raw)
		}
		if r.Err != "" {
			fmt.Fprintf(&b, "| %d | %s | %s | %s | error: %s | | | | | | %s |\n", r.ScenarioID, r.Scenario, r.Impl, r.Dir, strings.ReplaceAll(r.Err, "|", "/"), raw)
			continue
		}
		fmt.Fprintf(&b, "| %d | %s | %s | %s | %.1f | %.2f | %s | %d | %.2f | %s | %s |\n",
			r.ScenarioID, r.Scenario, r.Impl, r.Dir, r.GoodputMbit, r.Ratio, fmtShares(r.Shares), r.Retrans, r.CPUPerGbit, below, raw)
	}
	writeComparison(&b, scenarios, runs)
	writeTargets(&b, scenarios, runs)
	if len(plots) > 0 {
		b.WriteString("\n## Plots\n\n")
		for _, p := range plots {
			fmt.Fprintf(&b, "![%s](%s%s)\n", p, link, p)
		}
	}
	_, err := io.WriteString(w, b.String())
	if err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	return nil
}

// writeReport writes results.md and results.json into dir and refreshes
// latest.md next to dir.
func writeReport(dir string, meta Meta, scenarios []Scenario, runs []Run, plots []string) error {
	slices.Sort(plots)
	var md strings.Builder
	if err := writeMarkdown(&md, meta, scenarios, runs, plots, ""); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "results.md"), []byte(md.String()), 0o644); err != nil {
		return fmt.Errorf("results.md: %w", err)
	}
	js, err := json.MarshalIndent(struct {
		Meta Meta  `json:"meta"`
		Runs []Run `json:"runs"`
	}{meta, runs}, "", " ")
	if err != nil {
		return fmt.Errorf("results.json: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "results.json"), js, 0o644); err != nil {
		return fmt.Errorf("results.json: %w", err)
	}
	var latest strings.Builder
	if err := writeMarkdown(&latest, meta, scenarios, runs, plots, filepath.Base(dir)+"/"); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(filepath.Dir(dir), "latest.md"), []byte(latest.String()), 0o644); err != nil {
		return fmt.Errorf("latest.md: %w", err)
	}
	return nil
}

// findRun returns the error-free run of impl in scenario id and direction d.
func findRun(runs []Run, id int, impl string, d Direction) (Run, bool) {
	for _, r := range runs {
		if r.ScenarioID == id && r.Impl == impl && r.Dir == d && r.Err == "" {
			return r, true
		}
	}
	return Run{}, false
}

// fmtVs is "goodput (ratio to base)" or "-" when a run is missing.
func fmtVs(r Run, ok bool, base Run, baseOK bool) string {
	if !ok {
		return "-"
	}
	if !baseOK || base.GoodputMbit == 0 {
		return fmt.Sprintf("%.1f", r.GoodputMbit)
	}
	return fmt.Sprintf("%.1f (%.2f)", r.GoodputMbit, r.GoodputMbit/base.GoodputMbit)
}

// writeComparison is mptun against the kernel in the same run, per
// scenario and direction.
func writeComparison(b *strings.Builder, scenarios []Scenario, runs []Run) {
	// One column per mptun implementation that ran (engine and tunnel,
	// each congestion controller the bench was given).
	cols := []string{"mptun-engine", "mptun-tunnel"}
	for _, r := range runs {
		if strings.HasPrefix(r.Impl, "mptun-") && r.Impl != "mptun-plain" && !slices.Contains(cols, r.Impl) {
			cols = append(cols, r.Impl)
		}
	}
	slices.Sort(cols)
	b.WriteString("\n## mptun vs kernel MPTCP (same run)\n\nGoodput in Mbit/s, in brackets the ratio to kernel-mptcp; best single path is the best tcp-pN.\n\n| # | scenario | dir | best single path | kernel-mptcp")
	for _, c := range cols {
		b.WriteString(" | " + c)
	}
	b.WriteString(" | engine retrans (kernel) | engine below 50% s (kernel) |\n|---|---|---|---:|---:" + strings.Repeat("|---:", len(cols)) + "|---:|---:|\n")
	for _, sc := range scenarios {
		for _, d := range []Direction{Upload, Download} {
			k, kok := findRun(runs, sc.ID, "kernel-mptcp", d)
			e, eok := findRun(runs, sc.ID, "mptun-engine", d)
			ran := kok
			for _, c := range cols {
				_, ok := findRun(runs, sc.ID, c, d)
				ran = ran || ok
			}
			if !ran {
				continue
			}
			best := 0.0
			for i := range sc.Paths {
				if r, ok := findRun(runs, sc.ID, fmt.Sprintf("tcp-p%d", i), d); ok {
					best = max(best, r.GoodputMbit)
				}
			}
			re, below := "-", "-"
			if eok && kok {
				re = fmt.Sprintf("%d (%d)", e.Retrans, k.Retrans)
				if e.BelowHalf != nil && k.BelowHalf != nil {
					below = fmt.Sprintf("%.1f (%.1f)", *e.BelowHalf, *k.BelowHalf)
				}
			}
			fmt.Fprintf(b, "| %d | %s | %s | %.1f | %s", sc.ID, sc.Name, d, best, fmtVs(k, kok, Run{}, false))
			for _, c := range cols {
				r, ok := findRun(runs, sc.ID, c, d)
				fmt.Fprintf(b, " | %s", fmtVs(r, ok, k, kok))
			}
			fmt.Fprintf(b, " | %s | %s |\n", re, below)
		}
	}
}

// writeTargets renders the figures mptun's performance targets are judged
// by: two 50 Mbit/s paths (scenario 1: mptun connect vs kernel MPTCP vs
// single-path TCP, target 90 % of 100 Mbit/s) and one unshaped connection
// (scenario 7: mptun connect vs connect --plain vs kernel, targets > 1
// Gbit/s, option layer <= 10 % of --plain in throughput and CPU).
func writeTargets(b *strings.Builder, scenarios []Scenario, runs []Run) {
	has := func(id int) bool {
		return slices.ContainsFunc(scenarios, func(s Scenario) bool { return s.ID == id })
	}
	if has(1) {
		b.WriteString("\n## Target: two 50 Mbit/s paths (scenario 1), >= 90 Mbit/s\n\n| impl | up Mbit/s | % of 100 | down Mbit/s | % of 100 |\n|---|---:|---:|---:|---:|\n")
		for _, impl := range []string{"mptun-engine", "mptun-tunnel", "kernel-mptcp", "tcp-p0", "tcp-p1"} {
			u, uok := findRun(runs, 1, impl, Upload)
			d, dok := findRun(runs, 1, impl, Download)
			if !uok && !dok {
				continue
			}
			fmt.Fprintf(b, "| %s | %.1f | %.0f | %.1f | %.0f |\n", impl, u.GoodputMbit, u.Ratio*100, d.GoodputMbit, d.Ratio*100)
		}
	}
	if has(7) {
		b.WriteString("\n## Target: one connection, no rate limit (scenario 7, one veth pair, offloads on), > 1 Gbit/s, option layer <= 10 % of --plain\n\nTotal CPU is both endpoints (iperf3 processes, mpsink peer and mptun processes) per Gbit; mptun CPU is the mptun process(es) alone. Ratios are against `mptun connect --plain` (the same userspace stack and TUN without the MPTCP option layer).\n\n| impl | dir | Mbit/s | vs plain | total CPU s/Gbit | mptun CPU s/Gbit | mptun CPU vs plain |\n|---|---|---:|---:|---:|---:|---:|\n")
		for _, d := range []Direction{Upload, Download} {
			p, pok := findRun(runs, 7, "mptun-plain", d)
			for _, impl := range []string{"mptun-engine", "mptun-plain", "mptun-tunnel", "kernel-mptcp", "tcp-p0"} {
				r, ok := findRun(runs, 7, impl, d)
				if !ok {
					continue
				}
				vs, cpuVs := "-", "-"
				if pok && p.GoodputMbit > 0 {
					vs = fmt.Sprintf("%.2f", r.GoodputMbit/p.GoodputMbit)
				}
				if pok && p.MptunCPUPerGbit > 0 && r.MptunCPUPerGbit > 0 {
					cpuVs = fmt.Sprintf("%.2f", r.MptunCPUPerGbit/p.MptunCPUPerGbit)
				}
				mcpu := "-"
				if r.MptunCPUPerGbit > 0 {
					mcpu = fmt.Sprintf("%.3f", r.MptunCPUPerGbit)
				}
				fmt.Fprintf(b, "| %s | %s | %.0f | %s | %.3f | %s | %s |\n", impl, d, r.GoodputMbit, vs, r.CPUPerGbit, mcpu, cpuVs)
			}
		}
	}
}
