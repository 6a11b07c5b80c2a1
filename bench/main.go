// Command bench runs the lab scenarios (package lab, link emulator) for
// every implementation in both directions and writes a report:
//
//	go run ./bench [-scenario 3] [-duration 20s] [-results bench/results]
//
// SCENARIO and BENCH_DURATION in the environment set the defaults of
// -scenario and -duration (for `make bench SCENARIO=3`). Output goes to
// RESULTS/DATE/ (results.md, results.json, raw iperf3 JSON, PNG plots) and
// RESULTS/latest.md. Needs root, iproute2, ethtool, iperf3 and mptcpize.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/mptun/mptun/lab"
	"github.com/mptun/mptun/netstack/cc"
)

func main() {
	runMpsinkIfAsked()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func run() error {
	var (
		scenarioFlag = flag.String("scenario", envOr("SCENARIO", "all"), "comma-separated scenario numbers, or all")
		durFlag      = flag.String("duration", envOr("BENCH_DURATION", "20s"), "duration of each transfer (Go duration or seconds)")
		resultsDir   = flag.String("results", "bench/results", "results root; a DATE directory is created in it")
		implFlag     = flag.String("impl", "", "comma-separated implementation names to run (default all; mptun-engine also selects mptun-engine/CC)")
		ccFlag       = flag.String("cc", envOr("BENCH_CC", ""), "comma-separated congestion controllers the mptun implementations run with, one row each (default: each command's own)")
		dirFlag      = flag.String("dir", "up,down", "directions: up, down or both")
		note         = flag.String("note", envOr("BENCH_NOTE", ""), "free-text note for the report (e.g. machine load; default $BENCH_NOTE)")
		verbose      = flag.Bool("v", false, "debug logging")
		mptunBin     = flag.String("mptun", "bin/mptun", "mptun binary (go build -o bin/mptun ./cmd/mptun)")
	)
	flag.Parse()
	level := slog.LevelWarn
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if !lab.IsRoot() {
		return errors.New("needs root to build network namespaces")
	}
	d, err := parseDuration(*durFlag)
	if err != nil {
		return err
	}
	all := Scenarios(d)
	selected, err := selectScenarios(all, *scenarioFlag)
	if err != nil {
		return err
	}
	var dirs []Direction
	for _, s := range strings.Split(*dirFlag, ",") {
		switch Direction(strings.TrimSpace(s)) {
		case Upload:
			dirs = append(dirs, Upload)
		case Download:
			dirs = append(dirs, Download)
		default:
			return fmt.Errorf("-dir %q: want up and/or down", s)
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if removed, err := lab.CleanupStale(ctx, "mtl"); err != nil {
		log.Warn("stale namespaces", "err", err)
	} else if len(removed) > 0 {
		log.Warn("removed stale namespaces of crashed runs", "names", removed)
	}

	// Checked before the results directory exists: no empty run left behind.
	bin, err := filepath.Abs(*mptunBin)
	if err != nil {
		return fmt.Errorf("-mptun: %w", err)
	}
	if _, err := os.Stat(bin); err != nil {
		return fmt.Errorf("-mptun: %w (go build -o bin/mptun ./cmd/mptun)", err)
	}
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("own binary (re-executed as mpsink): %w", err)
	}
	now := time.Now()
	dir := filepath.Join(*resultsDir, now.UTC().Format("2006-01-02T150405Z"))
	if err := os.MkdirAll(filepath.Join(dir, "raw"), 0o755); err != nil {
		return fmt.Errorf("results dir: %w", err)
	}
	var ccs []string
	if *ccFlag != "" {
		for _, c := range strings.Split(*ccFlag, ",") {
			c = strings.TrimSpace(c)
			if err := cc.Valid(c); err != nil {
				return fmt.Errorf("-cc: %w", err)
			}
			ccs = append(ccs, c)
		}
	}
	r := &runner{dir: dir, log: log, progress: os.Stderr, dirs: dirs,
		impls: implConfig{MptunBin: bin, Self: self, LogDir: filepath.Join(dir, "raw"), CCs: ccs}}
	if *implFlag != "" {
		want := strings.Split(*implFlag, ",")
		r.implFilter = func(name string) bool {
			base, _, _ := strings.Cut(name, "/")
			for _, w := range want {
				if w = strings.TrimSpace(w); w == name || w == base {
					return true
				}
			}
			return false
		}
	}
	meta := Meta{Date: now, Command: commandLine(), Duration: d, Machine: machine(), Kernel: kernel(), Note: *note}
	var runs []Run
	var plots []string
	var runErr error
	for i, sc := range selected {
		t0 := time.Now()
		fmt.Fprintf(os.Stderr, "[%d/%d] scenario %v (%v per transfer)\n", i+1, len(selected), sc, sc.Duration)
		got, err := r.scenario(ctx, sc)
		runs = append(runs, got...)
		if sc.Timeline {
			for _, run := range got {
				if run.Err != "" || len(run.Timeline.T) == 0 {
					continue
				}
				name, err := plotTimeline(dir, sc, run)
				if err != nil {
					return err
				}
				plots = append(plots, name)
			}
		}
		fmt.Fprintf(os.Stderr, "[%d/%d] scenario %v done in %v\n", i+1, len(selected), sc, time.Since(t0).Round(time.Second))
		if err != nil {
			runErr = err
			break
		}
	}
	for _, sc := range selected {
		if !sc.unlimited() {
			continue
		}
		name, err := plotUnlimited(dir, sc, runs)
		if err != nil {
			return err
		}
		if name != "" {
			plots = append(plots, name)
		}
	}
	for _, d := range dirs {
		name, err := plotSummary(dir, selected, runs, d)
		if err != nil {
			return err
		}
		if name != "" {
			plots = append(plots, name)
		}
	}
	if err := writeReport(dir, meta, selected, runs, plots); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "report: %s\n", filepath.Join(dir, "results.md"))
	return runErr
}

func parseDuration(s string) (time.Duration, error) {
	d, err := time.ParseDuration(s)
	if secs, perr := strconv.ParseFloat(s, 64); perr == nil {
		d, err = time.Duration(secs*float64(time.Second)), nil
	}
	if err != nil || d < 2*time.Second {
		return 0, fmt.Errorf("duration %q: want >= 2s (%v)", s, err)
	}
	return d, nil
}

func selectScenarios(all []Scenario, spec string) ([]Scenario, error) {
	if spec == "" || spec == "all" {
		return all, nil
	}
	var out []Scenario
	for _, f := range strings.Split(spec, ",") {
		id, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || id < 1 || id > len(all) {
			return nil, fmt.Errorf("scenario %q: want 1-%d or all", f, len(all))
		}
		out = append(out, all[id-1])
	}
	return out, nil
}

func commandLine() string {
	var env []string
	for _, k := range []string{"SCENARIO", "BENCH_DURATION", "BENCH_CC"} {
		if v := os.Getenv(k); v != "" {
			env = append(env, k+"="+v)
		}
	}
	return strings.Join(append(env, append([]string{"go run ./bench"}, os.Args[1:]...)...), " ")
}

func machine() string {
	model := "unknown CPU"
	if raw, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range bytes.SplitSeq(raw, []byte("\n")) {
			if k, v, ok := bytes.Cut(line, []byte(":")); ok && string(bytes.TrimSpace(k)) == "model name" {
				model = string(bytes.TrimSpace(v))
				break
			}
		}
	}
	load := ""
	if raw, err := os.ReadFile("/proc/loadavg"); err == nil {
		load = ", load average at start " + strings.Join(strings.Fields(string(raw))[:3], " ")
	}
	return fmt.Sprintf("%s, %d CPUs%s", model, runtime.NumCPU(), load)
}

func kernel() string {
	var u syscall.Utsname
	if err := syscall.Uname(&u); err != nil {
		return "unknown"
	}
	b := make([]byte, 0, len(u.Release))
	for _, c := range u.Release {
		if c == 0 {
			break
		}
		b = append(b, byte(c))
	}
	return "Linux " + string(b)
}
