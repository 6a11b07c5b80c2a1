package mptcpep

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/mptun/mptun/mptcpep/header"
	"github.com/mptun/mptun/netstack"
)

// ErrNoUplink reports that no local uplink can reach the destination.
var ErrNoUplink = errors.New("mptcp: no usable local uplink")

// Dial opens an MPTCP connection to remote: the initial subflow from the
// first regular local uplink of the right family, then (path manager) one
// subflow from every other uplink. A peer that does not answer MP_CAPABLE
// gets a plain TCP connection (Conn.MultipathTCP reports false).
func (e *Endpoint) Dial(ctx context.Context, remote netip.AddrPort) (*Conn, error) {
	ctx = ctxOrBackground(ctx)
	var first *Local
	for _, l := range e.localList() {
		if l.Addr.Is4() != remote.Addr().Is4() {
			continue
		}
		if first == nil || (first.Backup && !l.Backup) {
			l := l
			first = &l
		}
	}
	if first == nil {
		return nil, fmt.Errorf("dial %v: %w", remote, ErrNoUplink)
	}
	c := newConn(e, true)
	c.port = remote.Port()
	key, err := e.newKey(c)
	if err != nil {
		return nil, err
	}
	c.setLocalKey(key)
	c.remoteAddrs[0] = remoteAddr{id: 0, addr: remote}
	sf, err := c.openSubflow(ctx, *first, remote, true, 0)
	if err != nil {
		e.forget(c)
		return nil, fmt.Errorf("dial %v: %w", remote, err)
	}
	c.mu.Lock()
	fb := c.fallback
	if fb {
		e.st.Mux.Unregister(sf.tuple)
	}
	c.mu.Unlock()
	if fb {
		e.MIB.FallbackConns.Add(1)
		e.forget(c)
		c.fb = newFallbackConn(sf.wq, sf.ep)
		return c, nil
	}
	c.start()
	return c, nil
}

// openSubflow creates a gVisor endpoint bound to local, registers it with
// the option layer and connects it. For a join, remoteID is the peer's
// address ID.
func (c *Conn) openSubflow(ctx context.Context, local Local, remote netip.AddrPort, initial bool, remoteID uint8) (*subflow, error) {
	e := c.e
	nic := e.st.NICFor(local.Addr)
	if nic == nil {
		return nil, fmt.Errorf("local %v: %w", local.Addr, ErrNoUplink)
	}
	proto := ipv4.ProtocolNumber
	if local.Addr.Is6() {
		proto = ipv6.ProtocolNumber
	}
	wq := new(waiter.Queue)
	ep, terr := e.st.S.NewEndpoint(tcp.ProtocolNumber, proto, wq)
	if terr != nil {
		return nil, fmt.Errorf("new endpoint: %s", terr)
	}
	if terr := ep.SocketOptions().SetBindToDevice(int32(nic.ID)); terr != nil {
		ep.Close()
		return nil, fmt.Errorf("bind to %s: %s", nic.Name, terr)
	}
	ep.SocketOptions().SetDelayOption(false)
	e.sizeReceiveBuffer(ep)
	if terr := ep.Bind(tcpip.FullAddress{Addr: tcpip.AddrFromSlice(local.Addr.AsSlice())}); terr != nil {
		ep.Close()
		return nil, fmt.Errorf("bind %v: %s", local.Addr, terr)
	}
	la, terr := ep.GetLocalAddress()
	if terr != nil {
		ep.Close()
		return nil, fmt.Errorf("local address: %s", terr)
	}
	t := netstack.Tuple{Local: netip.AddrPortFrom(local.Addr, la.Port), Remote: remote}
	sf := newSubflow(c, t, true, initial)
	sf.ep, sf.wq = ep, wq
	sf.uplinkID = local.ID
	sf.backup = local.Backup
	sf.remoteID = remoteID
	sf.localNonce = e.nonce()
	sf.state = sfSynSent
	c.mu.Lock()
	sf.localID = c.wireIDLocked(local.Addr, local.ID)
	c.subflows = append(c.subflows, sf)
	c.mu.Unlock()
	e.st.Mux.Register(t, sf)

	we, ch := waiter.NewChannelEntry(waiter.WritableEvents | waiter.EventErr | waiter.EventHUp)
	wq.EventRegister(&we)
	defer wq.EventUnregister(&we)
	terr = ep.Connect(tcpip.FullAddress{Addr: tcpip.AddrFromSlice(remote.Addr().AsSlice()), Port: remote.Port()})
	if _, started := terr.(*tcpip.ErrConnectStarted); started {
		select {
		case <-ctx.Done():
			c.dropSubflow(sf)
			return nil, ctx.Err()
		case <-c.done:
			c.dropSubflow(sf)
			return nil, ErrClosed
		case <-ch:
		}
		terr = ep.LastError()
	}
	if terr != nil {
		c.mu.Lock()
		reason, transient := sf.rstReason, sf.rstTransient
		c.mu.Unlock()
		c.dropSubflow(sf)
		if reason >= 0 {
			return nil, &RefusedError{Reason: uint8(reason), Transient: transient}
		}
		return nil, fmt.Errorf("connect %v from %v: %s", remote, local.Addr, terr)
	}
	if !initial {
		c.mu.Lock()
		ok := sf.state == sfPreEstablished || sf.state == sfEstablished
		c.mu.Unlock()
		if !ok {
			c.dropSubflow(sf)
			return nil, fmt.Errorf("join %v from %v: refused", remote, local.Addr)
		}
	}
	return sf, nil
}

// RefusedError is a subflow the peer reset with MP_TCPRST during its
// handshake (RFC 8684 3.6).
type RefusedError struct {
	Reason    uint8
	Transient bool // the peer says the condition is temporary
}

func (e *RefusedError) Error() string {
	t := ""
	if e.Transient {
		t = ", transient"
	}
	return fmt.Sprintf("mptcp: subflow refused by the peer: MP_TCPRST reason %d (%s%s)", e.Reason, rstReasonName(e.Reason), t)
}

// permanent reports whether retrying the same pair is pointless while the
// connection lives: the peer's policy forbids it and says it will not change.
func (e *RefusedError) permanent() bool {
	return !e.Transient && e.Reason == header.RstReasonAdminProhibited
}

func rstReasonName(r uint8) string {
	switch r {
	case header.RstReasonUnspecified:
		return "unspecified"
	case header.RstReasonMPTCPError:
		return "MPTCP-specific error"
	case header.RstReasonLackOfResources:
		return "lack of resources"
	case header.RstReasonAdminProhibited:
		return "administratively prohibited"
	case header.RstReasonTooMuchOutstanding:
		return "too much outstanding data"
	case header.RstReasonUnacceptablePerf:
		return "unacceptable performance"
	case header.RstReasonMiddlebox:
		return "middlebox interference"
	}
	return "unknown"
}

// dropSubflow forgets a subflow that never got going.
func (c *Conn) dropSubflow(sf *subflow) {
	c.mu.Lock()
	sf.state = sfClosed
	for i, s := range c.subflows {
		if s == sf {
			c.subflows = append(c.subflows[:i], c.subflows[i+1:]...)
			break
		}
	}
	c.mu.Unlock()
	c.e.st.Mux.Unregister(sf.tuple)
	sf.ep.Abort()
}

// joinTimeout bounds one join attempt.
const joinTimeout = 10 * time.Second
