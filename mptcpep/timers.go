package mptcpep

import (
	"time"

	"github.com/mptun/mptun/mptcpep/header"
	"github.com/mptun/mptun/mptcpep/mpkey"
)

// The run goroutine's timers (control): each function below handles one
// timer under c.mu, queues the control segments it decides on, and says
// when it wants to run next. The segments go out after the lock is
// released (Mux.SendACK), in the order they were queued. The MP_FAIL
// timer is with the rest of MP_FAIL (mpFailTimerLocked, mpfail.go).

// controlPass is one run of control: the time it runs at, what every
// timer needs, when the next one is due, and the segments to send.
type controlPass struct {
	now  time.Time
	rto  time.Duration
	best *subflow // the subflow for control segments (ackSubflowLocked), or nil
	next time.Time
	out  []controlSend
}

type controlSend struct {
	sf  *subflow
	opt []byte
}

// at asks for control to run again at t (zero: no timer).
func (p *controlPass) at(t time.Time) {
	if !t.IsZero() && (p.next.IsZero() || t.Before(p.next)) {
		p.next = t
	}
}

// send queues a pure ACK carrying opt on sf.
func (p *controlPass) send(sf *subflow, opt []byte) {
	p.out = append(p.out, controlSend{sf, opt})
}

// control sends what gVisor will not and runs the timers. It returns when
// it wants to run next (zero: no timer needed).
func (c *Conn) control() time.Time {
	p := controlPass{now: time.Now()}
	c.mu.Lock()
	if c.infinite && !c.isDone() {
		c.infiniteFinLocked()
		c.mu.Unlock()
		return time.Time{}
	}
	if c.fallback || c.isDone() || !c.remoteKeyKnown {
		c.mu.Unlock()
		return time.Time{}
	}
	p.rto = c.rtoLocked()
	p.best = c.ackSubflowLocked()
	c.pureAcksLocked(&p)
	for _, sf := range c.subflows {
		c.joinAckTimerLocked(&p, sf)
	}
	c.mpCapableKeysTimerLocked(&p)
	p.at(c.mpFailTimerLocked(p.now, p.rto))
	if c.isDone() {
		c.mu.Unlock()
		return time.Time{}
	}
	c.dataAckTimerLocked(&p)
	c.dataFinTimerLocked(&p)
	c.addAddrTimerLocked(&p)
	c.stallTimerLocked(&p)
	// Orderly end: both DATA_FINs are through.
	if c.writeClosed && c.finAcked && c.rcv.EOF() {
		c.finishLocked(nil)
	}
	c.mu.Unlock()
	for _, s := range p.out {
		if err := c.e.st.Mux.SendACK(s.sf.tuple, s.opt); err != nil {
			c.e.log.Debug("mptcp: control segment", "subflow", s.sf.tuple.String(), "err", err)
		}
	}
	return p.next
}

// rtoLocked is the connection-level retransmission timeout.
func (c *Conn) rtoLocked() time.Duration {
	var m time.Duration
	for _, sf := range c.subflows {
		m = max(m, sf.info.rtt)
	}
	return max(200*time.Millisecond, 2*m)
}

// ackSubflowLocked picks the subflow for control segments: the one data
// last arrived on, else any established one.
func (c *Conn) ackSubflowLocked() *subflow {
	if sf := c.lastRxSf; sf != nil && sf.state == sfEstablished && !sf.stale {
		return sf
	}
	var backup *subflow
	for _, sf := range c.subflows {
		if sf.state == sfEstablished && sf.err == nil {
			if !sf.stale {
				return sf
			}
			backup = sf
		}
	}
	return backup
}

// pureAcksLocked sends the pure ACKs subflows asked for (needAck: the
// fourth ACK of a join, a DATA_ACK), with our DATA_ACK.
func (c *Conn) pureAcksLocked(p *controlPass) {
	for _, sf := range c.subflows {
		if sf.needAck && sf.state == sfEstablished {
			sf.needAck = false
			p.send(sf, c.dataAckOptionLocked())
		}
	}
}

