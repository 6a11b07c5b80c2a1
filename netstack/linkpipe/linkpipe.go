// Package linkpipe joins two gVisor stacks by an emulated point-to-point
// link: a pair of connected stack.LinkEndpoints with per-direction delay,
// jitter, random loss, rate limiting with a bounded tail-drop queue,
// outages, and a middlebox (Hook) that may rewrite or drop packets. It needs
// no privileges, so the MPTCP engine's in-process tests can model several
// uplinks, and what sits on them, with it.
//
// The link carries bare L3 packets (IPv4/IPv6, no link header, no ARP/NDP
// resolution), like gVisor's link/channel and link/pipe. It advertises no
// capabilities (in particular no GSO), so every TCP segment crosses it as a
// separate packet. Every packet is deep-copied into a fresh PacketBuffer on
// the way, so the two stacks never share packet memory, exactly as across a
// real wire; a layer that rewrites headers in place on one side cannot
// corrupt the other side's retransmission data.
package linkpipe

import (
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// DefaultMTU is used when Config.MTU is zero.
const DefaultMTU = 1500

// DefaultQueueBytes is the minimum default queue bound of a rate-limited
// direction (see Direction.QueueBytes).
const DefaultQueueBytes = 256 << 10

// Direction describes the emulation applied to one direction of the link.
type Direction struct {
	// Delay is the one-way propagation delay added to every packet.
	Delay time.Duration
	// Jitter adds a uniformly distributed offset in [-Jitter, +Jitter] to
	// Delay (never below zero). Without Reorder, packets keep their order:
	// a packet is never delivered before its predecessor.
	Jitter time.Duration
	// Reorder lets jitter reorder packets (a packet with a smaller random
	// delay overtakes its predecessors).
	Reorder bool
	// Loss is the probability (0..1) that a packet is dropped at random.
	Loss float64
	// RateBps limits the direction to this many bits per second of L3
	// bytes; 0 means unlimited.
	RateBps int64
	// QueueBytes bounds the bytes waiting for transmission at RateBps;
	// packets beyond it are tail-dropped. 0 picks the larger of
	// DefaultQueueBytes and one bandwidth-delay product (RateBps × 2×Delay).
	// It has no effect when RateBps is 0 (an unlimited link never queues).
	QueueBytes int
}

// Hook is a middlebox on one direction of a link, in front of the receiving
// endpoint: it sees every packet the link is about to deliver (after loss,
// queueing and delay), as the bytes of its IP packet. It may rewrite them
// in place, without changing the length (a NAT, a normalising firewall, a
// corrupting path), and returns false to drop the packet (a firewall). The
// bytes are the link's own copy, so rewriting them costs no copy and never
// reaches the sender. It runs on the direction's delivery goroutine, one
// packet at a time; like a delivery, it must not call Close.
type Hook func(pkt []byte) (pass bool)

// Config describes a link.
type Config struct {
	// MTU of both endpoints; 0 means DefaultMTU.
	MTU uint32
	// AtoB is applied to packets written to endpoint a, BtoA to packets
	// written to b.
	AtoB, BtoA Direction
	// Seed makes loss and jitter deterministic for a given packet sequence.
	Seed int64
}

// DirectionStats counts the packets of one direction. Every packet offered
// to the link is counted in Sent and then in exactly one of Delivered or a
// Dropped counter (or is still in flight).
type DirectionStats struct {
	SentPackets, SentBytes           uint64
	DeliveredPackets, DeliveredBytes uint64
	// DroppedLoss counts random losses (Direction.Loss).
	DroppedLoss uint64
	// DroppedQueue counts tail drops of the bounded rate-limiting queue.
	DroppedQueue uint64
	// DroppedDown counts packets dropped because the link was down, when
	// they were sent or while they were in flight.
	DroppedDown uint64
	// DroppedHook counts packets a Hook dropped.
	DroppedHook uint64
	// DroppedOther counts packets dropped because the receiving endpoint
	// was not attached to a stack, was not IP, or the link was closed.
	DroppedOther uint64
}

// Stats holds an endpoint's view of both directions of its link.
type Stats struct {
	// Tx is the direction from this endpoint to its peer.
	Tx DirectionStats
	// Rx is the direction from the peer to this endpoint.
	Rx DirectionStats
}

// link is the state shared by both endpoints.
type link struct {
	down atomic.Bool
	// downEpoch counts outages, so that a packet sent before an outage is
	// never delivered after it, even if the link is already up again.
	downEpoch atomic.Uint64
	closed    atomic.Bool
	done      chan struct{}
	wg        sync.WaitGroup
	closeOnce sync.Once
	dirs      [2]*direction
}

// Endpoint is one end of a link. It implements stack.LinkEndpoint.
type Endpoint struct {
	link *link
	// tx carries packets written to this endpoint, rx delivers to it.
	tx, rx *direction

	mtu        atomic.Uint32
	dispatcher atomic.Pointer[dispatcherBox]

	mu       sync.Mutex
	linkAddr tcpip.LinkAddress
}

// dispatcherBox lets an interface value live in an atomic.Pointer.
type dispatcherBox struct{ d stack.NetworkDispatcher }

var _ stack.LinkEndpoint = (*Endpoint)(nil)

// New creates a link and returns its two ends. Each direction runs one
// delivery goroutine until Close is called on either end.
func New(cfg Config) (a, b *Endpoint) {
	mtu := cfg.MTU
	if mtu == 0 {
		mtu = DefaultMTU
	}
	l := &link{done: make(chan struct{})}
	a = &Endpoint{link: l}
	b = &Endpoint{link: l}
	a.mtu.Store(mtu)
	b.mtu.Store(mtu)
	// Distinct seeds per direction so both directions do not lose the same
	// packet indexes.
	ab := newDirection(l, b, cfg.AtoB, uint64(cfg.Seed), 1)
	ba := newDirection(l, a, cfg.BtoA, uint64(cfg.Seed), 2)
	l.dirs = [2]*direction{ab, ba}
	a.tx, a.rx = ab, ba
	b.tx, b.rx = ba, ab
	for _, d := range l.dirs {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			d.run()
		}()
	}
	return a, b
}

