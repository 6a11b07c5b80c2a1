package integration

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	mrand "math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/mptun/mptun/lab"

	"github.com/mptun/mptun/mptcpep"
)

// mpiBuild builds cmd/mptun once per test binary (TestMain removes it).
type mpiBuild struct {
	once sync.Once
	dir  string
	bin  string
	err  error
}

// mpiBinary is the lazily built mptun binary shared by the interop tests;
// building it once keeps the package fast on the shared CPU.
var mpiBinary = &mpiBuild{}

func (b *mpiBuild) path(t *testing.T) string {
	t.Helper()
	b.once.Do(func() {
		b.dir, b.err = os.MkdirTemp("", "mpi-bin-")
		if b.err != nil {
			return
		}
		b.bin = filepath.Join(b.dir, "mptun")
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		out, err := exec.CommandContext(ctx, "go", "build", "-o", b.bin, "github.com/mptun/mptun/cmd/mptun").CombinedOutput()
		if err != nil {
			b.err = fmt.Errorf("go build ./cmd/mptun: %w: %s", err, out)
		}
	})
	require.NoError(t, b.err)
	return b.bin
}

func (b *mpiBuild) remove() {
	if b.dir != "" {
		os.RemoveAll(b.dir)
	}
}

func TestMain(m *testing.M) {
	code := m.Run()
	mpiBinary.remove()
	os.Exit(code)
}

func mpiRequireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces, veths, TUN devices and nftables tables")
	}
}

// mpiOut runs a command and returns its combined output, failing the test
// on error.
func mpiOut(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	require.NoError(t, err, "%s: %s", strings.Join(args, " "), out)
	return string(out)
}

// Addresses of the two paths: path i is cli<i> (10.91.<i+1>.2) <-> srv<i>
// (10.91.<i+1>.1). They only exist inside the test's own namespaces.
func mpiCliAddr(i int) string { return fmt.Sprintf("10.91.%d.2", i+1) }
func mpiSrvAddr(i int) string { return fmt.Sprintf("10.91.%d.1", i+1) }

const mpiPort = 5000

// mpiTopo is a client and a server namespace joined by two veth pairs.
type mpiTopo struct {
	cli, srv string
}

type mpiTopoOpts struct {
	// rate shapes every veth's egress with tbf ("" = unshaped), so one path
	// alone cannot carry the transfer in time and both are needed.
	rate string
	// cliChecksum/srvChecksum set net.mptcp.checksum_enabled in that
	// namespace (the kernel then requires DSS checksums).
	cliChecksum, srvChecksum bool
}

func mpiNewTopo(t *testing.T, o mpiTopoOpts) *mpiTopo {
	t.Helper()
	var rnd [3]byte
	_, err := rand.Read(rnd[:])
	require.NoError(t, err)
	id := hex.EncodeToString(rnd[:])
	tp := &mpiTopo{cli: "mpi-" + id + "-c", srv: "mpi-" + id + "-s"}
	kcNewNetns(t, tp.cli)
	kcNewNetns(t, tp.srv)
	for _, ns := range []struct {
		name string
		csum bool
	}{{tp.cli, o.cliChecksum}, {tp.srv, o.srvChecksum}} {
		csum := "0"
		if ns.csum {
			csum = "1"
		}
		// Subflows of one connection leave and arrive on different veths:
		// reverse-path filtering must not drop them.
		kcRun(t, "ip", "netns", "exec", ns.name, "sysctl", "-q", "-w",
			"net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
			"net.mptcp.enabled=1", "net.mptcp.checksum_enabled="+csum)
		kcRun(t, "ip", "-n", ns.name, "link", "set", "lo", "up")
		kcRun(t, "ip", "-n", ns.name, "mptcp", "limits", "set", "subflows", "4", "add_addr_accepted", "4")
	}
	for i := range 2 {
		c, s := fmt.Sprintf("cli%d", i), fmt.Sprintf("srv%d", i)
		kcRun(t, "ip", "link", "add", c, "netns", tp.cli, "type", "veth", "peer", "name", s, "netns", tp.srv)
		kcRun(t, "ip", "-n", tp.cli, "addr", "add", mpiCliAddr(i)+"/24", "dev", c)
		kcRun(t, "ip", "-n", tp.srv, "addr", "add", mpiSrvAddr(i)+"/24", "dev", s)
		for _, d := range []struct{ ns, dev string }{{tp.cli, c}, {tp.srv, s}} {
			kcRun(t, "ip", "-n", d.ns, "link", "set", d.dev, "up")
			if o.rate != "" {
				kcRun(t, "ip", "netns", "exec", d.ns, "tc", "qdisc", "add", "dev", d.dev, "root",
					"tbf", "rate", o.rate, "burst", "64kb", "latency", "50ms")
			}
		}
	}
	return tp
}

