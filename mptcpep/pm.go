package mptcpep

import (
	"context"
	"errors"
	"net/netip"
	"time"

	"github.com/mptun/mptun/mptcpep/header"
	"github.com/mptun/mptun/mptcpep/mpkey"
)

// pathManager keeps a full mesh of subflows between the endpoint's local
// uplinks and the peer's addresses (its initial one plus those it
// announces) on the initiating side, re-creating subflows whose uplink
// comes back. On the passive side it announces the endpoint's other
// addresses with ADD_ADDR (announceAddrs, called by start). It ends with
// the connection.
func (c *Conn) pathManager() {
	type pair struct {
		local  netip.Addr
		remote netip.AddrPort
	}
	type attempt struct {
		at      time.Time
		backoff time.Duration
		running bool
	}
	// Joins wait until the peer proved (with a DSS) that it holds our keys:
	// a Linux server registers the token only then, and answers an early
	// MP_JOIN with a reset. A peer that stays silent gets them after 500 ms.
	wait := time.NewTimer(500 * time.Millisecond)
	for confirmed := false; !confirmed; {
		c.mu.Lock()
		confirmed = c.peerConfirmed
		c.mu.Unlock()
		if confirmed {
			break
		}
		select {
		case <-c.done:
			wait.Stop()
			return
		case <-c.pmCh:
		case <-wait.C:
			confirmed = true
		}
	}
	wait.Stop()
	type result struct {
		p   pair
		err error
	}
	attempts := make(map[pair]*attempt)
	results := make(chan result, 16)
	retry := time.NewTicker(500 * time.Millisecond)
	defer retry.Stop()
	for {
		now := time.Now()
		locals := c.e.localList()
		c.mu.Lock()
		if c.isDone() || c.writeClosed && c.finAcked || c.fallback || c.fail.pending() {
			c.mu.Unlock()
			return
		}
		have := make(map[pair]bool)
		live := 0
		for _, sf := range c.subflows {
			if sf.state != sfClosed {
				have[pair{sf.tuple.Local.Addr(), sf.tuple.Remote}] = true
				live++
			}
		}
		type want struct {
			p        pair
			l        Local
			remoteID uint8
		}
		var wants []want
		for _, ra := range c.remoteAddrs {
			if ra.removed || ra.noJoin {
				continue
			}
			for _, l := range locals {
				if l.Addr.Is4() != ra.addr.Addr().Is4() {
					continue
				}
				p := pair{l.Addr, ra.addr}
				if !have[p] {
					wants = append(wants, want{p, l, ra.id})
				}
			}
		}
		max := c.e.cfg.MaxSubflows
		c.mu.Unlock()
		for _, w := range wants {
			if live >= max {
				break
			}
			a := attempts[w.p]
			if a == nil {
				a = &attempt{backoff: 500 * time.Millisecond}
				attempts[w.p] = a
			}
			if a.running || now.Before(a.at) {
				continue
			}
			a.running = true
			a.at = now.Add(a.backoff)
			a.backoff = min(2*a.backoff, 8*time.Second)
			live++
			w := w
			c.mu.Lock()
			c.goLocked(func() {
				ctx, cancel := context.WithTimeout(c.ctx, joinTimeout)
				defer cancel()
				sf, err := c.openSubflow(ctx, w.l, w.p.remote, false, w.remoteID)
				if err == nil {
					c.e.log.Debug("mptcp: subflow joined", "local", w.l.Addr, "remote", w.p.remote)
					c.startReader(sf)
					c.mu.Lock()
					c.kickLocked()
					c.mu.Unlock()
				} else {
					c.e.log.Debug("mptcp: join failed", "local", w.l.Addr, "remote", w.p.remote, "err", err)
				}
				select {
				case results <- result{w.p, err}:
				case <-c.done:
				}
			})
			c.mu.Unlock()
		}
		select {
		case <-c.done:
			return
		case <-c.pmCh:
		case <-retry.C:
		case r := <-results:
			if a := attempts[r.p]; a != nil {
				a.running = false
				// The peer's policy forbids this pair for good (MP_TCPRST
				// "administratively prohibited", not transient): asking
				// again would only be refused again.
				var refused *RefusedError
				if errors.As(r.err, &refused) && refused.permanent() {
					c.e.MIB.JoinsProhibited.Add(1)
					a.at = now.Add(100 * 365 * 24 * time.Hour)
				}
			}
		}
		// A subflow that came back resets the backoff of its pair.
		c.mu.Lock()
		for _, sf := range c.subflows {
			if sf.state == sfEstablished {
				if a := attempts[pair{sf.tuple.Local.Addr(), sf.tuple.Remote}]; a != nil && !a.running {
					a.backoff = 500 * time.Millisecond
				}
			}
		}
		c.mu.Unlock()
	}
}

