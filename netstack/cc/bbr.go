package cc

import (
	"math"
	"math/rand/v2"
	"sort"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/seqnum"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// BBR is a model-based controller written from the description of BBR v1
// (Cardwell et al., "BBR: Congestion-Based Congestion Control", ACM Queue
// 14(5), 2016, and draft-cardwell-iccrg-bbr-congestion-control-00): it
// estimates the bottleneck bandwidth (windowed max of delivery rate over 10
// rounds) and the round-trip propagation time (windowed min over 10 s),
// paces at gain x bandwidth and caps the data in flight at 2 BDP. It does not
// cut its rate on loss: random loss (LTE, Wi-Fi, LEO) costs only the lost
// segments' retransmission, not the window.
//
// Differences from the draft, forced by gVisor's sender:
//   - Delivery rate is measured from acknowledgements (cumulative and SACK)
//     over at least one min RTT, not per packet at send time: gVisor keeps no
//     per-segment delivery state. Measuring over an RTT or more averages out
//     ACK compression.
//   - A sample counts as application-limited when the sender had less than
//     half a BDP in flight over its interval; such samples may only raise
//     the estimate, as in the draft.
type BBR struct {
	st *tcp.TCPSenderState
	r  report
	ev Events

	mode       bbrMode
	pacingGain float64
	cwndGain   float64

	// Delivery: total bytes delivered and a short history of (time,
	// delivered, max in flight since) to measure rates over a min RTT.
	delivered int64
	hist      []deliveryPoint
	// Sending: total new bytes sent and when the count passed each value
	// (coarsely), to find when delivered bytes were sent.
	sent       int64
	sendHist   []sendPoint
	inflightHi int // max bytes in flight since the last history point

	btlBw         maxFilter // bytes per second, per round
	rtProp        time.Duration
	rtPropAt      tcpip.MonotonicTime
	haveRTT       bool
	rtPropExpired bool
	srtt          time.Duration // smoothed RTT (RFC 6298's 1/8 gain)
	round         int64
	roundStart    tcpip.MonotonicTime
	roundEnd      int64 // delivered count that ends the current round

	roundStarted bool
	// roundMaxInflight is the most in flight during the current round;
	// roundAppLimited says the last round never filled half the window.
	roundMaxInflight int
	roundAppLimited  bool

	fullBw      float64
	fullBwCount int
	filledPipe  bool

	cycleIdx int
	cycleAt  tcpip.MonotonicTime

	probeRTTDone  tcpip.MonotonicTime // zero until inflight reached the floor
	probeRTTRound int64
	priorCwnd     int

	inRecovery bool
	rtoRecover seqnum.Value // SND.NXT at the RTO: the model's window is back once it is acked
	rtoPending bool

	rng *rand.Rand
}

type bbrMode int

const (
	bbrStartup bbrMode = iota
	bbrDrain
	bbrProbeBW
	bbrProbeRTT
)

func (m bbrMode) String() string {
	return [...]string{"startup", "drain", "probe_bw", "probe_rtt"}[m]
}

type sendPoint struct {
	at   tcpip.MonotonicTime
	sent int64 // bytes sent by at
}

type deliveryPoint struct {
	at        tcpip.MonotonicTime
	delivered int64
	inflight  int
}

// Constants of the draft.
const (
	bbrHighGain       = 2.885 // 2/ln(2): doubles the rate each round in Startup
	bbrBwRounds       = 10    // bandwidth filter window, rounds
	bbrRtPropWindow   = 10 * time.Second
	bbrProbeRTTTime   = 200 * time.Millisecond
	bbrMinCwndPackets = 4
	bbrFullBwGrowth   = 1.25
	bbrFullBwRounds   = 3
	bbrCwndGain       = 2
)

// bbrCycle is ProbeBW's pacing gain cycle, one phase per min RTT.
var bbrCycle = [...]float64{1.25, 0.75, 1, 1, 1, 1, 1, 1}

// NewBBR returns a BBR controller for a sender with state st.
func NewBBR(st *tcp.TCPSenderState) *BBR {
	b := &BBR{
		st:         st,
		mode:       bbrStartup,
		pacingGain: bbrHighGain,
		cwndGain:   bbrHighGain,
		rng:        rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 0x6d70)),
	}
	b.btlBw.window = bbrBwRounds
	b.publish()
	return b
}

func (b *BBR) mss() int {
	if b.st.MaxPayloadSize > 0 {
		return b.st.MaxPayloadSize
	}
	return 1460
}

// inflightBytes is what the sender counts as in flight.
func (b *BBR) inflightBytes() int { return b.st.Outstanding * b.mss() }

