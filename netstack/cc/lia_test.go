package cc

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

func TestLIAAlpha(t *testing.T) {
	ms := time.Millisecond
	for _, tc := range []struct {
		name  string
		cwnd  []float64
		rtt   []time.Duration
		alpha float64
	}{
		// One subflow: Reno's increase (RFC 6356's alpha is 1).
		{"one subflow", []float64{100}, []time.Duration{20 * ms}, 1},
		// n equal subflows: 1/n each, n x 1/n together: one Reno flow.
		{"two equal", []float64{100, 100}, []time.Duration{20 * ms, 20 * ms}, 0.5},
		{"three equal", []float64{50, 50, 50}, []time.Duration{10 * ms, 10 * ms, 10 * ms}, 1.0 / 3},
		// cwnd_total * max(cwnd/rtt^2) / (sum cwnd/rtt)^2 with
		// (100, 10 ms) and (100, 40 ms): 200 * 1e6 / (1e4 + 2.5e3)^2.
		{"unequal RTTs", []float64{100, 100}, []time.Duration{10 * ms, 40 * ms}, 200 * 1e6 / (12500.0 * 12500)},
		{"no RTT yet", []float64{100}, []time.Duration{0}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			members := map[*liaMember]struct{}{}
			for i := range tc.cwnd {
				members[&liaMember{cwnd: tc.cwnd[i], rtt: tc.rtt[i]}] = struct{}{}
			}
			alpha, _ := liaAlpha(members)
			require.InDelta(t, tc.alpha, alpha, 1e-9)
		})
	}
}

// ackRTT acks one window of l's sender at rtt, packet by packet.
func ackRTT(l *LIA, rtt time.Duration) {
	for i, n := 0, l.st.SndCwnd; i < n; i++ {
		l.Update(1, rtt, mono(0))
	}
}

func TestLIACongestionAvoidance(t *testing.T) {
	newSub := func(g *Group) *LIA {
		st := &tcp.TCPSenderState{SndCwnd: 100, Ssthresh: 50, MaxPayloadSize: 1448}
		return NewLIA(st, g, Events{})
	}
	t.Run("alone it grows like Reno: one segment per RTT", func(t *testing.T) {
		l := newSub(nil)
		for i := 0; i < 8; i++ {
			ackRTT(l, 20*time.Millisecond)
		}
		require.InDelta(t, 108, l.st.SndCwnd, 1)
	})
	t.Run("two coupled subflows grow together like one Reno flow", func(t *testing.T) {
		g := NewGroup()
		a, b := newSub(g), newSub(g)
		for i := 0; i < 16; i++ {
			ackRTT(a, 20*time.Millisecond)
			ackRTT(b, 20*time.Millisecond)
		}
		// alpha = 1/2: each gains a quarter segment per RTT, the pair half
		// of what one Reno flow would gain over two RTTs' worth of ACKs.
		require.InDelta(t, 104, a.st.SndCwnd, 1)
		require.InDelta(t, 104, b.st.SndCwnd, 1)
		require.InDelta(t, 0.5, a.Info().Alpha, 0.01)
	})
	t.Run("after a subflow left, the other grows alone", func(t *testing.T) {
		g := NewGroup()
		a, b := newSub(g), newSub(g)
		ackRTT(a, 20*time.Millisecond)
		ackRTT(b, 20*time.Millisecond)
		b.Close()
		c0 := a.st.SndCwnd
		for i := 0; i < 4; i++ {
			ackRTT(a, 20*time.Millisecond)
		}
		require.InDelta(t, c0+4, a.st.SndCwnd, 1)
		require.InDelta(t, 1, a.Info().Alpha, 0.01)
	})
	t.Run("slow start below ssthresh, halving on loss", func(t *testing.T) {
		st := &tcp.TCPSenderState{SndCwnd: 10, Ssthresh: 40, MaxPayloadSize: 1448}
		l := NewLIA(st, nil, Events{})
		ackRTT(l, 20*time.Millisecond)
		require.Equal(t, 20, st.SndCwnd)
		require.Equal(t, "slow_start", l.Info().State)
		st.Outstanding = 20
		l.HandleLossDetected()
		require.Equal(t, 10, st.Ssthresh)
		require.EqualValues(t, 1, l.Info().LossEvents)
	})
}

// TestLIAUnderRandomLoss: LIA is loss-driven like Reno, on purpose (RFC
// 6356 couples Reno): at 1 % random loss it is capped as Reno is. This
// is why the loss-tolerant default is BBR and LIA is for shared
// bottlenecks where fairness matters.
func TestLIAUnderRandomLoss(t *testing.T) {
	p := newPathSim(50, 20*time.Millisecond, 0.01, func(st *tcp.TCPSenderState) tcp.CongestionControl {
		return NewLIA(st, nil, Events{})
	})
	got := p.run(12 * time.Second)
	t.Logf("lia alone at 1%% loss: %.1f Mbit/s", got)
	require.Less(t, got, 25.0)
	p = newPathSim(50, 20*time.Millisecond, 0, func(st *tcp.TCPSenderState) tcp.CongestionControl {
		return NewLIA(st, nil, Events{})
	})
	got = p.run(12 * time.Second)
	t.Logf("lia alone clean: %.1f Mbit/s", got)
	require.Greater(t, got, 45.0)
}
