package mptcpep

import (
	"context"
	"io"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mptun/mptun/netstack"
	"github.com/mptun/mptun/netstack/cc"
	"github.com/mptun/mptun/netstack/linkpipe"
	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
)

// TestCongestionControlPerEndpoint: an endpoint's Config.CongestionControl
// reaches every subflow's gVisor sender; the controller reports in the
// subflow stats and counts its events in the MIB. The peer keeps gVisor's
// own controller (no report, no counts).
func TestCongestionControlPerEndpoint(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p := pathSpec{delay: 10 * time.Millisecond, rateBps: 50_000_000, loss: 0.01}
	w := newWorld(t, []pathSpec{p, p}, Config{CongestionControl: "bbr"}, Config{})
	cc, sc := dialAccept(t, ctx, w, 80)
	waitSubflows(t, cc, 2)
	exchange(t, ctx, cc, sc, randomData(16<<20, 31), randomData(256<<10, 32))

	for _, s := range cc.Stats().Subflows {
		require.Equal(t, "bbr", s.CC.Name, "client subflow %v", s.Local)
		require.NotZero(t, s.CC.BtlBw)
		require.NotZero(t, s.CC.MinRTT)
	}
	for _, s := range sc.Stats().Subflows {
		require.Empty(t, s.CC.Name, "server subflow %v runs gVisor's cubic", s.Local)
	}
	m := &w.client.MIB
	require.Positive(t, m.CCStartupExits.Load(), mibString(m))
	require.Positive(t, m.CCLossEvents.Load(), "1 %% loss: %s", mibString(m))
	require.Zero(t, w.server.MIB.CCLossEvents.Load()+w.server.MIB.CCStartupExits.Load(), mibString(&w.server.MIB))
}

// sharedBottleneck runs one MPTCP connection with two subflows (two client
// addresses on one link) beside one plain TCP flow through the same 20
// Mbit/s bottleneck, and returns what each carried per second after a
// warm-up. The plain flow and uncoupled subflows run Reno.
func sharedBottleneck(t *testing.T, subflowCC string, d time.Duration) (mptcp, plain float64) {
	t.Helper()
	checkGoroutines(t)
	cs, err := netstack.New(netstack.Options{CongestionControl: cc.NameReno})
	require.NoError(t, err)
	ss, err := netstack.New(netstack.Options{CongestionControl: cc.NameReno})
	require.NoError(t, err)
	up := linkpipe.Direction{Delay: 10 * time.Millisecond, RateBps: 20_000_000, QueueBytes: 64 << 10}
	a, b := linkpipe.New(linkpipe.Config{MTU: 1500, AtoB: up, BtoA: linkpipe.Direction{Delay: 10 * time.Millisecond}, Seed: 5})
	c1, c2, c3 := netip.MustParseAddr("10.1.0.1"), netip.MustParseAddr("10.1.0.2"), netip.MustParseAddr("10.1.0.3")
	sa := netip.MustParseAddr("10.0.0.2")
	_, err = cs.AddNIC("c0", a, netip.PrefixFrom(c1, 32), netip.PrefixFrom(c2, 32), netip.PrefixFrom(c3, 32))
	require.NoError(t, err)
	_, err = ss.AddNIC("s0", b, netip.PrefixFrom(sa, 32))
	require.NoError(t, err)
	client := New(cs, Config{CongestionControl: subflowCC, Logger: testLogger(t)})
	server := New(ss, Config{Logger: testLogger(t)})
	t.Cleanup(func() {
		client.Close()
		server.Close()
		cs.Close()
		ss.Close()
		a.Close()
		b.Close()
	})
	client.SetLocals([]Local{{Addr: c1, ID: 1}, {Addr: c2, ID: 2}})
	server.SetLocals([]Local{{Addr: sa, ID: 0}})

	ctx, cancel := context.WithTimeout(context.Background(), d+20*time.Second)
	defer cancel()
	l, err := server.Listen(80)
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	conn, err := client.Dial(ctx, netip.AddrPortFrom(sa, 80))
	require.NoError(t, err)
	t.Cleanup(conn.Abort)
	sc, err := l.AcceptMPTCP()
	require.NoError(t, err)
	t.Cleanup(sc.Abort)
	waitSubflows(t, conn, 2)

	pl, err := gonet.ListenTCP(ss.S, tcpip.FullAddress{Port: 81}, ipv4.ProtocolNumber)
	require.NoError(t, err)
	t.Cleanup(func() { pl.Close() })
	pc, err := gonet.DialTCPWithBind(ctx, cs.S, tcpip.FullAddress{Addr: tcpip.AddrFromSlice(c3.AsSlice())},
		tcpip.FullAddress{Addr: tcpip.AddrFromSlice(sa.AsSlice()), Port: 81}, ipv4.ProtocolNumber)
	require.NoError(t, err)
	t.Cleanup(func() { pc.Close() })
	ps, err := pl.Accept()
	require.NoError(t, err)
	t.Cleanup(func() { ps.Close() })

	// Senders write until the end; receivers count.
	var got [2]atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i, pair := range []struct {
		w io.Writer
		r io.Reader
	}{{conn, sc}, {pc, ps}} {
		wg.Add(2)
		go func() {
			defer wg.Done()
			buf := make([]byte, 32<<10)
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := pair.w.Write(buf); err != nil {
					return
				}
			}
		}()
		go func() {
			defer wg.Done()
			buf := make([]byte, 64<<10)
			for {
				n, err := pair.r.Read(buf)
				got[i].Add(int64(n))
				if err != nil {
					return
				}
			}
		}()
	}
	warm := d / 3
	time.Sleep(warm)
	m0, p0 := got[0].Load(), got[1].Load()
	time.Sleep(d - warm)
	m1, p1 := got[0].Load(), got[1].Load()
	close(stop)
	conn.Abort()
	sc.Abort()
	pc.Close()
	ps.Close()
	wg.Wait()
	secs := (d - warm).Seconds()
	return float64(m1-m0) * 8 / secs / 1e6, float64(p1-p0) * 8 / secs / 1e6
}

