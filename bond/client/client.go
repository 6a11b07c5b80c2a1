// Package client is the client side of mptun's bonding tunnel: a gVisor
// stack ("stack A") behind a TUN device terminates every TCP flow and UDP
// flow the host routes into the tunnel, and carries each one to the
// concentrator over its own upstream connection (an MPTCP connection whose
// subflows use every uplink), announced with an RFC 8803 Convert request
// (package bond/convert).
//
// TCP: the app's handshake completes only after the concentrator has
// connected to the destination, so an unreachable destination reaches the
// app as a refused connection (RST), not as a connection that hangs.
// UDP: one framed association per (app source, destination) pair, closed
// after an idle timeout. UDP to port 443 (QUIC) is refused with ICMP port
// unreachable unless QUIC carrying is enabled, so browsers fall back to TCP.
package client

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/mptun/mptun/bond/convert"
	"github.com/mptun/mptun/bond/splice"
	"github.com/mptun/mptun/mptcpep/mpkey"
)

// Upstream is one connection to the concentrator. *mptcpep.Conn is one; the
// keys bind the authenticator to this very connection.
type Upstream interface {
	net.Conn
	CloseWrite() error
	Keys() (local, remote mpkey.Key)
}

// DialFunc opens an upstream connection to the concentrator.
type DialFunc func(ctx context.Context) (Upstream, error)

// QUICPolicy says what happens to UDP flows to port 443.
type QUICPolicy int

const (
	// QUICReject answers with ICMP port unreachable (browsers then use TCP,
	// which the bond carries better than QUIC over a single association).
	QUICReject QUICPolicy = iota
	// QUICCarry carries QUIC like any other UDP flow.
	QUICCarry
)

// ParseQUICPolicy parses "reject" or "carry".
func ParseQUICPolicy(s string) (QUICPolicy, error) {
	switch s {
	case "reject", "":
		return QUICReject, nil
	case "carry":
		return QUICCarry, nil
	}
	return 0, fmt.Errorf("quic policy %q: want carry or reject", s)
}

func (p QUICPolicy) String() string {
	if p == QUICCarry {
		return "carry"
	}
	return "reject"
}

// Defaults for zero Config fields.
const (
	DefaultUDPIdle      = 60 * time.Second
	DefaultSetupTimeout = 10 * time.Second
	DefaultMaxInFlight  = 1024
	// copyBuf is the splice buffer per direction: large enough that one
	// read drains a full gVisor receive batch at 100+ Mbit/s.
	copyBuf = 128 << 10
)

// Config configures a Client.
type Config struct {
	// Stack is stack A (see NewStack) with the tunnel NIC.
	Stack *stack.Stack
	// Dial opens an upstream connection per flow.
	Dial DialFunc
	// PSK is the pre-shared key (32 bytes from mptun genkey).
	PSK []byte
	// QUIC is the policy for UDP port 443.
	QUIC QUICPolicy
	// UDPIdle closes a UDP association without traffic (0: 60 s).
	UDPIdle time.Duration
	// SetupTimeout bounds dialing and the Convert exchange (0: 10 s).
	SetupTimeout time.Duration
	// MaxInFlight bounds TCP handshakes waiting for the concentrator (0:
	// 1024); SYNs beyond it are dropped and retransmitted by the app.
	MaxInFlight int
	// ReceiveWindow of the terminated app flows (0: gVisor's default,
	// which receive-buffer moderation then grows).
	ReceiveWindow int
	Logger        *slog.Logger
}

// Stats are cumulative counters of a Client.
type Stats struct {
	TCPFlows        uint64 `json:"tcp_flows"`        // accepted and spliced
	TCPActive       int64  `json:"tcp_active"`       // spliced right now
	TCPRefused      uint64 `json:"tcp_refused"`      // concentrator answered with an Error TLV
	TCPFailed       uint64 `json:"tcp_failed"`       // upstream dial or exchange failed
	UDPAssociations uint64 `json:"udp_associations"` // opened
	UDPActive       int64  `json:"udp_active"`       // open right now
	UDPFailed       uint64 `json:"udp_failed"`       // dial or exchange failed
	QUICRejected    uint64 `json:"quic_rejected"`    // UDP/443 flows refused by policy
	AuthRefused     uint64 `json:"auth_refused"`     // Error 32 (wrong key)
	BytesUp         uint64 `json:"bytes_up"`         // app to concentrator, TCP and UDP payload
	BytesDown       uint64 `json:"bytes_down"`       // concentrator to app
	LastError       string `json:"last_error,omitempty"`
}

