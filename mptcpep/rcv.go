package mptcpep

import (
	"errors"
	"io"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"

	"github.com/mptun/mptun/mptcpep/header"
	"github.com/mptun/mptun/netstack"
)

// The receive path, as gVisor's transport/tcp rcv.go and the receive side
// of Linux's net/mptcp (subflow.c, protocol.c): the peer's DSS options
// bring mappings and DATA_ACKs (dssInLocked, dataAckLocked); a subflow
// reader hands over what it read from gVisor (deliver, or reserveLocked
// and commit for bytes read in place), placed by those mappings into the
// DSN-keyed reassembly; the application reads it (Read here, WriteTo in
// writeto.go); and the DATA_ACK we owe is built here (dataAckOptionLocked)
// and sent by the run goroutine (timers.go) or piggybacked (options.go).

func (c *Conn) rcvWindow() int { return c.rcvBuf }

// rxRoomLocked is how many bytes (at most limit) the reader of sf may take
// from gVisor now: what fits in the connection's receive window at the DSN
// its next byte carries. The peer sends by gVisor's window, which knows
// nothing of ours, so reading more than fits would drop bytes gVisor has
// already acknowledged (the peer resends them only at the MPTCP level,
// after its own timeout); left in gVisor they close its window instead.
func (c *Conn) rxRoomLocked(sf *subflow, limit int) int {
	if c.readClosed {
		return limit
	}
	if !c.infinite {
		if dsn, n, ok := sf.rx.Lookup(sf.readSSN); ok {
			room := dsnDiff(c.rcv.WindowEnd(), dsn)
			return int(max(min(room, int64(n), int64(limit)), 0))
		}
	}
	return min(limit, c.rcvWindow()-c.rcv.Buffered())
}

// deliver places bytes read from a subflow by the peer's mappings.
func (c *Conn) deliver(sf *subflow, b []byte) {
	mib := &c.e.MIB
	c.mu.Lock()
	defer c.mu.Unlock()
	if sf.readerDone {
		return // reset after a checksum failure: nothing more from it
	}
	sf.bytesRx += uint64(len(b))
	c.stats.bytesReceived += uint64(len(b))
	for len(b) > 0 {
		dsn, n, ok := sf.rx.Lookup(sf.readSSN)
		if c.infinite && c.fail.rxBaseSet && !ssnLT(sf.readSSN, c.fail.rxBaseSSN) {
			// Beyond the peer's infinite mapping: plain TCP.
			dsn, n, ok = c.infiniteRxDSN(sf.readSSN), len(b), true
		}
		if !ok {
			if !c.infinite {
				mib.DSSNoMapping.Add(1)
			}
			if c.infinite || c.fail.sent || (sf.initial && !c.peerConfirmed && len(c.subflows) == 1) {
				// A peer that sends no DSS fell back to TCP (RFC 8684
				// 3.7): the stream continues where it stands.
				if !c.infinite && c.fail.sent {
					c.fail.answered = true
					c.enterInfiniteLocked(sf)
				}
				dsn, n = c.infiniteRxDSN(sf.readSSN), len(b)
			} else {
				// Data we cannot place (no mapping covers it: RFC 8684
				// 3.3.1 calls it invalid). While another subflow carries
				// on, this one is reset with MP_TCPRST "MPTCP-specific
				// error", as Linux resets an MP_JOIN subflow, and the
				// peer reinjects its data there: left open, a subflow
				// whose mappings go missing trickled at one reinjected
				// chunk per stall timeout. Alone, the bytes are dropped
				// and the peer resends them at the connection level.
				if c.otherEstablishedLocked(sf) > 0 {
					mib.DSSNoMappingReset.Add(1)
					c.abortSubflowLocked(sf, rstOption(header.RstReasonMPTCPError, false), errNoMapping)
					return
				}
				sf.readSSN += uint32(len(b))
				sf.rx.Consume(sf.readSSN)
				return
			}
		}
		k := min(n, len(b))
		if c.infinite && len(sf.csumBuf) > 0 {
			// Fell back while a mapping was being collected: TCP
			// semantics, it goes as it is.
			c.insertLocked(sf.csumMap.DSN, sf.csumBuf)
			sf.csumMap, sf.csumBuf = rxMapping{}, sf.csumBuf[:0]
		}
		if m, ok := sf.rx.Find(sf.readSSN); ok && m.HasCsum && c.csum && !c.infinite && dsn == m.DSN+uint64(sf.readSSN-m.SSN) {
			// A mapping with a checksum is placed only once all of it
			// arrived and its checksum holds.
			if !c.checksummedLocked(sf, m, b[:k]) {
				return // the subflow was reset
			}
		} else {
			c.insertLocked(dsn, b[:k])
		}
		sf.readSSN += uint32(k)
		b = b[k:]
	}
	sf.rx.Consume(sf.readSSN)
	c.deliveredLocked(sf)
}

