// Package server is the mptun concentrator: it accepts connections from
// mptun clients (MPTCP from the userspace engine or the kernel, or plain
// TCP as fallback), authenticates each one with the pre-shared key bound to
// the connection's MPTCP keys (bond/convert), checks the destination
// against its policy, connects to it with ordinary TCP (or opens a UDP
// association) and splices both ways with half-close.
package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/mptun/mptun/bond/convert"
	"github.com/mptun/mptun/bond/splice"
	"github.com/mptun/mptun/mptcpep/mpkey"
)

// DialFunc opens a connection to dest; network is "tcp" or "udp" (a
// connected UDP socket that only receives from dest).
type DialFunc func(ctx context.Context, network string, dest netip.AddrPort) (net.Conn, error)

// Config tunes a Server. Zero values take the documented defaults.
type Config struct {
	// PSK is the pre-shared key (required).
	PSK []byte
	// Dial reaches destinations (nil: the host's sockets).
	Dial DialFunc
	// AllowPrivate lets clients reach loopback, link-local, unspecified,
	// multicast and broadcast destinations and the server's own addresses.
	AllowPrivate bool
	// AllowUnbound accepts connections whose MPTCP keys are unknown (plain
	// TCP fallback, kernel MPTCP sockets) if their tag was computed over
	// zero keys. Such a tag is the same on every connection, so an observer
	// can replay it: only enable it where that risk is accepted.
	AllowUnbound bool
	// OwnAddrs returns the server's own addresses (refused destinations
	// unless AllowPrivate); nil: none beyond the fixed ranges.
	OwnAddrs func() []netip.Addr
	// MaxConnsPerClient bounds concurrent connections per client IP
	// address (0: 256).
	MaxConnsPerClient int
	// MaxConns bounds all concurrent connections; beyond it connections
	// are closed at once (0: 16384).
	MaxConns int
	// RequestTimeout bounds the wait for the client's request (0: 10 s).
	RequestTimeout time.Duration
	// DialTimeout bounds the connection to the destination (0: 10 s).
	DialTimeout time.Duration
	// TCPIdle closes a TCP flow silent both ways this long (0: 2 h).
	TCPIdle time.Duration
	// UDPIdle closes a UDP association silent this long (0: 60 s).
	UDPIdle time.Duration
	// Logger (nil: slog.Default()).
	Logger *slog.Logger
}

// Metrics are the server's counters.
type Metrics struct {
	Accepted            atomic.Uint64
	AuthFailures        atomic.Uint64 // wrong or missing Auth TLV, or unbound keys not allowed
	BadRequests         atomic.Uint64 // malformed, unsupported, or not received in time
	RefusedDestinations atomic.Uint64 // policy (private ranges, own addresses)
	LimitRejected       atomic.Uint64 // per-client or global limit
	DialFailures        atomic.Uint64
	TCPFlows            atomic.Uint64
	UDPAssociations     atomic.Uint64
	IdleClosed          atomic.Uint64
	UDPDatagramsUp      atomic.Uint64
	UDPDatagramsDown    atomic.Uint64
	BytesUp             atomic.Uint64 // client to destination
	BytesDown           atomic.Uint64 // destination to client
	Active              atomic.Int64
}

// Server is the concentrator. It is safe for concurrent use.
type Server struct {
	cfg Config
	log *slog.Logger
	// M counts what the server does.
	M Metrics

	mu        sync.Mutex
	perClient map[netip.Addr]int
	total     int
	conns     map[net.Conn]struct{}
	closed    bool
	wg        sync.WaitGroup
}

