package mptcpep

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/mptun/mptun/mptcpep/header"
	"github.com/mptun/mptun/netstack"
	"github.com/mptun/mptun/netstack/cc"
)

// defaultMSS stands for a subflow's MSS until a full segment shows it: an
// Ethernet path's payload with timestamps and the option budget.
const defaultMSS = 1400

// maxEarlyDSS bounds subflow.earlyDSS.
const maxEarlyDSS = 32

// maxSegLen bounds what maxSeg believes, should a segment ever be a GSO
// super-segment.
const maxSegLen = 9000

type sfState int

const (
	sfSynSent        sfState = iota // active, SYN out
	sfSynRcvd                       // passive, SYN seen
	sfPreEstablished                // join: handshake done, waiting for the fourth/third ACK
	sfEstablished
	sfClosed
)

func (s sfState) String() string {
	return [...]string{"syn-sent", "syn-rcvd", "pre-established", "established", "closed"}[s]
}

// subflow is one TCP connection of an MPTCP connection: a gVisor endpoint
// plus the MPTCP state the option layer needs. Fields below the mutex line
// are guarded by the connection's mutex.
type subflow struct {
	c       *Conn
	tuple   netstack.Tuple
	active  bool
	initial bool
	created time.Time // its SYN was sent or seen

	ep tcpip.Endpoint // set once the gVisor endpoint exists (accept/dial)
	wq *waiter.Queue

	// guarded by c.mu
	state         sfState
	localID       uint8 // address ID on the wire: 0 for the initial subflow's address (RFC 8684 3.2)
	uplinkID      uint8 // the endpoint's Local.ID of its address (RemoveLocal, SetBackup)
	remoteID      uint8
	backup        bool // we asked the peer to treat it as backup (or it is our backup uplink)
	remoteBackup  bool // the peer marked it backup
	localNonce    uint32
	remoteNonce   uint32
	iss, irs      uint32
	issKnown      bool
	irsKnown      bool
	synTries      int       // SYNs sent (the initial subflow's MP_CAPABLE ones)
	synAt         time.Time // when the last of them was counted
	joinAckSent   bool
	joinAckTries  int
	joinAckAt     time.Time
	needAck       bool // send a pure ACK (fourth ACK, DATA_ACK) soon
	peerWScale    uint8
	tx            *txMappings
	rx            *rxMappings
	wrote         uint32 // SSN following the last mapping (the bytes of owed are not in ep yet)
	owed          span   // the tail of a chunk gVisor did not take: written next, at its mapping's SSNs
	acked         uint32 // subflow-level ACK seen from the peer (relative)
	lastAckMove   time.Time
	stale         bool
	readSSN       uint32 // SSN of the next byte read from ep
	csumMap       rxMapping
	csumBuf       []byte // bytes of csumMap so far, until its DSS checksum is checked
	info          sfInfo
	bytesTx       uint64
	bytesRx       uint64
	reinjTx       uint64
	rstReason     int // MP_TCPRST reason received, -1 none
	rstTransient  bool
	err           error
	readerDone    bool
	readerStarted bool
	// earlyDSS holds the mappings of a passive initial subflow that came
	// before the peer's key (its third ACK and first data segment lost,
	// later data first): they are placed once the retransmitted
	// MP_CAPABLE brings the key (at most maxEarlyDSS; the rest the peer
	// announces again or reinjects).
	earlyDSS []header.DSS

	// maxSeg is the largest payload gVisor put in one segment of this
	// subflow: its sending MSS once bulk data flowed. gVisor reports no
	// MSS for a connected endpoint (MaxSegOption answers the 536 default),
	// and the scheduler sizes its grant in cwnd x MSS bytes. Atomic: set
	// in Outgoing, read by sample without the connection lock.
	maxSeg atomic.Int32

	// cc is the congestion controller of ours that gVisor runs for this
	// subflow (nil: gVisor's own); its Info is safe from any goroutine.
	cc atomic.Pointer[cc.Reporter]
}

func newSubflow(c *Conn, t netstack.Tuple, active, initial bool) *subflow {
	return &subflow{
		c:         c,
		tuple:     t,
		active:    active,
		initial:   initial,
		tx:        newTxMappings(1),
		rx:        newRxMappings(1),
		wrote:     1,
		acked:     1,
		readSSN:   1,
		rstReason: -1,
		created:   time.Now(),
	}
}

// usable reports whether the scheduler may give the subflow data.
func (sf *subflow) usable() bool {
	return sf.state == sfEstablished && sf.ep != nil && sf.err == nil && !sf.stale
}

func (sf *subflow) isBackup() bool { return sf.backup || sf.remoteBackup }

// inflight is what was written into gVisor and not yet acknowledged.
func (sf *subflow) inflight() int { return int(sf.wrote - sf.acked) }

