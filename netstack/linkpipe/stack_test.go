package linkpipe

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

const nicID = 1

var (
	addrA4 = tcpip.AddrFrom4([4]byte{10, 0, 0, 1})
	addrB4 = tcpip.AddrFrom4([4]byte{10, 0, 0, 2})
	addrA6 = tcpip.AddrFrom16([16]byte{0: 0xfd, 15: 1})
	addrB6 = tcpip.AddrFrom16([16]byte{0: 0xfd, 15: 2})
)

// stackPair is two gVisor stacks joined by one link.
type stackPair struct {
	a, b   *stack.Stack
	ea, eb *Endpoint
}

func newStack(t testing.TB, ep *Endpoint, a4, a6 tcpip.Address) *stack.Stack {
	t.Helper()
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol},
	})
	require.Nil(t, s.CreateNIC(nicID, ep))
	for _, pa := range []tcpip.ProtocolAddress{
		{Protocol: ipv4.ProtocolNumber, AddressWithPrefix: tcpip.AddressWithPrefix{Address: a4, PrefixLen: 24}},
		{Protocol: ipv6.ProtocolNumber, AddressWithPrefix: tcpip.AddressWithPrefix{Address: a6, PrefixLen: 64}},
	} {
		require.Nil(t, s.AddProtocolAddress(nicID, pa, stack.AddressProperties{}))
	}
	s.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: nicID},
		{Destination: header.IPv6EmptySubnet, NIC: nicID},
	})
	sack := tcpip.TCPSACKEnabled(true)
	require.Nil(t, s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack))
	// Buffers large enough not to cap the window below the test links' BDP.
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 8 << 20}
	require.Nil(t, s.SetTransportProtocolOption(tcp.ProtocolNumber, &rcv))
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 8 << 20}
	require.Nil(t, s.SetTransportProtocolOption(tcp.ProtocolNumber, &snd))
	return s
}

func newStackPair(t testing.TB, cfg Config) *stackPair {
	t.Helper()
	ea, eb := New(cfg)
	p := &stackPair{ea: ea, eb: eb}
	p.a = newStack(t, ea, addrA4, addrA6)
	p.b = newStack(t, eb, addrB4, addrB6)
	t.Cleanup(func() {
		p.a.Close()
		p.b.Close()
		p.a.Wait()
		p.b.Wait()
		ea.Close()
	})
	return p
}

// listen opens a listener on b, for IPv4 or IPv6, and returns the address
// a dials.
func (p *stackPair) listen(t testing.TB, v6 bool) (*gonet.TCPListener, tcpip.FullAddress, tcpip.NetworkProtocolNumber) {
	t.Helper()
	addr, proto := addrB4, ipv4.ProtocolNumber
	if v6 {
		addr, proto = addrB6, ipv6.ProtocolNumber
	}
	full := tcpip.FullAddress{NIC: nicID, Addr: addr, Port: 5201}
	ln, err := gonet.ListenTCP(p.b, full, proto)
	require.NoError(t, err)
	t.Cleanup(func() { _ = ln.Close() })
	return ln, full, proto
}

func (p *stackPair) dial(t testing.TB, ctx context.Context, to tcpip.FullAddress, proto tcpip.NetworkProtocolNumber) *gonet.TCPConn {
	t.Helper()
	c, err := gonet.DialContextTCP(ctx, p.a, to, proto)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	if d, ok := ctx.Deadline(); ok {
		require.NoError(t, c.SetDeadline(d))
	}
	return c
}

// received is what the sink side of a transfer saw.
type received struct {
	n   int64
	sum [sha256.Size]byte
	err error
}

// sink accepts one connection and hashes everything until EOF. onProgress,
// if set, is called once when half of want bytes have arrived.
func sink(ctx context.Context, ln *gonet.TCPListener, want int64, onHalf func()) <-chan received {
	out := make(chan received, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			out <- received{err: err}
			return
		}
		defer c.Close()
		if d, ok := ctx.Deadline(); ok {
			_ = c.SetDeadline(d)
		}
		h := sha256.New()
		var n int64
		buf := make([]byte, 64<<10)
		half := onHalf != nil
		for {
			k, err := c.Read(buf)
			h.Write(buf[:k])
			n += int64(k)
			if half && n >= want/2 {
				half = false
				onHalf()
			}
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				out <- received{n: n, err: err}
				return
			}
		}
		var r received
		r.n = n
		copy(r.sum[:], h.Sum(nil))
		out <- r
	}()
	return out
}

func payload(size int, seed uint64) []byte {
	b := make([]byte, size)
	r := rand.NewChaCha8([32]byte{byte(seed)})
	_, _ = r.Read(b)
	return b
}

