package mptcpep

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/mptun/mptun/mptcpep/header"
	"github.com/mptun/mptun/netstack"
)

// Listener accepts MPTCP connections (and plain TCP ones, as fallback) on a
// port of every address of the stack. It implements net.Listener.
type Listener struct {
	e    *Endpoint
	port uint16
	eps  []tcpip.Endpoint
	wqs  []*waiter.Queue

	mu      sync.Mutex
	pending map[netstack.Tuple]pendingSYN
	accept  chan net.Conn
	done    chan struct{}
	once    sync.Once
	wg      sync.WaitGroup
}

type pendingSYN struct {
	sf *subflow
	at time.Time
}

// Listen listens on port over IPv4 (and IPv6 if the stack has IPv6
// addresses).
func (e *Endpoint) Listen(port uint16) (*Listener, error) {
	l := &Listener{
		e:       e,
		port:    port,
		pending: make(map[netstack.Tuple]pendingSYN),
		accept:  make(chan net.Conn, 128),
		done:    make(chan struct{}),
	}
	has6 := false
	for _, n := range e.st.NICs() {
		for _, a := range n.Addrs {
			if a.Addr().Is6() {
				has6 = true
			}
		}
	}
	protos := []tcpip.NetworkProtocolNumber{ipv4.ProtocolNumber}
	if has6 {
		protos = append(protos, ipv6.ProtocolNumber)
	}
	for _, p := range protos {
		wq := new(waiter.Queue)
		ep, terr := e.st.S.NewEndpoint(tcp.ProtocolNumber, p, wq)
		if terr != nil {
			l.closeEps()
			return nil, fmt.Errorf("listen :%d: %s", port, terr)
		}
		if p == ipv6.ProtocolNumber {
			ep.SocketOptions().SetV6Only(true)
		}
		ep.SocketOptions().SetReuseAddress(true)
		if terr := ep.Bind(tcpip.FullAddress{Port: port}); terr != nil {
			ep.Close()
			l.closeEps()
			return nil, fmt.Errorf("listen :%d: bind: %s", port, terr)
		}
		if terr := ep.Listen(1024); terr != nil {
			ep.Close()
			l.closeEps()
			return nil, fmt.Errorf("listen :%d: %s", port, terr)
		}
		l.eps = append(l.eps, ep)
		l.wqs = append(l.wqs, wq)
	}
	e.st.Mux.SetAcceptor(port, l)
	for i := range l.eps {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			l.acceptLoop(l.eps[i], l.wqs[i])
		}()
	}
	return l, nil
}

func (l *Listener) closeEps() {
	for _, ep := range l.eps {
		ep.Close()
	}
}

