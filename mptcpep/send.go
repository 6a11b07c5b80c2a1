package mptcpep

import (
	"io"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"

	"github.com/mptun/mptun/mptcpep/header"
	"github.com/mptun/mptun/mptcpep/mpkey"
)

// maxChunk is the most the scheduler hands one subflow at a time.
const maxChunk = maxMappingLen // one chunk is one mapping, so its checksum is exact

// run is the connection's control goroutine: it schedules data onto
// subflows, sends the segments gVisor does not (DATA_ACK updates, DATA_FIN,
// fourth ACKs, ADD_ADDR) and runs the timers. It ends with the connection.
func (c *Conn) run() {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	var rd chunkReader
	for {
		c.runActions()
		c.push(&rd)
		next := c.control()
		c.runActions()
		d := time.Hour
		if !next.IsZero() {
			d = max(time.Until(next), 200*time.Microsecond)
		}
		timer.Reset(d)
		select {
		case <-c.kick:
		case <-timer.C:
		case <-c.done:
			c.runActions()
			c.closeSubflows()
			return
		}
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
	}
}

// runActions runs work queued under the lock that must run without it
// (gVisor endpoint calls, raw sends).
func (c *Conn) runActions() {
	c.mu.Lock()
	acts := c.actions
	c.actions = nil
	c.mu.Unlock()
	for _, a := range acts {
		a()
	}
}

// closeSubflows closes what is left when the connection is finished.
func (c *Conn) closeSubflows() {
	c.mu.Lock()
	var eps []tcpip.Endpoint
	for _, sf := range c.subflows {
		if sf.ep != nil && sf.state != sfClosed {
			eps = append(eps, sf.ep)
			sf.state = sfClosed
		}
	}
	c.mu.Unlock()
	for _, ep := range eps {
		ep.Close()
	}
	go func() {
		// Keep the flows registered while gVisor finishes the subflow FIN
		// exchange, so its segments still carry DATA_ACKs.
		time.Sleep(2 * time.Second)
		c.mu.Lock()
		for _, sf := range c.subflows {
			c.e.st.Mux.Unregister(sf.tuple)
		}
		c.mu.Unlock()
		c.e.forget(c)
	}()
}

// push hands connection data to subflows until nothing is left or no
// subflow has room. rd is reused for every chunk.
func (c *Conn) push(rd *chunkReader) {
	for iter := 0; iter < 512; iter++ {
		c.mu.Lock()
		if (c.fallback && !c.infinite) || c.isDone() || !c.hasPendingData() {
			c.mu.Unlock()
			return
		}
		live := make([]*subflow, 0, len(c.subflows))
		for _, sf := range c.subflows {
			if sf.usable() {
				live = append(live, sf)
			}
		}
		c.mu.Unlock()
		if len(live) == 0 {
			return
		}
		infos := make([]sfInfo, len(live))
		for i, sf := range live {
			infos[i] = sf.sample()
		}

		c.mu.Lock()
		for i, sf := range live {
			sf.info = infos[i]
		}
		sf, dsn, n, owed := c.owedLocked(live)
		reinj := false
		if !owed {
			var ok bool
			dsn, n, reinj, ok = c.nextChunkLocked()
			if !ok {
				c.mu.Unlock()
				return
			}
			var allowance int
			sf, allowance = c.pickLocked(live)
			if sf == nil {
				c.mu.Unlock()
				return
			}
			n = min(n, allowance)
		}
		n = min(n, maxChunk)
		// The chunk goes to gVisor straight from the send buffer's blocks,
		// pinned so that a DATA_ACK arriving meanwhile cannot recycle them.
		rd.reset()
		for rd.Len() < n && len(rd.parts) < cap(rd.parts) {
			p := c.snd.Peek(dsn+uint64(rd.Len()), n-rd.Len())
			if len(p) == 0 {
				break
			}
			rd.add(p)
		}
		n = rd.Len()
		if n == 0 {
			c.mu.Unlock()
			return
		}
		if owed {
			// The mapping is on the wire already: only the bytes go now.
			sf.owed.DSN += uint64(n)
			sf.owed.Len -= n
		} else {
			var sum uint16
			if c.csum {
				sum = rd.sum(n)
			}
			if err := sf.tx.AddSum(sf.wrote, dsn, n, sum); err != nil {
				c.mu.Unlock()
				return
			}
			sf.wrote += uint32(n)
			if reinj {
				c.reinjectQ[0].DSN += uint64(n)
				c.reinjectQ[0].Len -= n
				if c.reinjectQ[0].Len <= 0 {
					c.reinjectQ = c.reinjectQ[1:]
				}
				sf.reinjTx += uint64(n)
				c.stats.reinjected += uint64(n)
				c.e.MIB.ReinjectedBytes.Add(uint64(n))
			} else {
				if c.snd.Una() == c.sndNxt {
					c.lastProgress = time.Now()
				}
				c.sndNxt += uint64(n)
			}
		}
		if sf.lastAckMove.IsZero() || sf.inflight() == n {
			sf.lastAckMove = time.Now()
		}
		ep := sf.ep
		c.snd.Pin()
		c.mu.Unlock()

		m, err := ep.Write(rd, tcpip.WriteOptions{})
		c.mu.Lock()
		c.snd.Unpin()
		sf.bytesTx += uint64(m)
		if int(m) < n {
			// gVisor took less than the scheduler expected. Its segments
			// may already have announced the whole mapping (they leave
			// from inside Write), and a peer rejects a changed mapping
			// (Linux resets the subflow), so the rest is owed to this
			// subflow, at the SSNs the mapping gave it.
			c.e.MIB.SubflowShortWrites.Add(1)
			rest := span{DSN: dsn + uint64(m), Len: n - int(m)}
			if owed {
				sf.owed = span{DSN: rest.DSN, Len: rest.Len + sf.owed.Len}
			} else {
				sf.owed = rest
			}
			c.mu.Unlock()
			if err != nil {
				if _, wb := err.(*tcpip.ErrWouldBlock); !wb {
					c.e.log.Debug("mptcp: subflow write", "subflow", sf.tuple.String(), "err", err.String())
				}
			}
			return
		}
		c.mu.Unlock()
	}
}