// transfer sends size bytes from a to b over TCP and checks SHA-256
// equality. midway, if set, runs (in the sink goroutine) once half the data
// has arrived.
func transfer(t *testing.T, p *stackPair, v6 bool, size int, timeout time.Duration, midway func()) time.Duration {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	ln, to, proto := p.listen(t, v6)
	got := sink(ctx, ln, int64(size), midway)
	data := payload(size, uint64(size))
	start := time.Now()
	c := p.dial(t, ctx, to, proto)
	_, err := c.Write(data)
	require.NoError(t, err)
	require.NoError(t, c.CloseWrite())
	var r received
	select {
	case r = <-got:
	case <-ctx.Done():
		buf := make([]byte, 1<<20)
		_ = os.WriteFile("/tmp/linkpipe-stacks.txt", buf[:runtime.Stack(buf, true)], 0o644)
		t.Fatalf("transfer timed out: %v", p.ea.Stats())
	}
	elapsed := time.Since(start)
	require.NoError(t, r.err)
	require.Equal(t, int64(size), r.n)
	require.Equal(t, sha256.Sum256(data), r.sum)
	return elapsed
}

func TestTCPTransfer(t *testing.T) {
	t.Parallel()
	const size = 8 << 20
	tests := []struct {
		name string
		v6   bool
		cfg  Config
		// wantLoss requires random losses to have happened.
		wantLoss bool
	}{
		{name: "ideal ipv4"},
		{name: "ideal ipv6", v6: true},
		{name: "delay and jitter", cfg: Config{
			AtoB: Direction{Delay: 5 * time.Millisecond, Jitter: 2 * time.Millisecond},
			BtoA: Direction{Delay: 5 * time.Millisecond, Jitter: 2 * time.Millisecond},
		}},
		{name: "rate limited", v6: true, cfg: Config{
			AtoB: Direction{RateBps: 400_000_000, Delay: time.Millisecond},
			BtoA: Direction{Delay: time.Millisecond},
		}},
		{name: "1% loss both ways", wantLoss: true, cfg: Config{
			AtoB: Direction{Loss: 0.01, Delay: time.Millisecond},
			BtoA: Direction{Loss: 0.01, Delay: time.Millisecond},
			Seed: 3,
		}},
		{name: "1% loss ipv6 jumbo", v6: true, wantLoss: true, cfg: Config{
			MTU:  9000,
			AtoB: Direction{Loss: 0.01},
			BtoA: Direction{Loss: 0.01},
			Seed: 4,
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := newStackPair(t, tc.cfg)
			elapsed := transfer(t, p, tc.v6, size, 30*time.Second, nil)
			st := p.ea.Stats()
			t.Logf("%s: %.0f Mbit/s, a stats %+v", tc.name, float64(size)*8/elapsed.Seconds()/1e6, st)
			require.GreaterOrEqual(t, st.Tx.DeliveredBytes, uint64(size))
			require.Zero(t, st.Tx.DroppedOther+st.Rx.DroppedOther)
			if tc.wantLoss {
				require.Positive(t, st.Tx.DroppedLoss)
			} else {
				require.Zero(t, st.Tx.DroppedLoss+st.Rx.DroppedLoss)
			}
			// No GSO: no packet may exceed the MTU.
			mtu := uint64(p.ea.MTU())
			require.LessOrEqual(t, st.Tx.DeliveredBytes, st.Tx.DeliveredPackets*mtu)
		})
	}
}

func TestRTT(t *testing.T) {
	if testing.Short() {
		t.Skip("seconds of round-trip measurements")
	}
	tests := []struct {
		name   string
		ab, ba time.Duration
	}{
		{name: "1ms each way", ab: time.Millisecond, ba: time.Millisecond},
		{name: "10ms each way", ab: 10 * time.Millisecond, ba: 10 * time.Millisecond},
		{name: "asymmetric 5/25ms", ab: 5 * time.Millisecond, ba: 25 * time.Millisecond},
		{name: "50ms each way", ab: 50 * time.Millisecond, ba: 50 * time.Millisecond},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := newStackPair(t, Config{AtoB: Direction{Delay: tc.ab}, BtoA: Direction{Delay: tc.ba}})
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			t.Cleanup(cancel)
			ln, to, proto := p.listen(t, false)
			go func() {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				_, _ = io.Copy(c, c) // echo until the client closes
			}()
			start := time.Now()
			c := p.dial(t, ctx, to, proto)
			rtt := tc.ab + tc.ba
			// The handshake needs exactly one round trip.
			connect := time.Since(start)
			require.GreaterOrEqual(t, connect, rtt)

			const rounds = 15
			samples := make([]time.Duration, 0, rounds)
			buf := []byte{0}
			for i := range rounds {
				buf[0] = byte(i)
				t0 := time.Now()
				_, err := c.Write(buf)
				require.NoError(t, err)
				_, err = io.ReadFull(c, buf)
				require.NoError(t, err)
				require.Equal(t, byte(i), buf[0])
				samples = append(samples, time.Since(t0))
			}
			slices.Sort(samples)
			median := samples[rounds/2]
			t.Logf("rtt %v: connect %v, min %v, median %v, max %v", rtt, connect, samples[0], median, samples[rounds-1])
			require.GreaterOrEqual(t, samples[0], rtt, "no packet may beat the configured delay")
			// Slack for timer wake-ups on a busy shared machine.
			require.LessOrEqual(t, median, rtt+max(3*time.Millisecond, rtt/10))
		})
	}
}

