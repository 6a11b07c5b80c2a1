package main

import (
	"bufio"
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
	"sync/atomic"
	"syscall"
	"time"

	"github.com/mptun/mptun/bond/client"
	"github.com/mptun/mptun/lab"
	"github.com/mptun/mptun/mptcpep"
)

// implConfig is what the mptun implementations need from the runner.
type implConfig struct {
	// MptunBin is the mptun binary (bin/mptun, built by make build).
	MptunBin string
	// Self is the bench binary, re-executed as the kernel peer (mpsink).
	Self string
	// LogDir keeps the whole stderr of every tunnel daemon (raw/ of the
	// results directory): a crash's full stack trace must survive the run.
	// Empty: a temporary directory.
	LogDir string
}

// mptunExtra is added to the iperf3-compatible JSON of mptun transfers:
// what the kernel counters and iperf3 cannot see.
type mptunExtra struct {
	// Retrans is the retransmitted segments of mptun's subflows (gVisor
	// sends them, so the kernel's RetransSegs never count them).
	Retrans uint64 `json:"retrans"`
	// CPUSeconds is the user+system time of the mptun processes.
	CPUSeconds float64 `json:"cpu_s"`
	// MPTCP is false when the connection fell back to plain TCP.
	MPTCP    bool `json:"mptcp"`
	Subflows int  `json:"subflows"`
	// PeerMPTCP is whether the kernel peer's socket is MPTCP.
	PeerMPTCP bool `json:"peer_mptcp"`
	// PeerMIB is the kernel peer namespace's nonzero MPTcpExt counters.
	PeerMIB string `json:"peer_mib,omitempty"`
	Stats   any    `json:"stats,omitempty"`
	// Samples are mptun's --stats-every lines: per-subflow rate, RTT and
	// cwnd every half second (what showed a subflow stuck below its share).
	Samples []string `json:"samples,omitempty"`
	Stderr  string   `json:"stderr,omitempty"`
}

// statsEvery is how often `mptun connect` samples its subflows in a run.
const statsEvery = "500ms"

// sampleLines returns the --stats-every lines of mptun's stderr.
func sampleLines(stderr string) []string {
	var out []string
	for _, l := range strings.Split(stderr, "\n") {
		if strings.HasPrefix(l, "stats t=") {
			out = append(out, l)
		}
	}
	return out
}

// tunnelWebAddr is the "host behind the concentrator": an address on lo of
// the server namespace, outside the path subnets (10.77.0.0/16), so the
// client can reach it only through the tunnel.
const (
	tunnelWebAddr   = "10.78.0.1"
	tunnelWebPrefix = "10.78.0.0/24"
	tunnelPort      = 4433
)

// setServerMPTCPLimits lets the kernel peer accept one subflow per path.
func setServerMPTCPLimits(ctx context.Context, topo *lab.Topology) error {
	if err := topo.Server.WriteSysctl("net/mptcp/enabled", "1"); err != nil {
		return err
	}
	n := strconv.Itoa(max(len(topo.Paths), 2))
	if out, err := exec.CommandContext(ctx, "ip", "-n", topo.Server.Name, "mptcp", "limits", "set",
		"subflow", n, "add_addr_accepted", n).CombinedOutput(); err != nil {
		return fmt.Errorf("mptcp limits: %w: %s", err, out)
	}
	return nil
}

// mptunEngine is `mptun connect` with one --uplink per path against a
// kernel MPTCP peer in the server namespace; plain is `connect --plain`,
// TCP over the same userspace stack and TUN on the first path only.
func mptunEngine(cfg implConfig, plain bool) Impl {
	name := "mptun-engine"
	if plain {
		name = "mptun-plain"
	}
	return Impl{
		Name:  name,
		Setup: setServerMPTCPLimits,
		Transfer: func(ctx context.Context, env Env) ([]byte, error) {
			return engineTransfer(ctx, env, cfg, plain)
		},
	}
}

// uplinkArgs are --uplink flags for the client side of every path: the lab
// paths are on-link, so no gateway is needed.
func uplinkArgs(topo *lab.Topology, n int) []string {
	var out []string
	for _, p := range topo.Paths[:n] {
		out = append(out, "--uplink", p.ClientIf)
	}
	return out
}

// startPeer runs the mpsink peer in the server namespace and waits until it
// listens.
func startPeer(ctx context.Context, env Env, cfg implConfig, mode, listen string) (*exec.Cmd, *bufio.Reader, error) {
	cmd := env.Topo.Server.Command(ctx, cfg.Self, "mpsink", "-mode", mode, "-listen", listen,
		"-duration", env.Duration.String(), "-timeout", (env.Duration + 50*time.Second).String())
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, nil, fmt.Errorf("mpsink stdout: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("mpsink: %w", err)
	}
	br := bufio.NewReader(out)
	ready := make(chan error, 1)
	go func() {
		line, err := br.ReadString('\n')
		if err == nil && strings.TrimSpace(line) != "ready" {
			err = fmt.Errorf("unexpected %q", line)
		}
		ready <- err
	}()
	select {
	case err = <-ready:
	case <-time.After(10 * time.Second):
		err = errors.New("not listening after 10 s")
	}
	if err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return nil, nil, fmt.Errorf("mpsink: %w: %s", err, stderr.String())
	}
	return cmd, br, nil
}

