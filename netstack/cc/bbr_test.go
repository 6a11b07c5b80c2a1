package cc

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip/seqnum"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

func newBBRForSim(st *tcp.TCPSenderState) tcp.CongestionControl { return NewBBR(st) }
func newRenoForSim(st *tcp.TCPSenderState) tcp.CongestionControl {
	return &renoRef{st: st}
}

func TestMaxFilter(t *testing.T) {
	for _, tc := range []struct {
		name   string
		rounds []int64
		vals   []float64
		want   float64
	}{
		{"rising", []int64{1, 2, 3}, []float64{1, 2, 3}, 3},
		{"holds the max within the window", []int64{1, 2, 5, 9}, []float64{10, 3, 4, 2}, 10},
		{"max expires after the window", []int64{1, 5, 9, 12}, []float64{10, 6, 4, 2}, 6},
		{"all old: restart at the sample", []int64{1, 30}, []float64{10, 1}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := maxFilter{window: 10}
			for i := range tc.rounds {
				f.update(tc.rounds[i], tc.vals[i])
			}
			require.Equal(t, tc.want, f.best)
		})
	}
}

// feed delivers rate bytes/s in per-ms acks with the given RTT for d,
// keeping inflight packets outstanding; it returns the time reached.
func feed(b *BBR, from, d time.Duration, rate float64, rtt time.Duration, inflight int) time.Duration {
	step := time.Millisecond
	per := int(rate * step.Seconds())
	for at := from + step; at <= from+d; at += step {
		b.st.Outstanding = inflight
		b.OnAck(tcp.AckSample{Acked: per, Delivered: per, RTT: rtt, AckTime: mono(at)})
	}
	return from + d
}

func TestBBRStartupFindsBandwidthAndDrains(t *testing.T) {
	st := &tcp.TCPSenderState{SndCwnd: 10, MaxPayloadSize: 1448}
	b := NewBBR(st)
	rate := 6.25e6 // 50 Mbit/s
	rtt := 20 * time.Millisecond
	// The pipe is full from the start: the rate never grows, so Startup
	// ends after three rounds without 25 % growth.
	now := feed(b, 0, 200*time.Millisecond, rate, rtt, 200)
	require.True(t, b.filledPipe, "startup did not detect the full pipe")
	require.InEpsilon(t, rate, b.btlBw.best, 0.05)
	require.Equal(t, bbrDrain, b.mode)
	// Little in flight: Drain is over, ProbeBW starts.
	feed(b, now, 5*time.Millisecond, rate, rtt, 10)
	require.Equal(t, bbrProbeBW, b.mode)
	bdpPkts := rate * rtt.Seconds() / 1448
	require.InDelta(t, 2*bdpPkts+3, float64(st.SndCwnd), 2, "cwnd is not 2 BDP")
	info := b.Info()
	require.Equal(t, "probe_bw", info.State)
	require.InEpsilon(t, rate, float64(info.PacingRate)/b.pacingGain, 0.05)
}

func TestBBRKeepsWindowOnLoss(t *testing.T) {
	st := &tcp.TCPSenderState{SndCwnd: 10, MaxPayloadSize: 1448}
	b := NewBBR(st)
	now := feed(b, 0, 300*time.Millisecond, 6.25e6, 20*time.Millisecond, 10)
	before := st.SndCwnd
	b.HandleLossDetected()
	st.SndCwnd = st.Ssthresh + 3 // what gVisor's enterRecovery does
	require.Equal(t, before, st.SndCwnd)
	feed(b, now, 20*time.Millisecond, 6.25e6, 20*time.Millisecond, 10)
	st.SndCwnd = st.Ssthresh // gVisor's leaveRecovery
	b.PostRecovery()
	require.GreaterOrEqual(t, st.SndCwnd, before-1)
	require.EqualValues(t, 1, b.Info().LossEvents)
}

func TestBBRProbeRTT(t *testing.T) {
	st := &tcp.TCPSenderState{SndCwnd: 10, MaxPayloadSize: 1448}
	b := NewBBR(st)
	now := feed(b, 0, 300*time.Millisecond, 6.25e6, 20*time.Millisecond, 10)
	cwnd := st.SndCwnd
	// 10 s of samples above the min RTT: the min RTT expires.
	now = feed(b, now, 10*time.Second+100*time.Millisecond, 6.25e6, 30*time.Millisecond, 10)
	require.Equal(t, bbrProbeRTT, b.mode)
	require.LessOrEqual(t, st.SndCwnd, bbrMinCwndPackets)
	// Inflight at the floor for 200 ms and a round: back to ProbeBW with
	// the window restored.
	feed(b, now, 250*time.Millisecond, 6.25e6, 30*time.Millisecond, 4)
	require.Equal(t, bbrProbeBW, b.mode)
	require.GreaterOrEqual(t, st.SndCwnd, cwnd)
	require.EqualValues(t, 1, b.Info().ProbeRTTs)
}

