package server

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"

	"github.com/mptun/mptun/bond/convert"
	"github.com/mptun/mptun/mptcpep"
)

func TestTCPFlowBothWaysWithHalfClose(t *testing.T) {
	w := newWorld(t, Config{})
	for _, dest := range []netip.Addr{destAddr, destAddr6} {
		t.Run(dest.String(), func(t *testing.T) {
			c, err := w.open(t, w.psk, convert.KindTCP, netip.AddrPortFrom(dest, echoPort))
			require.NoError(t, err)
			require.True(t, c.MultipathTCP())
			up := pattern(1 << 20)
			_, err = c.Write(up)
			require.NoError(t, err)
			require.NoError(t, c.CloseWrite())
			require.NoError(t, c.SetReadDeadline(time.Now().Add(20*time.Second)))
			got, err := io.ReadAll(c)
			require.NoError(t, err)
			sum := sha256.Sum256(up)
			require.Equal(t, sum[:], got[:32], "upload arrived intact (destination's digest)")
			require.True(t, bytes.Equal(pattern(downSize), got[32:]), "download intact: %d bytes", len(got)-32)
		})
	}
	eventually(t, func() bool { return w.server.M.Active.Load() == 0 }, "flows end")
	require.EqualValues(t, 2, w.server.M.TCPFlows.Load())
	require.EqualValues(t, 2<<20, w.server.M.BytesUp.Load())
	require.EqualValues(t, 2*(32+downSize), w.server.M.BytesDown.Load())
	require.Zero(t, w.server.M.AuthFailures.Load())
}

func TestRefusals(t *testing.T) {
	w := newWorld(t, Config{})
	other := []byte("another key, not the server's one")
	tests := []struct {
		name string
		psk  []byte // nil: no Auth TLV
		dest netip.AddrPort
		code convert.ErrorCode
		auth uint64 // AuthFailures afterwards
		ref  uint64 // RefusedDestinations afterwards
	}{
		{"wrong key", other, netip.AddrPortFrom(destAddr, echoPort), convert.ErrNotAuthorized, 1, 0},
		{"missing auth", nil, netip.AddrPortFrom(destAddr, echoPort), convert.ErrNotAuthorized, 2, 0},
		{"loopback", w.psk, netip.MustParseAddrPort("127.0.0.1:22"), convert.ErrNotAuthorized, 2, 1},
		{"loopback v6", w.psk, netip.MustParseAddrPort("[::1]:22"), convert.ErrNotAuthorized, 2, 2},
		{"link-local", w.psk, netip.MustParseAddrPort("169.254.169.254:80"), convert.ErrNotAuthorized, 2, 3},
		{"link-local v6", w.psk, netip.MustParseAddrPort("[fe80::1]:80"), convert.ErrNotAuthorized, 2, 4},
		{"own address", w.psk, netip.AddrPortFrom(serverAddr, 22), convert.ErrNotAuthorized, 2, 5},
		{"own egress address", w.psk, netip.AddrPortFrom(egressAddr, 22), convert.ErrNotAuthorized, 2, 6},
		{"port 0", w.psk, netip.AddrPortFrom(destAddr, 0), convert.ErrNotAuthorized, 2, 7},
		{"connection refused", w.psk, netip.AddrPortFrom(destAddr, 9), convert.ErrConnectionReset, 2, 7},
		{"unreachable", w.psk, netip.MustParseAddrPort("10.250.0.1:80"), convert.ErrDestinationUnreachable, 2, 7},
		{"timed out", w.psk, netip.MustParseAddrPort("10.200.0.77:80"), convert.ErrConnectionTimedOut, 2, 7},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := w.open(t, tt.psk, convert.KindTCP, tt.dest)
			requireCode(t, err, tt.code)
			// The server closes after the error: nothing else arrives.
			require.NoError(t, c.SetReadDeadline(time.Now().Add(5*time.Second)))
			n, err := io.Copy(io.Discard, c)
			require.Zero(t, n)
			require.NoError(t, err)
			require.Equal(t, tt.auth, w.server.M.AuthFailures.Load())
			require.Equal(t, tt.ref, w.server.M.RefusedDestinations.Load())
		})
	}
	require.Zero(t, w.dstConn.Load(), "no refused request reached the destination")
	require.EqualValues(t, 3, w.server.M.DialFailures.Load())
}

