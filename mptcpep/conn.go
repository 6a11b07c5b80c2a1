package mptcpep

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	tcpheader "gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/mptun/mptun/mptcpep/header"
	"github.com/mptun/mptun/mptcpep/mpkey"
	"github.com/mptun/mptun/netstack"
)

// Conn is an MPTCP connection (the meta-socket). It implements net.Conn
// with half-close (CloseWrite). All protocol state is guarded by mu; gVisor
// endpoints are only ever called without mu held, because gVisor calls the
// option layer (which takes mu) under its own endpoint locks.
type Conn struct {
	e      *Endpoint
	active bool
	port   uint16 // the peer's port of the initial subflow (joins use it)

	done     chan struct{} // closed when the connection is finished
	kick     chan struct{} // wakes the run goroutine
	pmCh     chan struct{} // wakes the path manager
	doneOnce sync.Once
	wg       sync.WaitGroup

	// wmu serializes Write and ReadFrom: ReadFrom fills the send buffer's
	// tail without mu, so no other writer may append meanwhile.
	wmu sync.Mutex
	// rmu serializes Read and WriteTo: WriteTo writes the reassembly's
	// blocks out without mu, so nothing may consume them meanwhile.
	rmu sync.Mutex

	mu             sync.Mutex
	notify         chan struct{} // closed and replaced to wake waiters
	notifyUsed     bool          // somebody holds notify
	localKey       mpkey.Key
	remoteKey      mpkey.Key
	remoteKeyKnown bool
	startedAt      time.Time // start(): the connection is established
	// awaitKey is the accept that waits for the peer's key (see
	// keyArrivedLocked); nil when none does.
	awaitKey      func()
	localToken    uint32
	remoteToken   uint32
	localIDSN     uint64
	remoteIDSN    uint64
	csum          bool
	peerConfirmed bool
	fallback      bool
	fb            *fallbackConn
	// infinite: fell back to TCP after the handshake; the meta-socket
	// stays, with the initial subflow's sequence space as the data
	// sequence space (an infinite mapping).
	infinite   bool
	shutWrSent bool
	// rxWaiting: a subflow reader waits for receive-window room since
	// the window ended at rxWaitEnd (see wakeReadersLocked).
	rxWaiting bool
	rxWaitEnd uint64
	// finSSN is the subflow sequence number (relative) of our TCP FIN
	// after a fallback, where the FIN is the DATA_FIN: it is acknowledged
	// once the subflow ACK passes it, not when the data is.
	finSSN uint32
	fail   failState // MP_FAIL and infinite mapping (mpfail.go)

	snd          *sendBuffer
	sndNxt       uint64
	sndEdge      uint64 // right edge of the peer's connection-level window
	reinjectQ    []span
	writeClosed  bool
	finDSN       uint64
	finAcked     bool
	finTxAt      time.Time
	finTries     int
	lastProgress time.Time // DATA_ACK last moved (or data first outstanding)
	lastReinject uint64

	rcv           *reassembly
	rcvBuf        int
	readClosed    bool
	lastDataAckTx uint64
	ackDueAt      time.Time
	lastRxSf      *subflow
	peerFinAcked  bool

	subflows    []*subflow
	remoteAddrs map[uint8]remoteAddr
	pendingEcho []header.AddAddr
	announced   map[uint8]*announcement
	actions     []func()
	err         error
	aborted     bool
	mpcAckTries int
	mpcAckAt    time.Time

	readDeadline, writeDeadline time.Time

	stats connCounters
}

type remoteAddr struct {
	id      uint8
	addr    netip.AddrPort
	removed bool
	noJoin  bool // the peer's MP_CAPABLE C flag: no joins to its initial address
}

type announcement struct {
	opt   header.AddAddr
	tries int
	first time.Time // first sent
	at    time.Time // last sent
	acked bool
}

type connCounters struct {
	bytesSent, bytesReceived uint64
	reinjected               uint64
}

var (
	// ErrClosed is returned by operations on a closed connection.
	ErrClosed = net.ErrClosed
	// ErrReset reports a connection reset by the peer (RST on every
	// subflow or MP_FASTCLOSE).
	ErrReset = errors.New("mptcp: connection reset by peer")
	// ErrFastclose reports a connection aborted with MP_FASTCLOSE.
	ErrFastclose = errors.New("mptcp: connection fast-closed by peer")
	// ErrNoSubflow reports that every subflow failed.
	ErrNoSubflow = errors.New("mptcp: all subflows failed")
)

func newConn(e *Endpoint, active bool) *Conn {
	c := &Conn{
		e:           e,
		active:      active,
		done:        make(chan struct{}),
		kick:        make(chan struct{}, 1),
		pmCh:        make(chan struct{}, 1),
		notify:      make(chan struct{}),
		rcvBuf:      e.cfg.ReceiveBuffer,
		remoteAddrs: make(map[uint8]remoteAddr),
		announced:   make(map[uint8]*announcement),
	}
	return c
}