func TestBBRTimeoutRestartsThenRestores(t *testing.T) {
	st := &tcp.TCPSenderState{SndCwnd: 10, MaxPayloadSize: 1448}
	b := NewBBR(st)
	now := feed(b, 0, 300*time.Millisecond, 6.25e6, 20*time.Millisecond, 30)
	cwnd := st.SndCwnd
	st.SndUna, st.SndNxt = 1000, seqnum.Value(1000+300*1448)
	b.HandleRTOExpired()
	require.Equal(t, 1, st.SndCwnd)
	// Slow start from one segment, by what is acknowledged, also when it
	// is not delivered again (SACKed before the timeout).
	st.SndUna += 1448
	b.OnAck(tcp.AckSample{Acked: 1448, RTT: 20 * time.Millisecond, AckTime: mono(now + time.Millisecond)})
	require.Equal(t, 2, st.SndCwnd)
	b.OnAck(tcp.AckSample{Acked: 2 * 1448, Delivered: 2 * 1448, RTT: 20 * time.Millisecond, AckTime: mono(now + 2*time.Millisecond), InRecovery: true})
	require.Equal(t, 4, st.SndCwnd)
	// Everything sent before the timeout acknowledged: the window is back.
	st.SndUna = st.SndNxt
	b.OnAck(tcp.AckSample{Acked: 1448, Delivered: 1448, RTT: 20 * time.Millisecond, AckTime: mono(now + 3*time.Millisecond)})
	require.GreaterOrEqual(t, st.SndCwnd, cwnd)
	require.EqualValues(t, 1, b.Info().RTOs)
}

// TestBBRUnderRandomLoss is the reason for the controller: at 1 % random
// loss on a 50 Mbit/s 20 ms path, a loss-driven controller is capped far
// below the link (Mathis: ~7 Mbit/s), BBR is not.
func TestBBRUnderRandomLoss(t *testing.T) {
	for _, tc := range []struct {
		name     string
		newCC    func(*tcp.TCPSenderState) tcp.CongestionControl
		rate     float64
		rtt      time.Duration
		loss     float64
		min, max float64 // goodput as a fraction of the rate
	}{
		{"bbr clean", newBBRForSim, 50, 20 * time.Millisecond, 0, 0.93, 1},
		{"bbr 1% loss", newBBRForSim, 50, 20 * time.Millisecond, 0.01, 0.90, 1},
		{"bbr satellite 1% loss", newBBRForSim, 20, 600 * time.Millisecond, 0.01, 0.80, 1},
		{"reno clean", newRenoForSim, 50, 20 * time.Millisecond, 0, 0.90, 1},
		{"reno 1% loss", newRenoForSim, 50, 20 * time.Millisecond, 0.01, 0, 0.5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dur := 12 * time.Second
			if tc.rtt > 100*time.Millisecond {
				dur = 30 * time.Second
			}
			p := newPathSim(tc.rate, tc.rtt, tc.loss, tc.newCC)
			got := p.run(dur)
			t.Logf("goodput %.1f of %.0f Mbit/s, cwnd %d", got, tc.rate, p.st.SndCwnd)
			require.GreaterOrEqual(t, got/tc.rate, tc.min, fmt.Sprintf("goodput %.1f Mbit/s", got))
			require.LessOrEqual(t, got/tc.rate, tc.max, fmt.Sprintf("goodput %.1f Mbit/s", got))
		})
	}
}

// TestBBRAckCompression: data leaves at the link rate but its ACKs come
// back in bursts (queued behind the reverse direction's data): the estimate
// must stay at the rate the data was sent and delivered at, not the ACKs'.
func TestBBRAckCompression(t *testing.T) {
	st := &tcp.TCPSenderState{SndCwnd: 10, MaxPayloadSize: 1448}
	b := NewBBR(st)
	const rate = 6.25e6 // 50 Mbit/s
	rtt := 10 * time.Millisecond
	step := time.Millisecond
	per := int(rate * step.Seconds())
	var sentBy []time.Duration // when each 1 ms chunk was sent
	for at := time.Duration(0); at < 2*time.Second; at += step {
		b.OnSend(per, mono(at))
		sentBy = append(sentBy, at)
	}
	// ACKs: every 20 ms, the chunks sent 20-40 ms earlier arrive within
	// 1 ms (ACK rate 20x the link's).
	acked := 0
	for at := 40 * time.Millisecond; at < 2*time.Second; at += 20 * time.Millisecond {
		for acked < len(sentBy) && sentBy[acked] <= at-rtt-20*time.Millisecond {
			st.Outstanding = 100
			b.OnAck(tcp.AckSample{Acked: per, Delivered: per, RTT: rtt, AckTime: mono(at + time.Duration(acked%20)*50*time.Microsecond)})
			acked++
		}
	}
	require.InEpsilon(t, rate, b.btlBw.best, 0.15, "estimate %.1f Mbit/s for a 50 Mbit/s link", b.btlBw.best*8/1e6)
}