// TestCoupledSharedBottleneck is RFC 6356's goal: at a bottleneck shared
// with one TCP flow, a connection whose subflows run LIA takes no more than
// that flow's share (0.47-0.71 of its rate seen), where uncoupled (Reno)
// subflows take more (1.14-1.71).
func TestCoupledSharedBottleneck(t *testing.T) {
	if testing.Short() {
		t.Skip("two 12 s transfers")
	}
	res := map[string][2]float64{}
	for _, name := range []string{cc.NameLIA, cc.NameReno} {
		m, p := sharedBottleneck(t, name, 12*time.Second)
		t.Logf("subflows %s: mptcp %.1f Mbit/s, tcp %.1f Mbit/s, ratio %.2f", name, m, p, m/p)
		res[name] = [2]float64{m, p}
	}
	lia, reno := res[cc.NameLIA], res[cc.NameReno]
	require.Less(t, lia[0]/lia[1], 1.3, "lia took more than the single flow's share")
	// Uncoupled subflows take more than lia's share by far (2.2-2.5x in
	// runs where their own ratio to the TCP flow varied from 1.14 under CI
	// load to 1.71): otherwise the test could not tell coupling apart.
	require.Greater(t, reno[0]/reno[1], 1.5*lia[0]/lia[1], "uncoupled subflows did not take more: the test cannot tell")
	require.Greater(t, lia[0]+lia[1], 15.0, "the bottleneck was not used")
}

// TestBBRHeterogeneousPaths: Wi-Fi (40 Mbit/s, 10 ms RTT) and LTE (20
// Mbit/s, 80 ms) with BBR subflows. Startup's overshoot fills the LTE
// queue; unless the loss with a queue ends Startup, it ran into RTOs that
// resent whole 2-BDP windows (3 RTOs, 2564 retransmissions, 40 Mbit/s
// against CUBIC's 48; with the exit 0 RTOs in 4 runs of 6 and 1 in the
// others, ~400 retransmissions, 50-51 Mbit/s). The RTO left is gVisor's
// 200 ms minimum against an RTT that the filling queue took from 80 to
// ~180 ms.
func TestBBRHeterogeneousPaths(t *testing.T) {
	if testing.Short() {
		t.Skip("a 24 MiB transfer over 60 Mbit/s")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	paths := []pathSpec{{delay: 5 * time.Millisecond, rateBps: 40_000_000}, {delay: 40 * time.Millisecond, rateBps: 20_000_000}}
	w := newWorld(t, paths, Config{CongestionControl: cc.NameBBR}, Config{})
	c, s := dialAccept(t, ctx, w, 80)
	waitSubflows(t, c, 2)
	exchange(t, ctx, c, s, randomData(24<<20, 41), randomData(1<<10, 42))
	rtos := uint64(0)
	for _, sf := range c.Stats().Subflows {
		rtos += sf.CC.RTOs
	}
	require.LessOrEqual(t, rtos, uint64(1), summary(c))
	require.Positive(t, w.client.MIB.CCStartupExits.Load())
}
