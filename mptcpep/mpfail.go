package mptcpep

import (
	"errors"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/mptun/mptun/mptcpep/header"
	"github.com/mptun/mptun/netstack"
)

// Fallback to TCP (RFC 8684 3.7): MP_FAIL, the infinite mapping, and the
// connection that runs on as plain TCP afterwards.
//
// At the handshake a peer without MPTCP gets a fallbackConn (plain gVisor
// TCP, the meta-socket is bypassed). After it, the meta-socket stays and
// the initial subflow's sequence space becomes the data sequence space
// (c.infinite): a peer that sends or answers data without DSS on the only
// subflow (fallBackLocked), or the end of an MP_FAIL exchange below.
//
// A DSS checksum failure on the only subflow of a connection that can
// still fall back (no other subflow ever carried data, nothing reinjected)
// does not kill the connection: the receiver sends MP_FAIL with the DSN of
// the failed mapping, the sender echoes it and sends an infinite mapping
// (a DSS mapping of data-level length 0) on its next data segment, and
// both continue as plain TCP over that subflow. The infinite mapping acts
// retroactively (RFC 8684 3.7): the failed mapping's bytes are not
// retransmitted, they count as delivered as TCP received them. Linux does
// the same (it hands the failed mapping's data to the application, and its
// selftest tolerates the flipped byte), so the receiver delivers them too
// rather than holding them: holding would stall a peer with no further
// data to send, which only ever sends its infinite mapping on new data.
//
// With another subflow the failing one is reset (MP_TCPRST "middlebox
// interference") and its data dropped; the sender reinjects it elsewhere.

// defaultMPFailTimeout bounds the wait for the peer's answer to our
// MP_FAIL (its MP_FAIL echo or its infinite mapping). Linux waits
// TCP_RTO_MAX (120 s); a few seconds is plenty for an answer that goes on
// the next ACK.
const defaultMPFailTimeout = 5 * time.Second

// ErrMPFailTimeout reports a connection reset because the peer did not
// answer MP_FAIL after a DSS checksum failure.
var ErrMPFailTimeout = errors.New("mptcp: DSS checksum failure and no answer to MP_FAIL: middlebox interference, connection reset")

// ErrChecksum reports a connection reset after a DSS checksum failure it
// could not survive (it cannot fall back to TCP and has no other subflow).
var ErrChecksum = errors.New("mptcp: DSS checksum failure (middlebox interference), cannot fall back to TCP: connection reset")

// failState is the connection's MP_FAIL / infinite mapping state.
type failState struct {
	// Receiver side: we sent MP_FAIL and wait for the peer's answer.
	sent     bool
	answered bool // the peer echoed MP_FAIL or sent its infinite mapping
	dsn      uint64
	at       time.Time // first MP_FAIL
	txAt     time.Time // last MP_FAIL (re)sent
	tries    int
	sf       *subflow

	// Sender side: the peer sent MP_FAIL; we owe it an infinite mapping
	// on our next data segment (txInf), and sent it at txSSN/txDSN.
	txInf     bool
	txInfSent bool
	txSSN     uint32
	txDSN     uint64

	// After the fallback the subflow's sequence space maps linearly onto
	// the data sequence space from these points (txBase: our bytes, for
	// turning the subflow ACK into a DATA_ACK; rxBase: the peer's bytes,
	// from its infinite mapping or from the first byte without mapping).
	txBaseSet bool
	txBaseSSN uint32
	txBaseDSN uint64
	rxBaseSet bool
	rxBaseSSN uint32
	rxBaseDSN uint64
}

// pending reports an MP_FAIL exchange under way: no joins now.
func (f *failState) pending() bool { return f.sent || f.txInf }

// infiniteOKLocked reports whether the connection can still fall back to
// TCP over sf: sf is the only subflow that ever carried data and nothing
// was reinjected on it, so its byte stream is the connection's.
func (c *Conn) infiniteOKLocked(sf *subflow) bool {
	for _, s := range c.subflows {
		if s != sf && (s.state != sfClosed || s.bytesTx > 0 || s.bytesRx > 0) {
			return false
		}
	}
	return sf.reinjTx == 0 && sf.state == sfEstablished
}