// announceAddrs queues ADD_ADDR for the endpoint's other addresses.
func (c *Conn) announceAddrs() {
	c.e.mu.Lock()
	ann := append([]Local(nil), c.e.announce...)
	c.e.mu.Unlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.subflows) == 0 {
		return
	}
	own := c.subflows[0].tuple.Local.Addr()
	for _, l := range ann {
		if l.Addr == own || l.ID == 0 {
			continue
		}
		a := l.Addr
		if l.Public.IsValid() {
			a = l.Public
		}
		c.announced[l.ID] = &announcement{opt: header.AddAddr{
			AddrID: l.ID, Addr: a,
			HMAC: mpkey.AddAddrHMAC(c.localKey, c.remoteKey, l.ID, a, 0),
		}}
	}
	if len(c.announced) > 0 {
		c.kickLocked()
	}
}

// addAddrInLocked handles ADD_ADDR: an echo acknowledges our announcement;
// an announcement with a valid HMAC adds a peer address for the mesh.
func (c *Conn) addAddrInLocked(sf *subflow, a *header.AddAddr) {
	mib := &c.e.MIB
	if a.Echo {
		mib.AddAddrEchoRX.Add(1)
		if an := c.announced[a.AddrID]; an != nil {
			an.acked = true
		}
		return
	}
	mib.AddAddrRX.Add(1)
	if !c.remoteKeyKnown || a.HMAC != mpkey.AddAddrHMAC(c.remoteKey, c.localKey, a.AddrID, a.Addr, a.Port) {
		mib.AddAddrHMACFail.Add(1)
		return
	}
	if len(c.remoteAddrs) >= 16 {
		return // bounded: a peer cannot make us hold unlimited addresses
	}
	port := a.Port
	if port == 0 {
		port = c.port
	}
	c.remoteAddrs[a.AddrID] = remoteAddr{id: a.AddrID, addr: netip.AddrPortFrom(a.Addr, port)}
	c.pendingEcho = append(c.pendingEcho, header.AddAddr{Echo: true, AddrID: a.AddrID, Addr: a.Addr, Port: a.Port})
	c.kickLocked()
	c.pmKick()
}

// removeAddrInLocked closes the subflows to addresses the peer withdrew.
func (c *Conn) removeAddrInLocked(ids []uint8) {
	for _, id := range ids {
		if ra, ok := c.remoteAddrs[id]; ok {
			ra.removed = true
			c.remoteAddrs[id] = ra
		}
		for _, sf := range c.subflows {
			if sf.remoteID == id && sf.state != sfClosed && !(sf.initial && id == 0 && len(c.subflows) == 1) {
				sf.state = sfClosed
				sf.err = errString("mptcp: peer removed the address")
				c.reinjectLocked(sf)
				c.e.st.Mux.Unregister(sf.tuple)
				sf.closeController()
				ep := sf.ep
				if ep != nil {
					c.actions = append(c.actions, func() { ep.Abort() })
				}
			}
		}
	}
	c.kickLocked()
}

// wireIDLocked is the address ID that subflows from addr carry on the
// wire: 0 for the address of the initial subflow, which both ends know by
// that ID (RFC 8684 3.2: one address, one ID), else the uplink's ID.
func (c *Conn) wireIDLocked(addr netip.Addr, uplinkID uint8) uint8 {
	if len(c.subflows) == 0 || c.subflows[0].tuple.Local.Addr() == addr {
		return 0
	}
	return uplinkID
}

// RemoveLocal withdraws the local address of uplink id from this
// connection: its subflows close and the peer is told with REMOVE_ADDR
// (naming the address by its wire ID).
func (c *Conn) RemoveLocal(id uint8) {
	c.mu.Lock()
	defer c.mu.Unlock()
	wire, found := id, false
	for _, sf := range c.subflows {
		if sf.uplinkID == id && !found {
			wire, found = sf.localID, true
		}
		if sf.uplinkID == id && sf.state != sfClosed {
			sf.state = sfClosed
			sf.err = errString("mptcp: local address removed")
			c.reinjectLocked(sf)
			c.e.st.Mux.Unregister(sf.tuple)
			sf.closeController()
			ep := sf.ep
			if ep != nil {
				c.actions = append(c.actions, func() { ep.Abort() })
			}
		}
	}
	// Tell the peer on a subflow that survives (picked after closing the
	// withdrawn ones).
	if best := c.ackSubflowLocked(); best != nil && best.uplinkID != id {
		b := make([]byte, 4)
		header.RemoveAddr{AddrIDs: []uint8{wire}}.Encode(b)
		t := best.tuple
		c.actions = append(c.actions, func() {
			if c.e.st.Mux.SendACK(t, b) == nil {
				c.e.MIB.RemoveAddrTX.Add(1)
			}
		})
	}
	c.kickLocked()
}

// SetBackup marks the subflows from the address of uplink id as backup (or not)
// and tells the peer with MP_PRIO.
func (c *Conn) SetBackup(id uint8, backup bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, sf := range c.subflows {
		if sf.uplinkID != id || sf.state != sfEstablished {
			continue
		}
		sf.backup = backup
		b := make([]byte, header.MPPrioLen)
		header.MPPrio{Backup: backup}.Encode(b)
		t := sf.tuple
		c.actions = append(c.actions, func() {
			if c.e.st.Mux.SendACK(t, b) == nil {
				c.e.MIB.MPPrioTX.Add(1)
			}
		})
	}
	c.kickLocked()
}
