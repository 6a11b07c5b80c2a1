package linkpipe

import (
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// item is a packet copy waiting for its delivery time.
type item struct {
	view  *buffer.View
	proto tcpip.NetworkProtocolNumber
	// at is the delivery time in nanoseconds since direction.base.
	at int64
	// epoch is the link's down epoch when the packet was sent; a packet
	// from an earlier epoch was in flight during an outage.
	epoch uint64
}

// direction emulates one direction of a link: a transmitter serialising
// packets at a rate behind a bounded queue, followed by a delay line. The
// schedule is computed when a packet is sent (virtual time), so the
// delivery goroutine only has to wake up at the head's delivery time and
// hand over everything that is due; coarse timer wake-ups therefore cost
// burstiness, never rate or delay accuracy on average.
type direction struct {
	link *link
	dst  *Endpoint
	base time.Time
	wake chan struct{}

	mu sync.Mutex
	// +checklocks:mu
	cfg Direction
	// +checklocks:mu
	queueLimit int64
	// +checklocks:mu
	rng *rand.Rand
	// busyUntil is when the transmitter finishes the last accepted packet.
	// +checklocks:mu
	busyUntil int64
	// lastAt is the latest delivery time scheduled so far.
	// +checklocks:mu
	lastAt int64
	// +checklocks:mu
	q ring

	// hook is read on every delivery, so it is not under mu.
	hook atomic.Pointer[Hook]

	stats counters
}

func newDirection(l *link, dst *Endpoint, cfg Direction, seed, stream uint64) *direction {
	d := &direction{
		link: l,
		dst:  dst,
		base: time.Now(),
		wake: make(chan struct{}, 1),
		rng:  rand.New(rand.NewPCG(seed, stream)),
	}
	d.setConfig(cfg)
	return d
}

func (d *direction) now() int64 { return int64(time.Since(d.base)) }

func (d *direction) setConfig(cfg Direction) {
	limit := int64(cfg.QueueBytes)
	if limit <= 0 {
		limit = DefaultQueueBytes
		// One bandwidth-delay product over the round trip, computed in
		// float to avoid overflowing rate × nanoseconds.
		if bdp := int64(float64(cfg.RateBps) / 8 * (2 * cfg.Delay).Seconds()); bdp > limit {
			limit = bdp
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.cfg = cfg
	d.queueLimit = limit
}

func (d *direction) setHook(h Hook) {
	if h == nil {
		d.hook.Store(nil)
		return
	}
	d.hook.Store(&h)
}

// protocolOf returns the network protocol from the IP version nibble.
func protocolOf(b []byte) (tcpip.NetworkProtocolNumber, bool) {
	if len(b) == 0 {
		return 0, false
	}
	switch b[0] >> 4 {
	case 4:
		return header.IPv4ProtocolNumber, true
	case 6:
		return header.IPv6ProtocolNumber, true
	default:
		return 0, false
	}
}

// send schedules a copy of pkt. The caller keeps its reference to pkt.
func (d *direction) send(pkt *stack.PacketBuffer) {
	size := pkt.Size()
	d.stats.sentPackets.Add(1)
	d.stats.sentBytes.Add(uint64(size))
	epoch := d.link.downEpoch.Load()
	if d.link.down.Load() {
		d.stats.droppedDown.Add(1)
		return
	}
	// A deep copy into one fresh view: the peer owns it outright and gets
	// a contiguous packet, like one read from a wire.
	v := pkt.ToView()
	proto, ok := protocolOf(v.AsSlice())
	if !ok {
		v.Release()
		d.stats.droppedOther.Add(1)
		return
	}

	d.mu.Lock()
	cfg := d.cfg
	if cfg.Loss > 0 && d.rng.Float64() < cfg.Loss {
		d.mu.Unlock()
		v.Release()
		d.stats.droppedLoss.Add(1)
		return
	}
	// The ideal link needs no clock: deliver as soon as everything
	// scheduled before has been delivered.
	at := d.lastAt
	if cfg.RateBps > 0 || cfg.Delay > 0 || cfg.Jitter > 0 {
		now := d.now()
		start := now
		if cfg.RateBps > 0 {
			start = max(now, d.busyUntil)
			backlog := int64(float64(start-now) * float64(cfg.RateBps) / 8e9)
			if backlog+int64(size) > d.queueLimit {
				d.mu.Unlock()
				v.Release()
				d.stats.droppedQueue.Add(1)
				return
			}
			d.busyUntil = start + int64(size)*8e9/cfg.RateBps
			start = d.busyUntil
		}
		delay := int64(cfg.Delay)
		if j := int64(cfg.Jitter); j > 0 {
			delay = max(0, delay+d.rng.Int64N(2*j+1)-j)
		}
		at = start + delay
		if !cfg.Reorder {
			at = max(at, d.lastAt)
		}
	}
	d.lastAt = max(d.lastAt, at)
	head := d.q.insert(item{view: v, proto: proto, at: at, epoch: epoch})
	d.mu.Unlock()
	if head {
		select {
		case d.wake <- struct{}{}:
		default:
		}
	}
}

// run delivers packets when they are due, until the link is closed.
func (d *direction) run() {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	var batch []item
	for {
		d.mu.Lock()
		if d.q.len() == 0 {
			d.mu.Unlock()
			select {
			case <-d.wake:
			case <-d.link.done:
				return
			}
			continue
		}
		now := d.now()
		if wait := d.q.front().at - now; wait > 0 {
			d.mu.Unlock()
			timer.Reset(time.Duration(wait))
			select {
			case <-timer.C:
			case <-d.wake:
				timer.Stop()
			case <-d.link.done:
				return
			}
			continue
		}
		for d.q.len() > 0 && d.q.front().at <= now {
			batch = append(batch, d.q.popFront())
		}
		d.mu.Unlock()
		for i := range batch {
			d.deliver(batch[i])
			batch[i] = item{}
		}
		batch = batch[:0]
	}
}

// deliver hands one packet to the receiving stack, or drops it if an
// outage began after it was sent or the hook refuses it.
func (d *direction) deliver(it item) {
	if d.link.down.Load() || it.epoch != d.link.downEpoch.Load() {
		it.view.Release()
		d.stats.droppedDown.Add(1)
		return
	}
	if h := d.hook.Load(); h != nil && !(*h)(it.view.AsSlice()) {
		it.view.Release()
		d.stats.droppedHook.Add(1)
		return
	}
	size := it.view.Size()
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		Payload: buffer.MakeWithView(it.view),
	})
	if !d.dst.deliverTo(it.proto, pkt) {
		d.stats.droppedOther.Add(1)
		return
	}
	d.stats.deliveredPackets.Add(1)
	d.stats.deliveredBytes.Add(uint64(size))
}

// dropQueued discards everything in flight (an outage began).
func (d *direction) dropQueued() {
	d.mu.Lock()
	n := d.q.len()
	for d.q.len() > 0 {
		it := d.q.popFront()
		it.view.Release()
	}
	d.busyUntil = 0
	d.lastAt = 0
	d.mu.Unlock()
	d.stats.droppedDown.Add(uint64(n))
}

// releaseAll frees the packets left when the link is closed.
func (d *direction) releaseAll() {
	d.mu.Lock()
	n := d.q.len()
	for d.q.len() > 0 {
		it := d.q.popFront()
		it.view.Release()
	}
	d.mu.Unlock()
	d.stats.droppedOther.Add(uint64(n))
}

// counters are updated without the direction lock so that Stats never
// contends with the data path.
type counters struct {
	sentPackets, sentBytes           atomic.Uint64
	deliveredPackets, deliveredBytes atomic.Uint64
	droppedLoss, droppedQueue        atomic.Uint64
	droppedDown, droppedHook         atomic.Uint64
	droppedOther                     atomic.Uint64
}

func (c *counters) snapshot() DirectionStats {
	return DirectionStats{
		SentPackets:      c.sentPackets.Load(),
		SentBytes:        c.sentBytes.Load(),
		DeliveredPackets: c.deliveredPackets.Load(),
		DeliveredBytes:   c.deliveredBytes.Load(),
		DroppedLoss:      c.droppedLoss.Load(),
		DroppedQueue:     c.droppedQueue.Load(),
		DroppedDown:      c.droppedDown.Load(),
		DroppedHook:      c.droppedHook.Load(),
		DroppedOther:     c.droppedOther.Load(),
	}
}

// ring is a FIFO of items ordered by delivery time, growing by doubling.
type ring struct {
	buf  []item
	head int
	n    int
}

func (r *ring) len() int { return r.n }

func (r *ring) front() *item { return &r.buf[r.head] }

func (r *ring) at(i int) *item { return &r.buf[(r.head+i)&(len(r.buf)-1)] }

func (r *ring) popFront() item {
	it := r.buf[r.head]
	r.buf[r.head] = item{}
	r.head = (r.head + 1) & (len(r.buf) - 1)
	r.n--
	return it
}

// insert adds it after every item due no later than it, so equal times keep
// FIFO order; without reordering that is always the back. It reports
// whether it became the front.
func (r *ring) insert(it item) bool {
	if r.n == len(r.buf) {
		r.grow()
	}
	i := r.n
	// Shift later items back by one; jitter moves a packet only a few
	// places, so this is short.
	for i > 0 && r.at(i-1).at > it.at {
		*r.at(i) = *r.at(i - 1)
		i--
	}
	*r.at(i) = it
	r.n++
	return i == 0
}

func (r *ring) grow() {
	size := max(64, 2*len(r.buf))
	buf := make([]item, size)
	for i := 0; i < r.n; i++ {
		buf[i] = *r.at(i)
	}
	r.buf = buf
	r.head = 0
}