func TestRate(t *testing.T) {
	if testing.Short() {
		t.Skip("seconds of rate measurements")
	}
	tests := []struct {
		name  string
		rate  int64
		delay time.Duration
		size  int
	}{
		{name: "20 Mbit/s", rate: 20_000_000, delay: 5 * time.Millisecond, size: 3 << 20},
		{name: "100 Mbit/s", rate: 100_000_000, delay: 2 * time.Millisecond, size: 8 << 20},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := newStackPair(t, Config{
				// A queue of ~4 RTTs: tail drops then cost gVisor fast
				// retransmits, not the long retransmission timeouts that a
				// huge burst loss from a deep queue triggers.
				AtoB: Direction{RateBps: tc.rate, Delay: tc.delay, QueueBytes: max(64<<10, int(tc.rate/8*int64(8*tc.delay)/int64(time.Second)))},
				BtoA: Direction{Delay: tc.delay},
			})
			// Measure the second half only, once slow start is over.
			var t1 time.Time
			var b1 uint64
			midway := func() {
				t1 = time.Now()
				b1 = p.eb.Stats().Rx.DeliveredBytes
			}
			transfer(t, p, false, tc.size, 30*time.Second, midway)
			t2 := time.Now()
			b2 := p.eb.Stats().Rx.DeliveredBytes
			got := float64(b2-b1) * 8 / t2.Sub(t1).Seconds()
			t.Logf("set %d bit/s, measured %.0f bit/s (%.1f%%), stats %+v", tc.rate, got, 100*got/float64(tc.rate), p.ea.Stats().Tx)
			// The shaper must never exceed the rate.
			require.LessOrEqual(t, got, float64(tc.rate)*1.02)
			if !raceEnabled {
				require.InEpsilon(t, float64(tc.rate), got, 0.10)
			}
		})
	}
}

func TestOutageAndResume(t *testing.T) {
	t.Parallel()
	const size = 8 << 20
	p := newStackPair(t, Config{
		AtoB: Direction{Delay: 2 * time.Millisecond},
		BtoA: Direction{Delay: 2 * time.Millisecond},
	})
	// With RACK on (gVisor's default), gVisor's TCP sender at this version
	// sometimes never retransmits again after losing its whole window to an
	// outage (link idle, retransmit timer apparently not re-armed; 3 of 6
	// runs stalled > 30 s). That is gVisor's, not the link's: the link
	// showed nothing queued and no packets offered. Classic RTO-based
	// recovery completes reliably, so that is what this test exercises.
	for _, s := range []*stack.Stack{p.a, p.b} {
		rec := tcpip.TCPRecovery(0)
		require.Nil(t, s.SetTransportProtocolOption(tcp.ProtocolNumber, &rec))
	}
	var duringDown [2]Stats
	var outage time.Time
	midway := func() {
		p.eb.SetDown(true)
		outage = time.Now()
		time.Sleep(10 * time.Millisecond)
		duringDown[0] = p.ea.Stats()
		time.Sleep(300 * time.Millisecond)
		duringDown[1] = p.ea.Stats()
		p.ea.SetDown(false)
	}
	transfer(t, p, false, size, 20*time.Second, midway)
	t.Logf("outage to completion: %v", time.Since(outage))
	// Nothing crossed in either direction while the link was down, though
	// TCP kept retransmitting into it.
	require.Equal(t, duringDown[0].Tx.DeliveredPackets, duringDown[1].Tx.DeliveredPackets)
	require.Equal(t, duringDown[0].Rx.DeliveredPackets, duringDown[1].Rx.DeliveredPackets)
	// What was in flight when the link went down was dropped.
	require.Positive(t, duringDown[1].Tx.DroppedDown+duringDown[1].Rx.DroppedDown)
	require.False(t, p.ea.IsDown())
}

// BenchmarkThroughput measures one gVisor TCP flow from a to b through an
// ideal link (no delay, unlimited rate).
func BenchmarkThroughput(b *testing.B) {
	for _, mtu := range []uint32{1500, 9000, 65000} {
		b.Run(fmt.Sprintf("mtu%d", mtu), func(b *testing.B) {
			p := newStackPair(b, Config{MTU: mtu})
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			b.Cleanup(cancel)
			ln, to, proto := p.listen(b, false)
			const chunk = 256 << 10
			got := sink(ctx, ln, 0, nil)
			c := p.dial(b, ctx, to, proto)
			data := bytes.Repeat([]byte{0x5a}, chunk)
			b.SetBytes(chunk)
			b.ResetTimer()
			start := time.Now()
			for range b.N {
				if _, err := c.Write(data); err != nil {
					b.Fatal(err)
				}
			}
			if err := c.CloseWrite(); err != nil {
				b.Fatal(err)
			}
			r := <-got
			elapsed := time.Since(start)
			b.StopTimer()
			if r.err != nil || r.n != int64(b.N)*chunk {
				b.Fatalf("received %d of %d bytes: %v", r.n, int64(b.N)*chunk, r.err)
			}
			b.ReportMetric(float64(r.n)*8/elapsed.Seconds()/1e9, "Gbit/s")
		})
	}
}
