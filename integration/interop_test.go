package integration

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// mpiTransferCases: a full-size run, and a DSS-checksum run kept smaller
// because it costs a checksum pass per segment on both ends.
var mpiTransferCases = []struct {
	name     string
	size     int64
	checksum bool
}{
	{name: "64MiB", size: 64 << 20},
	{name: "checksum-16MiB", size: 16 << 20, checksum: true},
}

// mpiPeerResult is what the kernel side of a transfer saw.
type mpiPeerResult struct {
	mptcp    bool
	recvSHA  string
	received int64
	sentSHA  string
	// recv is everything received, kept only by mpiExchangeKeep.
	recv []byte
	err  error
}

// mpiExchange sends size bytes of mpiData(seed) on conn (then half-closes)
// while reading everything conn delivers; it returns when both are done.
func mpiExchange(conn *net.TCPConn, seed uint64, size int64) mpiPeerResult {
	return mpiExchangeTo(conn, seed, size, nil, false)
}

// mpiExchangeKeep is mpiExchange that also keeps the received bytes (in
// recv): for small transfers whose content is checked byte by byte.
func mpiExchangeKeep(conn *net.TCPConn, seed uint64, size int64) mpiPeerResult {
	var buf bytes.Buffer
	r := mpiExchangeTo(conn, seed, size, &buf, false)
	r.recv = buf.Bytes()
	return r
}

// mpiNewPeerResult starts a peer's result with whether conn is MPTCP; ok
// is false (r.err set) when the socket cannot tell.
func mpiNewPeerResult(conn *net.TCPConn) (r mpiPeerResult, ok bool) {
	mp, err := conn.MultipathTCP()
	if err != nil {
		r.err = fmt.Errorf("MultipathTCP: %w", err)
		return r, false
	}
	r.mptcp = mp
	return r, true
}

// mpiExchangeTo is mpiExchange copying the received bytes to keep as well
// (nil: hash only). With drain, it half-closes only once the kernel's
// send queue is empty (see mpfSendDrainThenClose).
func mpiExchangeTo(conn *net.TCPConn, seed uint64, size int64, keep io.Writer, drain bool) mpiPeerResult {
	r, ok := mpiNewPeerResult(conn)
	if !ok {
		return r
	}
	sendErr := make(chan error, 1)
	sent := sha256.New()
	go func() {
		_, err := io.CopyN(conn, io.TeeReader(mpiData(seed), sent), size)
		if err == nil && drain {
			err = mpfWaitSendQueueEmpty(conn, 10*time.Second)
		}
		if err == nil {
			err = conn.CloseWrite()
		}
		sendErr <- err
	}()
	recv := sha256.New()
	var dst io.Writer = recv
	if keep != nil {
		dst = io.MultiWriter(recv, keep)
	}
	n, rerr := io.Copy(dst, conn)
	serr := <-sendErr
	r.received, r.recvSHA, r.sentSHA = n, mpiHex(recv), mpiHex(sent)
	if rerr != nil {
		r.err = fmt.Errorf("receive after %d bytes: %w", n, rerr)
	}
	if serr != nil {
		r.err = errors.Join(r.err, fmt.Errorf("send: %w", serr))
	}
	return r
}

// TestInteropConnectToKernel: mptun connect (two uplinks) against a Linux
// MPTCP server, 64 MiB each way at the same time over two 50 Mbit/s paths.
func TestInteropConnectToKernel(t *testing.T) {
	mpiRequireRoot(t)
	for _, tc := range mpiTransferCases {
		t.Run(tc.name, func(t *testing.T) {
			mpiConnectToKernel(t, tc.size, tc.checksum)
		})
	}
}