// errNoMapping ends a subflow that delivered data no mapping covers.
const errNoMapping = errString("mptcp: data without a DSS mapping")

// deliveredLocked follows new data from sf: a DATA_ACK soon, readers woken.
func (c *Conn) deliveredLocked(sf *subflow) {
	c.lastRxSf = sf
	if c.rcv.RcvNxt() != c.lastDataAckTx && c.ackDueAt.IsZero() {
		c.ackDueAt = time.Now().Add(time.Millisecond)
		c.kickLocked()
	}
	c.wakeLocked()
}

// reserveLocked appends to dst where the reader of sf may read up to want
// bytes straight into the reassembly; nothing means to read through its
// buffer and deliver. Only for in-order bytes (at rcv_nxt) of a mapping
// without a DSS checksum (those are checked whole before they are placed).
func (c *Conn) reserveLocked(dst [][]byte, sf *subflow, want int) [][]byte {
	if want <= 0 || sf.readerDone || c.infinite || c.fail.sent || c.readClosed || c.csum {
		return dst
	}
	dsn, n, ok := sf.rx.Lookup(sf.readSSN)
	if !ok {
		return dst
	}
	return c.rcv.Reserve(dst, dsn, min(n, want))
}

// commit ends the reservation of sf's reader, which read n bytes into it.
func (c *Conn) commit(sf *subflow, n int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.rcv.Commit(n)
	if n <= 0 {
		return
	}
	c.e.MIB.RxInPlaceReads.Add(1)
	sf.bytesRx += uint64(n)
	c.stats.bytesReceived += uint64(n)
	sf.readSSN += uint32(n)
	sf.rx.Consume(sf.readSSN)
	c.deliveredLocked(sf)
}

// insertLocked places b at dsn in the reassembly, counting drops.
func (c *Conn) insertLocked(dsn uint64, b []byte) {
	if _, err := c.rcv.Insert(dsn, b); err != nil {
		switch {
		case errors.Is(err, ErrBeyondWindow):
			c.e.MIB.WindowDropBytes.Add(uint64(len(b)))
		case errors.Is(err, ErrTooManySegments):
			c.e.MIB.OFOSegmentDrops.Add(1)
		}
	}
}

// checksummedLocked collects the bytes b of mapping m (they start at
// sf.readSSN) until the mapping is complete, then checks its DSS checksum
// and places it. It returns false when a checksum failure reset the
// subflow.
func (c *Conn) checksummedLocked(sf *subflow, m rxMapping, b []byte) bool {
	if sf.csumMap != m || int(sf.readSSN-m.SSN) != len(sf.csumBuf) {
		if sf.readSSN != m.SSN {
			// The start of the mapping was read under another one (a
			// conflicting mapping was dropped): nothing to check.
			c.insertLocked(m.DSN+uint64(sf.readSSN-m.SSN), b)
			return true
		}
		sf.csumMap = m
		sf.csumBuf = sf.csumBuf[:0]
	}
	sf.csumBuf = append(sf.csumBuf, b...)
	if len(sf.csumBuf) < m.Len {
		return true
	}
	data := sf.csumBuf
	sf.csumMap, sf.csumBuf = rxMapping{}, data[:0]
	l := uint16(m.Len)
	if m.DataFin {
		l++
	}
	if header.DSSChecksum(m.DSN, m.SSN, l, checksum.Checksum(data, 0)) == m.Checksum {
		c.insertLocked(m.DSN, data)
		return true
	}
	c.e.MIB.DSSChecksumFail.Add(1)
	c.e.log.Warn("mptcp: DSS checksum failure", "subflow", sf.tuple.String(), "dsn", m.DSN, "ssn", m.SSN, "len", m.Len)
	if c.mpFailOutLocked(sf, m.DSN) {
		// Falling back to TCP: the infinite mapping acts retroactively,
		// the bytes count as TCP delivered them (RFC 8684 3.7).
		c.insertLocked(m.DSN, data)
		return true
	}
	return false
}