// bdp is the estimated bandwidth-delay product in bytes (0 when unknown).
func (b *BBR) bdp() float64 {
	if !b.haveRTT || b.btlBw.best == 0 {
		return 0
	}
	return b.btlBw.best * b.rtProp.Seconds()
}

// HandleLossDetected implements tcp.CongestionControl. gVisor sets cwnd to
// Ssthresh+3 right after: keep the window (no multiplicative decrease).
func (b *BBR) HandleLossDetected() {
	b.inRecovery = true
	b.r.lossEvents.Add(1)
	count(b.ev.LossEvents)
	// Never below what is in flight (the draft's packet conservation):
	// gVisor's recovery sends only while the pipe is below cwnd, and a
	// window under the pipe (after a timeout, with everything sent before
	// an outage in flight) stalled a returned path until the next,
	// backed-off RTO (3.2 s).
	b.st.Ssthresh = max(b.st.SndCwnd, b.st.Outstanding+1) - 3
	b.st.Ssthresh = max(b.st.Ssthresh, bbrMinCwndPackets)
	// Loss in Startup with a queue (RTT a quarter above the min) is the
	// overshoot filling the bottleneck's buffer, not random loss: the pipe
	// is full (as BBRv2 ends Startup on loss). Going on overran a 20 Mbit/s
	// 80 ms path's queue into RTOs that resent whole 2-BDP windows (2564
	// retransmissions in 10 s, wifi+lte in-process).
	if b.mode == bbrStartup && b.haveRTT && b.srtt > b.rtProp*5/4 {
		b.filledPipe = true
		b.r.startupExit.Store(1)
		count(b.ev.StartupExits)
	}
}

// HandleRTOExpired implements tcp.CongestionControl: a timeout may mean the
// path went away, so restart from one segment (as Linux does for every
// controller), and give the model's window back once the data outstanding
// at the timeout is delivered (the draft's restore of prior_cwnd).
func (b *BBR) HandleRTOExpired() {
	b.r.rtos.Add(1)
	count(b.ev.RTOs)
	b.priorCwnd = max(b.priorCwnd, b.st.SndCwnd)
	b.rtoRecover = b.st.SndNxt
	b.rtoPending = true
	b.st.SndCwnd = 1
	b.st.Ssthresh = bbrMinCwndPackets
	b.publish()
}

// Update implements tcp.CongestionControl; the work is in OnAck, which
// gVisor also calls during recovery.
func (b *BBR) Update(int, time.Duration, tcpip.MonotonicTime) {}

// maybeRestoreAfterRTO gives the model's window back once everything sent
// before the timeout is acknowledged.
func (b *BBR) maybeRestoreAfterRTO() {
	if b.rtoPending && !b.st.SndUna.LessThan(b.rtoRecover) {
		b.rtoPending = false
		b.st.SndCwnd = max(b.st.SndCwnd, b.priorCwnd)
		b.priorCwnd = 0
	}
}

// PostRecovery implements tcp.CongestionControl: gVisor set cwnd to
// Ssthresh; put the model's window back.
func (b *BBR) PostRecovery() {
	b.inRecovery = false
	b.st.SndCwnd = b.st.Ssthresh + 3
	b.setCwnd(0)
}

// OnSend implements tcp.SendObserver.
func (b *BBR) OnSend(n int, at tcpip.MonotonicTime) {
	b.sent += int64(n)
	span := max(b.rtProp, time.Millisecond)
	if k := len(b.sendHist); k > 0 && at.Sub(b.sendHist[k-1].at) < span/8 {
		b.sendHist[k-1].sent = b.sent
		return
	}
	b.sendHist = append(b.sendHist, sendPoint{at: at, sent: b.sent})
}

// sendIndex is the first send point that had sent byte d of the stream
// (len(sendHist) when none has yet).
func (b *BBR) sendIndex(d int64) int {
	return sort.Search(len(b.sendHist), func(i int) bool { return b.sendHist[i].sent >= d })
}

// PacingRate implements tcp.Pacer.
func (b *BBR) PacingRate() uint64 { return b.r.pacingRate.Load() }

// OnAck implements tcp.AckObserver: the model and the control are updated on
// every acknowledgement.
func (b *BBR) OnAck(s tcp.AckSample) {
	now := s.AckTime
	b.delivered += int64(s.Delivered)
	b.rtPropExpired = false
	if s.RTT > 0 {
		b.updateRTProp(s.RTT, now)
		if b.srtt == 0 {
			b.srtt = s.RTT
		}
		b.srtt += (s.RTT - b.srtt) / 8
	}
	b.sampleBandwidth(now)
	b.updateRound(now)
	b.checkFullPipe()
	b.updateMode(now)
	b.maybeRestoreAfterRTO()
	b.setCwnd(s.Acked)
	b.setPacingRate()
	b.publish()
}