// mpFailOutLocked reacts to a DSS checksum failure of the mapping at dsn
// on sf. It reports whether the mapping's data is still to be delivered
// (the single-subflow case, which falls back to TCP) or dropped.
func (c *Conn) mpFailOutLocked(sf *subflow, dsn uint64) bool {
	if c.fail.sent || c.infinite {
		return true // already falling back: TCP semantics from here on
	}
	others := c.otherEstablishedLocked(sf)
	if others == 0 && c.infiniteOKLocked(sf) {
		c.e.log.Warn("mptcp: DSS checksum failure, falling back to TCP (MP_FAIL)", "subflow", sf.tuple.String(), "dsn", dsn)
		c.fail.sent, c.fail.dsn, c.fail.sf = true, dsn, sf
		c.fail.at = time.Now()
		c.sendMPFailLocked(sf, dsn)
		c.pmKick()
		return true
	}
	// Another subflow carries on (or the connection cannot fall back):
	// reset this one with MP_FAIL and MP_TCPRST "middlebox interference";
	// the peer reinjects its data.
	c.e.log.Warn("mptcp: DSS checksum failure, resetting the subflow", "subflow", sf.tuple.String(), "dsn", dsn)
	c.e.MIB.MPFailTX.Add(1)
	opt := make([]byte, header.MPFailLen+header.MPTCPRstLen)
	n := header.MPFail{DSN: dsn}.Encode(opt)
	header.MPTCPRst{Reason: header.RstReasonMiddlebox}.Encode(opt[n:])
	c.abortSubflowLocked(sf, opt, errString("mptcp: DSS checksum failure"))
	if others == 0 {
		c.finishLocked(ErrChecksum)
	}
	return false
}

// abortSubflowLocked resets sf with an RST carrying opt (MP_TCPRST and
// friends) and retires it.
func (c *Conn) abortSubflowLocked(sf *subflow, opt []byte, err error) {
	if sf.state == sfClosed {
		return
	}
	c.e.MIB.MPRstTX.Add(1)
	sf.state = sfClosed
	sf.err = err
	sf.readerDone = true
	c.e.MIB.SubflowsClosed.Add(1)
	c.e.MIB.SubflowErrors.Add(1)
	t, ep := sf.tuple, sf.ep
	c.actions = append(c.actions, func() {
		// The RST goes first: it needs the flow registered.
		_ = c.e.st.Mux.SendRST(t, opt)
		c.e.st.Mux.Unregister(t)
		if ep != nil {
			ep.Abort()
		}
	})
	c.kickLocked()
	c.pmKick()
	c.wakeLocked()
}

func (c *Conn) sendMPFailLocked(sf *subflow, dsn uint64) {
	c.e.MIB.MPFailTX.Add(1)
	c.fail.txAt = time.Now()
	b := make([]byte, header.MPFailLen)
	header.MPFail{DSN: dsn}.Encode(b)
	t := sf.tuple
	c.actions = append(c.actions, func() { _ = c.e.st.Mux.SendACK(t, b) })
	c.kickLocked()
}

// mpFailTimerLocked runs from control while the connection has not fallen
// back: it repeats our MP_FAIL until the peer answers (a pure ACK can be
// lost) and resets the connection when no answer came in time. It returns
// when it wants to run next (zero: no timer).
func (c *Conn) mpFailTimerLocked(now time.Time, rto time.Duration) time.Time {
	f := &c.fail
	if !f.sent || f.answered || c.infinite {
		return time.Time{}
	}
	sf := f.sf
	deadline := f.at.Add(max(c.e.mpFailTimeout, 4*rto))
	if !now.Before(deadline) {
		c.e.MIB.MPFailTimeout.Add(1)
		c.e.log.Warn("mptcp: no answer to MP_FAIL, resetting the connection", "subflow", sf.tuple.String())
		opt := make([]byte, header.MPTCPRstLen)
		header.MPTCPRst{Reason: header.RstReasonMiddlebox}.Encode(opt)
		c.abortSubflowLocked(sf, opt, ErrMPFailTimeout)
		c.aborted = true
		c.finishLocked(ErrMPFailTimeout)
		return time.Time{}
	}
	due := f.txAt.Add(rto << min(f.tries, 5))
	if !now.Before(due) && sf.state == sfEstablished {
		f.tries++
		c.sendMPFailLocked(sf, f.dsn)
		due = now.Add(rto << min(f.tries, 5))
	}
	if deadline.Before(due) {
		return deadline
	}
	return due
}

