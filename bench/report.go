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