func (b *BBR) updateRTProp(rtt time.Duration, now tcpip.MonotonicTime) {
	expired := b.haveRTT && now.Sub(b.rtPropAt) > bbrRtPropWindow
	// Remembered for the ProbeRTT check, which the new sample must not
	// hide (the draft's rtprop_expired).
	b.rtPropExpired = expired
	if !b.haveRTT || rtt <= b.rtProp || expired {
		b.rtProp = rtt
		b.rtPropAt = now
		b.haveRTT = true
	}
}

// sampleBandwidth measures the delivery rate over the most recent interval
// of at least one min RTT and feeds it to the max filter.
func (b *BBR) sampleBandwidth(now tcpip.MonotonicTime) {
	inflight := b.inflightBytes()
	b.inflightHi = max(b.inflightHi, inflight)
	// Measure over a smoothed RTT, not just the min: ACKs that queued
	// behind the other direction's data arrive in bursts as long as that
	// queue (20 ms on a 100 Mbit/s link with 256 KiB of buffer), and a
	// min-RTT span inside such a burst read 2.5-3x the link's rate.
	span := max(b.rtProp, b.srtt, time.Millisecond)
	// One history point per quarter span bounds the history at ~4 spans
	// worth plus the one being measured from.
	if n := len(b.hist); n == 0 || now.Sub(b.hist[n-1].at) >= span/4 {
		b.hist = append(b.hist, deliveryPoint{at: now, delivered: b.delivered, inflight: b.inflightHi})
		b.inflightHi = inflight
	}
	// The newest point at least one span old is the start of the sample.
	start := -1
	for i := len(b.hist) - 1; i >= 0; i-- {
		if now.Sub(b.hist[i].at) >= span {
			start = i
			break
		}
	}
	if start < 0 {
		return
	}
	p := b.hist[start]
	if start > 0 {
		b.hist = append(b.hist[:0], b.hist[start:]...)
	}
	// The draft's rate sample: delivered over the longer of the ACK
	// interval and the interval its bytes were sent in. Queues on the
	// return path (ACKs behind the other direction's data) compress ACKs
	// into bursts whose ACK rate far exceeds the link (460 Mbit/s measured
	// on a 100 Mbit/s linkpipe before this).
	elapsed := now.Sub(p.at)
	from := b.sendIndex(p.delivered + 1)
	if to := b.sendIndex(b.delivered); to < len(b.sendHist) && from < len(b.sendHist) {
		elapsed = max(elapsed, b.sendHist[to].at.Sub(b.sendHist[from].at))
	}
	// The points before the one that sent byte p.delivered+1: no later
	// sample starts before it.
	if from > 0 {
		b.sendHist = append(b.sendHist[:0], b.sendHist[from:]...)
	}
	rate := float64(b.delivered-p.delivered) / elapsed.Seconds()
	maxInflight := 0
	for _, q := range b.hist {
		maxInflight = max(maxInflight, q.inflight)
	}
	appLimited := b.filledPipe && float64(maxInflight) < 0.5*b.bdp()
	if !appLimited || rate >= b.btlBw.best {
		b.btlBw.update(b.round, rate)
	}
}

// updateRound advances the round count once the data in flight at the
// round's start is delivered.
func (b *BBR) updateRound(now tcpip.MonotonicTime) {
	b.roundMaxInflight = max(b.roundMaxInflight, b.inflightBytes())
	if b.delivered >= b.roundEnd {
		// A round that never filled half the window says nothing about
		// the pipe (an MPTCP scheduler may starve a subflow).
		b.roundAppLimited = 2*b.roundMaxInflight < b.st.SndCwnd*b.mss()
		b.roundMaxInflight = 0
		b.round++
		b.roundStart = now
		b.roundEnd = b.delivered + int64(max(b.inflightBytes(), b.mss()))
		b.roundStarted = true
		return
	}
	b.roundStarted = false
}

// checkFullPipe ends Startup when the bandwidth estimate grew by less than
// 25 % over three rounds.
func (b *BBR) checkFullPipe() {
	if b.filledPipe || !b.roundStarted || b.roundAppLimited || b.btlBw.best == 0 {
		return
	}
	if b.btlBw.best >= b.fullBw*bbrFullBwGrowth {
		b.fullBw = b.btlBw.best
		b.fullBwCount = 0
		return
	}
	b.fullBwCount++
	if b.fullBwCount >= bbrFullBwRounds {
		b.filledPipe = true
		b.r.startupExit.Store(1)
		count(b.ev.StartupExits)
	}
}