// setKeyLocked installs the local key and derives what follows from it.
func (c *Conn) setLocalKey(k mpkey.Key) {
	c.localKey = k
	c.localToken, c.localIDSN = k.TokenIDSN()
	c.snd = newSendBuffer(c.localIDSN+1, c.e.cfg.SendBuffer)
	c.snd.pool = &c.e.sendBlocks
	c.sndNxt = c.localIDSN + 1
	c.sndEdge = c.sndNxt + 65535
	c.finDSN = 0
}

func (c *Conn) setRemoteKeyLocked(k mpkey.Key) {
	if c.remoteKeyKnown {
		return
	}
	c.remoteKey = k
	c.remoteKeyKnown = true
	c.remoteToken, c.remoteIDSN = k.TokenIDSN()
	c.rcv = newReassembly(c.remoteIDSN+1, c.rcvBuf)
	c.rcv.pool = &c.e.recvBlocks
	c.lastDataAckTx = c.remoteIDSN + 1
}

func (c *Conn) rcvWindow() int { return c.rcvBuf }

// keyArrivedLocked follows the peer's key reaching a passive initial
// subflow late (in the data-carrying MP_CAPABLE): the mappings that came
// before it are placed now, and an accept that waited for it goes on.
func (c *Conn) keyArrivedLocked(sf *subflow, seg *netstack.Segment) {
	early := sf.earlyDSS
	sf.earlyDSS = nil
	for i := range early {
		c.dssInLocked(sf, seg, &early[i])
	}
	if f := c.awaitKey; f != nil {
		c.awaitKey = nil
		go f() // not under gVisor's endpoint lock, which Incoming holds
	}
}

func (c *Conn) isDone() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// waitCh returns a channel closed at the next state change (call with mu).
func (c *Conn) waitCh() chan struct{} {
	c.notifyUsed = true
	return c.notify
}

// wakeLocked wakes everybody waiting on waitCh. Without waiters it costs
// nothing: it runs for every chunk delivered.
func (c *Conn) wakeLocked() {
	if !c.notifyUsed {
		return
	}
	c.notifyUsed = false
	close(c.notify)
	c.notify = make(chan struct{})
}

func (c *Conn) kickLocked() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