// mpFailInLocked handles MP_FAIL from the peer (it found a DSS checksum
// error at dsn).
func (c *Conn) mpFailInLocked(sf *subflow, dsn uint64) {
	if c.e.ignoreMPFail {
		return // test hook: a peer that never answers
	}
	switch {
	case c.fail.sent:
		// The echo of ours: the peer falls back with its next data.
		c.fail.answered = true
		return
	case c.fail.txInf || c.infinite:
		return // a repetition
	}
	c.e.log.Warn("mptcp: peer reported a checksum failure", "subflow", sf.tuple.String(), "dsn", dsn)
	others := false
	for _, s := range c.subflows {
		if s != sf && s.state == sfEstablished {
			others = true
		}
	}
	if !others && c.infiniteOKLocked(sf) {
		// Echo it (Linux waits for the echo) and fall back with an
		// infinite mapping on the next data segment.
		c.fail.txInf = true
		c.sendMPFailLocked(sf, dsn)
		c.pmKick()
		return
	}
	// The peer resets the subflow; its data goes again on the others,
	// starting with the failed mapping (the peer's TCP acknowledged it,
	// so it is not among the subflow's unacknowledged data).
	if una := c.snd.Una(); dsnLEQ(una, dsn) && dsnLT(dsn, c.sndNxt) {
		c.reinjectQ = append(c.reinjectQ, span{DSN: dsn, Len: int(min(c.sndNxt-dsn, maxChunk))})
	}
	c.reinjectLocked(sf)
	c.kickLocked()
}

// beforeInfiniteLocked reports whether seg carries data of sf from before
// the infinite mapping we sent on it, not yet acknowledged.
func (sf *subflow) beforeInfiniteLocked(seg *netstack.Segment) bool {
	f := &sf.c.fail
	if !f.txInfSent || sf != f.sf || !sf.issKnown || seg.SYN() || seg.PayloadLen == 0 {
		return false
	}
	rel := seg.Seq - sf.iss
	return ssnLT(rel, f.txSSN) && !ssnLT(rel, sf.acked)
}

// infiniteMapOutLocked writes the infinite mapping we owe the peer into
// the options of a data segment at relative sequence rel, falling back to
// TCP when it first goes out. It repeats on segments from that point on
// until the peer acknowledges it; ok is false when the segment gets no
// MPTCP option from here.
func (sf *subflow) infiniteMapOutLocked(seg *netstack.Segment, rel uint32, opt []byte) (n, cover int, ok bool) {
	c := sf.c
	f := &c.fail
	if f.txInfSent {
		if sf != f.sf || ssnLT(f.txSSN, sf.acked) || ssnLT(rel, f.txSSN) {
			return 0, 0, false
		}
	} else {
		m, found := sf.tx.Find(rel)
		if !found {
			return 0, 0, false
		}
		f.txInfSent, f.sf = true, sf
		f.txSSN, f.txDSN = rel, m.DSN+uint64(rel-m.SSN)
		c.e.MIB.InfiniteMapTX.Add(1)
		c.e.log.Info("mptcp: sent an infinite mapping, falling back to TCP", "subflow", sf.tuple.String(), "dsn", f.txDSN)
		c.enterInfiniteLocked(sf)
	}
	d := header.DSS{HasDataAck: true, DataAck64: true, DataAck: c.rcv.RcvNxt(),
		HasMapping: true, DSN64: true, DSN: f.txDSN, SSN: f.txSSN, DataLen: 0}
	if c.csum {
		d.HasChecksum = true
		d.Checksum = header.DSSChecksum(f.txDSN, f.txSSN, 0, 0)
	}
	if d.Len() > len(opt) {
		d.DataAck64 = false
	}
	if d.Len() > len(opt) {
		d.HasDataAck = false
	}
	if d.Len() > len(opt) {
		c.e.MIB.OptionNoRoom.Add(1)
		return 0, 0, true
	}
	return d.Encode(opt), seg.PayloadLen, true
}