// mpiNetstat reads the MPTcpExt counters of a namespace from
// /proc/net/netstat (not nstat: its shared history file skews deltas).
func mpiNetstat(t *testing.T, ns string) map[string]uint64 {
	t.Helper()
	out := mpiOut(t, "ip", "netns", "exec", ns, "cat", "/proc/net/netstat")
	var names, values []string
	for _, line := range strings.Split(out, "\n") {
		rest, ok := strings.CutPrefix(line, "MPTcpExt:")
		if !ok {
			continue
		}
		if names == nil {
			names = strings.Fields(rest)
		} else {
			values = strings.Fields(rest)
		}
	}
	require.NotEmpty(t, names, "no MPTcpExt line in /proc/net/netstat of %s", ns)
	require.Len(t, values, len(names))
	m := make(map[string]uint64, len(names))
	for i, n := range names {
		v, err := strconv.ParseUint(values[i], 10, 64)
		require.NoError(t, err)
		m[n] = v
	}
	return m
}

// mpiKernelBadCounters are the MPTcpExt counters that count a fallback to
// plain TCP, a protocol error or a refused/failed subflow: all must stay 0
// in a clean interop run. Counters this kernel lacks count as 0.
var mpiKernelBadCounters = []string{
	"MPCapableFallbackACK", "MPCapableFallbackSYNACK", "MPFallbackTokenInit",
	"MPCapableDataFallback", "MD5SigFallback", "DssFallback", "SimultConnectFallback", "FallbackFailed",
	"MPJoinNoTokenFound", "MPJoinSynAckHMacFailure", "MPJoinAckHMacFailure", "MPJoinRejected",
	"MPJoinSynTxCreatSkErr", "MPJoinSynTxBindErr", "MPJoinSynTxConnectErr",
	"DSSNotMatching", "DSSCorruptionFallback", "DSSCorruptionReset", "DSSNoMatchTCP",
	"InfiniteMapTx", "InfiniteMapRx", "DataCsumErr",
	"MPFailTx", "MPFailRx", "AddAddrDrop", "AddAddrTxDrop", "EchoAddTxDrop", "RmAddrDrop",
	"MismatchPortSynRx", "MismatchPortAckRx", "Blackhole",
	// A clean run resets no subflow (a join reset for a control ACK that
	// overtook queued data once went unnoticed: the other subflows
	// carried the data).
	"MPRstTx",
}

// mpiEngineBadCounters are mptun's own MIB counters of the same kind.
var mpiEngineBadCounters = []string{
	"MPCapableFallbackSYN", "MPCapableFallbackACK", "MPCapableBadKey",
	"MPJoinSYNACKHMACFail", "MPJoinACKHMACFail", "MPJoinNoTokenFound",
	"DSSMappingConflict", "DSSNoMapping", "DSSNoMappingTX", "DSSChecksumFail", "DataAckInvalid",
	"AddAddrHMACFail", "MPFailRX", "MPFailTX", "MPFailTimeout", "InfiniteMapTX", "InfiniteMapRX",
	"OptionMalformed", "FallbackConns", "TokenCollisions", "MPRstRX",
}

// mpiDelta is after-before for every counter in after.
func mpiDelta(before, after map[string]uint64) map[string]uint64 {
	d := make(map[string]uint64, len(after))
	for k, v := range after {
		d[k] = v - before[k]
	}
	return d
}

// mpiNonZero keeps the counters that moved, for failure messages.
func mpiNonZero(m map[string]uint64) map[string]uint64 {
	out := map[string]uint64{}
	for k, v := range m {
		if v != 0 {
			out[k] = v
		}
	}
	return out
}

// mpiRequireClean fails with every nonzero "bad" counter at once, so one
// run shows the whole picture.
func mpiRequireClean(t *testing.T, what string, counters map[string]uint64, bad []string) {
	t.Helper()
	nonzero := map[string]uint64{}
	for _, n := range bad {
		if counters[n] != 0 {
			nonzero[n] = counters[n]
		}
	}
	require.Empty(t, nonzero, "%s: fallback/error counters moved (all that moved: %v)", what, mpiNonZero(counters))
}

// mpiData is deterministic pseudo-random content: both ends regenerate or
// hash it without keeping 64 MiB in memory.
func mpiData(seed uint64) io.Reader {
	var s [32]byte
	for i := range s {
		s[i] = byte(seed >> (8 * (i % 8)))
		s[i] ^= byte(i)
	}
	return mrand.NewChaCha8(s)
}

