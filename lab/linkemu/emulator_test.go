package linkemu_test

import (
	"context"
	"encoding/binary"
	"errors"
	"math"
	"net"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/mptun/mptun/lab"
	"github.com/mptun/mptun/lab/linkemu"
	"github.com/stretchr/testify/require"
)

// newTopo builds a one-path client/server topology through the emulator.
func newTopo(t *testing.T, p lab.Path) *lab.Topology {
	t.Helper()
	lab.NeedRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	topo, err := lab.New(ctx, lab.Spec{Prefix: "mtl", Paths: []lab.Path{p}})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, topo.Close()) })
	return topo
}

// udpPair returns a server socket (in the server namespace) and a client
// socket connected to it over path 0.
func udpPair(t *testing.T, topo *lab.Topology) (srv *net.UDPConn, cli *net.UDPConn) {
	t.Helper()
	p := topo.Paths[0]
	require.NoError(t, topo.Server.Do(func() error {
		var err error
		srv, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(p.ServerAddr, 0)))
		return err
	}))
	t.Cleanup(func() { srv.Close() })
	require.NoError(t, srv.SetReadBuffer(8<<20))
	require.NoError(t, topo.Client.Do(func() error {
		var err error
		cli, err = net.DialUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(p.ClientAddr, 0)), srv.LocalAddr().(*net.UDPAddr))
		return err
	}))
	t.Cleanup(func() { cli.Close() })
	require.NoError(t, cli.SetReadBuffer(8<<20))
	return srv, cli
}

// echo reflects datagrams until the socket is closed.
func echo(t *testing.T, c *net.UDPConn) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 2048)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			_, _ = c.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	t.Cleanup(func() { c.Close(); wg.Wait() })
}

func TestRTTIsTwiceDelay(t *testing.T) {
	tests := []struct {
		delay time.Duration
	}{{0}, {5 * time.Millisecond}, {25 * time.Millisecond}}
	for _, tc := range tests {
		t.Run(tc.delay.String(), func(t *testing.T) {
			topo := newTopo(t, lab.Path{Delay: tc.delay})
			srv, cli := udpPair(t, topo)
			echo(t, srv)
			buf := make([]byte, 64)
			var rtts []time.Duration
			for i := range 30 {
				binary.BigEndian.PutUint32(buf, uint32(i))
				start := time.Now()
				_, err := cli.Write(buf)
				require.NoError(t, err)
				require.NoError(t, cli.SetReadDeadline(time.Now().Add(2*time.Second)))
				_, err = cli.Read(buf)
				require.NoError(t, err, "probe %d (the first one also resolves ARP)", i)
				if i > 0 {
					rtts = append(rtts, time.Since(start))
				}
			}
			slices.Sort(rtts)
			median := rtts[len(rtts)/2]
			t.Logf("delay %v: rtt min %v median %v max %v", tc.delay, rtts[0], median, rtts[len(rtts)-1])
			// Scheduling noise of a loaded machine only adds: the minimum is
			// the emulator's RTT, the median a sanity check.
			require.GreaterOrEqual(t, rtts[0], 2*tc.delay)
			require.Less(t, rtts[0], 2*tc.delay+time.Millisecond)
			require.Less(t, median, 2*tc.delay+5*time.Millisecond)
		})
	}
}

// blast sends size-byte datagrams at roughly rate bit/s for d, numbering
// them and stamping their send time; it returns the send times.
func blast(ctx context.Context, cli *net.UDPConn, size int, rate float64, d time.Duration) ([]time.Duration, error) {
	buf := make([]byte, size)
	start := time.Now()
	var sent []time.Duration
	for time.Since(start) < d && ctx.Err() == nil {
		due := int(time.Since(start).Seconds()*rate/8/float64(size)) + 1
		for len(sent) < due {
			at := time.Since(start)
			binary.BigEndian.PutUint32(buf, uint32(len(sent)))
			binary.BigEndian.PutUint64(buf[4:], uint64(at))
			if _, err := cli.Write(buf); err != nil && !errors.Is(err, net.ErrClosed) {
				return sent, err
			}
			sent = append(sent, at)
		}
		time.Sleep(500 * time.Microsecond)
	}
	return sent, nil
}

type rx struct {
	seq uint32
	at  time.Duration
	n   int
}

// collect reads datagrams until the socket idles for idle.
func collect(srv *net.UDPConn, idle time.Duration) []rx {
	var got []rx
	buf := make([]byte, 2048)
	for {
		_ = srv.SetReadDeadline(time.Now().Add(idle))
		n, err := srv.Read(buf)
		if err != nil {
			return got
		}
		got = append(got, rx{seq: binary.BigEndian.Uint32(buf), at: time.Duration(binary.BigEndian.Uint64(buf[4:])), n: n})
	}
}