type counters struct {
	tcpFlows, tcpRefused, tcpFailed       atomic.Uint64
	tcpActive, udpActive                  atomic.Int64
	udpAssoc, udpFailed, quicRej, authRef atomic.Uint64
	bytesUp, bytesDown                    atomic.Uint64
}

// Client forwards the flows arriving on stack A.
type Client struct {
	cfg Config
	log *slog.Logger
	st  *stack.Stack

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	c         counters
	lastErr   atomic.Pointer[string]
	authOnce  sync.Once
	closeOnce sync.Once
}

// New installs the TCP and UDP forwarders on cfg.Stack. Flows are served
// until Close.
func New(cfg Config) (*Client, error) {
	if cfg.Stack == nil || cfg.Dial == nil {
		return nil, errors.New("client: Stack and Dial are required")
	}
	if len(cfg.PSK) == 0 {
		return nil, errors.New("client: empty pre-shared key")
	}
	if cfg.UDPIdle == 0 {
		cfg.UDPIdle = DefaultUDPIdle
	}
	if cfg.SetupTimeout == 0 {
		cfg.SetupTimeout = DefaultSetupTimeout
	}
	if cfg.MaxInFlight == 0 {
		cfg.MaxInFlight = DefaultMaxInFlight
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &Client{cfg: cfg, log: cfg.Logger, st: cfg.Stack, ctx: ctx, cancel: cancel}
	tf := tcp.NewForwarder(cfg.Stack, cfg.ReceiveWindow, cfg.MaxInFlight, c.handleTCP)
	cfg.Stack.SetTransportProtocolHandler(tcp.ProtocolNumber, tf.HandlePacket)
	uf := udp.NewForwarder(cfg.Stack, c.handleUDP)
	cfg.Stack.SetTransportProtocolHandler(udp.ProtocolNumber, uf.HandlePacket)
	return c, nil
}

// Close stops accepting flows, aborts the running ones and waits for their
// goroutines. It does not close the stack.
func (c *Client) Close() {
	c.closeOnce.Do(func() {
		c.cancel()
		c.wg.Wait()
	})
}

// Stats returns a snapshot of the counters.
func (c *Client) Stats() Stats {
	s := Stats{
		TCPFlows: c.c.tcpFlows.Load(), TCPActive: c.c.tcpActive.Load(),
		TCPRefused: c.c.tcpRefused.Load(), TCPFailed: c.c.tcpFailed.Load(),
		UDPAssociations: c.c.udpAssoc.Load(), UDPActive: c.c.udpActive.Load(),
		UDPFailed: c.c.udpFailed.Load(), QUICRejected: c.c.quicRej.Load(),
		AuthRefused: c.c.authRef.Load(),
		BytesUp:     c.c.bytesUp.Load(), BytesDown: c.c.bytesDown.Load(),
	}
	if p := c.lastErr.Load(); p != nil {
		s.LastError = *p
	}
	return s
}

func (c *Client) noteErr(err error) {
	s := err.Error()
	c.lastErr.Store(&s)
}

// endpointAddr converts a gVisor address and port.
func endpointAddr(a tcpip.Address, port uint16) netip.AddrPort {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return netip.AddrPortFrom(ip.Unmap(), port)
}

// open dials the concentrator and runs the Convert exchange for dest. On
// an Error TLV it returns a *convert.ConvertError.
func (c *Client) open(kind convert.Kind, dest netip.AddrPort) (Upstream, error) {
	ctx, cancel := context.WithTimeout(c.ctx, c.cfg.SetupTimeout)
	defer cancel()
	up, err := c.cfg.Dial(ctx)
	if err != nil {
		return nil, fmt.Errorf("dial concentrator: %w", err)
	}
	// A deadline bounds the exchange; cancellation of ctx closes the
	// connection so a stuck read returns too.
	stop := context.AfterFunc(ctx, func() { _ = up.Close() })
	defer stop()
	_ = up.SetDeadline(time.Now().Add(c.cfg.SetupTimeout))
	local, remote := up.Keys()
	req := convert.Request{HasAuth: true, Auth: convert.AuthTag(c.cfg.PSK, local, remote), Kind: kind, Dest: dest}
	if err := convert.WriteRequest(up, req); err != nil {
		up.Close()
		return nil, err
	}
	if err := convert.ReadReply(up); err != nil {
		up.Close()
		var ce *convert.ConvertError
		if errors.As(err, &ce) && ce.Code == convert.ErrNotAuthorized {
			c.c.authRef.Add(1)
			c.authOnce.Do(func() {
				c.log.Error("concentrator refused our key: check --key-file on both sides")
			})
		}
		if ctx.Err() != nil && !errors.As(err, &ce) {
			return nil, fmt.Errorf("convert exchange: %w", ctx.Err())
		}
		return nil, err
	}
	if !stop() {
		// ctx ended and closed the connection right after a good reply.
		return nil, fmt.Errorf("convert exchange: %w", context.Cause(ctx))
	}
	_ = up.SetDeadline(time.Time{})
	return up, nil
}

// handleTCP runs in its own goroutine per SYN (gVisor's forwarder starts
// it). It must call r.Complete exactly once.
func (c *Client) handleTCP(r *tcp.ForwarderRequest) {
	id := r.ID()
	dest := endpointAddr(id.LocalAddress, id.LocalPort)
	if c.ctx.Err() != nil {
		r.Complete(true)
		return
	}
	c.wg.Add(1)
	defer c.wg.Done()
	up, err := c.open(convert.KindTCP, dest)
	if err != nil {
		var ce *convert.ConvertError
		if errors.As(err, &ce) {
			c.c.tcpRefused.Add(1)
		} else {
			c.c.tcpFailed.Add(1)
		}
		c.noteErr(err)
		c.log.Debug("tcp flow refused", "dest", dest, "err", err)
		// RST: the app sees a refused connection rather than a hang.
		r.Complete(true)
		return
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		// The app gave up (RST) while we dialed.
		r.Complete(true)
		up.Close()
		c.log.Debug("tcp flow: app handshake failed", "dest", dest, "err", terr)
		return
	}
	r.Complete(false)
	ep.SocketOptions().SetDelayOption(false)
	ep.SocketOptions().SetKeepAlive(true)
	app := gonet.NewTCPConn(&wq, ep)
	c.c.tcpFlows.Add(1)
	c.c.tcpActive.Add(1)
	defer c.c.tcpActive.Add(-1)
	c.log.Debug("tcp flow", "src", endpointAddr(id.RemoteAddress, id.RemotePort), "dest", dest)
	c.splice(app, ep, up)
}

// splice copies both ways with half-close: EOF from one side becomes a FIN
// (DATA_FIN upstream) towards the other. An error in either direction
// aborts both (RST to the app).
func (c *Client) splice(app *gonet.TCPConn, ep tcpip.Endpoint, up Upstream) {
	errc := make(chan error, 2)
	go func() {
		n, err := splice.Copy(up, app, make([]byte, copyBuf), nil)
		c.c.bytesUp.Add(uint64(n))
		errc <- err
	}()
	go func() {
		n, err := splice.Copy(app, up, make([]byte, copyBuf), nil)
		c.c.bytesDown.Add(uint64(n))
		errc <- err
	}()
	var failed bool
	for range 2 {
		select {
		case err := <-errc:
			if err != nil && !failed {
				failed = true
				c.log.Debug("tcp flow aborted", "err", err)
				ep.Abort()
				up.Close()
			}
		case <-c.ctx.Done():
			if !failed {
				failed = true
				ep.Abort()
				up.Close()
			}
			<-errc
		}
	}
	app.Close()
	up.Close()
}
