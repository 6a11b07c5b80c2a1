package main

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/mptun/mptun/lab"
)

// Direction of a transfer, seen from the client.
type Direction string

// Directions measured for every implementation.
const (
	Upload   Direction = "up"
	Download Direction = "down"
)

// Env is what an implementation gets for one measured transfer.
type Env struct {
	Topo     *lab.Topology
	Scenario Scenario
	Dir      Direction
	Duration time.Duration
	// Port is free for this transfer in both namespaces.
	Port int
}

// Impl is one way of moving bytes from client to server, one file each:
// single-path TCP and the kernel's MPTCP (baselines.go), mptun's engine
// (mptun_engine.go) and tunnel (mptun_tunnel.go). Adding one means writing
// a Transfer function (usually a call of iperf3Transfer with the right
// command wrappers) in a file of its own and listing it in implementations.
type Impl struct {
	Name string
	// Setup runs once per scenario topology before its transfers (optional).
	Setup func(ctx context.Context, topo *lab.Topology) error
	// Transfer runs one timed transfer and returns iperf3's client JSON.
	Transfer func(ctx context.Context, env Env) ([]byte, error)
	// Teardown stops what Setup started (optional), before the topology goes.
	Teardown func() error
}

// implementations lists what runs in scenario s. The unlimited scenario
// also runs `mptun connect --plain`, the baseline of the option layer.
func implementations(s Scenario, cfg implConfig) []Impl {
	var out []Impl
	for i := range s.Paths {
		out = append(out, singlePathTCP(i))
	}
	out = append(out, kernelMPTCP())
	ccs := cfg.CCs
	if len(ccs) == 0 {
		ccs = []string{""}
	}
	for _, cc := range ccs {
		out = append(out, mptunEngine(cfg, false, cc))
		for _, i := range s.MptunAlone {
			out = append(out, mptunEngineOn(cfg, false, cc, i))
		}
	}
	if s.unlimited() {
		out = append(out, mptunEngine(cfg, true, ""))
	}
	for _, cc := range ccs {
		out = append(out, mptunTunnel(cfg, cc))
	}
	return out
}

type iperf3Opts struct {
	Server string // address the client connects to
	Bind   string // client source address ("" for any)
	// Wrap prefixes both iperf3 commands, e.g. mptcpize run.
	Wrap []string
}

// iperf3Transfer runs a one-shot iperf3 server in the server namespace and
// a timed client in the client namespace, and returns the client's JSON.
func iperf3Transfer(ctx context.Context, env Env, o iperf3Opts) ([]byte, error) {
	port := strconv.Itoa(env.Port)
	srvArgs := append(append([]string{}, o.Wrap...), "iperf3", "-s", "-1", "-p", port)
	sctx, scancel := context.WithCancel(ctx)
	defer scancel()
	srv := env.Topo.Server.Command(sctx, srvArgs[0], srvArgs[1:]...)
	// The server's own words explain a refused connection (seen once on
	// scenario 7: kernel MPTCP download refused for 10 s).
	var srvOut lab.SyncBuffer
	srv.Stdout, srv.Stderr = &srvOut, &srvOut
	if err := srv.Start(); err != nil {
		return nil, fmt.Errorf("iperf3 server: %w", err)
	}
	defer func() { scancel(); _ = srv.Wait() }()

	cliArgs := append(append([]string{}, o.Wrap...), "iperf3", "-c", o.Server, "-p", port,
		"-t", strconv.FormatFloat(env.Duration.Seconds(), 'f', 1, 64), "-i", "0.5", "-J")
	if o.Bind != "" {
		cliArgs = append(cliArgs, "-B", o.Bind)
	}
	if env.Dir == Download {
		cliArgs = append(cliArgs, "-R")
	}
	// The server needs a moment to listen; retry refused connections only.
	deadline := time.Now().Add(10 * time.Second) // a loaded machine starts iperf3 slowly
	for {
		out, err := env.Topo.Client.Command(ctx, cliArgs[0], cliArgs[1:]...).Output()
		if err == nil {
			return out, nil
		}
		var ee *exec.ExitError
		if !errors.As(err, &ee) || time.Now().After(deadline) || ctx.Err() != nil || !refused(out) {
			return out, fmt.Errorf("iperf3 client %v: %w: %s (server: %q)", cliArgs, err, iperfError(out), lastLines(srvOut.String(), 5))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