// owedLocked returns a live subflow that owes the rest of a chunk it took
// only partly (see push), with the bytes it owes.
func (c *Conn) owedLocked(live []*subflow) (*subflow, uint64, int, bool) {
	for _, sf := range live {
		if sf.owed.Len > 0 && sf.info.sndFree > 0 {
			return sf, sf.owed.DSN, sf.owed.Len, true
		}
	}
	return nil, 0, 0, false
}

// chunkReader is a tcpip.Payloader over the send-buffer slices of one
// chunk (at most maxChunk bytes, so at most two blocks; three parts leave
// slack for an unaligned start).
type chunkReader struct {
	parts [][]byte
	store [3][]byte
	off   int // bytes already read
	n     int // total bytes
}

func (r *chunkReader) reset() {
	clear(r.store[:])
	r.parts = r.store[:0]
	r.off, r.n = 0, 0
}

func (r *chunkReader) add(p []byte) {
	r.parts = append(r.parts, p)
	r.n += len(p)
}

// Len implements tcpip.Payloader: the bytes not read yet.
func (r *chunkReader) Len() int { return r.n - r.off }

// Read implements io.Reader.
func (r *chunkReader) Read(b []byte) (int, error) {
	if r.off >= r.n {
		return 0, io.EOF
	}
	done := 0
	skip := r.off
	for _, p := range r.parts {
		if skip >= len(p) {
			skip -= len(p)
			continue
		}
		k := copy(b[done:], p[skip:])
		done += k
		skip = 0
		if done == len(b) {
			break
		}
	}
	r.off += done
	return done, nil
}

// sum is the ones'-complement sum of the chunk's first n bytes.
func (r *chunkReader) sum(n int) uint16 {
	var cs checksum.Checksumer
	for _, p := range r.parts {
		if n <= 0 {
			break
		}
		k := min(n, len(p))
		cs.Add(p[:k])
		n -= k
	}
	return cs.Checksum()
}

// nextChunkLocked picks what to send next: reinjections first, then new
// data within the peer's connection-level window.
func (c *Conn) nextChunkLocked() (dsn uint64, n int, reinj, ok bool) {
	una := c.snd.Una()
	for len(c.reinjectQ) > 0 {
		s := &c.reinjectQ[0]
		end := s.DSN + uint64(s.Len)
		if dsnLEQ(end, una) || s.Len <= 0 {
			c.reinjectQ = c.reinjectQ[1:]
			continue
		}
		if dsnLT(s.DSN, una) {
			s.Len = int(end - una)
			s.DSN = una
		}
		if dsnLEQ(c.sndNxt, s.DSN) {
			// Not sent yet at all: the normal path will send it.
			c.reinjectQ = c.reinjectQ[1:]
			continue
		}
		if dsnLT(c.sndNxt, end) {
			s.Len = int(c.sndNxt - s.DSN)
		}
		return s.DSN, min(s.Len, maxChunk), true, true
	}
	end := c.snd.End()
	if !dsnLT(c.sndNxt, end) {
		return 0, 0, false, false
	}
	n = int(min(end-c.sndNxt, maxChunk))
	if w := dsnDiff(c.sndEdge, c.sndNxt); w < int64(n) {
		if w <= 0 {
			c.e.MIB.PeerWindowFull.Add(1)
			return 0, 0, false, false
		}
		n = int(w)
	}
	return c.sndNxt, n, false, true
}

