package integration

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/mptun/mptun/lab"
)

// MP_FAIL and the infinite mapping (RFC 8684 3.7) against Linux: one
// subflow, DSS checksums on, one payload byte of one data segment flipped
// on the way (TCP checksum fixed, so only the DSS checksum can see it).
// The connection must survive by falling back to TCP: exact length, the
// flipped byte delivered as TCP got it (the infinite mapping acts
// retroactively; the kernel selftests accept the same), the other
// direction intact.

const (
	// mpfSize is each direction's transfer; the corruption hits the data
	// segment after the first mpfSkip bytes of data segments, early
	// enough that plenty of data follows (Linux sends its infinite
	// mapping only on new data).
	mpfSize = 2 << 20
	mpfSkip = 256 << 10
)

// mpfCorruptOnce makes the ingress of dev in namespace ns flip (XOR 0xff)
// the first payload byte of one TCP segment to port dport: the first data
// segment (longer than 1000 bytes, so no handshake or pure ACK) after skip
// bytes of such segments went by. nftables rewrites the TCP checksum with
// it (a raw payload write at the inner header carries the L4 checksum
// flag), so TCP accepts the segment and only the DSS checksum can catch
// the change. act_pedit/act_csum (the kernel selftests' tool) and netem are
// not built into this kernel; nft's netdev ingress is. The returned
// function reads how many segments were changed.
func mpfCorruptOnce(t *testing.T, ns, dev string, dport, skip int) func() int {
	t.Helper()
	rules := fmt.Sprintf(`table netdev mpi_corrupt {
	chain in {
		type filter hook ingress device %q priority 0; policy accept;
		ip protocol tcp tcp dport %d meta length > 1000 quota over %d bytes limit rate 1/hour burst 1 packets @ih,0,16 set @ih,0,16 ^ 0xff00 counter
	}
}
`, dev, dport, skip)
	f := filepath.Join(t.TempDir(), "corrupt.nft")
	require.NoError(t, os.WriteFile(f, []byte(rules), 0o644))
	mpiOut(t, "ip", "netns", "exec", ns, "nft", "-f", f)
	re := regexp.MustCompile(`counter packets (\d+)`)
	return func() int {
		out := mpiOut(t, "ip", "netns", "exec", ns, "nft", "list", "table", "netdev", "mpi_corrupt")
		m := re.FindStringSubmatch(out)
		require.NotNil(t, m, "no counter in:\n%s", out)
		n, err := strconv.Atoi(m[1])
		require.NoError(t, err)
		return n
	}
}

// mpfSingleSubflow keeps both kernels of tp from opening or accepting any
// additional subflow: MP_FAIL can fall back only on a single subflow.
func mpfSingleSubflow(t *testing.T, tp *mpiTopo) {
	t.Helper()
	for _, ns := range []string{tp.cli, tp.srv} {
		mpiOut(t, "ip", "-n", ns, "mptcp", "limits", "set", "subflows", "0", "add_addr_accepted", "0")
	}
}

// mpfRequireOneFlipped checks that got is size bytes of mpiData(seed) with
// exactly one byte inverted, and returns its offset.
func mpfRequireOneFlipped(t *testing.T, what string, seed uint64, size int, got []byte) int {
	t.Helper()
	require.Equal(t, size, len(got), "%s: length", what) // not Len: it prints the 2 MiB
	want := make([]byte, size)
	_, err := io.ReadFull(mpiData(seed), want)
	require.NoError(t, err)
	var diff []int
	for i := range want {
		if want[i] != got[i] {
			diff = append(diff, i)
		}
	}
	require.Len(t, diff, 1, "%s: want exactly one changed byte, differing offsets (first 10): %v", what, diff[:min(len(diff), 10)])
	i := diff[0]
	require.Equal(t, want[i]^0xff, got[i], "%s: byte %d is the inverted original", what, i)
	return i
}

// TestInteropMPFail: one byte flipped in each case, caught by the DSS
// checksum of the receiver; both directions of MP_FAIL and the infinite
// mapping between mptun and Linux.
func TestInteropMPFail(t *testing.T) {
	mpiRequireRoot(t)
	t.Run("kernel-sends", mpfKernelSends)
	t.Run("mptun-sends", mpfMptunSends)
}

// mpfSetup builds one case: the topology (opts says which kernel checks
// DSS checksums), a single subflow, the one-byte corruption on srv0's
// ingress toward the service port (corrupted counts its hits) and the
// optional capture of srv0 into $MPI_PCAP_DIR/pcap.
func mpfSetup(t *testing.T, opts mpiTopoOpts, pcap string) (ctx context.Context, tp *mpiTopo, corrupted func() int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Second)
	t.Cleanup(cancel)
	tp = mpiNewTopo(t, opts)
	mpfSingleSubflow(t, tp)
	corrupted = mpfCorruptOnce(t, tp.srv, "srv0", mpiPort, mpfSkip)
	mpfCapture(t, tp.srv, "srv0", pcap)
	return ctx, tp, corrupted
}