func (c *Conn) pmKick() {
	select {
	case c.pmCh <- struct{}{}:
	default:
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

// start launches the connection's goroutines once the initial subflow is
// established.
func (c *Conn) start() {
	c.e.MIB.ConnsEstablished.Add(1)
	c.e.MIB.SubflowsEstablished.Add(1)
	c.mu.Lock()
	c.lastProgress = time.Now()
	c.startedAt = c.lastProgress
	sfs := append([]*subflow(nil), c.subflows...)
	c.mu.Unlock()
	if !c.active {
		// Before the application can close: a DATA_FIN waits for the
		// echo of these (finHoldLocked).
		c.announceAddrs()
	}
	c.wg.Add(1)
	go func() { defer c.wg.Done(); c.run() }()
	if c.active {
		c.wg.Add(1)
		go func() { defer c.wg.Done(); c.pathManager() }()
	}
	for _, sf := range sfs {
		c.startReader(sf)
	}
}

func (c *Conn) startReader(sf *subflow) {
	c.mu.Lock()
	if sf.readerStarted || sf.ep == nil || sf.wq == nil {
		c.mu.Unlock()
		return
	}
	sf.readerStarted = true
	c.mu.Unlock()
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		sf.reader()
	}()
}

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

// otherEstablishedLocked counts the established subflows besides sf.
func (c *Conn) otherEstablishedLocked(sf *subflow) int {
	n := 0
	for _, s := range c.subflows {
		if s != sf && s.state == sfEstablished {
			n++
		}
	}
	return n
}

// rstOption is an MP_TCPRST option with reason (RFC 8684 3.6).
func rstOption(reason uint8, transient bool) []byte {
	opt := make([]byte, header.MPTCPRstLen)
	header.MPTCPRst{Reason: reason, Transient: transient}.Encode(opt)
	return opt
}

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

// subflowFailed retires a subflow whose TCP connection ended and queues
// its unacknowledged data for reinjection on the others.
func (c *Conn) subflowFailed(sf *subflow, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if sf.state == sfClosed {
		return
	}
	sf.state = sfClosed
	sf.err = err
	sf.readerDone = true
	c.e.MIB.SubflowsClosed.Add(1)
	if !errors.Is(err, errSubflowEOF) {
		c.e.MIB.SubflowErrors.Add(1)
	}
	c.reinjectLocked(sf)
	c.e.st.Mux.Unregister(sf.tuple)
	c.actions = append(c.actions, func() { sf.ep.Close() })
	live := 0
	for _, s := range c.subflows {
		if s.state != sfClosed {
			live++
		}
	}
	if live == 0 {
		switch {
		case c.rcv != nil && c.rcv.EOF() && (!c.writeClosed || c.finAcked):
			c.finishLocked(nil)
		case sf.rstReason >= 0 || c.aborted:
			c.finishLocked(ErrReset)
		default:
			// The path manager may bring a subflow back (an uplink that
			// returns); give it a while before declaring the connection
			// dead.
			c.actions = append(c.actions, func() { c.pmKick() })
		}
	}
	c.kickLocked()
	c.pmKick()
	c.wakeLocked()
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

// finishLocked ends the connection with err (nil: orderly).
func (c *Conn) finishLocked(err error) {
	if c.err == nil {
		if err == nil {
			err = io.EOF
		}
		c.err = err
	}
	c.doneOnce.Do(func() { close(c.done) })
	c.wakeLocked()
}

func (c *Conn) fastclosedLocked() {
	c.aborted = true
	for _, sf := range c.subflows {
		if sf.state != sfClosed {
			sf.state = sfClosed
			ep := sf.ep
			c.e.st.Mux.Unregister(sf.tuple)
			if ep != nil {
				c.actions = append(c.actions, func() { ep.Abort() })
			}
		}
	}
	c.finishLocked(ErrFastclose)
	c.kickLocked()
}

// resetSubflowLocked resets a subflow that failed MPTCP validation: an RST
// with MP_TCPRST answers the offending segment.
func (c *Conn) resetSubflowLocked(sf *subflow, reason uint8, seg *netstack.Segment) {
	c.e.MIB.MPRstTX.Add(1)
	sf.state = sfClosed
	sf.err = fmt.Errorf("subflow %v: reset: MPTCP error", sf.tuple)
	opt := make([]byte, header.MPTCPRstLen)
	header.MPTCPRst{Reason: reason}.Encode(opt)
	via, ipv6, t := seg.Via, seg.IPv6(), sf.tuple
	seq, ack := seg.Ack, seg.Seq+uint32(seg.PayloadLen)
	if seg.SYN() {
		ack++
	}
	c.e.st.Mux.Unregister(sf.tuple)
	ep := sf.ep
	c.actions = append(c.actions, func() {
		_ = via.SendRaw(ipv6, t, seq, ack, rstAck, 0, opt)
		if ep != nil {
			ep.Abort()
		}
	})
	c.kickLocked()
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

// waitLocked waits for a state change or the deadline.
func (c *Conn) waitLocked(deadline time.Time) error {
	w := c.waitCh()
	c.mu.Unlock()
	defer c.mu.Lock()
	if deadline.IsZero() {
		<-w
		return nil
	}
	d := time.Until(deadline)
	if d <= 0 {
		return os.ErrDeadlineExceeded
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-w:
		return nil
	case <-t.C:
		return os.ErrDeadlineExceeded
	}
}

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

// CloseWrite sends a DATA_FIN once everything written has been sent.
func (c *Conn) CloseWrite() error {
	if c.fb != nil {
		return c.fb.CloseWrite()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.writeClosed {
		return nil
	}
	c.writeClosed = true
	c.finDSN = c.snd.End()
	c.kickLocked()
	return nil
}

// CloseRead stops delivering data to the application.
func (c *Conn) CloseRead() error {
	c.mu.Lock()
	c.readClosed = true
	c.wakeLocked()
	c.mu.Unlock()
	return nil
}

// Close closes both directions; the connection finishes its DATA_FIN
// exchange in the background (bounded by a timeout), then closes its
// subflows.
func (c *Conn) Close() error {
	if c.fb != nil {
		return c.fb.Close()
	}
	_ = c.CloseWrite()
	c.mu.Lock()
	c.readClosed = true
	c.wakeLocked()
	c.mu.Unlock()
	go func() {
		t := time.NewTimer(30 * time.Second)
		defer t.Stop()
		select {
		case <-c.done:
		case <-t.C:
			c.Abort()
		}
	}()
	return nil
}

// Abort resets the connection at once with MP_FASTCLOSE on every subflow.
func (c *Conn) Abort() {
	if c.fb != nil {
		c.fb.Abort()
		return
	}
	c.mu.Lock()
	if c.isDone() {
		c.mu.Unlock()
		return
	}
	c.aborted = true
	var fc []byte
	if c.remoteKeyKnown {
		fc = make([]byte, header.MPFastcloseLen)
		header.MPFastclose{ReceiverKey: uint64(c.remoteKey)}.Encode(fc)
	}
	var eps []tcpip.Endpoint
	for _, sf := range c.subflows {
		if sf.state == sfClosed {
			continue
		}
		if fc != nil && sf.issKnown {
			if err := c.e.st.Mux.SendRST(sf.tuple, fc); err == nil {
				c.e.MIB.MPFastcloseTX.Add(1)
			}
		}
		sf.state = sfClosed
		c.e.st.Mux.Unregister(sf.tuple)
		if sf.ep != nil {
			eps = append(eps, sf.ep)
		}
	}
	c.finishLocked(ErrClosed)
	c.mu.Unlock()
	for _, ep := range eps {
		ep.Abort()
	}
	c.wg.Wait()
	c.e.forget(c)
}

// LocalAddr implements net.Conn (the initial subflow's address).
func (c *Conn) LocalAddr() net.Addr {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.subflows) == 0 {
		return nil
	}
	return net.TCPAddrFromAddrPort(c.subflows[0].tuple.Local)
}

// RemoteAddr implements net.Conn.
func (c *Conn) RemoteAddr() net.Addr {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.subflows) == 0 {
		return nil
	}
	return net.TCPAddrFromAddrPort(c.subflows[0].tuple.Remote)
}

// SetDeadline implements net.Conn.
func (c *Conn) SetDeadline(t time.Time) error {
	_ = c.SetReadDeadline(t)
	return c.SetWriteDeadline(t)
}

// SetReadDeadline implements net.Conn.
func (c *Conn) SetReadDeadline(t time.Time) error {
	if c.fb != nil {
		return c.fb.SetReadDeadline(t)
	}
	c.mu.Lock()
	c.readDeadline = t
	c.wakeLocked()
	c.mu.Unlock()
	return nil
}

// SetWriteDeadline implements net.Conn.
func (c *Conn) SetWriteDeadline(t time.Time) error {
	if c.fb != nil {
		return c.fb.SetWriteDeadline(t)
	}
	c.mu.Lock()
	c.writeDeadline = t
	c.wakeLocked()
	c.mu.Unlock()
	return nil
}

// Done is closed when the connection has finished (both DATA_FINs
// exchanged, reset or aborted).
func (c *Conn) Done() <-chan struct{} { return c.done }

// MultipathTCP reports whether the connection runs MPTCP (false after a
// fallback to plain TCP).
func (c *Conn) MultipathTCP() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return !c.fallback
}

var _ net.Conn = (*Conn)(nil)

const rstAck = tcpheader.TCPFlagRst | tcpheader.TCPFlagAck

// ConnStats describes a connection and its subflows.
type ConnStats struct {
	Local, Remote string
	MPTCP         bool
	LocalToken    uint32
	RemoteToken   uint32
	Checksum      bool
	BytesSent     uint64 // accepted from the application (Write, ReadFrom), not yet necessarily on the wire
	BytesReceived uint64 // delivered by the subflows into the reassembly, duplicates included
	Reinjected    uint64 // bytes sent again on another subflow
	SendBuffered  int    // not yet acknowledged by DATA_ACK
	RecvBuffered  int    // in the reassembly, not yet read
	DataFinSent   bool
	DataFinAcked  bool
	DataFinRecv   bool
	Subflows      []SubflowStats
}

// Stats returns a snapshot of the connection's state.
func (c *Conn) Stats() ConnStats {
	if c.fb != nil {
		// A closed gVisor endpoint has no addresses any more.
		s := ConnStats{}
		if a := c.fb.LocalAddr(); a != nil {
			s.Local = a.String()
		}
		if a := c.fb.RemoteAddr(); a != nil {
			s.Remote = a.String()
		}
		return s
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	s := ConnStats{
		MPTCP: !c.fallback, LocalToken: c.localToken, RemoteToken: c.remoteToken, Checksum: c.csum,
		BytesSent: c.stats.bytesSent, BytesReceived: c.stats.bytesReceived, Reinjected: c.stats.reinjected,
		DataFinSent: c.writeClosed, DataFinAcked: c.finAcked,
	}
	if c.snd != nil {
		s.SendBuffered = c.snd.Len()
	}
	if c.rcv != nil {
		s.RecvBuffered = c.rcv.Buffered()
		_, s.DataFinRecv = c.rcv.FinDSN()
	}
	if len(c.subflows) > 0 {
		s.Local, s.Remote = c.subflows[0].tuple.Local.String(), c.subflows[0].tuple.Remote.String()
	}
	for _, sf := range c.subflows {
		s.Subflows = append(s.Subflows, sf.stats())
	}
	return s
}

// Keys returns the connection's local and remote MPTCP keys (zero for a
// connection that fell back to TCP). Applications bind authentication to
// them so that it cannot be replayed on another connection.
func (c *Conn) Keys() (local, remote mpkey.Key) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fallback || !c.remoteKeyKnown {
		return 0, 0
	}
	return c.localKey, c.remoteKey
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