// pickLocked asks the scheduler for a subflow and how much it may take.
func (c *Conn) pickLocked(live []*subflow) (*subflow, int) {
	// A subflow owing the rest of a chunk takes nothing new before it.
	ready := live[:0:0]
	for _, sf := range live {
		if sf.owed.Len == 0 {
			ready = append(ready, sf)
		}
	}
	live = ready
	paths := make([]PathInfo, len(live))
	for i, sf := range live {
		paths[i] = sf.pathInfo()
	}
	i, n := c.e.cfg.Scheduler.Pick(paths)
	if i < 0 || i >= len(live) || n <= 0 {
		return nil, 0
	}
	return live[i], n
}

// control sends what gVisor will not and runs the timers. It returns when
// it wants to run next (zero: no timer needed).
func (c *Conn) control() time.Time {
	now := time.Now()
	var next time.Time
	at := func(t time.Time) {
		if !t.IsZero() && (next.IsZero() || t.Before(next)) {
			next = t
		}
	}
	type send struct {
		sf  *subflow
		opt []byte
	}
	var sends []send
	c.mu.Lock()
	if c.infinite && !c.isDone() {
		// Plain TCP now: the subflow FIN is the DATA_FIN.
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
		c.mu.Unlock()
		return time.Time{}
	}
	if c.fallback || c.isDone() || !c.remoteKeyKnown {
		c.mu.Unlock()
		return time.Time{}
	}
	rto := c.rtoLocked()
	best := c.ackSubflowLocked()
	for _, sf := range c.subflows {
		if sf.needAck && sf.state == sfEstablished {
			sf.needAck = false
			sends = append(sends, send{sf, c.dataAckOptionLocked()})
		}
		// A joining initiator retransmits its third ACK until the fourth.
		if !sf.initial && sf.active && sf.state == sfPreEstablished && sf.joinAckSent {
			due := sf.joinAckAt.Add(rto << min(sf.joinAckTries, 5))
			if !now.Before(due) {
				if sf.joinAckTries >= 6 {
					c.e.MIB.MPJoinRejected.Add(1)
					sf.state = sfClosed
					sf.err = errJoinTimeout
					ep := sf.ep
					c.actions = append(c.actions, func() { ep.Abort() })
					continue
				}
				sf.joinAckTries++
				sf.joinAckAt = now
				b := make([]byte, header.MPJoinACKLen)
				header.MPJoinACK{HMAC: mpkey.JoinACKHMAC(c.localKey, c.remoteKey, sf.localNonce, sf.remoteNonce)}.Encode(b)
				sends = append(sends, send{sf, b})
				due = now.Add(rto << min(sf.joinAckTries, 5))
			}
			at(due)
		}
	}
	// The initiator repeats its keys on a pure ACK while the peer has not
	// shown (with a DSS) that the third ACK arrived and we send no data:
	// until it does (RFC 8684 3.1), backing off to 64 RTOs between tries.
	if c.active && !c.peerConfirmed && len(c.subflows) > 0 {
		sf := c.subflows[0]
		if sf.state == sfEstablished && c.sndNxt == c.localIDSN+1 {
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
				sends = append(sends, send{sf, b})
			}
			at(c.mpcAckAt.Add(rto << min(c.mpcAckTries, 6)))
		}
	}
	// Our MP_FAIL is repeated until answered, and times out.
	at(c.mpFailTimerLocked(now, rto))
	if c.isDone() {
		c.mu.Unlock()
		return time.Time{}
	}
	// A DATA_ACK that moved after gVisor's last ACK goes out on its own.
	if !c.ackDueAt.IsZero() {
		if !now.Before(c.ackDueAt) {
			c.ackDueAt = time.Time{}
			if c.rcv.RcvNxt() != c.lastDataAckTx && best != nil {
				c.e.MIB.DataAckTX.Add(1)
				sends = append(sends, send{best, c.dataAckOptionLocked()})
			}
		} else {
			at(c.ackDueAt)
		}
	}
	// DATA_FIN on a pure ACK once all data is out, until DATA_ACKed; the
	// first one waits while subflows are still being added (finHoldLocked).
	hold := time.Time{}
	if c.writeClosed && !c.finAcked && c.finTxAt.IsZero() {
		hold = c.finHoldLocked(rto)
	}
	if !hold.IsZero() && now.Before(hold) {
		at(hold)
	} else if c.writeClosed && !c.finAcked && c.sndNxt == c.snd.End() && best != nil {
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
			sends = append(sends, send{best, b})
			due = now.Add(rto << min(c.finTries, 6))
		}
		at(due)
	}
	// ADD_ADDR echoes and announcements.
	if best != nil {
		for _, a := range c.pendingEcho {
			b := make([]byte, a.Len())
			a.Encode(b)
			sends = append(sends, send{best, b})
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
				sends = append(sends, send{best, b})
				due = now.Add(2 * time.Second)
			}
			at(due)
		}
	}
	// Stall: the DATA_ACK has not moved although data is outstanding. A
	// subflow whose own ACK is stuck too is marked stale and its data is
	// reinjected on the others.
	if dsnLT(c.snd.Una(), c.sndNxt) {
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
		at(c.lastProgress.Add(stall))
	}
	// Orderly end: both DATA_FINs are through.
	if c.writeClosed && c.finAcked && c.rcv.EOF() {
		c.finishLocked(nil)
	}
	c.mu.Unlock()
	for _, s := range sends {
		if err := c.e.st.Mux.SendACK(s.sf.tuple, s.opt); err != nil {
			c.e.log.Debug("mptcp: control segment", "subflow", s.sf.tuple.String(), "err", err)
		}
	}
	return next
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