// infiniteMapInLocked handles the peer's infinite mapping (a DSS mapping
// of data-level length 0): subflow byte ssn is DSN dsn and the rest of the
// subflow follows linearly; the connection falls back to TCP.
func (c *Conn) infiniteMapInLocked(sf *subflow, seg *netstack.Segment, dsn uint64, ssn uint32) {
	c.e.MIB.InfiniteMapRX.Add(1)
	if !c.infiniteOKLocked(sf) {
		// Fallback is impossible with data on other subflows (RFC 8684
		// 3.7): a protocol error on this subflow.
		c.resetSubflowLocked(sf, header.RstReasonMPTCPError, seg)
		return
	}
	if d := dsnDiff(dsn, c.rcv.RcvNxt()); d > int64(c.rcvWindow())+(1<<20) || d < -(1<<31) {
		c.e.MIB.DSSMappingDropped.Add(1)
		return
	}
	c.fail.answered = true
	c.fail.rxBaseSet, c.fail.rxBaseSSN, c.fail.rxBaseDSN = true, ssn, dsn
	c.e.log.Info("mptcp: peer sent an infinite mapping, falling back to TCP", "subflow", sf.tuple.String(), "dsn", dsn, "mp_fail_sent", c.fail.sent)
	c.enterInfiniteLocked(sf)
}

// enterInfiniteLocked turns the connection into plain TCP over sf: from
// here the subflow ACK is the DATA_ACK, its window the connection window,
// the TCP FIN the DATA_FIN; no more options or joins.
func (c *Conn) enterInfiniteLocked(sf *subflow) {
	if c.infinite {
		return
	}
	if !c.fail.txBaseSet {
		// Our bytes: the mapping of the first unacknowledged one (all of
		// sf's bytes map linearly, nothing was reinjected).
		c.fail.txBaseSet = true
		if m, ok := sf.tx.Find(sf.acked); ok {
			c.fail.txBaseSSN, c.fail.txBaseDSN = sf.acked, m.DSN+uint64(sf.acked-m.SSN)
		} else {
			c.fail.txBaseSSN, c.fail.txBaseDSN = sf.wrote, c.sndNxt
		}
	}
	c.e.MIB.FallbackConns.Add(1)
	c.fallback = true
	c.infinite = true
	c.reinjectQ = nil
	c.kickLocked()
	c.pmKick()
	c.wakeLocked()
}

// infiniteTxDSN is the DSN of our subflow byte rel after the fallback.
func (c *Conn) infiniteTxDSN(rel uint32) uint64 {
	if !c.fail.txBaseSet {
		return c.localIDSN + uint64(rel)
	}
	return c.fail.txBaseDSN + uint64(int64(int32(rel-c.fail.txBaseSSN)))
}

// infiniteRxDSN is the DSN of the peer's subflow byte ssn that carries no
// mapping after the fallback: the stream continues linearly from the
// peer's infinite mapping, or, without one, from the first such byte at
// the next DSN expected.
func (c *Conn) infiniteRxDSN(ssn uint32) uint64 {
	if !c.fail.rxBaseSet {
		c.fail.rxBaseSet, c.fail.rxBaseSSN, c.fail.rxBaseDSN = true, ssn, c.rcv.RcvNxt()
	}
	return c.fail.rxBaseDSN + uint64(int64(int32(ssn-c.fail.rxBaseSSN)))
}

