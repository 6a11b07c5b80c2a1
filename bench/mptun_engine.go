package main

// mptun-engine and mptun-plain: `mptun connect` against a kernel MPTCP
// peer (the mpsink subcommand of this binary).

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/mptun/mptun/lab"
	"github.com/mptun/mptun/mptcpep"
)

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
func mptunEngine(cfg implConfig, plain bool, cc string) Impl {
	return mptunEngineOn(cfg, plain, cc, -1)
}

// mptunEngineOn is mptunEngine over the scenario's path i alone
// ("mptun-p<i>"), or over all of them for i < 0.
func mptunEngineOn(cfg implConfig, plain bool, cc string, path int) Impl {
	name := ccName("mptun-engine", cc)
	switch {
	case plain:
		name = ccName("mptun-plain", cc)
	case path >= 0:
		name = ccName(fmt.Sprintf("mptun-p%d", path), cc)
	}
	return Impl{
		Name:  name,
		Setup: setServerMPTCPLimits,
		Transfer: func(ctx context.Context, env Env) ([]byte, error) {
			return engineTransfer(ctx, env, cfg, plain, cc, path)
		},
	}
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

func engineTransfer(ctx context.Context, env Env, cfg implConfig, plain bool, cc string, path int) ([]byte, error) {
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

	args := append([]string{"connect"}, ccArgs(cc)...)
	if plain {
		args = append(append(args, "--plain"), uplinkArgs(env.Topo, 1)...)
	} else {
		args = append(args, "--stats", "--stats-every", statsEvery)
		if path >= 0 {
			args = append(args, "--uplink", env.Topo.Paths[path].ClientIf)
		} else {
			args = append(args, uplinkArgs(env.Topo, len(env.Topo.Paths))...)
		}
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
