package main

// mptun-tunnel: `mptun server` and `mptun client` as daemons, iperf3
// through the tunnel.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/mptun/mptun/bond/client"
	"github.com/mptun/mptun/lab"
)

// tunnelWebAddr is the "host behind the concentrator": an address on lo of
// the server namespace, outside the path subnets (10.77.0.0/16), so the
// client can reach it only through the tunnel.
const (
	tunnelWebAddr   = "10.78.0.1"
	tunnelWebPrefix = "10.78.0.0/24"
	tunnelPort      = 4433
)

// procCPU is a running process's user+system time from /proc/PID/stat.
func procCPU(pid int) (float64, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("read stat of %d: %w", pid, err)
	}
	return parseProcPidStat(raw)
}

func parseProcPidStat(raw []byte) (float64, error) {
	// The command name may contain spaces and parentheses: fields start
	// after the last ')'. utime and stime are fields 14 and 15.
	i := bytes.LastIndexByte(raw, ')')
	if i < 0 {
		return 0, errors.New("stat: no command name")
	}
	f := strings.Fields(string(raw[i+1:]))
	if len(f) < 13 {
		return 0, errors.New("stat: too few fields")
	}
	var ticks uint64
	for _, s := range f[11:13] {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("stat: %w", err)
		}
		ticks += v
	}
	return float64(ticks) / 100, nil // USER_HZ
}

// daemon is a long-running mptun process (tunnel client or server).
type daemon struct {
	cmd     *exec.Cmd
	stderr  *lab.SyncBuffer
	logPath string // the whole stderr, kept after the run
	done    chan struct{}
	err     error
}

// startDaemon runs bin in ns; its stderr is kept in memory and in the file
// logPath (truncated first).
func startDaemon(ns *lab.NS, logPath, bin string, args ...string) (*daemon, error) {
	f, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("mptun %s: stderr log: %w", args[0], err)
	}
	// Not CommandContext: the daemon outlives Setup's context and is stopped
	// by stop (SIGTERM, then SIGKILL).
	cmd := ns.Command(context.Background(), bin, args...)
	d := &daemon{cmd: cmd, stderr: &lab.SyncBuffer{}, logPath: logPath, done: make(chan struct{})}
	cmd.Stderr = io.MultiWriter(d.stderr, f)
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("mptun %s: %w", args[0], err)
	}
	go func() { d.err = cmd.Wait(); f.Close(); close(d.done) }()
	return d, nil
}

// diag is what an error about the daemon quotes: the whole crash report
// (from Go's "panic:" or "fatal error:" line to the end) when it crashed,
// its last lines otherwise, and where the whole stderr is.
func (d *daemon) diag() string {
	return crashReport(d.stderr.String(), 20) + "\n(whole stderr: " + d.logPath + ")"
}

// crashReport returns s from its first Go crash line on, or its last n
// lines when it has none.
func crashReport(s string, n int) string {
	for _, mark := range []string{"panic: ", "fatal error: "} {
		if i := strings.Index(s, mark); i >= 0 && (i == 0 || s[i-1] == '\n') {
			return s[i:]
		}
	}
	return lastLines(s, n)
}

func (d *daemon) exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