// rtoLocked is the connection-level retransmission timeout.
func (c *Conn) rtoLocked() time.Duration {
	var m time.Duration
	for _, sf := range c.subflows {
		m = max(m, sf.info.rtt)
	}
	return max(200*time.Millisecond, 2*m)
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

type errString string

func (e errString) Error() string { return string(e) }

const errJoinTimeout = errString("mptcp: join: no fourth ACK")

// Write implements net.Conn.
func (c *Conn) Write(p []byte) (int, error) {
	if c.fb != nil {
		return c.fb.Write(p)
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	total := 0
	for len(p) > 0 {
		if err := c.writeErrLocked(); err != nil {
			return total, err
		}
		if n := c.snd.Write(p); n > 0 {
			total += n
			p = p[n:]
			c.stats.bytesSent += uint64(n)
			c.kickLocked()
			continue
		}
		if err := c.waitLocked(c.writeDeadline); err != nil {
			return total, err
		}
	}
	return total, nil
}

// writeErrLocked is why Write and ReadFrom can take no more data, or nil.
func (c *Conn) writeErrLocked() error {
	if c.writeClosed || c.err == io.EOF {
		return ErrClosed
	}
	return c.err
}

// ReadFrom implements io.ReaderFrom: it reads from r straight into the
// send buffer, so io.Copy to a Conn costs one copy less than through
// Write (as many as plain TCP through gVisor's gonet).
func (c *Conn) ReadFrom(r io.Reader) (int64, error) {
	if c.fb != nil {
		return io.Copy(struct{ io.Writer }{c.fb}, r)
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	var total int64
	for {
		if err := c.writeErrLocked(); err != nil {
			return total, err
		}
		tail := c.snd.Tail()
		if len(tail) == 0 {
			if err := c.waitLocked(c.writeDeadline); err != nil {
				return total, err
			}
			continue
		}
		// The tail's block stays in place while pinned (an Ack cannot
		// recycle it), and only this writer appends (wmu).
		c.snd.Pin()
		c.mu.Unlock()
		n, err := r.Read(tail)
		c.mu.Lock()
		n = max(min(n, len(tail)), 0)
		c.snd.Commit(n)
		c.snd.Unpin()
		if n > 0 {
			total += int64(n)
			c.stats.bytesSent += uint64(n)
			c.kickLocked()
		}
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

func (c *Conn) hasPendingData() bool {
	if len(c.reinjectQ) > 0 || (c.snd != nil && dsnLT(c.sndNxt, c.snd.End())) {
		return true
	}
	for _, sf := range c.subflows {
		if sf.owed.Len > 0 && sf.usable() {
			return true
		}
	}
	return false
}

// reinjectLocked queues what sf carried and the peer did not DATA_ACK.
func (c *Conn) reinjectLocked(sf *subflow) {
	una := c.snd.Una()
	for _, s := range sf.tx.Unacked() {
		end := s.DSN + uint64(s.Len)
		if dsnLEQ(end, una) {
			continue
		}
		if dsnLT(s.DSN, una) {
			s.Len -= int(una - s.DSN)
			s.DSN = una
		}
		c.reinjectQ = append(c.reinjectQ, s)
	}
}
