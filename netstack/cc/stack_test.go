package cc_test

import (
	"context"
	"io"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"

	"github.com/mptun/mptun/netstack"
	"github.com/mptun/mptun/netstack/linkpipe"
)

// lossyTransfer sends for d over one linkpipe link (rate, one-way delay,
// random loss in the data direction) from a stack running controller name
// and returns the goodput in Mbit/s and the sender's retransmissions.
func lossyTransfer(t *testing.T, name string, rateMbit int64, oneWay time.Duration, loss float64, d time.Duration) (float64, uint64) {
	t.Helper()
	ea, eb := linkpipe.New(linkpipe.Config{
		AtoB: linkpipe.Direction{Delay: oneWay, Loss: loss, RateBps: rateMbit * 1e6},
		BtoA: linkpipe.Direction{Delay: oneWay},
		Seed: 7,
	})
	snd, err := netstack.New(netstack.Options{CongestionControl: name})
	require.NoError(t, err)
	rcv, err := netstack.New(netstack.Options{})
	require.NoError(t, err)
	t.Cleanup(func() { snd.Close(); rcv.Close(); ea.Close() })
	a, b := netip.MustParsePrefix("10.9.0.1/24"), netip.MustParsePrefix("10.9.0.2/24")
	_, err = snd.AddNIC("a", ea, a)
	require.NoError(t, err)
	_, err = rcv.AddNIC("b", eb, b)
	require.NoError(t, err)

	to := tcpip.FullAddress{Addr: tcpip.AddrFromSlice(b.Addr().AsSlice()), Port: 5201}
	ln, err := gonet.ListenTCP(rcv.S, to, ipv4.ProtocolNumber)
	require.NoError(t, err)
	t.Cleanup(func() { _ = ln.Close() })
	got := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- 0
			return
		}
		defer c.Close()
		n, _ := io.Copy(io.Discard, c)
		got <- n
	}()
	ctx, cancel := context.WithTimeout(context.Background(), d+10*time.Second)
	defer cancel()
	c, err := gonet.DialContextTCP(ctx, snd.S, to, ipv4.ProtocolNumber)
	require.NoError(t, err)
	buf := make([]byte, 64<<10)
	start := time.Now()
	require.NoError(t, c.SetWriteDeadline(start.Add(d)))
	for time.Since(start) < d {
		if _, err := c.Write(buf); err != nil {
			break
		}
	}
	// Count what arrived by the deadline: close both ends now.
	_ = c.Close()
	_ = ln.Close()
	n := <-got
	ts := snd.S.Stats().TCP
	t.Logf("%s: timeouts %d sack-recovery %d fast-retransmit %d slow-start-rtx %d spurious-rto %d segs-sent %d", name,
		ts.Timeouts.Value(), ts.SACKRecovery.Value(), ts.FastRetransmit.Value(), ts.SlowStartRetransmits.Value(), ts.SpuriousRTORecovery.Value(), ts.SegmentsSent.Value())
	return float64(n) * 8 / time.Since(start).Seconds() / 1e6, snd.S.Stats().TCP.Retransmits.Value()
}

// TestControllerOnLossyLink runs the real gVisor sender with each controller
// over a 50 Mbit/s, 20 ms RTT link with 1 % random loss: CUBIC is capped by
// the loss (Mathis), BBR is not.
func TestControllerOnLossyLink(t *testing.T) {
	if testing.Short() {
		t.Skip("8 s of transfers")
	}
	res := map[string]float64{}
	for _, name := range []string{"cubic", "bbr"} {
		mbit, retrans := lossyTransfer(t, name, 50, 10*time.Millisecond, 0.01, 4*time.Second)
		t.Logf("%s: %.1f Mbit/s, %d retransmissions", name, mbit, retrans)
		res[name] = mbit
	}
	if raceEnabled {
		return
	}
	require.Greater(t, res["bbr"], 35.0, "bbr below 0.7 of the link under 1 %% loss")
	require.Greater(t, res["bbr"], 2*res["cubic"])
}