// mpfKernelSends: a Linux MPTCP client sends to mptun listen and the
// corrupted segment goes to mptun, which sends MP_FAIL; Linux echoes it and
// falls back with an infinite mapping.
func mpfKernelSends(t *testing.T) {
	// Kernel client -> srv0 ingress (before the DNAT to mptun's TUN).
	ctx, tp, corrupted := mpfSetup(t, mpiTopoOpts{cliChecksum: true}, "mpfail-kernel-sends.pcap")

	dir := t.TempDir()
	downPath, downSHA := mpiWriteFile(t, dir, 21, mpfSize)
	upPath := filepath.Join(dir, "up")
	p := mpiStart(ctx, t, tp.srv, downPath, upPath, "listen", "--uplink", "srv0", "--once", "--stats",
		":"+strconv.Itoa(mpiPort))
	conn, before := mpiDialListen(ctx, t, tp.cli, net.JoinHostPort(mpiSrvAddr(0), strconv.Itoa(mpiPort)), p)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kernel client MPTcpExt counters that moved: %v; mptun stderr:\n%s",
				mpiNonZero(mpiDelta(before, mpiNetstat(t, tp.cli))), p.stderr)
		}
	})
	require.NoError(t, conn.SetDeadline(time.Now().Add(20*time.Second)))
	res := mpfSendDrainThenClose(conn.(*net.TCPConn), 22, mpfSize)
	conn.Close()
	require.NoError(t, res.err, "kernel client")
	require.NoError(t, p.wait(t, 15*time.Second), "mptun listen --once")
	require.True(t, res.mptcp, "kernel client socket was MPTCP before the fallback")

	require.Equal(t, 1, corrupted(), "segments corrupted")
	require.EqualValues(t, mpfSize, res.received)
	require.Equal(t, downSHA, res.recvSHA, "mptun -> kernel (not corrupted) changed")
	up, err := os.ReadFile(upPath)
	require.NoError(t, err)
	off := mpfRequireOneFlipped(t, "kernel -> mptun", 22, mpfSize, up)

	st := mpiParseStats(t, p.stderr.String())
	d := mpiDelta(before, mpiNetstat(t, tp.cli))
	t.Logf("flipped byte at stream offset %d; kernel client MPTcpExt moved: %v; mptun MIB: %v; conn: %+v",
		off, mpiNonZero(d), mpiNonZero(st.MIB), st.Conn)
	require.True(t, st.Conn.Checksum, "DSS checksums as the kernel asked")

	// mptun caught it and asked for the fallback.
	require.EqualValues(t, 1, st.MIB["DSSChecksumFail"], "%v", st.MIB)
	require.GreaterOrEqual(t, st.MIB["MPFailTX"], uint64(1), "%v", st.MIB)
	// mptun falls back on Linux's infinite mapping or, when a segment
	// without DSS comes first after its MP_FAIL, on that (RFC 8684 3.7).
	// The second was seen in about one run in eight (DSSNoMapping=1,
	// InfiniteMapRX=0 while Linux counted InfiniteMapTx=1): not explained
	// yet.
	// Linux sends its infinite mapping on its next new data. When all of
	// its data was already sent when our MP_FAIL came (2 MiB fit our
	// window; seen in about 1 run in 5 on a 2-core machine), it sends none
	// and both ends finish with DATA_FINs, the stream intact (checked
	// above) and neither fallen back.
	if d["InfiniteMapTx"] == 0 {
		t.Logf("Linux had no new data after the MP_FAIL: no infinite mapping, no fallback")
		require.Zero(t, st.MIB["FallbackConns"], "%v", st.MIB)
		require.GreaterOrEqual(t, st.MIB["MPFailRX"], uint64(1), "Linux echoed the MP_FAIL: %v", st.MIB)
	} else {
		require.True(t, st.MIB["InfiniteMapRX"] == 1 || st.MIB["DSSNoMapping"] >= 1, "%v", st.MIB)
		if st.MIB["InfiniteMapRX"] == 0 {
			t.Logf("mptun fell back on data without DSS before Linux's infinite mapping arrived")
		}
		require.EqualValues(t, 1, st.MIB["FallbackConns"], "%v", st.MIB)
		require.EqualValues(t, 1, d["InfiniteMapTx"], "%v", d)
	}
	require.Zero(t, st.MIB["MPFailTimeout"], "%v", st.MIB)
	require.Zero(t, st.MIB["MPRstRX"], "%v", st.MIB)
	require.Zero(t, st.MIB["MPRstTX"], "%v", st.MIB)
	// Linux got the MP_FAIL.
	require.GreaterOrEqual(t, d["MPFailRx"], uint64(1), "%v", d)
	require.Zero(t, d["DataCsumErr"], "%v", d)
	require.Zero(t, d["MPRstTx"], "%v", d)
	require.Zero(t, d["MPRstRx"], "%v", d)
}