// fallBackLocked turns an established connection into plain TCP over its
// initial subflow (RFC 8684 3.7). It is only possible while the subflow's
// byte stream is the connection's: one subflow, nothing reinjected.
func (c *Conn) fallBackLocked(sf *subflow) bool {
	for _, s := range c.subflows {
		if s != sf && s.state != sfClosed {
			return false
		}
	}
	if sf.reinjTx > 0 {
		return false
	}
	c.e.MIB.MPCapableFallbackData.Add(1)
	c.e.log.Info("mptcp: peer fell back to TCP", "subflow", sf.tuple.String())
	c.enterInfiniteLocked(sf)
	return true
}

// infiniteAckLocked turns the subflow ACK into the DATA_ACK after a
// fallback: the subflow's bytes map linearly onto the connection's.
func (c *Conn) infiniteAckLocked(sf *subflow, seg *netstack.Segment) {
	if !seg.ACK() || !sf.issKnown || sf.state == sfClosed {
		return
	}
	rel := seg.Ack - sf.iss
	if ssnLT(sf.acked, rel) {
		sf.acked = rel
		sf.tx.Ack(rel)
		sf.lastAckMove = time.Now()
	}
	ack := c.infiniteTxDSN(rel)
	if end := c.snd.End(); dsnLT(end, ack) {
		ack = end // the subflow FIN
	}
	if n, err := c.snd.Ack(ack); err == nil && n > 0 {
		c.lastProgress = time.Now()
		c.wakeLocked()
	}
	// The subflow window is the connection's window now.
	if edge := ack + uint64(seg.Window)<<sf.peerWScale; dsnLT(c.sndEdge, edge) {
		c.sndEdge = edge
	}
	if c.infiniteFinAckedLocked(sf) && !c.finAcked {
		c.finAcked = true
		c.wakeLocked()
	}
	c.kickLocked()
}

// infiniteFinAckedLocked reports whether the peer acknowledged our TCP FIN
// on sf after a fallback: all data and the FIN itself (an ACK of the data
// alone does not end the connection; were the FIN lost, nobody would send
// it again once we are gone).
func (c *Conn) infiniteFinAckedLocked(sf *subflow) bool {
	return c.writeClosed && c.shutWrSent && c.snd.Una() == c.snd.End() && ssnLT(c.finSSN, sf.acked)
}

// peerFinInfinite handles the peer's TCP FIN after a fallback: it is the
// end of the connection's incoming stream.
func (c *Conn) peerFinInfinite() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.infinite {
		return false
	}
	if _, set := c.rcv.FinDSN(); !set {
		_ = c.rcv.SetFin(c.rcv.RcvNxt())
	}
	c.kickLocked()
	c.wakeLocked()
	return true
}

// fallbackConn is a connection that fell back to plain TCP.
type fallbackConn struct {
	*gonet.TCPConn
	ep tcpip.Endpoint
}

func newFallbackConn(wq *waiter.Queue, ep tcpip.Endpoint) *fallbackConn {
	return &fallbackConn{TCPConn: gonet.NewTCPConn(wq, ep), ep: ep}
}

// Abort resets the connection.
func (f *fallbackConn) Abort() { f.ep.Abort() }

// infiniteFinLocked runs from control after the fallback, when the
// connection is plain TCP: our subflow FIN is the DATA_FIN (sent once all
// data is written), and the connection ends when it is acknowledged and
// the peer's FIN came.
func (c *Conn) infiniteFinLocked() {
	if c.writeClosed && !c.shutWrSent && c.sndNxt == c.snd.End() && len(c.subflows) > 0 {
		c.shutWrSent = true
		sf := c.subflows[0]
		c.finSSN = sf.wrote // the FIN follows the last byte
		ep := sf.ep
		c.actions = append(c.actions, func() { ep.Shutdown(tcpip.ShutdownWrite) })
	}
	if len(c.subflows) > 0 && c.infiniteFinAckedLocked(c.subflows[0]) {
		c.finAcked = true
	}
	if c.finAcked && c.rcv.EOF() {
		c.finishLocked(nil)
	}
}