func mpiConnectToKernel(t *testing.T, size int64, checksum bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 55*time.Second)
	t.Cleanup(cancel)
	tp := mpiNewTopo(t, mpiTopoOpts{rate: "50mbit", srvChecksum: checksum})
	dir := t.TempDir()
	upPath, upSHA := mpiWriteFile(t, dir, 1, size)
	downPath := filepath.Join(dir, "down")

	// The listener stays open for the whole connection: Linux handles
	// MP_JOIN SYNs through it.
	srvRes := mpiKernelServer(ctx, t, tp.srv, true, 2, size, 50*time.Second)

	before := mpiNetstat(t, tp.srv)
	stopSS := mpiWatchSS(tp.srv, net.JoinHostPort(mpiSrvAddr(0), strconv.Itoa(mpiPort)))
	start := time.Now()
	p := mpiStart(ctx, t, tp.cli, upPath, downPath, "connect", "--uplink", "cli0", "--uplink", "cli1", "--stats",
		"--stats-every", "500ms", net.JoinHostPort(mpiSrvAddr(0), strconv.Itoa(mpiPort)))
	err := p.wait(t, 50*time.Second)
	elapsed := time.Since(start)
	ssOut := stopSS()
	if err != nil {
		t.Logf("kernel server MPTcpExt counters that moved: %v", mpiNonZero(mpiDelta(before, mpiNetstat(t, tp.srv))))
	}
	require.NoError(t, err, "mptun connect failed; stderr:\n%s", p.stderr)

	res := mpiPeerWait(t, srvRes)
	require.NoError(t, res.err, "kernel server; mptun stderr:\n%s", p.stderr)
	require.True(t, res.mptcp, "kernel server socket fell back to TCP")
	require.Equal(t, size, res.received)
	require.Equal(t, upSHA, res.recvSHA, "upload corrupted")
	downSHA, downN := mpiFileSHA(t, downPath)
	require.Equal(t, size, downN)
	require.Equal(t, res.sentSHA, downSHA, "download corrupted")

	st := mpiParseStats(t, p.stderr.String())
	require.True(t, st.Conn.MPTCP, "mptun fell back: %+v", st.Conn)
	require.Equal(t, checksum, st.Conn.Checksum, "DSS checksums as the kernel asked")
	require.Len(t, st.Conn.Subflows, 2, "one subflow per uplink: %+v", st.Conn.Subflows)
	mpiRequirePathsCarried(t, st, size, size)
	// --stats-every: live lines for each subflow while it ran.
	for _, sf := range st.Conn.Subflows {
		require.Contains(t, p.stderr.String(), fmt.Sprintf("subflow %v->%v established", sf.Local, sf.Remote),
			"no --stats-every line for %v", sf.Local)
	}

	d := mpiDelta(before, mpiNetstat(t, tp.srv))
	require.GreaterOrEqual(t, d["MPCapableSYNRX"], uint64(1), "%v", d)
	require.GreaterOrEqual(t, d["MPCapableACKRX"], uint64(1), "%v", d)
	require.GreaterOrEqual(t, d["MPJoinSynRx"], uint64(1), "%v", d)
	require.GreaterOrEqual(t, d["MPJoinAckRx"], uint64(1), "%v", d)
	mpiRequireClean(t, "kernel server MPTcpExt", d, mpiKernelBadCounters)
	require.NotEmpty(t, ssOut, "ss -M in %s never listed the connection", tp.srv)
	mpiRequireClean(t, "mptun MIB", st.MIB, mpiEngineBadCounters)

	t.Logf("%d MiB each way in %v (%.1f Mbit/s per direction); subflows %+v; ss -M: %s",
		size>>20, elapsed.Round(time.Millisecond), float64(size*8)/elapsed.Seconds()/1e6,
		st.Conn.Subflows, strings.TrimSpace(ssOut))
}

// TestInteropKernelToListen: a Linux MPTCP client (with a subflow endpoint
// on its second interface) against mptun listen on two uplinks, 64 MiB
// each way; mptun announces its second address with ADD_ADDR.
func TestInteropKernelToListen(t *testing.T) {
	mpiRequireRoot(t)
	for _, tc := range mpiTransferCases {
		t.Run(tc.name, func(t *testing.T) {
			mpiKernelToListen(t, tc.size, tc.size, tc.checksum)
		})
	}
	// mptun's stdin is at EOF: its DATA_FIN is ready at once. Sent then,
	// it moved the Linux client to CLOSE_WAIT before its joins' SYN/ACKs
	// came, and Linux reset both joins (mptcp_finish_join refuses a
	// connection that left ESTABLISHED; MPRstTx 2, MPJoinSynAckRx 0). The
	// DATA_FIN now waits for the joins and the ADD_ADDR echo.
	t.Run("stdin-at-EOF-16MiB", func(t *testing.T) {
		mpiKernelToListen(t, 16<<20, 0, false)
	})
}