func (b *BBR) updateMode(now tcpip.MonotonicTime) {
	switch b.mode {
	case bbrStartup:
		if b.filledPipe {
			b.mode = bbrDrain
			b.pacingGain = 1 / bbrHighGain
			b.cwndGain = bbrHighGain
		}
	case bbrDrain:
		if float64(b.inflightBytes()) <= b.bdp() {
			b.enterProbeBW(now)
		}
	case bbrProbeBW:
		b.advanceCycle(now)
	}
	// ProbeRTT: the min RTT was not refreshed for 10 s: drain the queue to
	// see the path's own delay.
	if b.mode != bbrProbeRTT && b.rtPropExpired {
		b.mode = bbrProbeRTT
		b.pacingGain, b.cwndGain = 1, 1
		b.priorCwnd = max(b.priorCwnd, b.st.SndCwnd)
		b.probeRTTDone = tcpip.MonotonicTime{}
		b.r.probeRTTs.Add(1)
		count(b.ev.ProbeRTTs)
	}
	if b.mode == bbrProbeRTT {
		b.handleProbeRTT(now)
	}
}

func (b *BBR) enterProbeBW(now tcpip.MonotonicTime) {
	b.mode = bbrProbeBW
	b.cwndGain = bbrCwndGain
	// Start in a random phase other than the draining one, as the draft
	// does, so that flows sharing a bottleneck do not probe in step.
	b.cycleIdx = len(bbrCycle) - 1 - b.rng.IntN(len(bbrCycle)-1)
	b.cycleAt = now
	b.pacingGain = bbrCycle[b.cycleIdx]
}

func (b *BBR) advanceCycle(now tcpip.MonotonicTime) {
	elapsed := now.Sub(b.cycleAt) > b.rtProp
	inflight := float64(b.inflightBytes())
	next := elapsed
	switch g := b.pacingGain; {
	case g > 1:
		// Probe until a min RTT passed and the extra data is in flight,
		// or losses say the pipe is full.
		next = elapsed && (b.inRecovery || inflight >= g*b.bdp())
	case g < 1:
		// Drain phase ends early once the queue is gone.
		next = elapsed || inflight <= b.bdp()
	}
	if next {
		b.cycleIdx = (b.cycleIdx + 1) % len(bbrCycle)
		b.cycleAt = now
		b.pacingGain = bbrCycle[b.cycleIdx]
	}
}

func (b *BBR) handleProbeRTT(now tcpip.MonotonicTime) {
	if b.probeRTTDone == (tcpip.MonotonicTime{}) {
		if b.st.Outstanding <= bbrMinCwndPackets {
			b.probeRTTDone = now.Add(bbrProbeRTTTime)
			b.probeRTTRound = b.round
		}
		return
	}
	if now.Before(b.probeRTTDone) || b.round <= b.probeRTTRound {
		return
	}
	b.rtPropAt = now
	b.st.SndCwnd = max(b.st.SndCwnd, b.priorCwnd)
	b.priorCwnd = 0
	if b.filledPipe {
		b.enterProbeBW(now)
	} else {
		b.mode = bbrStartup
		b.pacingGain, b.cwndGain = bbrHighGain, bbrHighGain
	}
}

// setCwnd moves cwnd toward cwnd_gain x BDP: in Startup it only grows (by
// what was acknowledged), after it follows the target, growing by at most
// what was acknowledged. After a timeout it slow-starts from one segment
// until the data sent before the timeout is acknowledged (in recovery too:
// RACK finds the holes the timeout left, and gVisor's recovery does not
// grow the window).
func (b *BBR) setCwnd(ackedBytes int) {
	mss := b.mss()
	acked := (ackedBytes + mss - 1) / mss
	if b.rtoPending {
		b.st.SndCwnd += acked
		if b.inRecovery {
			b.st.SndCwnd = max(b.st.SndCwnd, b.st.Outstanding+acked)
		}
		b.st.Ssthresh = max(b.st.SndCwnd-3, bbrMinCwndPackets)
		return
	}
	cwnd := b.st.SndCwnd
	if bdp := b.bdp(); bdp > 0 {
		// Three segments of quantum for delayed and stretched ACKs.
		target := int(math.Ceil(b.cwndGain*bdp/float64(mss))) + 3
		switch {
		case b.filledPipe:
			cwnd = min(cwnd+acked, target)
		case cwnd < target || b.delivered < int64(10*mss):
			cwnd += acked
		}
	} else {
		cwnd += acked
	}
	if b.inRecovery {
		// Packet conservation: send as much as was acknowledged.
		cwnd = max(cwnd, b.st.Outstanding+acked)
	}
	cwnd = max(cwnd, bbrMinCwndPackets)
	if b.mode == bbrProbeRTT {
		cwnd = min(cwnd, bbrMinCwndPackets)
	}
	b.st.SndCwnd = cwnd
	// Keep gVisor's recovery entry (cwnd = Ssthresh+3) at our window.
	b.st.Ssthresh = max(cwnd-3, bbrMinCwndPackets)
}