func TestAllowPrivate(t *testing.T) {
	// Pretend the destination is one of the server's own addresses.
	own := func() []netip.Addr { return []netip.Addr{destAddr} }
	for _, allow := range []bool{false, true} {
		w := newWorld(t, Config{AllowPrivate: allow, OwnAddrs: own})
		c, err := w.open(t, w.psk, convert.KindTCP, netip.AddrPortFrom(destAddr, echoPort))
		if !allow {
			requireCode(t, err, convert.ErrNotAuthorized)
			require.EqualValues(t, 1, w.server.M.RefusedDestinations.Load())
			continue
		}
		require.NoError(t, err)
		require.NoError(t, c.CloseWrite())
		got, err := io.ReadAll(c)
		require.NoError(t, err)
		require.Len(t, got, 32+downSize)
		require.Zero(t, w.server.M.RefusedDestinations.Load())
	}
}

func TestReplayOnAnotherConnectionRefused(t *testing.T) {
	w := newWorld(t, Config{})
	// A tag computed for one connection's keys does not open another.
	first, err := w.open(t, w.psk, convert.KindTCP, netip.AddrPortFrom(destAddr, echoPort))
	require.NoError(t, err)
	lk, rk := first.Keys()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := w.client.Dial(ctx, netip.AddrPortFrom(serverAddr, listenPort))
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	req := convert.Request{HasAuth: true, Auth: convert.AuthTag(w.psk, lk, rk), Kind: convert.KindTCP, Dest: netip.AddrPortFrom(destAddr, echoPort)}
	require.NoError(t, convert.WriteRequest(c, req))
	requireCode(t, convert.ReadReply(c), convert.ErrNotAuthorized)
	require.EqualValues(t, 1, w.server.M.AuthFailures.Load())
}

// plainDial opens a plain-TCP (no MPTCP option) connection from the client
// stack and sends a request authenticated over zero keys.
func (w *world) plainDial(t *testing.T) (net.Conn, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := gonet.DialContextTCP(ctx, w.cstack.S, tcpip.FullAddress{Addr: tcpip.AddrFrom4(serverAddr.As4()), Port: listenPort}, ipv4.ProtocolNumber)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	req := convert.Request{HasAuth: true, Auth: convert.AuthTag(w.psk, 0, 0), Kind: convert.KindTCP, Dest: netip.AddrPortFrom(destAddr, echoPort)}
	require.NoError(t, convert.WriteRequest(c, req))
	require.NoError(t, c.SetReadDeadline(time.Now().Add(10*time.Second)))
	return c, convert.ReadReply(c)
}

func TestUnboundAuthentication(t *testing.T) {
	t.Run("zero-key tag on an MPTCP connection", func(t *testing.T) {
		w := newWorld(t, Config{AllowUnbound: true})
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := w.client.Dial(ctx, netip.AddrPortFrom(serverAddr, listenPort))
		require.NoError(t, err)
		t.Cleanup(func() { c.Close() })
		req := convert.Request{HasAuth: true, Auth: convert.AuthTag(w.psk, 0, 0), Kind: convert.KindTCP, Dest: netip.AddrPortFrom(destAddr, echoPort)}
		require.NoError(t, convert.WriteRequest(c, req))
		requireCode(t, convert.ReadReply(c), convert.ErrNotAuthorized)
	})
	t.Run("plain TCP refused by default", func(t *testing.T) {
		w := newWorld(t, Config{})
		_, err := w.plainDial(t)
		requireCode(t, err, convert.ErrNotAuthorized)
		require.EqualValues(t, 1, w.server.M.AuthFailures.Load())
		require.Zero(t, w.dstConn.Load())
	})
	t.Run("plain TCP allowed with AllowUnbound", func(t *testing.T) {
		w := newWorld(t, Config{AllowUnbound: true})
		c, err := w.plainDial(t)
		require.NoError(t, err)
		require.NoError(t, c.(*gonet.TCPConn).CloseWrite())
		got, err := io.ReadAll(c)
		require.NoError(t, err)
		require.Len(t, got, 32+downSize)
		require.EqualValues(t, 1, w.srvEP.MIB.Snapshot()["FallbackConns"])
	})
}

