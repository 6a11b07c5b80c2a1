package engine

import (
	"sync"

	"github.com/mptun/mptun/hostnet"
	"github.com/mptun/mptun/mptcpep"
)

// uplinkSet is the link-down policy: which uplinks the endpoint may start
// subflows from. It only decides; Engine.onLinkEvent carries the decision
// out, so the policy is testable without an endpoint or a host.
type uplinkSet struct {
	mu     sync.Mutex
	locals []mptcpep.Local // one per uplink, as given to the endpoint
	down   map[uint8]bool  // local IDs whose link is down
}

func newUplinkSet(locals []mptcpep.Local) *uplinkSet {
	return &uplinkSet{locals: append([]mptcpep.Local(nil), locals...), down: make(map[uint8]bool)}
}

// linkAction is what one link event asks of the endpoint.
type linkAction struct {
	// locals, if not nil, are the endpoint's new local addresses.
	locals []mptcpep.Local
	// withdraw, if not 0, is the local ID to remove from every running
	// connection: their data on it is reinjected on the others at once
	// instead of after retransmission timeouts.
	withdraw uint8
	// natAddrChanged: the uplink's own (SNAT) address went or came; the
	// NAT rules still name the old one.
	natAddrChanged bool
}

// apply records ev and says what to do: a downed uplink leaves the
// endpoint's locals and every connection; a returning one is offered
// again, so the path manager re-creates its subflows.
func (s *uplinkSet) apply(ev hostnet.LinkEvent) linkAction {
	id := LocalID(ev.Uplink.Index)
	switch ev.Kind {
	case hostnet.LinkDown:
		s.mu.Lock()
		s.down[id] = true
		s.mu.Unlock()
		return linkAction{locals: s.live(), withdraw: id}
	case hostnet.LinkUp:
		s.mu.Lock()
		delete(s.down, id)
		s.mu.Unlock()
		return linkAction{locals: s.live()}
	case hostnet.AddrRemoved, hostnet.AddrAdded:
		return linkAction{natAddrChanged: ev.Addr.Addr() == ev.Uplink.ExternalAddr}
	}
	return linkAction{}
}

// live are the uplinks not known to be down. With all of them down it
// keeps them all, so dialing still tries when a link returns unseen.
func (s *uplinkSet) live() []mptcpep.Local {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []mptcpep.Local
	for _, l := range s.locals {
		if !s.down[l.ID] {
			out = append(out, l)
		}
	}
	if len(out) == 0 {
		return append([]mptcpep.Local(nil), s.locals...)
	}
	return out
}

func (s *uplinkSet) isDown(id uint8) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.down[id]
}