// mpiWriteFile writes n bytes of mpiData(seed) to a file in dir and returns
// its path and SHA-256.
func mpiWriteFile(t *testing.T, dir string, seed uint64, n int64) (string, string) {
	t.Helper()
	path := filepath.Join(dir, fmt.Sprintf("data-%d", seed))
	f, err := os.Create(path)
	require.NoError(t, err)
	defer f.Close()
	h := sha256.New()
	w := bufio.NewWriterSize(io.MultiWriter(f, h), 1<<20)
	_, err = io.CopyN(w, mpiData(seed), n)
	require.NoError(t, err)
	require.NoError(t, w.Flush())
	require.NoError(t, f.Close())
	return path, hex.EncodeToString(h.Sum(nil))
}

func mpiFileSHA(t *testing.T, path string) (string, int64) {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	require.NoError(t, err)
	return hex.EncodeToString(h.Sum(nil)), n
}

func mpiHex(h hash.Hash) string { return hex.EncodeToString(h.Sum(nil)) }

// mpiProc is an mptun process running in a namespace.
type mpiProc struct {
	cmd    *exec.Cmd
	stderr *lab.SyncBuffer
	done   chan struct{}
	err    error // of Wait, valid after done
}

// mpiStart runs mptun in ns via "ip netns exec" (which execs, so the pid is
// mptun's own). stdin/stdout are file paths ("" = /dev/null). The process
// gets SIGTERM when ctx ends or the test is cleaned up, SIGKILL 5 s later.
func mpiStart(ctx context.Context, t *testing.T, ns, stdin, stdout string, args ...string) *mpiProc {
	t.Helper()
	bin := mpiBinary.path(t)
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns, bin}, args...)...)
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 5 * time.Second
	if stdin != "" {
		f, err := os.Open(stdin)
		require.NoError(t, err)
		t.Cleanup(func() { f.Close() })
		cmd.Stdin = f
	}
	if stdout != "" {
		f, err := os.Create(stdout)
		require.NoError(t, err)
		t.Cleanup(func() { f.Close() })
		cmd.Stdout = f
	}
	p := &mpiProc{cmd: cmd, stderr: &lab.SyncBuffer{}, done: make(chan struct{})}
	cmd.Stderr = p.stderr
	require.NoError(t, cmd.Start())
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
			return
		default:
		}
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-p.done
		}
		t.Logf("mptun %v stopped by cleanup; stderr:\n%s", args, p.stderr)
	})
	return p
}

// wait waits up to d for the process to end and returns its Wait error.
func (p *mpiProc) wait(t *testing.T, d time.Duration) error {
	t.Helper()
	select {
	case <-p.done:
		return p.err
	case <-time.After(d):
		// SIGQUIT makes the Go runtime dump every goroutine: the evidence
		// of where it hangs.
		_ = p.cmd.Process.Signal(syscall.SIGQUIT)
		select {
		case <-p.done:
		case <-time.After(3 * time.Second):
		}
		require.FailNow(t, "mptun did not exit in time", "after %v; stderr (goroutine dump at the end):\n%s", d, p.stderr)
		return nil
	}
}

// mpiStats is the JSON that --stats prints to stderr.
type mpiStats struct {
	Conn mptcpep.ConnStats `json:"conn"`
	MIB  map[string]uint64 `json:"mib"`
}

// mpiParseStats finds the stats object among the log lines on stderr.
func mpiParseStats(t *testing.T, stderr string) mpiStats {
	t.Helper()
	i := strings.Index(stderr, "{\n")
	require.GreaterOrEqual(t, i, 0, "no --stats JSON on stderr:\n%s", stderr)
	var s mpiStats
	require.NoError(t, json.NewDecoder(strings.NewReader(stderr[i:])).Decode(&s), "stderr:\n%s", stderr)
	return s
}

// mpiRequirePathsCarried checks that the subflows of each local address
// (one per uplink TUN) together carried at least a tenth of each direction:
// with every veth shaped, both paths were needed.
func mpiRequirePathsCarried(t *testing.T, s mpiStats, sent, received int64) {
	t.Helper()
	type tot struct{ tx, rx uint64 }
	byLocal := map[string]*tot{}
	for _, sf := range s.Conn.Subflows {
		k := sf.Local.Addr().String()
		if byLocal[k] == nil {
			byLocal[k] = &tot{}
		}
		byLocal[k].tx += sf.BytesSent
		byLocal[k].rx += sf.BytesReceived
	}
	require.Len(t, byLocal, 2, "subflows on both uplinks: %+v", s.Conn.Subflows)
	for local, v := range byLocal {
		require.GreaterOrEqual(t, v.tx, uint64(sent/10), "uplink %s sent too little: %+v", local, s.Conn.Subflows)
		require.GreaterOrEqual(t, v.rx, uint64(received/10), "uplink %s received too little: %+v", local, s.Conn.Subflows)
	}
}