// reader moves bytes from the gVisor endpoint into the connection's
// reassembly, placing them by the peer's DSS mappings. It applies
// back-pressure: while the connection buffer is full it stops reading, so
// gVisor's window closes. It ends when the subflow ends.
func (sf *subflow) reader() {
	c := sf.c
	we, ch := waiter.NewChannelEntry(waiter.ReadableEvents | waiter.EventHUp | waiter.EventErr)
	sf.wq.EventRegister(&we)
	defer sf.wq.EventUnregister(&we)
	buf := make([]byte, 64<<10)
	var vw vecWriter
	for {
		// What gVisor holds now (only this goroutine takes from it, so it
		// can only grow): an in-place read of that much is filled whole.
		queued, err := sf.ep.GetSockOptInt(tcpip.ReceiveQueueSizeOption)
		if err != nil {
			queued = 0
		}
		// Back-pressure: wait for room in the connection buffer.
		c.mu.Lock()
		room := c.rxRoomLocked(sf, len(buf))
		for room <= 0 && !c.isDone() {
			if !c.rxWaiting {
				c.rxWaiting, c.rxWaitEnd = true, c.rcv.WindowEnd()
			}
			w := c.waitCh()
			c.mu.Unlock()
			select {
			case <-w:
			case <-c.done:
			}
			c.mu.Lock()
			room = c.rxRoomLocked(sf, len(buf))
		}
		done := c.isDone()
		inPlace := 0
		if !done {
			vw.reset(c.reserveLocked(vw.bufs[:0], sf, min(room, queued)))
			inPlace = vw.size
		}
		c.mu.Unlock()
		if done {
			return
		}
		if inPlace == 0 {
			vw.reset(append(vw.bufs[:0], buf[:room]))
		}
		res, err := sf.ep.Read(&vw, tcpip.ReadOptions{})
		if inPlace > 0 {
			c.commit(sf, res.Count)
		}
		vw.release()
		if err != nil {
			if _, ok := err.(*tcpip.ErrWouldBlock); ok {
				select {
				case <-ch:
				case <-c.done:
					return
				}
				continue
			}
			var e error
			if _, ok := err.(*tcpip.ErrClosedForReceive); ok {
				if c.peerFinInfinite() {
					return // the subflow stays open for sending
				}
				e = errSubflowEOF
			} else {
				e = fmt.Errorf("subflow %v: read: %s", sf.tuple, err)
			}
			c.subflowFailed(sf, e)
			return
		}
		if res.Count > 0 && inPlace == 0 {
			c.deliver(sf, buf[:res.Count])
		}
	}
}

var errSubflowEOF = errors.New("subflow closed by peer")

var errShortBuffer = errors.New("short buffer")

// vecWriter collects what gVisor's Read hands out into a list of buffers:
// a reservation in the reassembly (one slice per block) or the reader's
// own buffer.
type vecWriter struct {
	bufs [][]byte
	size int // total length of bufs
	i    int // current buffer
	off  int // bytes written into bufs[i]
}

// reset makes bufs (appended to v.bufs[:0]) the target.
func (v *vecWriter) reset(bufs [][]byte) {
	v.bufs, v.i, v.off, v.size = bufs, 0, 0, 0
	for _, b := range bufs {
		v.size += len(b)
	}
}

// release drops the references to the buffers, keeping the list's array.
func (v *vecWriter) release() {
	clear(v.bufs[:cap(v.bufs)])
	v.reset(v.bufs[:0])
}

func (v *vecWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 && v.i < len(v.bufs) {
		k := copy(v.bufs[v.i][v.off:], p)
		n += k
		p = p[k:]
		if v.off += k; v.off == len(v.bufs[v.i]) {
			v.i, v.off = v.i+1, 0
		}
	}
	if len(p) > 0 {
		return n, errShortBuffer
	}
	return n, nil
}

// sizeReceiveBuffer gives a subflow endpoint a receive buffer whose TCP
// window is the connection's receive buffer (gVisor advertises about half
// of its free buffer: it counts segment memory), within the stack's
// limit. The peer sends by that window (the layer does not rewrite it), so
// it is the connection-level window the peer sees. gVisor's receive-buffer
// moderation would never size it: it runs only when the reader calls
// ModerateRecvBuf, which the subflow readers do not. With the stack's 1
// MiB default the window stayed at ~512 KiB, 45 ms at 93 Mbit/s, and tail
// drops on one uplink stalled the whole connection until that subflow
// recovered (TestPeerWindowCoversReceiveBuffer). A window beyond the
// connection buffer would let the peer put far-ahead data in front of
// the bytes the receiver waits for (TestSlowReaderKeepsWindow).
func (e *Endpoint) sizeReceiveBuffer(ep tcpip.Endpoint) {
	ep.SocketOptions().SetReceiveBufferSize(int64(e.SubflowReceiveBuffer()), true)
}

// SubflowReceiveBuffer is the receive buffer each subflow gets (see
// sizeReceiveBuffer): a plain-TCP baseline on the same stack should use it
// too (mptun connect --plain).
func (e *Endpoint) SubflowReceiveBuffer() int {
	want := 2 * e.cfg.ReceiveBuffer
	var r tcpip.TCPReceiveBufferSizeRangeOption
	if err := e.st.S.TransportProtocolOption(tcp.ProtocolNumber, &r); err == nil && r.Max > 0 {
		want = min(want, r.Max)
	}
	return want
}