// New validates cfg and returns a Server.
func New(cfg Config) (*Server, error) {
	if len(cfg.PSK) == 0 {
		return nil, errors.New("server: a pre-shared key is required")
	}
	if cfg.Dial == nil {
		cfg.Dial = HostDial
	}
	if cfg.MaxConnsPerClient == 0 {
		cfg.MaxConnsPerClient = 256
	}
	if cfg.MaxConns == 0 {
		cfg.MaxConns = 16384
	}
	if cfg.RequestTimeout == 0 {
		cfg.RequestTimeout = 10 * time.Second
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 10 * time.Second
	}
	if cfg.TCPIdle == 0 {
		cfg.TCPIdle = 2 * time.Hour
	}
	if cfg.UDPIdle == 0 {
		cfg.UDPIdle = 60 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Server{cfg: cfg, log: cfg.Logger, perClient: make(map[netip.Addr]int), conns: make(map[net.Conn]struct{})}, nil
}

// HostDial dials with the host's sockets.
func HostDial(ctx context.Context, network string, dest netip.AddrPort) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, network, dest.String())
	if err != nil {
		return nil, fmt.Errorf("dial %s %s: %w", network, dest, err)
	}
	return c, nil
}

// Serve accepts connections from l until ctx ends or l fails, handling
// each in its own goroutine. When ctx ends it closes l and every
// connection and waits for the handlers.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	defer s.shutdown()
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("server: accept: %w", err)
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.Handle(ctx, c)
		}()
	}
}

// shutdown closes all connections and waits for their handlers.
func (s *Server) shutdown() {
	s.mu.Lock()
	s.closed = true
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

func remoteIP(c net.Conn) netip.Addr {
	switch a := c.RemoteAddr().(type) {
	case *net.TCPAddr:
		return a.AddrPort().Addr().Unmap()
	case nil:
		return netip.Addr{}
	default:
		ap, err := netip.ParseAddrPort(a.String())
		if err != nil {
			return netip.Addr{}
		}
		return ap.Addr().Unmap()
	}
}

// admit registers c against the limits: 0 if admitted, else the code to
// refuse it with (ErrResourceExceeded), or -1 to drop it at once.
func (s *Server) admit(c net.Conn, ip netip.Addr) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.total >= s.cfg.MaxConns {
		return -1
	}
	s.conns[c] = struct{}{}
	s.total++
	if s.perClient[ip] >= s.cfg.MaxConnsPerClient {
		return int(convert.ErrResourceExceeded)
	}
	s.perClient[ip]++
	return 0
}

func (s *Server) release(c net.Conn, ip netip.Addr, counted bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, c)
	s.total--
	if counted {
		if s.perClient[ip]--; s.perClient[ip] <= 0 {
			delete(s.perClient, ip)
		}
	}
}

// keyer is implemented by mptcpep.Conn.
type keyer interface {
	Keys() (local, remote mpkey.Key)
}