// SetDown takes the whole link down (both directions drop everything,
// including packets already in flight) or brings it back up.
func (e *Endpoint) SetDown(down bool) {
	if down {
		e.link.down.Store(true)
		e.link.downEpoch.Add(1)
		for _, d := range e.link.dirs {
			d.dropQueued()
		}
		return
	}
	e.link.down.Store(false)
}

// IsDown reports whether the link is down.
func (e *Endpoint) IsDown() bool { return e.link.down.Load() }

// SetDirection changes the emulation of this endpoint's outgoing direction.
// Packets already in flight keep their schedule; the order of delivery is
// preserved unless d.Reorder is set.
func (e *Endpoint) SetDirection(d Direction) { e.tx.setConfig(d) }

// SetHook puts the middlebox h on this endpoint's outgoing direction, in
// front of the peer (nil removes it). It is kept apart from Direction, so
// that changing the emulation with SetDirection leaves the middlebox in
// place. Packets in flight meet the hook installed when they arrive.
func (e *Endpoint) SetHook(h Hook) { e.tx.setHook(h) }

// Direction returns the emulation of this endpoint's outgoing direction.
func (e *Endpoint) Direction() Direction {
	e.tx.mu.Lock()
	defer e.tx.mu.Unlock()
	return e.tx.cfg
}

// Stats returns counters of both directions as seen from this endpoint.
func (e *Endpoint) Stats() Stats {
	return Stats{Tx: e.tx.stats.snapshot(), Rx: e.rx.stats.snapshot()}
}

// Close shuts the whole link down: both endpoints stop carrying packets,
// queued packets are released, and Close returns after the delivery
// goroutines have exited. It is idempotent and also called by the stack
// when the NIC is removed. Close must not be called from within a packet
// delivery (the stack's receive path), where it would wait for itself.
func (e *Endpoint) Close() {
	l := e.link
	l.closeOnce.Do(func() {
		l.closed.Store(true)
		close(l.done)
		l.wg.Wait()
		for _, d := range l.dirs {
			d.releaseAll()
		}
	})
}

// WritePackets implements stack.LinkWriter. It copies each packet and
// queues the copy; it never takes the caller's references.
func (e *Endpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	if e.link.closed.Load() {
		return 0, &tcpip.ErrClosedForSend{}
	}
	n := 0
	for _, pkt := range pkts.AsSlice() {
		e.tx.send(pkt)
		n++
	}
	return n, nil
}

// Attach implements stack.NetworkLinkEndpoint.
func (e *Endpoint) Attach(dispatcher stack.NetworkDispatcher) {
	if dispatcher == nil {
		e.dispatcher.Store(nil)
		return
	}
	e.dispatcher.Store(&dispatcherBox{d: dispatcher})
}

// IsAttached implements stack.NetworkLinkEndpoint.
func (e *Endpoint) IsAttached() bool { return e.dispatcher.Load() != nil }

// Wait implements stack.NetworkLinkEndpoint: it returns once the link is
// closed and its goroutines have exited, or at once if it is still open
// (the stack calls Wait without asking the link to stop).
func (e *Endpoint) Wait() {
	if e.link.closed.Load() {
		e.link.wg.Wait()
	}
}

// MTU implements stack.NetworkLinkEndpoint.
func (e *Endpoint) MTU() uint32 { return e.mtu.Load() }

// SetMTU implements stack.NetworkLinkEndpoint.
func (e *Endpoint) SetMTU(mtu uint32) { e.mtu.Store(mtu) }

// MaxHeaderLength implements stack.NetworkLinkEndpoint: there is no link
// header.
func (*Endpoint) MaxHeaderLength() uint16 { return 0 }

// LinkAddress implements stack.NetworkLinkEndpoint.
func (e *Endpoint) LinkAddress() tcpip.LinkAddress {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.linkAddr
}

// SetLinkAddress implements stack.NetworkLinkEndpoint.
func (e *Endpoint) SetLinkAddress(addr tcpip.LinkAddress) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.linkAddr = addr
}

// Capabilities implements stack.NetworkLinkEndpoint: none, so no GSO and
// no resolution.
func (*Endpoint) Capabilities() stack.LinkEndpointCapabilities { return 0 }

// ARPHardwareType implements stack.NetworkLinkEndpoint.
func (*Endpoint) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareNone }

// AddHeader implements stack.NetworkLinkEndpoint.
func (*Endpoint) AddHeader(*stack.PacketBuffer) {}

// ParseHeader implements stack.NetworkLinkEndpoint.
func (*Endpoint) ParseHeader(*stack.PacketBuffer) bool { return true }

// SetOnCloseAction implements stack.NetworkLinkEndpoint. The link never
// closes by itself (only through Close), so the action is never needed.
func (*Endpoint) SetOnCloseAction(func()) {}

// deliverTo hands a packet to the endpoint's stack, if attached. It takes
// ownership of pkt's reference.
func (e *Endpoint) deliverTo(proto tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) bool {
	defer pkt.DecRef()
	box := e.dispatcher.Load()
	if box == nil {
		return false
	}
	box.d.DeliverNetworkPacket(proto, pkt)
	return true
}