// joinAckTimerLocked retransmits the third ACK of a join we initiated
// until the peer's fourth ACK establishes it, and gives the join up after
// 6 tries.
func (c *Conn) joinAckTimerLocked(p *controlPass, sf *subflow) {
	if sf.initial || !sf.active || sf.state != sfPreEstablished || !sf.joinAckSent {
		return
	}
	now, rto := p.now, p.rto
	due := sf.joinAckAt.Add(rto << min(sf.joinAckTries, 5))
	if !now.Before(due) {
		if sf.joinAckTries >= 6 {
			c.e.MIB.MPJoinRejected.Add(1)
			sf.state = sfClosed
			sf.err = errJoinTimeout
			ep := sf.ep
			c.actions = append(c.actions, func() { ep.Abort() })
			return
		}
		sf.joinAckTries++
		sf.joinAckAt = now
		b := make([]byte, header.MPJoinACKLen)
		header.MPJoinACK{HMAC: mpkey.JoinACKHMAC(c.localKey, c.remoteKey, sf.localNonce, sf.remoteNonce)}.Encode(b)
		p.send(sf, b)
		due = now.Add(rto << min(sf.joinAckTries, 5))
	}
	p.at(due)
}

const errJoinTimeout = errString("mptcp: join: no fourth ACK")

// mpCapableKeysTimerLocked: the initiator repeats its keys on a pure ACK
// while the peer has not shown (with a DSS) that the third ACK arrived
// and we send no data: until it does (RFC 8684 3.1), backing off to 64
// RTOs between tries.
func (c *Conn) mpCapableKeysTimerLocked(p *controlPass) {
	if !c.active || c.peerConfirmed || len(c.subflows) == 0 {
		return
	}
	sf := c.subflows[0]
	if sf.state != sfEstablished || c.sndNxt != c.localIDSN+1 {
		return
	}
	now, rto := p.now, p.rto
	if c.mpcAckAt.IsZero() {
		c.mpcAckAt = now
	}
	due := c.mpcAckAt.Add(rto << min(c.mpcAckTries, 6))
	if !now.Before(due) {
		c.mpcAckTries++
		c.mpcAckAt = now
		b := make([]byte, header.MPCapableACKLen)
		header.MPCapable{Version: 1, HMACSHA256: true, ChecksumRequired: c.csum, NumKeys: 2,
			SenderKey: uint64(c.localKey), ReceiverKey: uint64(c.remoteKey)}.Encode(b)
		p.send(sf, b)
	}
	p.at(c.mpcAckAt.Add(rto << min(c.mpcAckTries, 6)))
}

// dataAckTimerLocked sends a DATA_ACK that moved after gVisor's last ACK
// on its own once it is due (ackDueAt, 1 ms after delivery unless a data
// segment carried it first): without it the peer's connection window
// stalls and it reinjects needlessly.
func (c *Conn) dataAckTimerLocked(p *controlPass) {
	if c.ackDueAt.IsZero() {
		return
	}
	if p.now.Before(c.ackDueAt) {
		p.at(c.ackDueAt)
		return
	}
	c.ackDueAt = time.Time{}
	if c.rcv.RcvNxt() != c.lastDataAckTx && p.best != nil {
		c.e.MIB.DataAckTX.Add(1)
		p.send(p.best, c.dataAckOptionLocked())
	}
}

// dataFinTimerLocked sends the DATA_FIN on a pure ACK once all data is
// out, and again with backoff until it is DATA_ACKed; the first one waits
// while subflows are still being added (finHoldLocked).
func (c *Conn) dataFinTimerLocked(p *controlPass) {
	now, rto := p.now, p.rto
	hold := time.Time{}
	if c.writeClosed && !c.finAcked && c.finTxAt.IsZero() {
		hold = c.finHoldLocked(rto)
	}
	if !hold.IsZero() && now.Before(hold) {
		p.at(hold)
		return
	}
	if !c.writeClosed || c.finAcked || c.sndNxt != c.snd.End() || p.best == nil {
		return
	}
	due := c.finTxAt.Add(rto << min(c.finTries, 6))
	if c.finTxAt.IsZero() || !now.Before(due) {
		c.finTries++
		c.finTxAt = now
		d := header.DSS{HasDataAck: true, DataAck64: true, DataAck: c.rcv.RcvNxt(),
			HasMapping: true, DSN64: true, DSN: c.finDSN, SSN: 0, DataLen: 1, DataFin: true}
		if c.csum {
			d.HasChecksum = true
			d.Checksum = header.DSSChecksum(c.finDSN, 0, 1, 0)
		}
		b := make([]byte, d.Len())
		d.Encode(b)
		c.lastDataAckTx = c.rcv.RcvNxt()
		c.e.MIB.DataFinTX.Add(1)
		p.send(p.best, b)
		due = now.Add(rto << min(c.finTries, 6))
	}
	p.at(due)
}