func engineTransfer(ctx context.Context, env Env, cfg implConfig, plain bool) ([]byte, error) {
	p0 := env.Topo.Paths[0]
	dst := netip.AddrPortFrom(p0.ServerAddr, uint16(env.Port)).String()
	mode := "recv"
	if env.Dir == Download {
		mode = "send"
	}
	pctx, pcancel := context.WithCancel(ctx)
	defer pcancel()
	peer, peerOut, err := startPeer(pctx, env, cfg, mode, dst)
	if err != nil {
		return nil, err
	}
	defer func() { pcancel(); _ = peer.Wait() }()

	args := []string{"connect"}
	if plain {
		args = append(append(args, "--plain"), uplinkArgs(env.Topo, 1)...)
	} else {
		args = append(append(args, "--stats", "--stats-every", statsEvery), uplinkArgs(env.Topo, len(env.Topo.Paths))...)
	}
	cmd := env.Topo.Client.Command(ctx, cfg.MptunBin, append(args, dst)...)
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 5 * time.Second
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("mptun stdin: %w", err)
	}
	var stdout io.ReadCloser
	if env.Dir == Download {
		if stdout, err = cmd.StdoutPipe(); err != nil {
			return nil, fmt.Errorf("mptun stdout: %w", err)
		}
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("mptun connect: %w", err)
	}
	peerResult := make(chan sinkResult, 1)
	peerErr := make(chan error, 1)
	go func() {
		// The peer's one result line: after EOF (recv) or after its last
		// byte left (send).
		var sr sinkResult
		line, err := peerOut.ReadString('\n')
		if err == nil {
			err = json.Unmarshal([]byte(line), &sr)
		}
		if err != nil {
			peerErr <- fmt.Errorf("mpsink result %q: %w", line, err)
			return
		}
		peerResult <- sr
	}()
	var recvBytes uint64
	var recvSecs float64
	var ioErr error
	var sr sinkResult
	if env.Dir == Upload {
		ioErr = writeZerosFor(stdin, env.Duration)
		stdin.Close()
	} else {
		// mptun's stdout stays open until it exits, so the end of the
		// download is when every byte the peer reports sent has arrived;
		// only then does our direction close.
		var got atomic.Uint64
		arrived := make(chan struct{}, 1)
		type counted struct {
			n    uint64
			secs float64
			err  error
		}
		cnt := make(chan counted, 1)
		go func() {
			n, secs, err := countUntilEOF(stdout, func(n uint64) {
				got.Store(n)
				select {
				case arrived <- struct{}{}:
				default:
				}
			})
			cnt <- counted{n, secs, err}
		}()
		select {
		case sr = <-peerResult:
		case err := <-peerErr:
			ioErr = err
		case c := <-cnt:
			ioErr = fmt.Errorf("mptun ended the download early after %d bytes: %w", c.n, c.err)
		}
		for ioErr == nil && got.Load() < sr.Bytes {
			select {
			case <-arrived:
			case c := <-cnt:
				ioErr = fmt.Errorf("mptun ended the download after %d of %d bytes: %w", c.n, sr.Bytes, c.err)
			case <-ctx.Done():
				ioErr = ctx.Err()
			}
		}
		stdin.Close()
		if ioErr == nil {
			c := <-cnt
			recvBytes, recvSecs, ioErr = c.n, c.secs, c.err
		}
	}
	werr := cmd.Wait()
	if ioErr != nil || werr != nil {
		return nil, fmt.Errorf("mptun connect: %w; kernel peer MPTcpExt %v; stderr: %s", errors.Join(ioErr, werr),
			mptcpCounters(env.Topo.Server), compactStats(stderr.String()))
	}
	mptunCPU := (cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()).Seconds()
	if env.Dir == Upload {
		select {
		case sr = <-peerResult:
		case err := <-peerErr:
			return nil, err
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if err := peer.Wait(); err != nil {
		return nil, fmt.Errorf("mpsink: %w", err)
	}
	if env.Dir == Upload {
		recvBytes, recvSecs = sr.Bytes, sr.Seconds
	}
	extra := mptunExtra{CPUSeconds: mptunCPU, PeerMPTCP: sr.MPTCP, PeerMIB: mptcpCounters(env.Topo.Server)}
	if !plain {
		st, err := parseConnectStats(stderr.String())
		if err != nil {
			return nil, err
		}
		extra.MPTCP, extra.Subflows, extra.Stats = st.Conn.MPTCP, len(st.Conn.Subflows), st
		extra.Samples = sampleLines(stderr.String())
		for _, sf := range st.Conn.Subflows {
			extra.Retrans += sf.Retransmits
		}
		if !st.Conn.MPTCP || !sr.MPTCP {
			return nil, fmt.Errorf("connection fell back to TCP (mptun %v, kernel peer %v)", st.Conn.MPTCP, sr.MPTCP)
		}
	}
	return synthIperf(recvBytes, recvSecs, sr.CPUSeconds, 0, extra)
}

// synthIperf writes the part of iperf3's JSON the runner reads, for
// transfers iperf3 did not measure. CPU is given in seconds and stored as
// iperf3 does, in percent of the transfer time.
func synthIperf(bytesRecv uint64, secs, hostCPU, remoteCPU float64, extra mptunExtra) ([]byte, error) {
	if secs <= 0 || bytesRecv == 0 {
		return nil, fmt.Errorf("no data received (%d bytes in %.2f s)", bytesRecv, secs)
	}
	bps := float64(bytesRecv) * 8 / secs
	doc := map[string]any{
		"end": map[string]any{
			"sum_sent":                map[string]any{"bytes": bytesRecv, "bits_per_second": bps},
			"sum_received":            map[string]any{"bytes": bytesRecv, "seconds": secs, "bits_per_second": bps},
			"cpu_utilization_percent": map[string]any{"host_total": hostCPU / secs * 100, "remote_total": remoteCPU / secs * 100},
		},
		"mptun": extra,
	}
	b, err := json.MarshalIndent(doc, "", " ")
	if err != nil {
		return nil, fmt.Errorf("result JSON: %w", err)
	}
	return b, nil
}

// connectStats is what `mptun connect --stats` prints to stderr.
type connectStats struct {
	Conn mptcpep.ConnStats `json:"conn"`
	MIB  map[string]uint64 `json:"mib"`
}

func parseConnectStats(stderr string) (connectStats, error) {
	var s connectStats
	i := strings.Index(stderr, "{\n")
	if i < 0 {
		return s, fmt.Errorf("no --stats JSON on mptun's stderr: %s", lastLines(stderr, 20))
	}
	if err := json.NewDecoder(strings.NewReader(stderr[i:])).Decode(&s); err != nil {
		return s, fmt.Errorf("mptun --stats JSON: %w", err)
	}
	return s, nil
}

// writeZerosFor feeds w for d, the upload generator.
func writeZerosFor(w io.Writer, d time.Duration) error {
	buf := make([]byte, 256<<10)
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		if _, err := w.Write(buf); err != nil {
			return fmt.Errorf("feeding mptun: %w", err)
		}
	}
	return nil
}