// mpfSendDrainThenClose is mpiExchangeKeep for a Linux sender that falls
// back mid-stream: it half-closes only once its send queue is empty
// (SIOCOUTQ 0). Linux 6.18 truncated the stream otherwise: with
// shutdown(SHUT_WR) while the fallback after MP_FAIL was under way, it
// sent the infinite mapping on a FIN segment after about 1 of the 2 MiB its
// application had written (tcpdump of mpfail-kernel-sends.pcap with
// MPI_PCAP_DIR set); mptun received exactly what went on the wire.
func mpfSendDrainThenClose(conn *net.TCPConn, seed uint64, size int64) mpiPeerResult {
	var buf bytes.Buffer
	r := mpiExchangeTo(conn, seed, size, &buf, true)
	r.recv = buf.Bytes()
	return r
}

// mpfWaitSendQueueEmpty polls SIOCOUTQ (bytes not yet acknowledged) until
// it is 0 or d has passed.
func mpfWaitSendQueueEmpty(conn *net.TCPConn, d time.Duration) error {
	rc, err := conn.SyscallConn()
	if err != nil {
		return fmt.Errorf("syscall conn: %w", err)
	}
	deadline := time.Now().Add(d)
	for {
		var n int
		var ierr error
		if err := rc.Control(func(fd uintptr) { n, ierr = unix.IoctlGetInt(int(fd), unix.SIOCOUTQ) }); err != nil {
			return fmt.Errorf("control: %w", err)
		}
		if ierr != nil {
			return fmt.Errorf("SIOCOUTQ: %w", ierr)
		}
		if n == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("send queue still holds %d bytes after %v", n, d)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// mpfRespondAfterUpload is the Linux server of mpfMptunSends: it reads the
// whole upload, then sends its own stream and half-closes (see there why).
func mpfRespondAfterUpload(conn *net.TCPConn, seed uint64, size int64) mpiPeerResult {
	r, ok := mpiNewPeerResult(conn)
	if !ok {
		return r
	}
	r.recv = make([]byte, size)
	n, err := io.ReadFull(conn, r.recv)
	r.received = int64(n)
	if err != nil {
		r.err = fmt.Errorf("receive after %d bytes: %w", n, err)
		return r
	}
	sent := sha256.New()
	if _, err := io.CopyN(conn, io.TeeReader(mpiData(seed), sent), size); err != nil {
		r.err = fmt.Errorf("send: %w", err)
		return r
	}
	if err := conn.CloseWrite(); err != nil {
		r.err = fmt.Errorf("close write: %w", err)
		return r
	}
	r.sentSHA = mpiHex(sent)
	rest, err := io.ReadAll(conn)
	r.recv = append(r.recv, rest...)
	r.received += int64(len(rest))
	if err != nil {
		r.err = fmt.Errorf("receive after %d bytes: %w", r.received, err)
	}
	return r
}

// mpfMptunSends: mptun connect sends to a Linux MPTCP server and the
// corrupted segment goes to Linux, which sends MP_FAIL; mptun echoes it and
// falls back with an infinite mapping.
//
// The server answers only after the whole upload (mpfRespondAfterUpload):
// Linux 6.18 loses the end of the stream when its own DATA_FIN went out
// (as a DSS option) before its MP_FAIL. After the fallback it acknowledges
// mptun's TCP FIN, the subflow goes to CLOSE-WAIT, but the fallen-back
// MPTCP socket stays in FIN-WAIT-2 and its reader never sees EOF (ss -M:
// "mptcp FIN-WAIT-2 ... fallback", the subflow "tcp CLOSE-WAIT",
// bytes_received = data + FIN). With both directions at once that
// happened in about one run in three.
func mpfMptunSends(t *testing.T) {
	// mptun's TUN -> SNAT -> cli0 -> srv0 ingress -> kernel server.
	ctx, tp, corrupted := mpfSetup(t, mpiTopoOpts{srvChecksum: true}, "mpfail-mptun-sends.pcap")

	dir := t.TempDir()
	upPath, _ := mpiWriteFile(t, dir, 23, mpfSize)
	downPath := filepath.Join(dir, "down")
	srvRes := mpiKernelServerFunc(ctx, t, tp.srv, true, 20*time.Second, func(c *net.TCPConn) mpiPeerResult {
		return mpfRespondAfterUpload(c, 24, mpfSize)
	})
	before := mpiNetstat(t, tp.srv)
	p := mpiStart(ctx, t, tp.cli, upPath, downPath, "connect", "--uplink", "cli0", "--stats",
		net.JoinHostPort(mpiSrvAddr(0), strconv.Itoa(mpiPort)))
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kernel server MPTcpExt counters that moved: %v; sockets:\n%s\nmptun stderr:\n%s",
				mpiNonZero(mpiDelta(before, mpiNetstat(t, tp.srv))),
				mpiOut(t, "ip", "netns", "exec", tp.srv, "ss", "-tanMie"), p.stderr)
		}
	})
	require.NoError(t, p.wait(t, 20*time.Second), "mptun connect")
	res := mpiPeerWait(t, srvRes)
	require.NoError(t, res.err, "kernel server")
	require.True(t, res.mptcp, "kernel server socket was MPTCP before the fallback")

	require.Equal(t, 1, corrupted(), "segments corrupted")
	off := mpfRequireOneFlipped(t, "mptun -> kernel", 23, mpfSize, res.recv)
	downSHA, downN := mpiFileSHA(t, downPath)
	require.EqualValues(t, mpfSize, downN)
	require.Equal(t, res.sentSHA, downSHA, "kernel -> mptun (not corrupted) changed")

	st := mpiParseStats(t, p.stderr.String())
	d := mpiDelta(before, mpiNetstat(t, tp.srv))
	t.Logf("flipped byte at stream offset %d; kernel server MPTcpExt moved: %v; mptun MIB: %v; conn: %+v",
		off, mpiNonZero(d), mpiNonZero(st.MIB), st.Conn)
	require.True(t, st.Conn.Checksum, "DSS checksums as the kernel asked")

	// Linux caught it and sent MP_FAIL.
	require.GreaterOrEqual(t, d["DataCsumErr"], uint64(1), "%v", d)
	require.GreaterOrEqual(t, d["MPFailTx"], uint64(1), "%v", d)
	// mptun echoed it and sent the infinite mapping, which Linux took.
	require.GreaterOrEqual(t, st.MIB["MPFailRX"], uint64(1), "%v", st.MIB)
	require.EqualValues(t, 1, st.MIB["InfiniteMapTX"], "%v", st.MIB)
	require.EqualValues(t, 1, st.MIB["FallbackConns"], "%v", st.MIB)
	// mptun's echo is a pure ACK of its own: when it arrives after the
	// data segment with the infinite mapping, Linux has fallen back and
	// no longer counts it (MPFailRx=0, seen after rebasing on the new
	// send path).
	if d["MPFailRx"] == 0 {
		t.Logf("Linux did not count mptun's MP_FAIL echo (it came after the infinite mapping)")
	}
	// Linux falls back on our infinite mapping or, when a segment of ours
	// without DSS reaches it first, on that (DssFallback, RFC 8684 3.7
	// allows both; the second in about 1 run in 5 here): the stream is
	// intact either way (checked above). Why a bare segment can still
	// come first is not explained yet: segments before the infinite
	// mapping now keep their own mapping.
	require.True(t, d["InfiniteMapRx"] == 1 || d["DssFallback"] >= 1, "%v", d)
	if d["InfiniteMapRx"] == 0 {
		t.Logf("Linux fell back on data without DSS before our infinite mapping")
	}
	require.Zero(t, st.MIB["DSSChecksumFail"], "%v", st.MIB)
	require.Zero(t, st.MIB["MPFailTimeout"], "%v", st.MIB)
	require.Zero(t, st.MIB["MPRstRX"], "%v", st.MIB)
	require.Zero(t, d["MPRstTx"], "%v", d)
	require.Zero(t, d["MPRstRx"], "%v", d)
}

// mpfCapture runs tcpdump on dev in namespace ns into $MPI_PCAP_DIR/name
// while the test runs, when that variable is set (evidence of what went
// over the wire: `tcpdump -nr FILE -v` shows MP_FAIL and the infinite
// mapping). It returns once tcpdump listens.
func mpfCapture(t *testing.T, ns, dev, name string) {
	t.Helper()
	dir := os.Getenv("MPI_PCAP_DIR")
	if dir == "" {
		return
	}
	path := filepath.Join(dir, name)
	cmd := exec.Command("ip", "netns", "exec", ns, "tcpdump", "-i", dev, "--immediate-mode", "-U", "-s", "200", "-w", path, "tcp")
	stderr := &lab.SyncBuffer{}
	cmd.Stderr = stderr
	require.NoError(t, cmd.Start())
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGINT)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		t.Logf("capture %s: %s", path, strings.TrimSpace(stderr.String()))
	})
	require.Eventually(t, func() bool { return strings.Contains(stderr.String(), "listening on") },
		5*time.Second, 20*time.Millisecond, "tcpdump: %s", stderr)
}