func (d *daemon) stop() error {
	if d.exited() {
		return fmt.Errorf("exited early: %w: %s", d.err, d.diag())
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
		return nil
	case <-time.After(10 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.done
		return fmt.Errorf("did not exit 10 s after SIGTERM: %s", d.diag())
	}
}

// tunnel is the state of one mptun-tunnel topology.
type tunnel struct {
	cc             string // --cc of both daemons ("" their default)
	dir            string
	started        time.Time // names the daemons' stderr logs
	server, client *daemon
}

// mptunTunnel is the bonding tunnel: `mptun server` (userspace engine on
// every server path interface) as the concentrator and `mptun client
// --route` in the client namespace; iperf3 runs unmodified from the client
// namespace to a dummy address of the server namespace routed into the
// tunnel.
func mptunTunnel(cfg implConfig, cc string) Impl {
	t := &tunnel{cc: cc}
	return Impl{
		Name: ccName("mptun-tunnel", cc),
		Setup: func(ctx context.Context, topo *lab.Topology) error {
			return t.setup(ctx, topo, cfg)
		},
		Teardown: t.teardown,
		Transfer: func(ctx context.Context, env Env) ([]byte, error) {
			return t.transfer(ctx, env)
		},
	}
}

func (t *tunnel) setup(ctx context.Context, topo *lab.Topology, cfg implConfig) error {
	dir, err := os.MkdirTemp("", "mpb-tunnel-")
	if err != nil {
		return fmt.Errorf("temp dir: %w", err)
	}
	t.dir = dir
	t.started = time.Now()
	key, err := exec.CommandContext(ctx, cfg.MptunBin, "genkey").Output()
	if err != nil {
		return fmt.Errorf("mptun genkey: %w", err)
	}
	keyFile := filepath.Join(dir, "key")
	if err := os.WriteFile(keyFile, key, 0o600); err != nil {
		return fmt.Errorf("key file: %w", err)
	}
	// On lo: this kernel has no dummy links.
	for _, c := range [][]string{
		{"addr", "add", tunnelWebAddr + "/32", "dev", "lo"},
	} {
		if out, err := exec.CommandContext(ctx, "ip", append([]string{"-n", topo.Server.Name}, c...)...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %v: %w: %s", c, err, out)
		}
	}
	srvAddr := netip.AddrPortFrom(topo.Paths[0].ServerAddr, tunnelPort).String()
	args := append([]string{"server", "--listen", srvAddr, "--key-file", keyFile, "--allow-private"}, ccArgs(t.cc)...)
	for _, p := range topo.Paths {
		args = append(args, "--uplink", p.ServerIf)
	}
	if t.server, err = startDaemon(topo.Server, t.logPath(cfg, "server"), cfg.MptunBin, args...); err != nil {
		return err
	}
	// Ready when the port accepts (DNAT into the userspace stack is in place).
	if err := waitFor(ctx, 15*time.Second, func() bool {
		ok := false
		_ = topo.Client.Do(func() error {
			c, err := net.DialTimeout("tcp", srvAddr, 300*time.Millisecond)
			if err == nil {
				ok = true
				c.Close()
			}
			return nil
		})
		return ok || t.server.exited()
	}); err != nil || t.server.exited() {
		return fmt.Errorf("mptun server not up (%v): %s", err, t.server.diag())
	}
	// The lab turns IPv6 off; the tunnel TUN gets an IPv6 address too.
	// Only links created from now on (the client's TUNs) get it back.
	if err := topo.Client.WriteSysctl("net/ipv6/conf/default/disable_ipv6", "0"); err != nil {
		return err
	}
	args = append([]string{"client", "--server", srvAddr, "--key-file", keyFile, "--route", tunnelWebPrefix,
		"--socket", t.socket()}, ccArgs(t.cc)...)
	args = append(args, uplinkArgs(topo, len(topo.Paths))...)
	if t.client, err = startDaemon(topo.Client, t.logPath(cfg, "client"), cfg.MptunBin, args...); err != nil {
		return err
	}
	if err := waitFor(ctx, 20*time.Second, func() bool {
		if t.client.exited() {
			return true
		}
		qctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		_, err := client.QueryControl(qctx, t.socket())
		return err == nil
	}); err != nil || t.client.exited() {
		return fmt.Errorf("mptun client not up (%v): %s", err, t.client.diag())
	}
	return nil
}

func (t *tunnel) socket() string { return filepath.Join(t.dir, "client.sock") }

// logPath is where a daemon's whole stderr goes: the results' raw/ folder,
// one file per setup and role, named by the setup's start time.
func (t *tunnel) logPath(cfg implConfig, role string) string {
	dir := cfg.LogDir
	if dir == "" {
		dir = os.TempDir()
	}
	return filepath.Join(dir, fmt.Sprintf("tunnel-%s-%s.stderr", t.started.UTC().Format("150405.000"), role))
}

func waitFor(ctx context.Context, d time.Duration, ok func() bool) error {
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %v", d)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return nil
}

func (t *tunnel) teardown() error {
	var errs []error
	if t.client != nil {
		if err := t.client.stop(); err != nil {
			errs = append(errs, fmt.Errorf("mptun client: %w", err))
		}
	}
	if t.server != nil {
		if err := t.server.stop(); err != nil {
			errs = append(errs, fmt.Errorf("mptun server: %w", err))
		}
	}
	if t.dir != "" {
		errs = append(errs, os.RemoveAll(t.dir))
	}
	return errors.Join(errs...)
}

// daemonsCPU is the summed CPU time of the tunnel's two processes.
func (t *tunnel) daemonsCPU() (float64, error) {
	var sum float64
	for _, d := range []*daemon{t.client, t.server} {
		v, err := procCPU(d.cmd.Process.Pid)
		if err != nil {
			return 0, err
		}
		sum += v
	}
	return sum, nil
}

func (t *tunnel) transfer(ctx context.Context, env Env) ([]byte, error) {
	if t.client.exited() || t.server.exited() {
		return nil, fmt.Errorf("tunnel process exited: client %s server %s", t.client.diag(), t.server.diag())
	}
	cpu0, err := t.daemonsCPU()
	if err != nil {
		return nil, err
	}
	// Subflow retransmits of the client's connections, polled because the
	// connections are gone from the status once iperf3 closes them.
	pctx, stopPoll := context.WithCancel(ctx)
	retrans := make(chan uint64, 1)
	go func() { retrans <- t.pollRetrans(pctx) }()
	raw, terr := iperf3Transfer(ctx, env, iperf3Opts{Server: tunnelWebAddr})
	stopPoll()
	re := <-retrans
	cpu1, err := t.daemonsCPU()
	if terr != nil || err != nil {
		return raw, errors.Join(terr, err)
	}
	var doc map[string]any
	if err := json.Unmarshal(raw, &doc); err != nil {
		return raw, fmt.Errorf("iperf3 JSON: %w", err)
	}
	doc["mptun"] = mptunExtra{Retrans: re, CPUSeconds: cpu1 - cpu0, MPTCP: true}
	out, err := json.MarshalIndent(doc, "", " ")
	if err != nil {
		return raw, fmt.Errorf("iperf3 JSON: %w", err)
	}
	return out, nil
}

func (t *tunnel) pollRetrans(ctx context.Context) uint64 {
	seen := map[string]uint64{}
	tk := time.NewTicker(500 * time.Millisecond)
	defer tk.Stop()
	for {
		qctx, cancel := context.WithTimeout(ctx, time.Second)
		raw, err := client.QueryControl(qctx, t.socket())
		cancel()
		if err == nil {
			var st client.Status
			if json.Unmarshal(raw, &st) == nil {
				for _, c := range st.Conns {
					for _, sf := range c.Subflows {
						k := c.Local + "|" + c.Remote + "|" + sf.Local + "|" + sf.Remote
						seen[k] = max(seen[k], sf.Retransmits)
					}
				}
			}
		}
		select {
		case <-ctx.Done():
			var sum uint64
			for _, v := range seen {
				sum += v
			}
			return sum
		case <-tk.C:
		}
	}
}
