package netstack

import (
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"

	"github.com/mptun/mptun/netstack/cc"
)

// CongestionControlled may be implemented by a Flow to choose the congestion
// controller of its gVisor endpoint and to learn which one runs. gVisor asks
// when the endpoint's sender is created (handshake complete), under the
// endpoint's lock: both methods must return at once.
type CongestionControlled interface {
	// CongestionControl names the controller (cc.Names), "" for the
	// stack's default, and what it shares (events, coupling group).
	CongestionControl() (string, cc.Options)
	// ControllerCreated hands over the controller, nil when gVisor's own
	// (cubic, reno) runs.
	ControllerCreated(r cc.Reporter)
}

// ccFactory is the stack's tcp.CongestionControlFactory: a registered flow
// may choose, the others get the stack's default.
func (s *Stack) ccFactory(id stack.TransportEndpointID, st *tcp.TCPSenderState) tcp.CongestionControl {
	name := s.opts.CongestionControl
	var chooser CongestionControlled
	var o cc.Options
	if e := s.Mux.lookup(tupleOf(id)); e != nil {
		if c, ok := e.flow.(CongestionControlled); ok {
			chooser = c
			var n string
			if n, o = c.CongestionControl(); n != "" {
				name = n
			}
		}
	}
	ctl := cc.New(name, st, o)
	if chooser != nil {
		var r cc.Reporter
		if rep, ok := ctl.(cc.Reporter); ok {
			r = rep
		}
		chooser.ControllerCreated(r)
	}
	return ctl
}

// tupleOf is the Mux key of a gVisor endpoint ID (our side first).
func tupleOf(id stack.TransportEndpointID) Tuple {
	return Tuple{Local: addrPort(id.LocalAddress, id.LocalPort), Remote: addrPort(id.RemoteAddress, id.RemotePort)}
}