// mpiWatchSS polls "ss -MHn" in ns until a line holds want, and returns a
// function that stops polling and reports the matching output ("" = never
// seen).
func mpiWatchSS(ns, want string) func() string {
	stop := make(chan struct{})
	res := make(chan string, 1)
	go func() {
		seen := ""
		defer func() { res <- seen }()
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			out, err := exec.CommandContext(ctx, "ip", "netns", "exec", ns, "ss", "-MHn").CombinedOutput()
			cancel()
			if err == nil && strings.Contains(string(out), want) {
				seen = string(out)
				return
			}
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	}()
	return func() string {
		close(stop)
		return <-res
	}
}

// mpiState is what mptun leaves in a namespace: links, policy rules and
// nftables tables.
type mpiState struct {
	links, rules, tables string
}

func mpiSnapshot(t *testing.T, ns string) mpiState {
	t.Helper()
	var links []string
	for _, l := range strings.Split(strings.TrimSpace(mpiOut(t, "ip", "-n", ns, "-o", "link", "show")), "\n") {
		// "2: name@peer: <...>": keep the name only, counters vary.
		f := strings.Fields(l)
		if len(f) > 1 {
			links = append(links, strings.TrimSuffix(f[1], ":"))
		}
	}
	return mpiState{
		links:  strings.Join(links, " "),
		rules:  mpiOut(t, "ip", "-n", ns, "rule", "show"),
		tables: mpiOut(t, "ip", "netns", "exec", ns, "nft", "list", "tables"),
	}
}

// mpiExitError returns err as an *exec.ExitError, if it is one.
func mpiExitError(err error) (*exec.ExitError, bool) {
	var ee *exec.ExitError
	ok := errors.As(err, &ee)
	return ee, ok
}

// mpiKernelServer listens on mpiPort in namespace ns with the kernel's
// sockets (MPTCP on or off; the listener stays open, since Linux takes
// MP_JOIN SYNs through it), accepts one connection and runs mpiExchange
// with seed and size on it, within deadline. The result arrives on the
// returned channel.
func mpiKernelServer(ctx context.Context, t *testing.T, ns string, mptcp bool, seed uint64, size int64, deadline time.Duration) <-chan mpiPeerResult {
	t.Helper()
	return mpiKernelServerFunc(ctx, t, ns, mptcp, deadline, func(c *net.TCPConn) mpiPeerResult {
		return mpiExchange(c, seed, size)
	})
}

// mpiKernelServerFunc is mpiKernelServer running exchange on the accepted
// connection.
func mpiKernelServerFunc(ctx context.Context, t *testing.T, ns string, mptcp bool, deadline time.Duration,
	exchange func(*net.TCPConn) mpiPeerResult) <-chan mpiPeerResult {
	t.Helper()
	var ln net.Listener
	require.NoError(t, kcInNetns(ns, func() error {
		var lc net.ListenConfig
		// Go enables MPTCP on listeners by default: set it either way.
		lc.SetMultipathTCP(mptcp)
		var err error
		ln, err = lc.Listen(ctx, "tcp4", "0.0.0.0:"+strconv.Itoa(mpiPort))
		return err
	}))
	t.Cleanup(func() { ln.Close() })
	res := make(chan mpiPeerResult, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			res <- mpiPeerResult{err: fmt.Errorf("accept: %w", err)}
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(deadline))
		res <- exchange(c.(*net.TCPConn))
	}()
	return res
}

// mpiPeerWait waits for the kernel peer's result after mptun exited.
func mpiPeerWait(t *testing.T, ch <-chan mpiPeerResult) mpiPeerResult {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(10 * time.Second):
		require.FailNow(t, "kernel peer did not finish after mptun exited")
		return mpiPeerResult{}
	}
}

// mpiDialListen dials dst from namespace ns with a kernel MPTCP socket
// until the mptun listen process p accepts, and returns the connection
// (closed at cleanup) and the MPTcpExt counters of ns taken just before
// the attempt that succeeded, so deltas count that connection only.
func mpiDialListen(ctx context.Context, t *testing.T, ns, dst string, p *mpiProc) (net.Conn, map[string]uint64) {
	t.Helper()
	for {
		before := mpiNetstat(t, ns)
		var conn net.Conn
		err := kcInNetns(ns, func() error {
			d := net.Dialer{Timeout: 2 * time.Second}
			d.SetMultipathTCP(true)
			var err error
			conn, err = d.DialContext(ctx, "tcp4", dst)
			return err
		})
		if err == nil {
			t.Cleanup(func() { conn.Close() })
			return conn, before
		}
		select {
		case <-p.done:
			require.FailNow(t, "mptun listen exited before accepting", "%v; stderr:\n%s", p.err, p.stderr)
		case <-ctx.Done():
			require.FailNow(t, "mptun listen never accepted", "last dial error %v; stderr:\n%s", err, p.stderr)
		case <-time.After(100 * time.Millisecond):
		}
	}
}