func (b *BBR) setPacingRate() {
	var rate float64
	if bw := b.btlBw.best; bw > 0 {
		rate = b.pacingGain * bw
	} else {
		// Before the first sample: the initial window per min RTT (or
		// per ms), at the Startup gain.
		rtt := b.rtProp
		if !b.haveRTT || rtt < time.Millisecond {
			rtt = time.Millisecond
		}
		rate = bbrHighGain * float64(b.st.SndCwnd*b.mss()) / rtt.Seconds()
	}
	// The draft paces 1 % below the estimate in steady state to drain
	// queues the estimate's noise builds.
	if b.mode == bbrProbeBW && b.pacingGain == 1 {
		rate *= 0.99
	}
	b.r.pacingRate.Store(uint64(rate))
}

// maxFilter is a windowed max over rounds (Kathleen Nichols' algorithm as
// used by Linux's minmax: three samples, best, second and third best in
// later subwindows).
type maxFilter struct {
	window int64
	s      [3]struct {
		round int64
		v     float64
	}
	best float64
}

func (f *maxFilter) update(round int64, v float64) {
	set := func(i int) { f.s[i].round, f.s[i].v = round, v }
	if v >= f.s[0].v || round-f.s[2].round > f.window {
		set(0)
		set(1)
		set(2)
		f.best = v
		return
	}
	if v >= f.s[1].v {
		set(1)
		set(2)
	} else if v >= f.s[2].v {
		set(2)
	}
	// Expire the best when it left the window; promote the next ones.
	dt := round - f.s[0].round
	switch {
	case dt > f.window:
		f.s[0], f.s[1] = f.s[1], f.s[2]
		set(2)
		if round-f.s[0].round > f.window {
			f.s[0], f.s[1] = f.s[1], f.s[2]
		}
	case f.s[1].round == f.s[0].round && dt > f.window/4:
		set(1)
		set(2)
	case f.s[2].round == f.s[1].round && dt > f.window/2:
		set(2)
	}
	f.best = f.s[0].v
}

// report holds what Info returns; written under gVisor's endpoint lock,
// read from any goroutine.
type report struct {
	mode        atomic.Int32
	pacingRate  atomic.Uint64
	btlBw       atomic.Uint64
	minRTT      atomic.Int64 // ns
	cwnd        atomic.Int64
	lossEvents  atomic.Uint64
	rtos        atomic.Uint64
	probeRTTs   atomic.Uint64
	startupExit atomic.Uint64
}

func (b *BBR) publish() {
	b.r.mode.Store(int32(b.mode))
	b.r.btlBw.Store(uint64(b.btlBw.best))
	if b.haveRTT {
		b.r.minRTT.Store(int64(b.rtProp))
	}
	b.r.cwnd.Store(int64(b.st.SndCwnd))
}

// Info implements Reporter; safe from any goroutine.
func (b *BBR) Info() Info {
	return Info{
		Name:        NameBBR,
		State:       bbrMode(b.r.mode.Load()).String(),
		PacingRate:  b.r.pacingRate.Load(),
		BtlBw:       b.r.btlBw.Load(),
		MinRTT:      time.Duration(b.r.minRTT.Load()).Seconds(),
		Cwnd:        int(b.r.cwnd.Load()),
		LossEvents:  b.r.lossEvents.Load(),
		RTOs:        b.r.rtos.Load(),
		ProbeRTTs:   b.r.probeRTTs.Load(),
		StartupExit: b.r.startupExit.Load(),
	}
}

// LossDetection implements tcp.LossDetector: RACK (time-based) finds lost
// retransmissions that duplicate-ACK counting only finds by timeout. With
// BBR's 2-BDP window under 1 % loss, RFC 6675 recovery took an RTO every
// ~0.4 s, each resending the whole window (4 s over 50 Mbit/s, 20 ms: 9
// RTOs, 4466 retransmissions, 23.8 Mbit/s; with RACK 0 RTOs, 480, 42.2).
func (b *BBR) LossDetection() tcpip.TCPRecovery { return tcpip.TCPRACKLossDetection }
