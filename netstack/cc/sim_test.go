package cc

import (
	"container/heap"
	"math/rand/v2"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// pathSim is a packet-level model of one TCP sender over a bottleneck, to
// drive a controller with the ACK, RTT and loss events gVisor gives it: a
// rate-limited FIFO with a tail-drop queue, a propagation delay, random loss
// after the queue, one ACK per packet (SACK: delivery counts when a packet
// arrives), loss detected three packets later, recovery as gVisor's sender
// does it (cwnd = Ssthresh+3 on entry, Ssthresh on exit), pacing as the
// patch does it (1 ms of slack).
type pathSim struct {
	rate     float64       // bytes per second
	oneWay   time.Duration // propagation delay each way
	queueCap int           // packets
	loss     float64
	mss      int

	st  *tcp.TCPSenderState
	cc  tcp.CongestionControl
	rng *rand.Rand

	now       time.Duration
	linkFree  time.Duration // when the bottleneck finishes its queue
	queued    []time.Duration
	events    eventHeap
	seq       int
	inflight  map[int]*simPkt
	pending   []int // lost packets waiting for retransmission
	recovery  bool
	recEnd    int // leave recovery once everything below is acked
	paceNext  time.Duration
	delivered int // unique bytes delivered after warmup
	warmup    time.Duration
	acked     map[int]bool
	trace     func(now time.Duration)
}

type simPkt struct {
	seq    int
	sentAt time.Duration
	lost   bool
}

type simEvent struct {
	at  time.Duration
	pkt *simPkt
}

type eventHeap []simEvent

func (h eventHeap) Len() int           { return len(h) }
func (h eventHeap) Less(i, j int) bool { return h[i].at < h[j].at }
func (h eventHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *eventHeap) Push(x any)        { *h = append(*h, x.(simEvent)) }
func (h *eventHeap) Pop() any {
	old := *h
	e := old[len(old)-1]
	*h = old[:len(old)-1]
	return e
}

func newPathSim(rateMbit float64, rtt time.Duration, loss float64, newCC func(*tcp.TCPSenderState) tcp.CongestionControl) *pathSim {
	p := &pathSim{
		rate:     rateMbit * 1e6 / 8,
		oneWay:   rtt / 2,
		loss:     loss,
		mss:      1448,
		rng:      rand.New(rand.NewPCG(1, 2)),
		inflight: make(map[int]*simPkt),
		acked:    make(map[int]bool),
		warmup:   2 * time.Second,
	}
	// One BDP of queue, like a tbf with a 1-BDP burst buffer.
	p.queueCap = max(int(p.rate*rtt.Seconds())/p.mss, 8)
	p.st = &tcp.TCPSenderState{SndCwnd: tcp.InitialCwnd, Ssthresh: tcp.InitialSsthresh, MaxPayloadSize: p.mss}
	p.cc = newCC(p.st)
	return p
}

func mono(d time.Duration) tcpip.MonotonicTime { return tcpip.MonotonicTime{}.Add(d) }

// run simulates until d and returns the goodput after warmup in Mbit/s.
func (p *pathSim) run(d time.Duration) float64 {
	for p.now < d {
		p.send()
		next := d
		if len(p.events) > 0 && p.events[0].at < next {
			next = p.events[0].at
		}
		if p.canSend() && p.paceNext > p.now && p.paceNext < next {
			next = p.paceNext
		}
		p.now = next
		for len(p.events) > 0 && p.events[0].at <= p.now {
			p.ack(heap.Pop(&p.events).(simEvent).pkt)
		}
		if p.trace != nil {
			p.trace(p.now)
		}
	}
	return float64(p.delivered) * 8 / (d - p.warmup).Seconds() / 1e6
}

func (p *pathSim) canSend() bool { return p.st.Outstanding < p.st.SndCwnd }

func (p *pathSim) send() {
	for p.canSend() {
		if pc, ok := p.cc.(tcp.Pacer); ok && pc.PacingRate() > 0 {
			if p.paceNext-p.now > time.Millisecond {
				return
			}
			if p.paceNext < p.now {
				p.paceNext = p.now
			}
			p.paceNext += time.Duration(float64(p.mss) / float64(pc.PacingRate()) * 1e9)
		}
		seq := p.seq
		if len(p.pending) > 0 {
			seq, p.pending = p.pending[0], p.pending[1:]
		} else {
			p.seq++
			if o, ok := p.cc.(tcp.SendObserver); ok {
				o.OnSend(p.mss, mono(p.now))
			}
		}
		p.transmit(seq)
	}
}

func (p *pathSim) transmit(seq int) {
	pkt := &simPkt{seq: seq, sentAt: p.now}
	p.inflight[seq] = pkt
	p.st.Outstanding++
	p.st.LastSendTime = mono(p.now)
	// Queue: drop the packets that left; tail-drop when full.
	for len(p.queued) > 0 && p.queued[0] <= p.now {
		p.queued = p.queued[1:]
	}
	if len(p.queued) >= p.queueCap {
		pkt.lost = true
		p.scheduleLossNotice(pkt)
		return
	}
	start := max(p.now, p.linkFree)
	p.linkFree = start + time.Duration(float64(p.mss)/p.rate*1e9)
	p.queued = append(p.queued, p.linkFree)
	if p.rng.Float64() < p.loss {
		pkt.lost = true
		p.scheduleLossNotice(pkt)
		return
	}
	heap.Push(&p.events, simEvent{at: p.linkFree + 2*p.oneWay, pkt: pkt})
}

// scheduleLossNotice makes the loss known about when three later packets
// are acked: one RTT and three serialization times after the send.
func (p *pathSim) scheduleLossNotice(pkt *simPkt) {
	at := max(p.now, p.linkFree) + 2*p.oneWay + 3*time.Duration(float64(p.mss)/p.rate*1e9)
	heap.Push(&p.events, simEvent{at: at, pkt: pkt})
}

func (p *pathSim) ack(pkt *simPkt) {
	if p.inflight[pkt.seq] != pkt {
		return
	}
	delete(p.inflight, pkt.seq)
	p.st.Outstanding--
	if pkt.lost {
		if !p.recovery {
			p.cc.HandleLossDetected()
			p.recovery = true
			p.recEnd = p.seq
			p.st.SndCwnd = p.st.Ssthresh + 3
		}
		p.pending = append(p.pending, pkt.seq)
		return
	}
	rtt := p.now - pkt.sentAt
	if !p.acked[pkt.seq] {
		p.acked[pkt.seq] = true
		if p.now >= p.warmup {
			p.delivered += p.mss
		}
	}
	if p.recovery && len(p.pending) == 0 && p.lowestOutstanding() >= p.recEnd {
		p.recovery = false
		p.st.SndCwnd = p.st.Ssthresh
		p.cc.PostRecovery()
	}
	if !p.recovery {
		p.cc.Update(1, rtt, mono(p.now))
	}
	if o, ok := p.cc.(tcp.AckObserver); ok {
		o.OnAck(tcp.AckSample{Acked: p.mss, Delivered: p.mss, RTT: rtt, AckTime: mono(p.now), InRecovery: p.recovery})
	}
}

func (p *pathSim) lowestOutstanding() int {
	low := p.seq
	for s := range p.inflight {
		low = min(low, s)
	}
	return low
}

// renoRef is textbook Reno (RFC 5681), the loss-driven reference the tests
// compare against: half the window per loss event.
type renoRef struct {
	st    *tcp.TCPSenderState
	count int
}

func (r *renoRef) HandleLossDetected() { r.st.Ssthresh = max(r.st.Outstanding/2, 2) }
func (r *renoRef) HandleRTOExpired()   { r.st.Ssthresh = max(r.st.Outstanding/2, 2); r.st.SndCwnd = 1 }
func (r *renoRef) PostRecovery()       {}
func (r *renoRef) Update(n int, _ time.Duration, _ tcpip.MonotonicTime) {
	for ; n > 0; n-- {
		if r.st.SndCwnd < r.st.Ssthresh {
			r.st.SndCwnd++
			continue
		}
		if r.count++; r.count >= r.st.SndCwnd {
			r.count = 0
			r.st.SndCwnd++
		}
	}
}
