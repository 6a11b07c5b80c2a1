package integration

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestBond runs mptun server and mptun client --default-route in the
// namespace topology of bond_helpers_test.go (two 50 Mbit/s uplinks) and
// checks what the bonding tunnel must do: throughput both ways, a flap in
// the middle of a transfer, 200 concurrent short flows, DNS, IPv6, status,
// clean exit.
func TestBond(t *testing.T) {
	b := bondNewTopo(t, 50)
	srv := b.startServer(t)
	cl := b.startClient(t, bondClientOpts{})

	t.Run("upload", func(t *testing.T) {
		c, err := b.dial(t, bondWebV4, bondSinkPort)
		require.NoError(t, err)
		defer c.Close()
		stop := make(chan struct{})
		go bondFlood(c, stop)
		rates := bondSample(b.sinkBytes.Load, time.Second, bondAfter(8*time.Second))
		close(stop)
		// The upload ends when the sink has its last byte: what the app
		// wrote before closing (its socket buffer, stack A's, the
		// connection's send buffer, ~10 MB) still drains for about a
		// second. The download subtest measures idle uplinks, as a
		// download alone does; started during that tail, its slow start
		// met ACKs queued behind the upload and overshot into the tbf
		// queues on both uplinks (a first second at 30-60 Mbit/s).
		drainStart := time.Now()
		c.Close()
		require.Eventually(t, func() bool { return b.sinkOpen.Load() == 0 }, 15*time.Second, 10*time.Millisecond,
			"the upload did not end at the sink")
		t.Logf("upload tail after close: %.2f s", time.Since(drainStart).Seconds())
		// After slow start and subflow joins: the sustained rate (median
		// second) must reach 90 %; the mean may lose a stalled second
		// (seen once in CI: one second at 51 Mbit/s, cause not found yet).
		got, mean := bondMedian(rates[2:]), bondMean(rates[2:])
		t.Logf("upload through the tunnel: median %.1f, mean %.1f Mbit/s (per second: %.1f)", got, mean, rates)
		require.GreaterOrEqual(t, got, 90.0, "upload over 2 x 50 Mbit/s")
		require.GreaterOrEqual(t, mean, 80.0, "upload over 2 x 50 Mbit/s, mean")
	})

	t.Run("download", func(t *testing.T) {
		c, err := b.dial(t, bondWebV4, bondSourcePort)
		require.NoError(t, err)
		defer c.Close()
		var n atomic.Int64
		go bondDrain(c, &n)
		rates := bondSample(n.Load, time.Second, bondAfter(8*time.Second))
		got, mean := bondMedian(rates[2:]), bondMean(rates[2:])
		t.Logf("download through the tunnel: median %.1f, mean %.1f Mbit/s (per second: %.1f)", got, mean, rates)
		require.GreaterOrEqual(t, got, 90.0, "download over 2 x 50 Mbit/s")
		require.GreaterOrEqual(t, mean, 80.0, "download over 2 x 50 Mbit/s, mean")
	})

	t.Run("uplink flap during a 30 s download", func(t *testing.T) {
		c, err := b.dial(t, bondWebV4, bondSourcePort)
		require.NoError(t, err)
		defer c.Close()
		var n atomic.Int64
		go bondDrain(c, &n)
		// Carrier loss on u2: the router's end goes down (the client's
		// uplink stays administratively up, as with a dead modem).
		go func() {
			time.Sleep(10 * time.Second)
			_, _ = b.rtr.Run(t.Context(), "ip", "link", "set", "r2", "down")
			time.Sleep(10 * time.Second)
			_, _ = b.rtr.Run(t.Context(), "ip", "link", "set", "r2", "up")
		}()
		rates := bondSample(n.Load, 500*time.Millisecond, bondAfter(30*time.Second))
		t.Logf("download per 0.5 s, u2 down 10-20 s: %.0f", rates)
		for i, r := range rates {
			require.Greater(t, r, 0.0, "transfer stopped at %.1f s", float64(i+1)/2)
		}
		outage := bondMean(rates[22:40]) // 11-20 s: one uplink left
		require.Greater(t, outage, 0.7*50*0.95, "during the outage: %.1f Mbit/s, want > 70%% of the surviving 50 Mbit/s (less framing)", outage)
		back := bondMean(rates[50:60]) // 25-30 s: within 5 s of the return
		require.Greater(t, back, 80.0, "after the return: %.1f Mbit/s, want > 80%% of 100", back)
		t.Logf("outage %.1f Mbit/s, 5-10 s after return %.1f Mbit/s", outage, back)
	})

	t.Run("200 concurrent short flows", func(t *testing.T) {
		const flows = 200
		var wg sync.WaitGroup
		errs := make(chan error, flows)
		for i := range flows {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs <- bondEcho(b, bondWebV4, 1+rand.IntN(64<<10), uint32(i))
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			require.NoError(t, err)
		}
	})

	t.Run("ipv6 destination", func(t *testing.T) {
		require.NoError(t, bondEcho(b, bondWebV6, 300<<10, 99))
	})

	t.Run("dns over the tunnel", func(t *testing.T) {
		var pc net.Conn
		require.NoError(t, b.cli.Do(func() error {
			var err error
			pc, err = net.Dial("udp", net.JoinHostPort(bondWebV4, fmt.Sprint(bondDNSPort)))
			return err
		}))
		defer pc.Close()
		buf := make([]byte, 512)
		for i := range 3 {
			q := fmt.Sprintf("example.com A %d", i)
			_, err := pc.Write([]byte(q))
			require.NoError(t, err)
			require.NoError(t, pc.SetReadDeadline(time.Now().Add(5*time.Second)))
			m, err := pc.Read(buf)
			require.NoError(t, err)
			require.Equal(t, "re:"+q, string(buf[:m]))
		}
	})

	t.Run("status", func(t *testing.T) {
		st := b.status(t)
		require.Len(t, st.Uplinks, 2)
		for _, u := range st.Uplinks {
			require.True(t, u.Up, "uplink %s", u.Iface)
		}
		require.GreaterOrEqual(t, st.Flows.TCPFlows, uint64(200))
		require.GreaterOrEqual(t, st.Flows.UDPAssociations, uint64(1))
		require.Zero(t, st.Flows.AuthRefused)
		out, err := b.cli.Run(t.Context(), mpiBinary.path(t), "status", "--socket", b.socket())
		require.NoError(t, err)
		require.Contains(t, string(out), "u1")
		require.Contains(t, string(out), "u2")
	})

	t.Run("SIGTERM leaves nothing behind", func(t *testing.T) {
		exited, err := cl.stop(syscall.SIGTERM, 10*time.Second)
		require.True(t, exited, "client did not exit within 10 s of SIGTERM")
		require.NoError(t, err, "client exit status: %s", cl.stderr)
		require.Empty(t, bondLeftovers(t, b.cli))
		exited, err = srv.stop(syscall.SIGTERM, 10*time.Second)
		require.True(t, exited)
		require.NoError(t, err, "server exit status: %s", srv.stderr)
		require.Empty(t, bondLeftovers(t, b.srv))
	})
}