func TestMalformedAndSlowRequests(t *testing.T) {
	w := newWorld(t, Config{RequestTimeout: 300 * time.Millisecond})
	dial := func() *mptcpep.Conn {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := w.client.Dial(ctx, netip.AddrPortFrom(serverAddr, listenPort))
		require.NoError(t, err)
		t.Cleanup(func() { c.Close() })
		require.NoError(t, c.SetReadDeadline(time.Now().Add(10*time.Second)))
		return c
	}
	c := dial()
	_, err := c.Write([]byte{1, 2, 0, 0, 10, 0, 0, 0})
	require.NoError(t, err)
	requireCode(t, convert.ReadReply(c), convert.ErrMalformed)

	c = dial()
	_, err = c.Write([]byte{2, 1, 0, 0})
	require.NoError(t, err)
	requireCode(t, convert.ReadReply(c), convert.ErrUnsupported)

	// A client that sends half a request and stalls is cut off.
	c = dial()
	_, err = c.Write([]byte{1, 11, 0, 0})
	require.NoError(t, err)
	start := time.Now()
	_, err = io.ReadAll(c)
	require.Less(t, time.Since(start), 5*time.Second)
	var ne net.Error
	require.False(t, errors.As(err, &ne) && ne.Timeout(), "server closed it before our deadline: %v", err)
	eventually(t, func() bool { return w.server.M.BadRequests.Load() == 3 }, "three bad requests")
	eventually(t, func() bool { return w.server.M.Active.Load() == 0 }, "all released")
}

func TestUDPAssociation(t *testing.T) {
	w := newWorld(t, Config{UDPIdle: 400 * time.Millisecond})
	for _, dest := range []netip.Addr{destAddr, destAddr6} {
		t.Run(dest.String(), func(t *testing.T) {
			c, err := w.open(t, w.psk, convert.KindUDP, netip.AddrPortFrom(dest, udpPort))
			require.NoError(t, err)
			require.NoError(t, c.SetReadDeadline(time.Now().Add(10*time.Second)))
			buf := make([]byte, convert.MaxDatagram)
			for _, p := range []string{"query one", "", strings.Repeat("x", 1400)} {
				require.NoError(t, convert.WriteDatagram(c, []byte(p)))
				n, err := convert.ReadDatagram(c, buf)
				require.NoError(t, err)
				require.Equal(t, "echo:"+p, string(buf[:n]))
			}
			// Idle: the server ends the association by itself.
			start := time.Now()
			_, err = convert.ReadDatagram(c, buf)
			require.ErrorIs(t, err, io.EOF)
			require.Less(t, time.Since(start), 3*time.Second)
		})
	}
	require.EqualValues(t, 2, w.server.M.UDPAssociations.Load())
	require.EqualValues(t, 6, w.server.M.UDPDatagramsUp.Load())
	require.EqualValues(t, 6, w.server.M.UDPDatagramsDown.Load())
	require.EqualValues(t, 2, w.server.M.IdleClosed.Load())
}

func TestTCPIdleTimeout(t *testing.T) {
	w := newWorld(t, Config{TCPIdle: 300 * time.Millisecond})
	c, err := w.open(t, w.psk, convert.KindTCP, netip.AddrPortFrom(destAddr, echoPort))
	require.NoError(t, err)
	// Activity keeps it open past the idle time.
	for range 4 {
		_, err := c.Write([]byte("keepalive"))
		require.NoError(t, err)
		time.Sleep(120 * time.Millisecond)
	}
	require.Zero(t, w.server.M.IdleClosed.Load())
	eventually(t, func() bool { return w.server.M.IdleClosed.Load() == 1 }, "silent flow closed")
	eventually(t, func() bool { return w.server.M.Active.Load() == 0 }, "no active connection")
}