// mptcpCounters is the nonzero MPTcpExt counters of a namespace, for
// error messages.
func mptcpCounters(ns *lab.NS) string {
	raw, err := ns.ReadProc("netstat")
	if err != nil {
		return err.Error()
	}
	var names []string
	var out []string
	for line := range strings.SplitSeq(string(raw), "\n") {
		rest, ok := strings.CutPrefix(line, "MPTcpExt:")
		if !ok {
			continue
		}
		if names == nil {
			names = strings.Fields(rest)
			continue
		}
		for i, v := range strings.Fields(rest) {
			if v != "0" && i < len(names) {
				out = append(out, names[i]+"="+v)
			}
		}
	}
	return strings.Join(out, " ")
}

// compactStats squeezes mptun's stderr (log lines and the --stats JSON)
// onto few lines for an error message.
func compactStats(stderr string) string {
	if st, err := parseConnectStats(stderr); err == nil {
		b, _ := json.Marshal(st)
		i := strings.Index(stderr, "{\n")
		return lastLines(stderr[:i], 10) + " stats " + string(b)
	}
	return lastLines(stderr, 20)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

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
	dir            string
	started        time.Time // names the daemons' stderr logs
	server, client *daemon
}

// mptunTunnel is the bonding tunnel: `mptun server` (userspace engine on
// every server path interface) as the concentrator and `mptun client
// --route` in the client namespace; iperf3 runs unmodified from the client
// namespace to a dummy address of the server namespace routed into the
// tunnel.
func mptunTunnel(cfg implConfig) Impl {
	t := &tunnel{}
	return Impl{
		Name: "mptun-tunnel",
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
	args := []string{"server", "--listen", srvAddr, "--key-file", keyFile, "--allow-private"}
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
	args = []string{"client", "--server", srvAddr, "--key-file", keyFile, "--route", tunnelWebPrefix,
		"--socket", t.socket()}
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
