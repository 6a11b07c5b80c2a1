package client

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestTCPEchoWithHalfClose(t *testing.T) {
	tests := []struct {
		name string
		dest string
		size int
	}{
		{"ipv4 empty", "192.0.2.10:80", 0},
		{"ipv4 1 byte", "192.0.2.10:80", 1},
		{"ipv4 2 MiB", "192.0.2.10:80", 2 << 20},
		{"ipv6 256 KiB", "[2001:db8::10]:443", 256 << 10},
	}
	h := newHarness(t, harnessOpts{})
	echo := startEcho(t)
	for _, tt := range tests {
		h.conc.targets[netip.MustParseAddrPort(tt.dest)] = echo
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			c, err := h.dialApp(ctx, netip.MustParseAddrPort(tt.dest))
			require.NoError(t, err)
			defer c.Close()
			want := make([]byte, tt.size)
			pattern(want, 7)
			errc := make(chan error, 1)
			go func() {
				_, err := c.Write(want)
				if err == nil {
					// Half-close: the echo server sees EOF only if the FIN
					// crossed the tunnel as a DATA_FIN-equivalent.
					err = c.CloseWrite()
				}
				errc <- err
			}()
			got, err := io.ReadAll(c)
			require.NoError(t, err)
			require.NoError(t, <-errc)
			require.True(t, bytes.Equal(want, got), "echo differs: sent %d, got %d bytes", len(want), len(got))
		})
	}
	s := h.client.Stats()
	require.Equal(t, uint64(len(tests)), s.TCPFlows)
	require.GreaterOrEqual(t, s.BytesUp, uint64(2<<20+256<<10+1))
}

func TestTCPRefusedReachesAppAsRST(t *testing.T) {
	tests := []struct {
		name      string
		psk       []byte
		dest      string
		mapped    bool
		wantAuth  uint64
		wantRefus uint64
	}{
		{"unreachable destination", nil, "192.0.2.20:80", false, 0, 1},
		{"wrong key", []byte("another key, 32 bytes long......"), "192.0.2.21:80", true, 1, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, harnessOpts{clientPSK: tt.psk})
			if tt.mapped {
				h.conc.targets[netip.MustParseAddrPort(tt.dest)] = startEcho(t)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			start := time.Now()
			_, err := h.dialApp(ctx, netip.MustParseAddrPort(tt.dest))
			require.Error(t, err)
			require.True(t, isRefused(err), "want connection refused, got %v", err)
			require.Less(t, time.Since(start), 3*time.Second, "refusal must be prompt, not a SYN timeout")
			s := h.client.Stats()
			require.Equal(t, tt.wantAuth, s.AuthRefused)
			require.Equal(t, tt.wantRefus, s.TCPRefused)
			require.Zero(t, s.TCPFlows)
		})
	}
}

func TestConcurrentShortFlows(t *testing.T) {
	const flows = 200
	h := newHarness(t, harnessOpts{})
	dest := netip.MustParseAddrPort("192.0.2.30:8080")
	h.conc.targets[dest] = startEcho(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, flows)
	for i := range flows {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := h.dialApp(ctx, dest)
			if err != nil {
				errs <- fmt.Errorf("flow %d: dial: %w", i, err)
				return
			}
			defer c.Close()
			want := make([]byte, 4096+i*97)
			pattern(want, uint32(i)<<20)
			go func() {
				_, _ = c.Write(want)
				_ = c.CloseWrite()
			}()
			got, err := io.ReadAll(c)
			if err != nil {
				errs <- fmt.Errorf("flow %d: read: %w", i, err)
				return
			}
			if !bytes.Equal(want, got) {
				errs <- fmt.Errorf("flow %d: %d bytes back, want %d identical", i, len(got), len(want))
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	require.Equal(t, uint64(flows), h.client.Stats().TCPFlows)
}

func TestUDPAssociation(t *testing.T) {
	tests := []struct {
		name string
		dest string
		quic QUICPolicy
	}{
		{"dns ipv4", "192.0.2.53:53", QUICReject},
		{"dns ipv6", "[2001:db8::53]:53", QUICReject},
		{"quic carried", "192.0.2.44:443", QUICCarry},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, harnessOpts{quic: tt.quic})
			h.conc.udpTargets[netip.MustParseAddrPort(tt.dest)] = startUDPEcho(t)
			c := h.udpApp(t, netip.MustParseAddrPort(tt.dest))
			buf := make([]byte, 2048)
			for i := range 5 {
				q := []byte(fmt.Sprintf("query %d", i))
				_, err := c.Write(q)
				require.NoError(t, err)
				require.NoError(t, c.SetReadDeadline(time.Now().Add(5*time.Second)))
				n, err := c.Read(buf)
				require.NoError(t, err)
				require.Equal(t, "re:"+string(q), string(buf[:n]))
			}
			s := h.client.Stats()
			require.Equal(t, uint64(1), s.UDPAssociations, "one association per flow")
			require.Equal(t, uint64(1), h.conc.requests.Load())
		})
	}
}

func TestQUICRejectedWithICMP(t *testing.T) {
	h := newHarness(t, harnessOpts{quic: QUICReject})
	dest := netip.MustParseAddrPort("192.0.2.44:443")
	h.conc.udpTargets[dest] = startUDPEcho(t)
	c := h.udpApp(t, dest)
	_, err := c.Write([]byte("initial"))
	require.NoError(t, err)
	// The app's stack must receive the port unreachable (the kernel would
	// then fail the app's next recv with ECONNREFUSED).
	require.Eventually(t, func() bool {
		return h.app.Stats().ICMP.V4.PacketsReceived.DstUnreachable.Value() == 1
	}, 3*time.Second, 10*time.Millisecond, "no ICMP port unreachable reached the app")
	_, err = c.Write([]byte("again"))
	require.Error(t, err)
	require.True(t, isRefused(err), "want the pending ICMP error as connection refused, got %v", err)
	require.Equal(t, uint64(1), h.client.Stats().QUICRejected)
	require.Zero(t, h.conc.requests.Load(), "nothing may reach the concentrator")
}

func TestUDPIdleTimeout(t *testing.T) {
	h := newHarness(t, harnessOpts{udpIdle: 300 * time.Millisecond})
	dest := netip.MustParseAddrPort("192.0.2.53:53")
	h.conc.udpTargets[dest] = startUDPEcho(t)
	c := h.udpApp(t, dest)
	ask := func() {
		_, err := c.Write([]byte("q"))
		require.NoError(t, err)
		require.NoError(t, c.SetReadDeadline(time.Now().Add(5*time.Second)))
		n, err := c.Read(make([]byte, 100))
		require.NoError(t, err)
		require.Equal(t, 4, n)
	}
	ask()
	require.Eventually(t, func() bool { return h.client.Stats().UDPActive == 0 }, 5*time.Second, 20*time.Millisecond)
	// The next datagram opens a fresh association.
	ask()
	require.Equal(t, uint64(2), h.client.Stats().UDPAssociations)
}