// finHoldLocked is when a standalone DATA_FIN may go out: not while a join
// is being made or our ADD_ADDR is unechoed, for at most max(200 ms, 2 RTT)
// (the connection RTO) since each began. Linux refuses a join once its
// connection has left ESTABLISHED (mptcp_finish_join), and a DATA_FIN
// moves it to CLOSE_WAIT: a peer whose joins cross our DATA_FIN resets
// them (MP_TCPRST). Zero: nothing holds it.
func (c *Conn) finHoldLocked(rto time.Duration) time.Time {
	var hold time.Time
	later := func(t time.Time) {
		if t = t.Add(rto); t.After(hold) {
			hold = t
		}
	}
	for _, sf := range c.subflows {
		if !sf.initial && (sf.state == sfSynSent || sf.state == sfSynRcvd || sf.state == sfPreEstablished) {
			later(sf.created)
		}
	}
	if !c.active && len(c.announced) > 0 {
		// A multi-homed listener: the peer's own joins (a Linux client's
		// subflow endpoints) start when it sees the connection
		// established and may come after our ADD_ADDR's echo.
		later(c.startedAt)
	}
	for _, an := range c.announced {
		switch {
		case an.acked || an.tries >= 3:
		case an.tries == 0:
			later(time.Now()) // goes out in this pass
		default:
			later(an.first)
		}
	}
	return hold
}

// addAddrTimerLocked sends the echoes of the peer's ADD_ADDRs and our own
// announcements, each again every 2 s until echoed (at most 3 tries).
func (c *Conn) addAddrTimerLocked(p *controlPass) {
	if p.best == nil {
		return
	}
	now := p.now
	for _, a := range c.pendingEcho {
		b := make([]byte, a.Len())
		a.Encode(b)
		p.send(p.best, b)
	}
	c.pendingEcho = nil
	for _, an := range c.announced {
		if an.acked || an.tries >= 3 {
			continue
		}
		due := an.at.Add(2 * time.Second)
		if an.tries == 0 || !now.Before(due) {
			if an.tries == 0 {
				an.first = now
			}
			an.tries++
			an.at = now
			b := make([]byte, an.opt.Len())
			an.opt.Encode(b)
			c.e.MIB.AddAddrTX.Add(1)
			p.send(p.best, b)
			due = now.Add(2 * time.Second)
		}
		p.at(due)
	}
}

// stallTimerLocked watches for a stall: the DATA_ACK has not moved for
// stallTimeoutLocked although data is outstanding. A subflow whose own
// ACK is stuck too is marked stale and its data is reinjected on the
// others; if none is, the head of the unacknowledged data is retransmitted
// at the connection level.
func (c *Conn) stallTimerLocked(p *controlPass) {
	if !dsnLT(c.snd.Una(), c.sndNxt) {
		return
	}
	now := p.now
	stall := c.stallTimeoutLocked()
	if now.Sub(c.lastProgress) >= stall {
		usable := 0
		for _, sf := range c.subflows {
			if sf.usable() {
				usable++
			}
		}
		marked := false
		for _, sf := range c.subflows {
			if sf.usable() && sf.inflight() > 0 && now.Sub(sf.lastAckMove) >= stall && usable > 1 {
				sf.stale = true
				usable--
				marked = true
				c.reinjectLocked(sf)
				c.lastReinject = c.snd.Una()
				c.e.log.Debug("mptcp: subflow stale, reinjecting", "subflow", sf.tuple.String())
			}
		}
		if !marked && len(c.reinjectQ) == 0 {
			// Every subflow delivered, yet the peer's DATA_ACK stands
			// still: the bytes at its head were lost above TCP (a
			// mapping it could not use). Retransmit them at the
			// connection level.
			una := c.snd.Una()
			n := int(min(c.sndNxt-una, maxChunk))
			c.reinjectQ = append(c.reinjectQ, span{DSN: una, Len: n})
			c.lastReinject = una
			c.e.MIB.MPTCPRetransmits.Add(1)
		}
		c.lastProgress = now
		c.kickLocked()
	}
	p.at(c.lastProgress.Add(stall))
}

// stallTimeoutLocked is how long the DATA_ACK may stand still with data
// outstanding before subflows are suspected.
func (c *Conn) stallTimeoutLocked() time.Duration {
	var m time.Duration
	for _, sf := range c.subflows {
		if sf.usable() {
			m = max(m, sf.info.rtt)
		}
	}
	return max(400*time.Millisecond, 4*m)
}