func TestRateWithinFivePercent(t *testing.T) {
	tests := []struct {
		rate uint64
		size int
	}{{20_000_000, 1400}, {50_000_000, 1000}}
	for _, tc := range tests {
		t.Run("", func(t *testing.T) {
			// A deep queue keeps the link busy through pauses of the sender on
			// a loaded machine; an idle link would read as a low rate.
			topo := newTopo(t, lab.Path{Rate: tc.rate, QueueBytes: int(tc.rate / 8 / 2)})
			srv, cli := udpPair(t, topo)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			var got []rx
			var recvTimes []time.Time
			done := make(chan struct{})
			go func() {
				defer close(done)
				buf := make([]byte, 2048)
				for {
					_ = srv.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
					n, err := srv.Read(buf)
					if err != nil {
						return
					}
					got = append(got, rx{n: n})
					recvTimes = append(recvTimes, time.Now())
				}
			}()
			// Offer 2x the rate so the bottleneck is always busy.
			_, err := blast(ctx, cli, tc.size, 2*float64(tc.rate), 1500*time.Millisecond)
			require.NoError(t, err)
			<-done
			require.Greater(t, len(got), 100)
			// Measure between the 10th and the last datagram: steady state.
			first, last := 10, len(got)-1
			var bytes int
			for _, r := range got[first+1 : last+1] {
				bytes += r.n
			}
			el := recvTimes[last].Sub(recvTimes[first]).Seconds()
			wire := float64(tc.size + 8 + 20 + 14) // UDP+IPv4+Ethernet headers
			gotRate := float64(bytes) / el * 8 * wire / float64(tc.size)
			t.Logf("rate %d: measured %.2f Mbit/s of frames", tc.rate, gotRate/1e6)
			require.InEpsilon(t, float64(tc.rate), gotRate, 0.05)
			st := topo.Paths[0].Emulator.Stats(linkemu.AtoB)
			require.Positive(t, st.DropQueue, "offering 2x the rate must fill the queue")
		})
	}
}

func TestLossWithinStatisticalBounds(t *testing.T) {
	tests := []struct {
		loss float64
		n    int
	}{{0.01, 20000}, {0.1, 10000}}
	for _, tc := range tests {
		t.Run("", func(t *testing.T) {
			topo := newTopo(t, lab.Path{Loss: tc.loss})
			srv, cli := udpPair(t, topo)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			// ARP first, so that no datagram waits for resolution.
			_, err := cli.Write([]byte("warmup-and-arp"))
			require.NoError(t, err)
			require.NoError(t, srv.SetReadDeadline(time.Now().Add(2*time.Second)))
			for {
				buf := make([]byte, 64)
				if _, err := srv.Read(buf); err != nil || string(buf[:14]) == "warmup-and-arp" {
					require.NoError(t, err)
					break
				}
			}
			var got []rx
			done := make(chan struct{})
			go func() { defer close(done); got = collect(srv, 500*time.Millisecond) }()
			// Spread over 1.6 s: fast, yet far below the ceiling even when
			// the machine is busy.
			sentAt, err := blast(ctx, cli, 200, float64(tc.n)*200*8/1.6, 1600*time.Millisecond)
			require.NoError(t, err)
			<-done
			sent := len(sentAt)
			lost := float64(sent - len(got))
			sd := math.Sqrt(float64(sent) * tc.loss * (1 - tc.loss))
			st := topo.Paths[0].Emulator.Stats(linkemu.AtoB)
			t.Logf("loss %v: sent %d received %d (emulator dropped %d)", tc.loss, sent, len(got), st.DropLoss)
			require.Zero(t, st.DropRx, "emulator fell behind: the kernel dropped frames before it read them")
			require.InDelta(t, float64(sent)*tc.loss, lost, 5*sd)
			// An ARP exchange may also cross the lossy link.
			require.InDelta(t, float64(st.DropLoss), lost, 3, "every loss must be the emulator's")
		})
	}
}

func TestOutageDropsEverything(t *testing.T) {
	topo := newTopo(t, lab.Path{Delay: 2 * time.Millisecond, Outages: []linkemu.Outage{{Start: 300 * time.Millisecond, Duration: 400 * time.Millisecond}}})
	srv, cli := udpPair(t, topo)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Resolve ARP before the clock starts.
	_, err := cli.Write(make([]byte, 16))
	require.NoError(t, err)
	require.NoError(t, srv.SetReadDeadline(time.Now().Add(2*time.Second)))
	_, err = srv.Read(make([]byte, 64))
	require.NoError(t, err)

	var got []rx
	done := make(chan struct{})
	go func() { defer close(done); got = collect(srv, time.Second) }() // idles longer than the outage
	topo.StartClock()
	sentAt, err := blast(ctx, cli, 100, 1e6, time.Second)
	require.NoError(t, err)
	<-done
	received := map[uint32]bool{}
	for _, r := range got {
		received[r.seq] = true
	}
	// Send times are offsets from blast's start, just after StartClock; a
	// datagram also dies when its delivery (2 ms later) falls in the outage.
	inside := 0
	for seq, at := range sentAt {
		switch {
		case at < 290*time.Millisecond || at > 710*time.Millisecond:
			require.True(t, received[uint32(seq)], "datagram %d sent at %v, outside the outage, was lost", seq, at)
		case at > 300*time.Millisecond && at < 698*time.Millisecond:
			require.False(t, received[uint32(seq)], "datagram %d sent at %v crossed the outage", seq, at)
			inside++
		}
	}
	require.Positive(t, inside)
	require.Positive(t, topo.Paths[0].Emulator.Stats(linkemu.AtoB).DropOutage)

	// A forced outage works the same way and lifts again.
	e := topo.Paths[0].Emulator
	e.SetDown(linkemu.AtoB, true)
	_, err = cli.Write(make([]byte, 16))
	require.NoError(t, err)
	require.NoError(t, srv.SetReadDeadline(time.Now().Add(200*time.Millisecond)))
	_, err = srv.Read(make([]byte, 64))
	require.Error(t, err, "forced down link delivered a datagram")
	e.SetDown(linkemu.AtoB, false)
	_, err = cli.Write(make([]byte, 16))
	require.NoError(t, err)
	require.NoError(t, srv.SetReadDeadline(time.Now().Add(time.Second)))
	_, err = srv.Read(make([]byte, 64))
	require.NoError(t, err)
}