// SYN implements netstack.Acceptor: it decides what a new flow is.
func (l *Listener) SYN(seg *netstack.Segment) (netstack.Flow, bool) {
	e := l.e
	r := parseRx(seg.Options, &e.MIB)
	l.mu.Lock()
	full := len(l.pending) >= e.cfg.MaxPendingSYNs
	l.mu.Unlock()
	wscale := uint8(0)
	if r.wscale >= 0 {
		wscale = uint8(min(r.wscale, 14))
	}
	switch {
	case r.hasJoinSYN:
		e.MIB.MPJoinSYNRX.Add(1)
		c := e.lookupToken(r.joinSYN.Token)
		if c == nil || c.isDone() {
			e.MIB.MPJoinNoTokenFound.Add(1)
			l.refuse(seg, header.RstReasonMPTCPError, false)
			return nil, true
		}
		if full {
			e.MIB.PendingSYNDropped.Add(1)
			return nil, true
		}
		c.mu.Lock()
		reject := func(reason uint8, transient bool) (netstack.Flow, bool) {
			c.mu.Unlock()
			e.MIB.MPJoinRejected.Add(1)
			l.refuse(seg, reason, transient)
			return nil, true
		}
		live := 0
		for _, s := range c.subflows {
			if s.state != sfClosed {
				live++
			}
		}
		if e.cfg.DenyJoinInitialAddr && len(c.subflows) > 0 && seg.Tuple.Local == c.subflows[0].tuple.Local {
			// We said so with the C flag; a client that joins anyway is
			// refused for good.
			return reject(header.RstReasonAdminProhibited, false)
		}
		if live >= e.cfg.MaxSubflows {
			// The subflow limit: "administratively prohibited", as
			// Linux answers its PM's limits; transient, since a
			// subflow may close and make room.
			return reject(header.RstReasonAdminProhibited, true)
		}
		if !c.remoteKeyKnown || c.fallback || c.fail.pending() {
			// Not (or no longer) a connection that takes joins; only
			// the missing key can change.
			return reject(header.RstReasonMPTCPError, !c.remoteKeyKnown && !c.fallback)
		}
		sf := newSubflow(c, seg.Tuple, false, false)
		sf.state = sfSynRcvd
		sf.irs, sf.irsKnown = seg.Seq, true
		sf.remoteNonce = r.joinSYN.Nonce
		sf.remoteID = r.joinSYN.AddrID
		sf.remoteBackup = r.joinSYN.Backup
		sf.localNonce = e.nonce()
		sf.uplinkID = l.localID(seg.Tuple.Local.Addr())
		sf.localID = c.wireIDLocked(seg.Tuple.Local.Addr(), sf.uplinkID)
		sf.peerWScale = wscale
		c.subflows = append(c.subflows, sf)
		c.mu.Unlock()
		l.addPending(seg.Tuple, sf)
		return sf, false
	case r.hasMPC && r.mpc.NumKeys == 0:
		e.MIB.MPCapableSYNRX.Add(1)
		if full {
			e.MIB.PendingSYNDropped.Add(1)
			return nil, true
		}
		c := newConn(e, false)
		c.port = seg.Tuple.Remote.Port()
		key, err := e.newKey(c)
		if err != nil {
			e.log.Warn("mptcp: no key for new connection", "err", err)
			return nil, false // plain TCP is still better than nothing
		}
		c.setLocalKey(key)
		c.csum = e.cfg.Checksum || r.mpc.ChecksumRequired
		sf := newSubflow(c, seg.Tuple, false, true)
		sf.uplinkID = l.localID(seg.Tuple.Local.Addr())
		sf.state = sfSynRcvd
		sf.irs, sf.irsKnown = seg.Seq, true
		sf.peerWScale = wscale
		c.subflows = []*subflow{sf}
		c.remoteAddrs[0] = remoteAddr{id: 0, addr: seg.Tuple.Remote}
		l.addPending(seg.Tuple, sf)
		return sf, false
	default:
		e.MIB.MPCapableFallbackSYN.Add(1)
		return nil, false
	}
}

// refuse resets a SYN we will not take (unknown token, limits) with an
// MP_TCPRST that says why (RFC 8684 3.6).
func (l *Listener) refuse(seg *netstack.Segment, reason uint8, transient bool) {
	opt := rstOption(reason, transient)
	l.e.MIB.MPRstTX.Add(1)
	_ = seg.Via.SendRaw(seg.IPv6(), seg.Tuple, 0, seg.Seq+1, rstAck, 0, opt)
}

func (l *Listener) localID(a netip.Addr) uint8 {
	l.e.mu.Lock()
	defer l.e.mu.Unlock()
	for _, x := range l.e.announce {
		if x.Addr == a {
			return x.ID
		}
	}
	for _, x := range l.e.locals {
		if x.Addr == a {
			return x.ID
		}
	}
	return 0
}

func (l *Listener) addPending(t netstack.Tuple, sf *subflow) {
	l.mu.Lock()
	l.pending[t] = pendingSYN{sf: sf, at: time.Now()}
	l.mu.Unlock()
}

// sweep forgets connection attempts gVisor never completed.
func (l *Listener) sweep() {
	now := time.Now()
	l.mu.Lock()
	var stale []pendingSYN
	for t, p := range l.pending {
		if now.Sub(p.at) > 30*time.Second {
			stale = append(stale, p)
			delete(l.pending, t)
		}
	}
	l.mu.Unlock()
	for _, p := range stale {
		l.e.st.Mux.Unregister(p.sf.tuple)
		if p.sf.initial {
			l.e.forget(p.sf.c)
		} else {
			c := p.sf.c
			c.mu.Lock()
			p.sf.state = sfClosed
			c.mu.Unlock()
		}
	}
}

func (l *Listener) acceptLoop(lep tcpip.Endpoint, wq *waiter.Queue) {
	we, ch := waiter.NewChannelEntry(waiter.ReadableEvents)
	wq.EventRegister(&we)
	defer wq.EventUnregister(&we)
	sweep := time.NewTicker(5 * time.Second)
	defer sweep.Stop()
	for {
		ep, nwq, terr := lep.Accept(nil)
		if terr != nil {
			if _, ok := terr.(*tcpip.ErrWouldBlock); !ok {
				return
			}
			select {
			case <-ch:
			case <-sweep.C:
				l.sweep()
			case <-l.done:
				return
			}
			continue
		}
		l.adopt(ep, nwq)
	}
}