// mpiKernelToListen: a kernel client (with a subflow endpoint on its second
// interface) uploads upSize bytes to `mptun listen` on two uplinks, which
// sends downSize bytes from its stdin.
func mpiKernelToListen(t *testing.T, upSize, downSize int64, checksum bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 55*time.Second)
	t.Cleanup(cancel)
	tp := mpiNewTopo(t, mpiTopoOpts{rate: "50mbit", cliChecksum: checksum})
	// The endpoint's subflow (from cli1's address) must reach the server's
	// first address over cli1, not over cli0 where the main table sends it.
	kcRun(t, "ip", "-n", tp.cli, "mptcp", "endpoint", "add", mpiCliAddr(1), "dev", "cli1", "subflow")
	kcRun(t, "ip", "-n", tp.cli, "rule", "add", "from", mpiCliAddr(1), "table", "102")
	kcRun(t, "ip", "-n", tp.cli, "route", "add", mpiSrvAddr(0)+"/32", "dev", "cli1", "table", "102")
	kcRun(t, "ip", "-n", tp.cli, "route", "add", "10.91.2.0/24", "dev", "cli1", "table", "102")

	dir := t.TempDir()
	downPath, downSHA := mpiWriteFile(t, dir, 3, downSize)
	upPath := filepath.Join(dir, "up")
	start := time.Now()
	p := mpiStart(ctx, t, tp.srv, downPath, upPath, "listen", "--uplink", "srv0", "--uplink", "srv1", "--once", "--stats",
		":"+strconv.Itoa(mpiPort))

	dst := net.JoinHostPort(mpiSrvAddr(0), strconv.Itoa(mpiPort))
	conn, before := mpiDialListen(ctx, t, tp.cli, dst, p)
	dialed := time.Since(start)
	require.NoError(t, conn.SetDeadline(time.Now().Add(50*time.Second)))
	stopSS := mpiWatchSS(tp.cli, dst)
	res := mpiExchange(conn.(*net.TCPConn), 4, upSize)
	elapsed := time.Since(start) - dialed
	ssOut := stopSS()
	conn.Close()
	if res.err != nil {
		t.Logf("kernel client MPTcpExt counters that moved: %v", mpiNonZero(mpiDelta(before, mpiNetstat(t, tp.cli))))
	}
	require.NoError(t, res.err, "kernel client; mptun stderr:\n%s", p.stderr)
	require.NoError(t, p.wait(t, 15*time.Second), "mptun listen --once; stderr:\n%s", p.stderr)

	require.True(t, res.mptcp, "kernel client socket fell back to TCP")
	require.Equal(t, downSize, res.received)
	require.Equal(t, downSHA, res.recvSHA, "download (mptun -> kernel) corrupted")
	upSHA, upN := mpiFileSHA(t, upPath)
	require.Equal(t, upSize, upN)
	require.Equal(t, res.sentSHA, upSHA, "upload (kernel -> mptun) corrupted")

	st := mpiParseStats(t, p.stderr.String())
	require.True(t, st.Conn.MPTCP, "mptun fell back: %+v", st.Conn)
	require.Equal(t, checksum, st.Conn.Checksum, "DSS checksums as the kernel asked")
	// Initial subflow, the endpoint's join and the join to the announced
	// address.
	require.GreaterOrEqual(t, len(st.Conn.Subflows), 2, "joins accepted: %+v", st.Conn.Subflows)
	t.Logf("kernel client MPTcpExt counters that moved: %v; mptun MIB: %v", mpiNonZero(mpiDelta(before, mpiNetstat(t, tp.cli))), st.MIB)
	mpiRequirePathsCarried(t, st, downSize, upSize)
	require.GreaterOrEqual(t, st.MIB["AddAddrTX"], uint64(1), "mptun announced its second uplink: %v", st.MIB)

	d := mpiDelta(before, mpiNetstat(t, tp.cli))
	require.GreaterOrEqual(t, d["MPCapableSYNACKRX"], uint64(1), "%v", d)
	require.GreaterOrEqual(t, d["MPJoinSynAckRx"], uint64(1), "%v", d)
	require.GreaterOrEqual(t, d["AddAddr"], uint64(1), "kernel received ADD_ADDR: %v", d)
	mpiRequireClean(t, "kernel client MPTcpExt", d, mpiKernelBadCounters)
	require.NotEmpty(t, ssOut, "ss -M in %s never listed the connection", tp.cli)
	mpiRequireClean(t, "mptun MIB", st.MIB, mpiEngineBadCounters)

	t.Logf("%d MiB up, %d MiB down in %v (%.1f Mbit/s up); subflows %+v; kernel joins %d; ss -M: %s",
		upSize>>20, downSize>>20, elapsed.Round(time.Millisecond), float64(upSize*8)/elapsed.Seconds()/1e6,
		st.Conn.Subflows, d["MPJoinSynAckRx"], strings.TrimSpace(ssOut))
}

