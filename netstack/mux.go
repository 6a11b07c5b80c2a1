package netstack

import (
	"encoding/binary"
	"fmt"
	"runtime/debug"
	"sync"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// Flow sees every TCP segment of a registered flow, in both directions. Its
// methods run on gVisor's goroutines, sometimes under gVisor's endpoint locks:
// they must never call back into a gVisor endpoint.
type Flow interface {
	// Incoming is called before gVisor sees an arriving segment. Returning
	// false drops it.
	Incoming(seg *Segment) bool
	// Outgoing may write options into opt (len(opt) is the room left) for a
	// segment gVisor sends. It returns how many bytes it wrote and how many
	// payload bytes, from the segment's first, those options describe; when
	// cover < seg.PayloadLen the layer splits the segment there and calls
	// Outgoing again for the rest. It may be asked twice about the same
	// segment (once from AddHeader, under the sending TCP endpoint's lock,
	// and again from WritePackets when the segment needs that split), so
	// it must give the same answer for the same segment.
	Outgoing(seg *Segment, opt []byte) (n, cover int)
}

// PanicHandler learns of a Flow (or Acceptor) that panicked on a segment
// of tuple t: the layer has unregistered the flow and dropped the segment;
// the handler ends what the flow belonged to. v and stack are the panic's
// value and goroutine stack. It runs on a goroutine of its own.
type PanicHandler func(t Tuple, f Flow, v any, stack []byte)

// Acceptor is consulted for a SYN of an unknown flow to a local port.
type Acceptor interface {
	// SYN returns the Flow to register for the new flow (nil leaves it to
	// gVisor untouched), and whether to drop the SYN.
	SYN(seg *Segment) (f Flow, drop bool)
}

// MuxStats counts what the option layer did (MIB-style).
type MuxStats struct {
	SegmentsOut, SegmentsIn       atomic.Uint64
	SegmentsSplit                 atomic.Uint64
	RewrittenInPlace              atomic.Uint64 // gVisor's packet reused, headers updated
	SACKTrimmed                   atomic.Uint64
	ControlSent                   atomic.Uint64
	BadChecksumIn                 atomic.Uint64
	NoRoomForOptions              atomic.Uint64
	DroppedIn                     atomic.Uint64
	WriteErrors                   atomic.Uint64
	PassThroughOut, PassThroughIn atomic.Uint64
	// FlowPanics counts segments on which a Flow or Acceptor panicked:
	// the flow is cut off and the process goes on serving the others.
	FlowPanics atomic.Uint64
}

// Mux connects the option layers of all NICs of a stack to the flows
// registered by the MPTCP engine.
type Mux struct {
	mu        sync.RWMutex
	flows     map[Tuple]*flowEntry
	acceptors map[uint16]Acceptor
	segPool   sync.Pool
	outPool   sync.Pool
	onPanic   atomic.Pointer[PanicHandler]
	Stats     MuxStats
}

// SetPanicHandler installs h (nil: none). Without a handler a panicking
// flow is still cut off and counted.
func (m *Mux) SetPanicHandler(h PanicHandler) {
	if h == nil {
		m.onPanic.Store(nil)
		return
	}
	m.onPanic.Store(&h)
}

// contain turns a panic of flow f on a segment of t into the loss of that
// flow alone: one peer's segments must not take down a process that serves
// many (a concentrator). Deferred around every call into a Flow, with the
// caller's named result: it is set to false when it recovered.
func (m *Mux) contain(t Tuple, f Flow, ok *bool) {
	v := recover()
	if v == nil {
		return
	}
	*ok = false
	m.Stats.FlowPanics.Add(1)
	m.Unregister(t)
	st := debug.Stack()
	if h := m.onPanic.Load(); h != nil {
		go (*h)(t, f, v, st)
	}
}

// NewMux returns an empty Mux.
func NewMux() *Mux {
	m := &Mux{flows: make(map[Tuple]*flowEntry), acceptors: make(map[uint16]Acceptor)}
	m.segPool.New = func() any { return new(Segment) }
	m.outPool.New = func() any { return new(outScratch) }
	return m
}

type flowEntry struct {
	flow Flow
	gone atomic.Bool // unregistered (or replaced): layers drop cached pointers

	mu     sync.Mutex
	via    *Layer
	ipv6   bool
	valid  bool // a segment went out, so the fields below are known
	sndNxt uint32
	ack    uint32
	wnd    uint16
	hasTS  bool
	tsVal  uint32
	tsEcr  uint32
}

// Register attaches f to the flow t (our side first).
func (m *Mux) Register(t Tuple, f Flow) {
	m.mu.Lock()
	if old := m.flows[t]; old != nil {
		old.gone.Store(true)
	}
	m.flows[t] = &flowEntry{flow: f}
	m.mu.Unlock()
}

// Unregister detaches flow t.
func (m *Mux) Unregister(t Tuple) {
	m.mu.Lock()
	if old := m.flows[t]; old != nil {
		old.gone.Store(true)
	}
	delete(m.flows, t)
	m.mu.Unlock()
}

// SetAcceptor makes a consulted for SYNs to local port (nil removes it).
func (m *Mux) SetAcceptor(port uint16, a Acceptor) {
	m.mu.Lock()
	if a == nil {
		delete(m.acceptors, port)
	} else {
		m.acceptors[port] = a
	}
	m.mu.Unlock()
}

func (m *Mux) lookup(t Tuple) *flowEntry {
	m.mu.RLock()
	e := m.flows[t]
	m.mu.RUnlock()
	return e
}

func (m *Mux) acceptor(port uint16) Acceptor {
	m.mu.RLock()
	a := m.acceptors[port]
	m.mu.RUnlock()
	return a
}

// noteOut records a segment l sent on the flow: sendControl builds its
// segments from the latest of these (sequence number, ACK, window, TS).
func (e *flowEntry) noteOut(l *Layer, ipv6 bool, tcp header.TCP, plen int, opts []byte) {
	end := tcp.SequenceNumber() + uint32(plen)
	if tcp.Flags()&(header.TCPFlagSyn|header.TCPFlagFin) != 0 {
		end++
	}
	ts := ParseTCPOptions(opts)
	e.mu.Lock()
	e.via = l
	e.ipv6 = ipv6
	if !e.valid || int32(end-e.sndNxt) > 0 {
		e.sndNxt = end
	}
	if tcp.Flags()&header.TCPFlagAck != 0 {
		e.ack = tcp.AckNumber()
		e.wnd = tcp.WindowSize()
	}
	if ts.HasTS {
		e.hasTS, e.tsVal, e.tsEcr = true, ts.TSVal, ts.TSEc
	}
	e.valid = true
	e.mu.Unlock()
}

// SendACK sends a pure ACK on flow t, carrying opts (MPTCP options), built
// from the last segment gVisor sent on it. gVisor never acknowledges a pure
// ACK, so DATA_ACK updates, DATA_FINs and the fourth ACK of a join need this.
func (m *Mux) SendACK(t Tuple, opts []byte) error {
	return m.sendControl(t, header.TCPFlagAck, opts)
}

// SendRST resets flow t with opts (MP_TCPRST, MP_FASTCLOSE).
func (m *Mux) SendRST(t Tuple, opts []byte) error {
	return m.sendControl(t, header.TCPFlagAck|header.TCPFlagRst, opts)
}

func (m *Mux) sendControl(t Tuple, flags header.TCPFlags, opts []byte) error {
	e := m.lookup(t)
	if e == nil {
		return fmt.Errorf("netstack: flow %v: not registered", t)
	}
	e.mu.Lock()
	if !e.valid || e.via == nil {
		e.mu.Unlock()
		return fmt.Errorf("netstack: flow %v: no segment sent yet", t)
	}
	via, ipv6, seq, ack, wnd := e.via, e.ipv6, e.sndNxt, e.ack, e.wnd
	var o [maxTCPOptions]byte
	all := o[:0]
	if e.hasTS && flags&header.TCPFlagRst == 0 {
		all = append(all, header.TCPOptionNOP, header.TCPOptionNOP, header.TCPOptionTS, 10)
		all = binary.BigEndian.AppendUint32(all, e.tsVal)
		all = binary.BigEndian.AppendUint32(all, e.tsEcr)
	}
	e.mu.Unlock()
	if len(all)+len(opts) > maxTCPOptions {
		return fmt.Errorf("netstack: flow %v: %d bytes of options do not fit", t, len(opts))
	}
	all = append(all, opts...)
	return via.SendRaw(ipv6, t, seq, ack, flags, wnd, all)
}
