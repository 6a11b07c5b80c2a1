package cc

import (
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// Group couples the controllers of one MPTCP connection's subflows (LIA):
// each member publishes its window and RTT, and its increase depends on
// all of them. Its lock is a leaf: taken under a gVisor endpoint's lock,
// never calling out.
type Group struct {
	mu      sync.Mutex
	members map[*liaMember]struct{}
}

// NewGroup returns an empty coupling group (one per MPTCP connection).
func NewGroup() *Group { return &Group{members: make(map[*liaMember]struct{})} }

type liaMember struct {
	cwnd float64 // bytes
	rtt  time.Duration
}

func (g *Group) join(m *liaMember) {
	g.mu.Lock()
	g.members[m] = struct{}{}
	g.mu.Unlock()
}

// Leave removes a controller's subflow from the group (its subflow closed).
func (g *Group) leave(m *liaMember) {
	g.mu.Lock()
	delete(g.members, m)
	g.mu.Unlock()
}

// update publishes m's window and RTT and returns RFC 6356's alpha and the
// total window of the group (bytes).
func (g *Group) update(m *liaMember, cwnd float64, rtt time.Duration) (alpha, total float64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	m.cwnd, m.rtt = cwnd, rtt
	return liaAlpha(g.members)
}

// liaAlpha is RFC 6356 (section 3):
//
//	alpha = cwnd_total * max_i(cwnd_i / rtt_i^2) / (sum_i cwnd_i / rtt_i)^2
//
// over the members with an RTT sample.
func liaAlpha(members map[*liaMember]struct{}) (alpha, total float64) {
	var best, sum float64
	for m := range members {
		if m.rtt <= 0 {
			continue
		}
		r := m.rtt.Seconds()
		total += m.cwnd
		best = max(best, m.cwnd/(r*r))
		sum += m.cwnd / r
	}
	if sum == 0 {
		return 1, total
	}
	return total * best / (sum * sum), total
}

// LIA is the Linked Increases Algorithm of RFC 6356 ("Coupled Congestion
// Control for Multipath Transport Protocols"): Reno's slow start and
// halving on loss per subflow, and in congestion avoidance an increase per
// acknowledged byte of
//
//	min(alpha * bytes_acked * MSS_i / cwnd_total, bytes_acked * MSS_i / cwnd_i)
//
// so that the connection takes no more at a shared bottleneck than one TCP
// flow (the RFC's goals 1-3) and moves traffic off congested paths.
type LIA struct {
	st    *tcp.TCPSenderState
	g     *Group
	m     liaMember
	ev    Events
	acc   float64 // congestion-avoidance growth below one segment, bytes
	srtt  time.Duration
	r     report
	alpha atomic.Uint64 // alpha x 1000, for Info
	slow  atomic.Bool   // in slow start, for Info
}

// NewLIA returns a LIA controller for a sender with state st, coupled with
// the other members of g (nil: a group of its own), counting in ev.
func NewLIA(st *tcp.TCPSenderState, g *Group, ev Events) *LIA {
	if g == nil {
		g = NewGroup()
	}
	l := &LIA{st: st, g: g, ev: ev}
	g.join(&l.m)
	l.publish()
	return l
}

func (l *LIA) mss() int {
	if l.st.MaxPayloadSize > 0 {
		return l.st.MaxPayloadSize
	}
	return 1460
}

// HandleLossDetected implements tcp.CongestionControl: halve (Reno).
func (l *LIA) HandleLossDetected() {
	l.r.lossEvents.Add(1)
	count(l.ev.LossEvents)
	l.st.Ssthresh = max(l.st.Outstanding/2, 2)
	l.acc = 0
}

// HandleRTOExpired implements tcp.CongestionControl: one segment (Reno).
func (l *LIA) HandleRTOExpired() {
	l.r.rtos.Add(1)
	count(l.ev.RTOs)
	l.st.Ssthresh = max(l.st.Outstanding/2, 2)
	l.st.SndCwnd = 1
	l.acc = 0
	l.publish()
}

// PostRecovery implements tcp.CongestionControl.
func (l *LIA) PostRecovery() { l.publish() }

// Update implements tcp.CongestionControl: slow start, then the linked
// increase.
func (l *LIA) Update(packetsAcked int, rtt time.Duration, _ tcpip.MonotonicTime) {
	if rtt > 0 {
		if l.srtt == 0 {
			l.srtt = rtt
		}
		l.srtt += (rtt - l.srtt) / 8
	}
	mss := float64(l.mss())
	if l.st.SndCwnd < l.st.Ssthresh {
		n := min(packetsAcked, l.st.Ssthresh-l.st.SndCwnd)
		l.st.SndCwnd += n
		packetsAcked -= n
	}
	shared := -1 // the window the group last heard of in this call
	if packetsAcked > 0 {
		cwnd := float64(l.st.SndCwnd) * mss
		alpha, total := l.g.update(&l.m, cwnd, l.srtt)
		shared = l.st.SndCwnd
		l.alpha.Store(uint64(alpha * 1000))
		acked := float64(packetsAcked) * mss
		inc := acked * mss / cwnd
		if total > 0 {
			inc = min(alpha*acked*mss/total, inc)
		}
		l.acc += inc
		for l.acc >= mss {
			l.acc -= mss
			l.st.SndCwnd++
		}
	}
	if l.st.SndCwnd != shared {
		l.publish()
	} else {
		// Most ACKs in congestion avoidance grow no whole segment: the
		// group already has this window; one lock per ACK, not two.
		l.report()
	}
}

// Close implements Closer: the subflow left its connection, its window no
// longer counts in the others' increase.
func (l *LIA) Close() { l.g.leave(&l.m) }

// publish tells the group and Info the window and RTT.
func (l *LIA) publish() {
	l.g.update(&l.m, float64(l.st.SndCwnd*l.mss()), l.srtt)
	l.report()
}

// report tells Info; gVisor's endpoint lock is held, readers are not.
func (l *LIA) report() {
	l.r.cwnd.Store(int64(l.st.SndCwnd))
	l.slow.Store(l.st.SndCwnd < l.st.Ssthresh)
	if l.srtt > 0 {
		l.r.minRTT.Store(int64(l.srtt))
	}
}

// Info implements Reporter. MinRTT is the smoothed RTT LIA couples by.
func (l *LIA) Info() Info {
	state := "congestion_avoidance"
	if l.slow.Load() {
		state = "slow_start"
	}
	return Info{
		Name:       NameLIA,
		State:      state,
		MinRTT:     time.Duration(l.r.minRTT.Load()).Seconds(),
		Cwnd:       int(l.r.cwnd.Load()),
		LossEvents: l.r.lossEvents.Load(),
		RTOs:       l.r.rtos.Load(),
		Alpha:      float64(l.alpha.Load()) / 1000,
	}
}