// dssInLocked processes an incoming DSS option.
func (c *Conn) dssInLocked(sf *subflow, seg *netstack.Segment, d *header.DSS) {
	mib := &c.e.MIB
	mib.DSSRX.Add(1)
	if !c.remoteKeyKnown {
		// Data before the key (the data-carrying MP_CAPABLE was lost):
		// its DSN is known only once the key is. Kept for then.
		if d.HasMapping && (d.DataLen > 0 || d.DataFin) && len(sf.earlyDSS) < maxEarlyDSS {
			early := *d
			early.HasDataAck = false
			sf.earlyDSS = append(sf.earlyDSS, early)
		}
		return
	}
	if !c.peerConfirmed {
		c.peerConfirmed = true
		c.pmKick()
	}
	if d.HasDataAck {
		mib.DataAckRX.Add(1)
		ack := d.DataAck
		if !d.DataAck64 {
			ack = expandDSN32(uint32(ack), c.snd.Una())
		}
		c.dataAckLocked(sf, ack, seg.Window)
	}
	if !d.HasMapping {
		return
	}
	dsn := d.DSN
	if !d.DSN64 {
		dsn = expandDSN32(uint32(dsn), c.rcv.RcvNxt())
	}
	n := int(d.DataLen)
	if n == 0 && !d.DataFin {
		c.infiniteMapInLocked(sf, seg, dsn, d.SSN)
		return
	}
	if d.DataFin {
		mib.DataFinRX.Add(1)
		if n == 0 {
			mib.DSSMappingDropped.Add(1)
			return
		}
		n--
		if err := c.rcv.SetFin(dsn + uint64(n)); err != nil {
			mib.DSSMappingDropped.Add(1)
		} else {
			c.ackDueAt = time.Now()
			c.kickLocked()
			c.wakeLocked()
		}
	}
	if n > 0 && d.SSN != 0 {
		sf.addRxMapping(rxMapping{SSN: d.SSN, DSN: dsn, Len: n, DataFin: d.DataFin, HasCsum: d.HasChecksum, Checksum: d.Checksum})
	}
}

// dataAckLocked processes a DATA_ACK and the window that came with it.
func (c *Conn) dataAckLocked(sf *subflow, ack uint64, wnd uint16) {
	mib := &c.e.MIB
	prev := c.snd.Una()
	if !c.writeClosed || dsnLT(ack, c.finDSN+1) {
		if _, err := c.snd.Ack(ack); err != nil {
			mib.DataAckInvalid.Add(1)
			return
		}
	} else {
		if _, err := c.snd.Ack(c.finDSN); err != nil {
			mib.DataAckInvalid.Add(1)
			return
		}
		if !c.finAcked {
			c.finAcked = true
			c.wakeLocked()
			c.kickLocked()
		}
	}
	una := c.snd.Una()
	// Only an ACK that moved counts: duplicates arrive on every segment of
	// the other direction and would hide a stall forever.
	if dsnLT(prev, una) && (dsnLT(c.lastReinject, una) || c.lastReinject == 0) {
		c.lastProgress = time.Now()
	}
	if dsnLT(c.sndNxt, una) {
		c.sndNxt = una
	}
	edge := ack + uint64(wnd)<<sf.peerWScale
	if dsnLT(c.sndEdge, edge) {
		c.sndEdge = edge
		c.kickLocked()
	}
	c.wakeLocked()
}

// Read implements net.Conn.
func (c *Conn) Read(p []byte) (int, error) {
	if c.fb != nil {
		return c.fb.Read(p)
	}
	c.rmu.Lock()
	defer c.rmu.Unlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		if c.fallback && c.fb != nil {
			c.mu.Unlock()
			n, err := c.fb.Read(p)
			c.mu.Lock()
			return n, err
		}
		if c.rcv.Readable() > 0 {
			n := c.rcv.Read(p)
			c.wakeReadersLocked()
			return n, nil
		}
		if err := c.readEndLocked(); err != nil {
			return 0, err
		}
		if err := c.waitLocked(c.readDeadline); err != nil {
			return 0, err
		}
	}
}

// readEndLocked is why Read and WriteTo, with nothing readable, get no
// more data (io.EOF at the end of the stream), or nil to wait for it.
func (c *Conn) readEndLocked() error {
	if c.rcv.EOF() {
		c.kickLocked() // the run goroutine finishes the connection
		return io.EOF
	}
	if c.readClosed && c.err == nil {
		return ErrClosed
	}
	return c.err
}

// wakeReadersLocked wakes subflow readers that wait for room in the
// receive window (rxRoomLocked) once the application has read an eighth
// of it since they began to wait, or everything: waking them on every
// small Read cost a goroutine switch per read when the application is
// the bottleneck.
func (c *Conn) wakeReadersLocked() {
	if !c.rxWaiting {
		return
	}
	if c.rcv.Readable() == 0 || dsnDiff(c.rcv.WindowEnd(), c.rxWaitEnd) >= int64(c.rcv.Window()/8) {
		c.rxWaiting = false
		c.wakeLocked()
	}
}

// dataAckOptionLocked is a DSS option carrying our DATA_ACK, for a pure
// ACK of our own (gVisor's segments get theirs in Outgoing); it counts as
// sent from here.
func (c *Conn) dataAckOptionLocked() []byte {
	d := header.DSS{HasDataAck: true, DataAck64: true, DataAck: c.rcv.RcvNxt()}
	b := make([]byte, d.Len())
	d.Encode(b)
	c.lastDataAckTx = c.rcv.RcvNxt()
	return b
}