// TestInteropFallback: a kernel server without MPTCP; mptun connect must
// fall back to plain TCP and still move the data intact.
func TestInteropFallback(t *testing.T) {
	mpiRequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	t.Cleanup(cancel)
	tp := mpiNewTopo(t, mpiTopoOpts{})
	const size = 4 << 20
	dir := t.TempDir()
	upPath, upSHA := mpiWriteFile(t, dir, 5, size)
	downPath := filepath.Join(dir, "down")

	srvRes := mpiKernelServer(ctx, t, tp.srv, false, 6, size, 30*time.Second)

	before := mpiNetstat(t, tp.srv)
	p := mpiStart(ctx, t, tp.cli, upPath, downPath, "connect", "--uplink", "cli0", "--uplink", "cli1", "--stats",
		net.JoinHostPort(mpiSrvAddr(0), strconv.Itoa(mpiPort)))
	require.NoError(t, p.wait(t, 30*time.Second), "mptun connect; stderr:\n%s", p.stderr)
	res := mpiPeerWait(t, srvRes)
	require.NoError(t, res.err)
	require.False(t, res.mptcp, "the plain TCP listener produced an MPTCP socket")
	require.Equal(t, upSHA, res.recvSHA, "upload corrupted")
	downSHA, downN := mpiFileSHA(t, downPath)
	require.EqualValues(t, size, downN)
	require.Equal(t, res.sentSHA, downSHA, "download corrupted")

	st := mpiParseStats(t, p.stderr.String())
	require.False(t, st.Conn.MPTCP, "mptun claims MPTCP with a plain TCP peer: %+v", st.Conn)
	// The SYN never reached an MPTCP socket in the server namespace.
	d := mpiDelta(before, mpiNetstat(t, tp.srv))
	require.Zero(t, d["MPCapableSYNRX"], "%v", d)
}

// TestInteropErrors: failures leave nothing behind.
func TestInteropErrors(t *testing.T) {
	mpiRequireRoot(t)
	t.Run("unknown-uplink", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		t.Cleanup(cancel)
		tp := mpiNewTopo(t, mpiTopoOpts{})
		before := mpiSnapshot(t, tp.cli)
		p := mpiStart(ctx, t, tp.cli, "", "", "connect", "--uplink", "doesnotexist0", "1.2.3.4:1")
		err := p.wait(t, 20*time.Second)
		ee, ok := mpiExitError(err)
		require.True(t, ok, "want a non-zero exit, got %v; stderr:\n%s", err, p.stderr)
		require.Positive(t, ee.ExitCode(), "exit by itself, not by a signal; stderr:\n%s", p.stderr)
		require.Contains(t, p.stderr.String(), "uplink doesnotexist0", "the message names the uplink")
		require.Equal(t, before, mpiSnapshot(t, tp.cli), "no TUN, rule or nft table left behind")
	})
	t.Run("sigterm-listen", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		t.Cleanup(cancel)
		tp := mpiNewTopo(t, mpiTopoOpts{})
		before := mpiSnapshot(t, tp.srv)
		p := mpiStart(ctx, t, tp.srv, "", "", "listen", "--log-level", "info", "--uplink", "srv0", "--uplink", "srv1",
			":"+strconv.Itoa(mpiPort))
		// Wait until it runs (both uplinks' TUNs ready, so it listens), not
		// just until set-up began: two TUNs, policy rules and our nft table.
		var during mpiState
		require.Eventually(t, func() bool {
			select {
			case <-p.done:
				return true // reported below
			default:
			}
			if strings.Count(p.stderr.String(), `msg="uplink ready" iface=`) < 2 {
				return false
			}
			during = mpiSnapshot(t, tp.srv)
			return strings.Count(during.links, "mpt") == 2 && strings.Contains(during.tables, "mptun_") &&
				during.rules != before.rules
		}, 20*time.Second, 100*time.Millisecond, "stderr:\n%s", p.stderr)
		select {
		case <-p.done:
			require.FailNow(t, "mptun listen exited by itself", "%v; stderr:\n%s", p.err, p.stderr)
		default:
		}
		require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
		err := p.wait(t, 10*time.Second)
		if err != nil {
			ee, ok := mpiExitError(err)
			require.True(t, ok, "%v", err)
			require.NotEqual(t, -1, ee.ExitCode(), "mptun died of the signal instead of handling it; stderr:\n%s", p.stderr)
		}
		after := mpiSnapshot(t, tp.srv)
		require.Equal(t, before, after, "TUNs, rules and nft table removed; while running it was %+v; stderr:\n%s", during, p.stderr)
	})
}