func TestPerClientLimit(t *testing.T) {
	w := newWorld(t, Config{MaxConnsPerClient: 2})
	dest := netip.AddrPortFrom(destAddr, echoPort)
	a, err := w.open(t, w.psk, convert.KindTCP, dest)
	require.NoError(t, err)
	_, err = w.open(t, w.psk, convert.KindTCP, dest)
	require.NoError(t, err)
	_, err = w.open(t, w.psk, convert.KindTCP, dest)
	requireCode(t, err, convert.ErrResourceExceeded)
	require.EqualValues(t, 1, w.server.M.LimitRejected.Load())
	require.EqualValues(t, 2, w.server.M.Active.Load())
	// Ending one flow frees its slot.
	require.NoError(t, a.CloseWrite())
	_, err = io.ReadAll(a)
	require.NoError(t, err)
	eventually(t, func() bool { return w.server.M.Active.Load() == 1 }, "slot freed")
	_, err = w.open(t, w.psk, convert.KindTCP, dest)
	require.NoError(t, err)
}

func TestMetricsExposition(t *testing.T) {
	w := newWorld(t, Config{})
	_, err := w.open(t, []byte("bad"), convert.KindTCP, netip.AddrPortFrom(destAddr, echoPort))
	requireCode(t, err, convert.ErrNotAuthorized)
	var b bytes.Buffer
	require.NoError(t, w.server.WriteMetrics(&b, w.srvEP.MIB.Snapshot()))
	out := b.String()
	require.Contains(t, out, "# TYPE mptun_server_auth_failures_total counter\nmptun_server_auth_failures_total 1\n")
	require.Contains(t, out, "# TYPE mptun_server_active_connections gauge\n")
	require.Contains(t, out, `mptun_mptcp_mib_total{counter="MPCapableSYNRX"} 1`)
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		require.Len(t, f, 2, "sample line %q", line)
	}
}

func TestErrorCodeFor(t *testing.T) {
	tests := []struct {
		err  error
		code convert.ErrorCode
	}{
		{&net.OpError{Op: "dial", Err: syscall.ECONNREFUSED}, convert.ErrConnectionReset},
		{syscall.EHOSTUNREACH, convert.ErrDestinationUnreachable},
		{syscall.ENETUNREACH, convert.ErrDestinationUnreachable},
		{context.DeadlineExceeded, convert.ErrConnectionTimedOut},
		{&net.OpError{Op: "dial", Err: timeoutErr{}}, convert.ErrConnectionTimedOut},
		{syscall.EMFILE, convert.ErrResourceExceeded},
		{errors.New("something else"), convert.ErrNetworkFailure},
	}
	for _, tt := range tests {
		require.Equal(t, tt.code, ErrorCodeFor(tt.err), "%v", tt.err)
	}
}

type timeoutErr struct{}

func (timeoutErr) Error() string   { return "i/o timeout" }
func (timeoutErr) Timeout() bool   { return true }
func (timeoutErr) Temporary() bool { return true }

func TestHostDialLoopback(t *testing.T) {
	// HostDial against the kernel's loopback: data flows and a closed port
	// maps to the reset code.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err == nil {
			_, _ = c.Write([]byte("hi"))
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := HostDial(ctx, "tcp", netip.MustParseAddrPort(ln.Addr().String()))
	require.NoError(t, err)
	got, err := io.ReadAll(c)
	require.NoError(t, err)
	require.Equal(t, "hi", string(got))
	c.Close()
	addr := ln.Addr().String()
	ln.Close()
	_, err = HostDial(ctx, "tcp", netip.MustParseAddrPort(addr))
	require.Equal(t, convert.ErrConnectionReset, ErrorCodeFor(err))
}