// adopt turns an accepted gVisor endpoint into a connection or a subflow.
func (l *Listener) adopt(ep tcpip.Endpoint, wq *waiter.Queue) {
	e := l.e
	la, err1 := ep.GetLocalAddress()
	ra, err2 := ep.GetRemoteAddress()
	if err1 != nil || err2 != nil {
		ep.Close()
		return
	}
	t := netstack.Tuple{Local: fullAddr(la), Remote: fullAddr(ra)}
	l.mu.Lock()
	p, ok := l.pending[t]
	delete(l.pending, t)
	l.mu.Unlock()
	ep.SocketOptions().SetDelayOption(false)
	if !ok {
		e.MIB.FallbackConns.Add(1)
		l.deliver(&Conn{e: e, fb: newFallbackConn(wq, ep), fallback: true, done: make(chan struct{})})
		return
	}
	e.sizeReceiveBuffer(ep)
	sf := p.sf
	c := sf.c
	c.mu.Lock()
	sf.ep, sf.wq = ep, wq
	if sf.state == sfClosed {
		c.mu.Unlock()
		ep.Abort()
		return
	}
	if !sf.initial {
		c.mu.Unlock()
		c.startReader(sf)
		c.mu.Lock()
		c.kickLocked()
		c.mu.Unlock()
		return
	}
	if !c.remoteKeyKnown {
		if len(sf.earlyDSS) > 0 {
			// The peer sends DSS, so it has our key and will resend the
			// lost data-carrying MP_CAPABLE: wait for it (keyArrived).
			c.awaitKey = func() { l.established(c) }
			c.mu.Unlock()
			e.MIB.MPCapableKeyWait.Add(1)
			time.AfterFunc(keyWaitTimeout, func() { l.keyTimeout(c, sf) })
			return
		}
		c.mu.Unlock()
		l.fallBack(c, sf)
		return
	}
	c.mu.Unlock()
	l.established(c)
}

// keyWaitTimeout bounds the wait for the data-carrying MP_CAPABLE of a
// peer whose later data came first: several RTOs of a 600 ms path.
const keyWaitTimeout = 10 * time.Second

// established starts an accepted connection whose key is known.
func (l *Listener) established(c *Conn) {
	c.mu.Lock()
	c.subflows[0].state = sfEstablished
	c.mu.Unlock()
	c.start()
	l.deliver(c)
}

// keyTimeout falls back to TCP if the peer's key never came.
func (l *Listener) keyTimeout(c *Conn, sf *subflow) {
	c.mu.Lock()
	waiting := c.awaitKey != nil
	c.awaitKey = nil
	c.mu.Unlock()
	if waiting {
		l.fallBack(c, sf)
	}
}

// fallBack delivers c as plain TCP: the third ACK carried no MP_CAPABLE.
func (l *Listener) fallBack(c *Conn, sf *subflow) {
	e := l.e
	c.mu.Lock()
	c.fallback = true
	c.mu.Unlock()
	e.MIB.MPCapableFallbackACK.Add(1)
	e.MIB.FallbackConns.Add(1)
	e.st.Mux.Unregister(sf.tuple)
	e.forget(c)
	c.fb = newFallbackConn(sf.wq, sf.ep)
	l.deliver(c)
}

func (l *Listener) deliver(c net.Conn) {
	select {
	case l.accept <- c:
	default:
		// The application does not accept fast enough: reset rather than
		// hold unbounded state.
		if mc, ok := c.(*Conn); ok {
			mc.Abort()
		}
	}
}

func fullAddr(a tcpip.FullAddress) netip.AddrPort {
	ad, _ := netip.AddrFromSlice(a.Addr.AsSlice())
	return netip.AddrPortFrom(ad, a.Port)
}

// Accept implements net.Listener; it returns *Conn values.
func (l *Listener) Accept() (net.Conn, error) {
	select {
	case c := <-l.accept:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

// AcceptMPTCP is Accept with the concrete type.
func (l *Listener) AcceptMPTCP() (*Conn, error) {
	c, err := l.Accept()
	if err != nil {
		return nil, err
	}
	mc, ok := c.(*Conn)
	if !ok {
		return nil, errors.New("mptcp: unexpected connection type")
	}
	return mc, nil
}

// Close implements net.Listener. Established connections stay open.
func (l *Listener) Close() error {
	l.once.Do(func() {
		close(l.done)
		l.e.st.Mux.SetAcceptor(l.port, nil)
		l.closeEps()
		l.wg.Wait()
	})
	return nil
}

// Addr implements net.Listener.
func (l *Listener) Addr() net.Addr { return &net.TCPAddr{Port: int(l.port)} }

var _ net.Listener = (*Listener)(nil)
