// Package cc holds the congestion controllers mptun supplies to gVisor's TCP
// senders through the hook its patch adds (patches/gvisor): gVisor alone has
// only Reno and CUBIC, without pacing, and CUBIC collapses under random loss.
//
// A controller works on the sender state gVisor gives it (SndCwnd,
// Ssthresh, Outstanding, MaxPayloadSize) and on the events of
// tcp.CongestionControl, tcp.AckObserver and tcp.Pacer. It runs under the
// gVisor endpoint's lock: no locks of its own, no blocking.
package cc

import (
	"fmt"
	"strings"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// Names of the controllers. "cubic" and "reno" are gVisor's own.
const (
	NameBBR   = "bbr"
	NameLIA   = "lia"
	NameCubic = "cubic"
	NameReno  = "reno"
)

// Names lists every controller a stack or connection can select.
func Names() []string { return []string{NameBBR, NameLIA, NameCubic, NameReno} }

// Valid reports an error naming the choices when name is not a controller.
func Valid(name string) error {
	for _, n := range Names() {
		if n == name {
			return nil
		}
	}
	return fmt.Errorf("congestion control %q: want one of %s", name, strings.Join(Names(), ", "))
}

// Options are what a controller shares beyond its own sender.
type Options struct {
	// Events is where it counts its events besides its own report (an
	// endpoint's MIB).
	Events Events
	// Group couples the subflows of one connection (LIA); nil: none.
	Group *Group
}

// New returns the controller called name for a sender with state st, or nil
// when gVisor's own controller of that name should run (cubic, reno).
func New(name string, st *tcp.TCPSenderState, o Options) tcp.CongestionControl {
	switch name {
	case NameBBR:
		b := NewBBR(st)
		b.ev = o.Events
		return b
	case NameLIA:
		return NewLIA(st, o.Group, o.Events)
	default:
		return nil
	}
}

// Closer is implemented by controllers that hold shared state (a Group):
// the owner of the sender calls Close when the sender is gone.
type Closer interface {
	Close()
}

// Events are counters shared by many controllers (an endpoint's MIB); a nil
// one is not counted.
type Events struct {
	LossEvents   *atomic.Uint64 // recoveries entered
	RTOs         *atomic.Uint64 // retransmission timeouts
	ProbeRTTs    *atomic.Uint64 // ProbeRTT phases
	StartupExits *atomic.Uint64 // Startup found the pipe full
}

func count(c *atomic.Uint64) {
	if c != nil {
		c.Add(1)
	}
}

// Info is what a controller reports for diagnostics (stats, status,
// metrics).
type Info struct {
	Name        string
	State       string  // e.g. "startup", "probe_bw"
	PacingRate  uint64  // bytes per second, 0 when not pacing
	BtlBw       uint64  // bottleneck bandwidth estimate, bytes per second
	MinRTT      float64 // seconds, 0 when unknown
	Cwnd        int     // packets
	LossEvents  uint64  // recoveries entered
	RTOs        uint64  // retransmission timeouts
	ProbeRTTs   uint64  // ProbeRTT phases entered
	StartupExit uint64  // 1 once Startup found the pipe full
	Alpha       float64 // LIA's coupling factor (RFC 6356), 0 for others
}

// Reporter is implemented by our controllers.
type Reporter interface {
	Info() Info
}
