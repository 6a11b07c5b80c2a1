package integration

import (
	"context"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestInteropConnectUplinkFlap: mptun connect over two uplinks to a kernel
// MPTCP server; the second uplink goes administratively down in the middle
// of the transfer and comes back. The transfer must finish intact, mptun
// must withdraw the uplink (REMOVE_ADDR, reinjection) and, once it is back,
// join a new subflow over it that carries data again.
func TestInteropConnectUplinkFlap(t *testing.T) {
	mpiRequireRoot(t)
	const size = 48 << 20
	ctx, cancel := context.WithTimeout(context.Background(), 55*time.Second)
	t.Cleanup(cancel)
	tp := mpiNewTopo(t, mpiTopoOpts{rate: "50mbit"})
	dir := t.TempDir()
	upPath, upSHA := mpiWriteFile(t, dir, 7, size)
	downPath := filepath.Join(dir, "down")

	// Both directions: a Linux server that half-closed (DATA_FIN) no
	// longer accepts joins.
	srvRes := mpiKernelServer(ctx, t, tp.srv, true, 8, size, 50*time.Second)

	before := mpiNetstat(t, tp.srv)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kernel server MPTcpExt counters that moved: %v", mpiNonZero(mpiDelta(before, mpiNetstat(t, tp.srv))))
		}
	})
	p := mpiStart(ctx, t, tp.cli, upPath, downPath, "connect", "--uplink", "cli0", "--uplink", "cli1", "--stats",
		net.JoinHostPort(mpiSrvAddr(0), strconv.Itoa(mpiPort)))
	// 48 MiB at 2 x 50 Mbit/s take about 4 s: flap cli1 from 1.5 s to 3 s.
	time.Sleep(1500 * time.Millisecond)
	mpiOut(t, "ip", "-n", tp.cli, "link", "set", "cli1", "down")
	time.Sleep(1500 * time.Millisecond)
	mpiOut(t, "ip", "-n", tp.cli, "link", "set", "cli1", "up")
	require.NoError(t, p.wait(t, 50*time.Second), "mptun connect failed; stderr:\n%s", p.stderr)

	res := mpiPeerWait(t, srvRes)
	require.NoError(t, res.err)
	require.Equal(t, int64(size), res.received)
	require.Equal(t, upSHA, res.recvSHA, "upload corrupted")
	downSHA, downN := mpiFileSHA(t, downPath)
	require.Equal(t, int64(size), downN)
	require.Equal(t, res.sentSHA, downSHA, "download corrupted")

	st := mpiParseStats(t, p.stderr.String())
	require.True(t, st.Conn.MPTCP)
	require.GreaterOrEqual(t, st.MIB["RemoveAddrTX"], uint64(1), "the downed uplink was withdrawn: %v", st.MIB)
	require.GreaterOrEqual(t, st.MIB["MPJoinEstablished"], uint64(2), "a second join over the returning uplink: %v", st.MIB)
	// A subflow joined over the second uplink after its return carried
	// data (the one before the flap was withdrawn with the removal error;
	// the others may end "closed by peer": the kernel closes its side
	// first at the end).
	var rejoined int64
	withdrawn := 0
	for _, s := range st.Conn.Subflows {
		switch {
		case s.Initial:
		case strings.Contains(s.Error, "local address removed"):
			withdrawn++
		default:
			rejoined += int64(s.BytesSent)
		}
	}
	require.Equal(t, 1, withdrawn, "the subflow over the downed uplink: %+v", st.Conn.Subflows)
	require.Positive(t, rejoined, "the returned uplink carried data again: %+v", st.Conn.Subflows)
	require.Contains(t, p.stderr.String(), "uplink changed")
}
