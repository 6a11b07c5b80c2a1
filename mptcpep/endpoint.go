// Package mptcpep is a userspace Multipath TCP (RFC 8684, v1) endpoint on
// gVisor's netstack: keys and tokens, the meta-socket (connection-level
// sequence space, reassembly, DATA_ACK, DATA_FIN, reinjection), the
// scheduler, the path manager and a net.Conn/net.Listener API. Subflows are
// ordinary gVisor TCP endpoints; the netstack option layer shows their
// segments to this package.
package mptcpep

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/mptun/mptun/mptcpep/mpkey"
	"github.com/mptun/mptun/netstack"
)

// Config tunes an Endpoint.
type Config struct {
	// Checksum requests DSS checksums. A peer that requires them gets them
	// regardless.
	Checksum bool
	// SendBuffer and ReceiveBuffer are the connection-level buffer sizes
	// (0: 4 MiB each).
	SendBuffer, ReceiveBuffer int
	// MaxSubflows bounds the subflows of one connection (0: 8).
	MaxSubflows int
	// DenyJoinInitialAddr makes a listener refuse joins to the address and
	// port its connections began on, and tell clients so with the
	// MP_CAPABLE C flag (RFC 8684 3.1), like Linux's
	// net.mptcp.allow_join_initial_addr_port=0: for a server behind a
	// load balancer that would not steer joins to it.
	DenyJoinInitialAddr bool
	// Scheduler picks the subflow for each chunk (nil: lowest RTT first).
	Scheduler Scheduler
	// CongestionControl names the subflows' congestion controller (package
	// netstack/cc: "bbr", "cubic", "reno"; "": the stack's default).
	CongestionControl string
	// Logger receives protocol events (nil: slog.Default()).
	Logger *slog.Logger
	// Rand supplies keys and nonces (nil: crypto/rand).
	Rand io.Reader
	// MaxPendingSYNs bounds connection attempts tracked before gVisor
	// completes their handshake (0: 1024).
	MaxPendingSYNs int
}

// Local is one local uplink address the endpoint may use for subflows.
type Local struct {
	Addr   netip.Addr
	ID     uint8 // address ID (0 is reserved for the initial subflow's)
	Backup bool
	// Public is the address peers see for Addr when NAT sits between (the
	// uplink's own address in front of a TUN); ADD_ADDR announces it.
	Public netip.Addr
}

// Endpoint is an MPTCP instance on a netstack.Stack.
type Endpoint struct {
	st  *netstack.Stack
	cfg Config
	log *slog.Logger

	// MIB counts protocol events and errors.
	MIB MIB

	// Buffer blocks are recycled across the endpoint's connections.
	sendBlocks, recvBlocks sync.Pool

	mu       sync.Mutex
	tokens   map[uint32]*Conn
	locals   []Local
	announce []Local
	conns    map[*Conn]struct{}

	// mpFailTimeout bounds the wait for an answer to our MP_FAIL;
	// ignoreMPFail makes the endpoint ignore the peer's MP_FAIL (tests).
	mpFailTimeout time.Duration
	ignoreMPFail  bool
}

// New returns an Endpoint on st.
func New(st *netstack.Stack, cfg Config) *Endpoint {
	if cfg.SendBuffer == 0 {
		cfg.SendBuffer = 4 << 20
	}
	if cfg.ReceiveBuffer == 0 {
		cfg.ReceiveBuffer = 4 << 20
	}
	if cfg.MaxSubflows == 0 {
		cfg.MaxSubflows = 8
	}
	if cfg.Scheduler == nil {
		cfg.Scheduler = LowestRTT{}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Reader
	}
	if cfg.MaxPendingSYNs == 0 {
		cfg.MaxPendingSYNs = 1024
	}
	e := &Endpoint{st: st, cfg: cfg, log: cfg.Logger, tokens: make(map[uint32]*Conn), conns: make(map[*Conn]struct{}),
		mpFailTimeout: defaultMPFailTimeout}
	st.Mux.SetPanicHandler(e.flowPanicked)
	return e
}

// flowPanicked ends the connection of a subflow whose option handling
// panicked (the layer has cut the subflow off): a bug hit by one peer's
// segments costs that connection, not the process and its other users.
func (e *Endpoint) flowPanicked(t netstack.Tuple, f netstack.Flow, v any, stack []byte) {
	e.MIB.FlowPanics.Add(1)
	e.log.Error("mptcp: option handling panicked; connection aborted (please report)",
		"subflow", t.String(), "panic", fmt.Sprint(v), "stack", string(stack))
	if sf, ok := f.(*subflow); ok {
		defer func() {
			if v := recover(); v != nil {
				e.log.Error("mptcp: abort after a panic panicked too", "subflow", t.String(), "panic", fmt.Sprint(v))
			}
		}()
		sf.c.Abort()
	}
}

// Stack returns the netstack the endpoint runs on.
func (e *Endpoint) Stack() *netstack.Stack { return e.st }

// SetLocals sets the uplink addresses subflows may start from (the path
// manager builds a full mesh from them to the peer's addresses).
func (e *Endpoint) SetLocals(locals []Local) {
	e.mu.Lock()
	e.locals = append([]Local(nil), locals...)
	conns := e.connList()
	e.mu.Unlock()
	for _, c := range conns {
		c.pmKick()
	}
}

// SetAnnounce sets the local addresses a listening endpoint announces to
// its peers with ADD_ADDR.
func (e *Endpoint) SetAnnounce(addrs []Local) {
	e.mu.Lock()
	e.announce = append([]Local(nil), addrs...)
	e.mu.Unlock()
}

func (e *Endpoint) localList() []Local {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]Local(nil), e.locals...)
}

func (e *Endpoint) connList() []*Conn {
	out := make([]*Conn, 0, len(e.conns))
	for c := range e.conns {
		out = append(out, c)
	}
	return out
}

// Conns returns the live connections.
func (e *Endpoint) Conns() []*Conn {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.connList()
}

// newKey draws a key whose token is unique on this endpoint and reserves
// the token for c.
func (e *Endpoint) newKey(c *Conn) (mpkey.Key, error) {
	for i := 0; i < 16; i++ {
		k, err := mpkey.NewKey(e.cfg.Rand)
		if err != nil {
			return 0, fmt.Errorf("mptcp: new key: %w", err)
		}
		tok := k.Token()
		e.mu.Lock()
		if _, dup := e.tokens[tok]; !dup {
			e.tokens[tok] = c
			e.conns[c] = struct{}{}
			e.mu.Unlock()
			return k, nil
		}
		e.mu.Unlock()
		e.MIB.TokenCollisions.Add(1)
	}
	return 0, errors.New("mptcp: no unique token after 16 keys")
}

func (e *Endpoint) lookupToken(tok uint32) *Conn {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.tokens[tok]
}

func (e *Endpoint) forget(c *Conn) {
	e.mu.Lock()
	if e.tokens[c.localToken] == c {
		delete(e.tokens, c.localToken)
	}
	delete(e.conns, c)
	e.mu.Unlock()
}

func (e *Endpoint) nonce() uint32 {
	var b [4]byte
	if _, err := io.ReadFull(e.cfg.Rand, b[:]); err != nil {
		return uint32(time.Now().UnixNano())
	}
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

// Close aborts every connection.
func (e *Endpoint) Close() {
	e.mu.Lock()
	conns := e.connList()
	e.mu.Unlock()
	for _, c := range conns {
		c.Abort()
	}
}

func ctxOrBackground(ctx context.Context) context.Context {
	if ctx == nil {
		return context.Background()
	}
	return ctx
}
