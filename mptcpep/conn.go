package mptcpep

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	tcpheader "gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/mptun/mptun/mptcpep/header"
	"github.com/mptun/mptun/mptcpep/mpkey"
	"github.com/mptun/mptun/netstack"
	"github.com/mptun/mptun/netstack/cc"
)

// Conn is an MPTCP connection (the meta-socket). It implements net.Conn
// with half-close (CloseWrite). All protocol state is guarded by mu; gVisor
// endpoints are only ever called without mu held, because gVisor calls the
// option layer (which takes mu) under its own endpoint locks.
type Conn struct {
	e      *Endpoint
	active bool
	port   uint16 // the peer's port of the initial subflow (joins use it)
	// ccGroup couples the subflows' congestion controllers (LIA);
	// immutable, its own leaf lock.
	ccGroup *cc.Group

	// ctx is the connection's life, cancelled when it finishes (done is
	// its Done channel): what the connection starts (joins) derives from it.
	ctx    context.Context
	cancel context.CancelFunc
	done   <-chan struct{} // closed when the connection is finished
	kick   chan struct{}   // wakes the run goroutine
	pmCh   chan struct{}   // wakes the path manager
	// wg counts every goroutine of the connection (run goroutine, path
	// manager and its joins, subflow readers, close watchdog), so that
	// Abort returns once they all ended. They start through goLocked
	// only: under mu, and not once Abort has begun (reaped), since Abort
	// waits for wg after setting it.
	wg sync.WaitGroup
	// reap is closed by Abort: the run goroutine's linger after the end
	// (see linger) stops at once.
	reap chan struct{}

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

	watchdog bool // Close started the close watchdog
	reaped   bool // reap is closed

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
	ctx, cancel := context.WithCancel(context.Background())
	c := &Conn{
		e:           e,
		active:      active,
		ctx:         ctx,
		cancel:      cancel,
		done:        ctx.Done(),
		reap:        make(chan struct{}),
		ccGroup:     cc.NewGroup(),
		kick:        make(chan struct{}, 1),
		pmCh:        make(chan struct{}, 1),
		notify:      make(chan struct{}),
		rcvBuf:      e.cfg.ReceiveBuffer,
		remoteAddrs: make(map[uint8]remoteAddr),
		announced:   make(map[uint8]*announcement),
	}
	return c
}

// setLocalKey installs the local key and derives what follows from it.
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
	c.mu.Lock()
	c.goLocked(c.run)
	if c.active {
		c.goLocked(c.pathManager)
	}
	c.mu.Unlock()
	for _, sf := range sfs {
		c.startReader(sf)
	}
}

// goLocked runs f in a goroutine of the connection, counted in wg, unless
// Abort has begun: it waits for wg once it set reaped, and an Add after
// that Wait began would be lost (or panic). Call with mu held.
func (c *Conn) goLocked(f func()) {
	if c.reaped {
		return
	}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		f()
	}()
}

// startReader starts the reader goroutine of sf once its gVisor endpoint
// exists.
func (c *Conn) startReader(sf *subflow) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if sf.readerStarted || sf.ep == nil || sf.wq == nil {
		return
	}
	sf.readerStarted = true
	c.goLocked(sf.reader)
}

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
	sf.closeController()
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

// finishLocked ends the connection with err (nil: orderly).
func (c *Conn) finishLocked(err error) {
	if c.err == nil {
		if err == nil {
			err = io.EOF
		}
		c.err = err
	}
	c.cancel()
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
	sf.closeController()
	ep := sf.ep
	c.actions = append(c.actions, func() {
		_ = via.SendRaw(ipv6, t, seq, ack, rstAck, 0, opt)
		if ep != nil {
			ep.Abort()
		}
	})
	c.kickLocked()
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
	if !c.watchdog && !c.isDone() {
		c.watchdog = true
		c.goLocked(c.closeWatchdog)
	}
	c.mu.Unlock()
	return nil
}

// closeTimeout bounds the DATA_FIN exchange after Close.
const closeTimeout = 30 * time.Second

// closeWatchdog aborts the connection if it has not finished closeTimeout
// after Close (a peer that never acknowledges our DATA_FIN).
func (c *Conn) closeWatchdog() {
	t := time.NewTimer(closeTimeout)
	defer t.Stop()
	select {
	case <-c.done:
	case <-t.C:
		c.abort()
	}
}

// Abort resets the connection at once with MP_FASTCLOSE on every subflow
// (a finished connection stops lingering) and returns once its goroutines
// have ended.
func (c *Conn) Abort() {
	if c.fb != nil {
		c.fb.Abort()
		return
	}
	c.abort()
	c.wg.Wait()
	c.e.forget(c)
}

// abort is Abort without the wait, for the connection's own goroutines
// (the close watchdog), which Abort would wait for.
func (c *Conn) abort() {
	c.mu.Lock()
	if !c.reaped {
		c.reaped = true
		close(c.reap)
	}
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

// errString is an error that can be a constant.
type errString string

func (e errString) Error() string { return string(e) }