// Handle serves one client connection and closes it.
func (s *Server) Handle(ctx context.Context, c net.Conn) {
	s.M.Accepted.Add(1)
	ip := remoteIP(c)
	log := s.log.With("client", c.RemoteAddr())
	switch code := s.admit(c, ip); {
	case code < 0:
		s.M.LimitRejected.Add(1)
		log.Warn("connection dropped: server at its connection limit")
		c.Close()
		return
	case code > 0:
		defer s.release(c, ip, false)
		s.M.LimitRejected.Add(1)
		log.Warn("connection refused: too many connections from this client", "limit", s.cfg.MaxConnsPerClient)
		// Read the request first so that closing does not reset the
		// connection before the client has read the reply.
		_ = c.SetReadDeadline(time.Now().Add(s.cfg.RequestTimeout))
		_, _ = convert.ReadRequest(c)
		s.refuse(c, convert.ErrorCode(code))
		return
	}
	defer s.release(c, ip, true)
	s.M.Active.Add(1)
	defer s.M.Active.Add(-1)

	_ = c.SetReadDeadline(time.Now().Add(s.cfg.RequestTimeout))
	req, err := convert.ReadRequest(c)
	if err != nil {
		s.M.BadRequests.Add(1)
		var ce *convert.ConvertError
		if errors.As(err, &ce) {
			log.Warn("bad request", "err", err)
			s.refuse(c, ce.Code)
		} else {
			log.Info("no request", "err", err)
			c.Close()
		}
		return
	}
	_ = c.SetReadDeadline(time.Time{})
	// The keys are read after the request: the server learns the client's
	// key from the third ACK or, if that was lost, from the first data.
	var ck, sk mpkey.Key
	if k, ok := c.(keyer); ok {
		sk, ck = k.Keys()
	}
	unbound := ck == 0 && sk == 0
	if (unbound && !s.cfg.AllowUnbound) || !req.Verify(s.cfg.PSK, ck, sk) {
		s.M.AuthFailures.Add(1)
		log.Warn("authentication failed", "auth_tlv", req.HasAuth, "mptcp_keys", !unbound)
		s.refuse(c, convert.ErrNotAuthorized)
		return
	}
	log = log.With("kind", req.Kind, "dest", req.Dest)
	if !s.allowed(req.Dest) {
		s.M.RefusedDestinations.Add(1)
		log.Warn("destination refused by policy")
		s.refuse(c, convert.ErrNotAuthorized)
		return
	}
	network := "tcp"
	if req.Kind == convert.KindUDP {
		network = "udp"
	}
	dctx, cancel := context.WithTimeout(ctx, s.cfg.DialTimeout)
	d, err := s.cfg.Dial(dctx, network, req.Dest)
	cancel()
	if err != nil {
		s.M.DialFailures.Add(1)
		code := ErrorCodeFor(err)
		log.Info("destination failed", "err", err, "code", code)
		s.refuse(c, code)
		return
	}
	if !s.track(d) {
		d.Close()
		c.Close()
		return
	}
	defer s.untrack(d)
	if err := convert.WriteReply(c, 0); err != nil {
		log.Info("reply", "err", err)
		d.Close()
		c.Close()
		return
	}
	log.Debug("connected")
	if req.Kind == convert.KindUDP {
		s.M.UDPAssociations.Add(1)
		s.udpAssociation(c, d, log)
		return
	}
	s.M.TCPFlows.Add(1)
	s.splice(c, d, log)
}

func (s *Server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *Server) untrack(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// refuse sends an Error TLV and closes c gracefully: half-close, then a
// short bounded drain, so the client reads the reply rather than a reset.
func (s *Server) refuse(c net.Conn, code convert.ErrorCode) {
	defer c.Close()
	_ = c.SetWriteDeadline(time.Now().Add(2 * time.Second))
	if err := convert.WriteReply(c, code); err != nil {
		return
	}
	_ = splice.CloseWrite(c)
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	_, _ = io.CopyN(io.Discard, c, 64<<10)
}

// allowed applies the destination policy.
func (s *Server) allowed(d netip.AddrPort) bool {
	a := d.Addr().Unmap()
	if d.Port() == 0 || !a.IsValid() {
		return false
	}
	if s.cfg.AllowPrivate {
		return true
	}
	if a.IsLoopback() || a.IsLinkLocalUnicast() || a.IsUnspecified() || a.IsMulticast() ||
		a.IsLinkLocalMulticast() || a.IsInterfaceLocalMulticast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
		return false
	}
	if s.cfg.OwnAddrs != nil {
		for _, o := range s.cfg.OwnAddrs() {
			if o.Unmap() == a {
				return false
			}
		}
	}
	return true
}

// ErrorCodeFor maps a dial error to the Convert error code the client gets.
func ErrorCodeFor(err error) convert.ErrorCode {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.ECONNABORTED):
		return convert.ErrConnectionReset
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH), errors.Is(err, syscall.EADDRNOTAVAIL),
		errors.Is(err, syscall.EAFNOSUPPORT), errors.Is(err, syscall.ENETDOWN), errors.Is(err, syscall.EHOSTDOWN):
		return convert.ErrDestinationUnreachable
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, syscall.ETIMEDOUT), errors.As(err, &ne) && ne.Timeout():
		return convert.ErrConnectionTimedOut
	case errors.Is(err, syscall.EMFILE), errors.Is(err, syscall.ENFILE), errors.Is(err, syscall.ENOBUFS), errors.Is(err, syscall.ENOMEM):
		return convert.ErrResourceExceeded
	}
	return convert.ErrNetworkFailure
}