// TestBondWrongKeyGetsNothingThrough: the concentrator refuses a client
// with another key; the app sees refused connections and the client says
// why.
func TestBondWrongKeyGetsNothingThrough(t *testing.T) {
	b := bondNewTopo(t, 0)
	b.startServer(t)
	other := filepath.Join(b.dir, "other.key")
	out, err := b.cli.Run(t.Context(), mpiBinary.path(t), "genkey")
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(other, out, 0o600))
	cl := b.startClient(t, bondClientOpts{keyFile: other})
	for range 3 {
		c, err := b.dial(t, bondWebV4, bondSinkPort)
		if err == nil {
			_, _ = c.Write([]byte("must not arrive"))
			c.Close()
		}
		require.Error(t, err, "connection through the tunnel with a wrong key")
	}
	time.Sleep(200 * time.Millisecond)
	require.Zero(t, b.sinkBytes.Load())
	require.GreaterOrEqual(t, b.status(t).Flows.AuthRefused, uint64(3))
	require.Contains(t, cl.stderr.String(), "concentrator refused our key")
}

// TestBondKillLeavesNothing: a client killed with SIGKILL leaves no device
// (TUNs vanish with the process); the rules it could not remove are removed
// by the next start, whose SIGTERM exit then leaves nothing at all.
func TestBondKillLeavesNothing(t *testing.T) {
	b := bondNewTopo(t, 0)
	srv := b.startServer(t)
	cl := b.startClient(t, bondClientOpts{})
	require.NoError(t, bondEcho(b, bondWebV4, 1000, 1))
	exited, _ := cl.stop(syscall.SIGKILL, 5*time.Second)
	require.True(t, exited)
	require.Eventually(t, func() bool {
		out, err := b.cli.Run(t.Context(), "ip", "-o", "link", "show")
		return err == nil && !bytes.Contains(out, []byte("mpt"))
	}, 5*time.Second, 50*time.Millisecond, "TUN devices outlived the killed client")

	cl = b.startClient(t, bondClientOpts{})
	require.NoError(t, bondEcho(b, bondWebV4, 1000, 2))
	exited, err := cl.stop(syscall.SIGTERM, 10*time.Second)
	require.True(t, exited)
	require.NoError(t, err)
	require.Empty(t, bondLeftovers(t, b.cli))

	exited, _ = srv.stop(syscall.SIGKILL, 5*time.Second)
	require.True(t, exited)
	require.Eventually(t, func() bool {
		out, err := b.srv.Run(t.Context(), "ip", "-o", "link", "show")
		return err == nil && !bytes.Contains(out, []byte("mpt"))
	}, 5*time.Second, 50*time.Millisecond, "TUN devices outlived the killed server")
}

func bondAfter(d time.Duration) <-chan struct{} {
	c := make(chan struct{})
	time.AfterFunc(d, func() { close(c) })
	return c
}

// bondFlood writes to c until stop is closed or a write fails (the write
// deadline ends it after 20 s at the latest).
func bondFlood(c net.Conn, stop <-chan struct{}) {
	buf := make([]byte, 128<<10)
	_ = c.SetWriteDeadline(time.Now().Add(20 * time.Second))
	for {
		select {
		case <-stop:
			return
		default:
		}
		if _, err := c.Write(buf); err != nil {
			return
		}
	}
}

func bondDrain(c net.Conn, n *atomic.Int64) {
	buf := make([]byte, 256<<10)
	for {
		m, err := c.Read(buf)
		n.Add(int64(m))
		if err != nil {
			return
		}
	}
}

// bondEcho asks the web host's echo server for size pattern bytes and checks
// them, with half-close both ways.
func bondEcho(b *bondTopo, addr string, size int, seed uint32) error {
	c, err := b.dial(nil, addr, bondEchoPort)
	if err != nil {
		return fmt.Errorf("dial %s: %w", addr, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(60 * time.Second))
	hdr := [4]byte{byte(size >> 24), byte(size >> 16), byte(size >> 8), byte(size)}
	if _, err := c.Write(hdr[:]); err != nil {
		return fmt.Errorf("request: %w", err)
	}
	got, err := io.ReadAll(c)
	if err != nil {
		return fmt.Errorf("response: %w", err)
	}
	want := make([]byte, size)
	bondPattern(want, hdr)
	if !bytes.Equal(got, want) {
		return fmt.Errorf("flow %d: got %d bytes, want %d identical", seed, len(got), size)
	}
	return c.(*net.TCPConn).CloseWrite()
}
