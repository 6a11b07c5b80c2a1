package client

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"

	"github.com/mptun/mptun/bond/convert"
	"github.com/mptun/mptun/mptcpep/mpkey"
	"github.com/mptun/mptun/netstack/linkpipe"
)

// The in-process harness: an "app" gVisor stack (standing in for the host
// kernel behind mptun0) joined by a linkpipe to stack A, a Client on stack
// A, and a fake concentrator on loopback that speaks the Convert protocol
// and maps the tunnel destinations to loopback servers.

var (
	appV4 = netip.MustParseAddr("198.19.255.1")
	appV6 = netip.MustParseAddr("fd6d:7074::1")
)

// keyedConn is a loopback TCP connection standing in for an MPTCP
// connection: its "keys" are derived from the ports, so both ends agree and
// the tag is bound to this connection as with real MPTCP keys.
type keyedConn struct {
	*net.TCPConn
	client bool
}

func (k keyedConn) Keys() (local, remote mpkey.Key) {
	l := k.LocalAddr().(*net.TCPAddr).Port
	r := k.RemoteAddr().(*net.TCPAddr).Port
	return mpkey.Key(uint64(l) * 0x9E3779B97F4A7C15), mpkey.Key(uint64(r) * 0x9E3779B97F4A7C15)
}

// fakeConcentrator accepts Convert requests on loopback.
type fakeConcentrator struct {
	t       *testing.T
	psk     []byte
	ln      net.Listener
	targets map[netip.AddrPort]string // tunnel destination -> loopback address
	// udpTargets are UDP destinations.
	udpTargets map[netip.AddrPort]string
	refused    atomic.Uint64
	requests   atomic.Uint64
	wg         sync.WaitGroup
}

func newFakeConcentrator(t *testing.T, psk []byte) *fakeConcentrator {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	f := &fakeConcentrator{t: t, psk: psk, ln: ln, targets: map[netip.AddrPort]string{}, udpTargets: map[netip.AddrPort]string{}}
	f.wg.Add(1)
	go f.serve()
	t.Cleanup(func() {
		ln.Close()
		f.wg.Wait()
	})
	return f
}

func (f *fakeConcentrator) serve() {
	defer f.wg.Done()
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return
		}
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			f.handle(keyedConn{TCPConn: c.(*net.TCPConn)})
		}()
	}
}

func (f *fakeConcentrator) handle(c keyedConn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	req, err := convert.ReadRequest(c)
	if err != nil {
		return
	}
	f.requests.Add(1)
	local, remote := c.Keys()
	// Server side: clientKey is the peer's, serverKey ours.
	if !req.Verify(f.psk, remote, local) {
		f.refused.Add(1)
		_ = convert.WriteReply(c, convert.ErrNotAuthorized)
		return
	}
	_ = c.SetDeadline(time.Time{})
	switch req.Kind {
	case convert.KindTCP:
		addr, ok := f.targets[req.Dest]
		if !ok {
			_ = convert.WriteReply(c, convert.ErrDestinationUnreachable)
			return
		}
		d, err := net.Dial("tcp", addr)
		if err != nil {
			_ = convert.WriteReply(c, convert.ErrConnectionReset)
			return
		}
		defer d.Close()
		if convert.WriteReply(c, 0) != nil {
			return
		}
		done := make(chan struct{})
		go func() {
			_, _ = io.Copy(d, c)
			_ = d.(*net.TCPConn).CloseWrite()
			close(done)
		}()
		_, _ = io.Copy(c, d)
		_ = c.CloseWrite()
		<-done
	case convert.KindUDP:
		addr, ok := f.udpTargets[req.Dest]
		if !ok {
			_ = convert.WriteReply(c, convert.ErrDestinationUnreachable)
			return
		}
		d, err := net.Dial("udp", addr)
		if err != nil {
			_ = convert.WriteReply(c, convert.ErrNetworkFailure)
			return
		}
		defer d.Close()
		if convert.WriteReply(c, 0) != nil {
			return
		}
		go func() {
			buf := make([]byte, convert.MaxDatagram)
			for {
				n, err := d.Read(buf)
				if err != nil || convert.WriteDatagram(c, buf[:n]) != nil {
					c.Close()
					return
				}
			}
		}()
		buf := make([]byte, convert.MaxDatagram)
		for {
			n, err := convert.ReadDatagram(c, buf)
			if err != nil {
				d.Close()
				return
			}
			_, _ = d.Write(buf[:n])
		}
	}
}

func (f *fakeConcentrator) dial(psk []byte) DialFunc {
	return func(ctx context.Context) (Upstream, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", f.ln.Addr().String())
		if err != nil {
			return nil, err
		}
		return keyedConn{TCPConn: c.(*net.TCPConn), client: true}, nil
	}
}

// harness joins an app stack to a Client.
type harness struct {
	app    *stack.Stack
	client *Client
	conc   *fakeConcentrator
}

type harnessOpts struct {
	clientPSK []byte // default: the concentrator's
	quic      QUICPolicy
	udpIdle   time.Duration
	link      linkpipe.Config
}

var testPSK = []byte("0123456789abcdef0123456789abcdef")

func newHarness(t *testing.T, o harnessOpts) *harness {
	t.Helper()
	conc := newFakeConcentrator(t, testPSK)
	a, b := linkpipe.New(o.link)
	app := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
	})
	require.Nil(t, app.CreateNIC(1, a))
	for _, ad := range []netip.Addr{appV4, appV6} {
		proto := ipv4.ProtocolNumber
		if ad.Is6() {
			proto = ipv6.ProtocolNumber
		}
		require.Nil(t, app.AddProtocolAddress(1, tcpip.ProtocolAddress{Protocol: proto,
			AddressWithPrefix: tcpip.AddrFromSlice(ad.AsSlice()).WithPrefix()}, stack.AddressProperties{}))
	}
	app.SetRouteTable([]tcpip.Route{{Destination: header.IPv4EmptySubnet, NIC: 1}, {Destination: header.IPv6EmptySubnet, NIC: 1}})
	sa, err := NewStack(b, StackOptions{Name: "test0"})
	require.NoError(t, err)
	psk := o.clientPSK
	if psk == nil {
		psk = testPSK
	}
	cl, err := New(Config{Stack: sa, Dial: conc.dial(psk), PSK: psk, QUIC: o.quic, UDPIdle: o.udpIdle,
		SetupTimeout: 3 * time.Second, Logger: slog.New(slog.DiscardHandler)})
	require.NoError(t, err)
	t.Cleanup(func() {
		cl.Close()
		app.Close()
		sa.Close()
		app.Wait()
		sa.Wait()
	})
	return &harness{app: app, client: cl, conc: conc}
}

func fullAddr(ap netip.AddrPort) (tcpip.FullAddress, tcpip.NetworkProtocolNumber) {
	proto := ipv4.ProtocolNumber
	if ap.Addr().Is6() {
		proto = ipv6.ProtocolNumber
	}
	return tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFromSlice(ap.Addr().AsSlice()), Port: ap.Port()}, proto
}

// dialApp opens a TCP connection from the app stack through the tunnel.
func (h *harness) dialApp(ctx context.Context, dest netip.AddrPort) (*gonet.TCPConn, error) {
	fa, proto := fullAddr(dest)
	return gonet.DialContextTCP(ctx, h.app, fa, proto)
}

// udpApp opens a connected UDP socket from the app stack.
func (h *harness) udpApp(t *testing.T, dest netip.AddrPort) *gonet.UDPConn {
	fa, proto := fullAddr(dest)
	c, err := gonet.DialUDP(h.app, nil, &fa, proto)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

// startEcho runs a loopback TCP server that echoes and then half-closes;
// it also records what it read.
func startEcho(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				_, _ = io.Copy(c, c)
				_ = c.(*net.TCPConn).CloseWrite()
			}()
		}
	}()
	return ln.Addr().String()
}

// startUDPEcho answers every datagram with "re:" + datagram (a DNS-ish
// request/response server).
func startUDPEcho(t *testing.T) string {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	require.NoError(t, err)
	done := make(chan struct{})
	t.Cleanup(func() {
		pc.Close()
		<-done
	})
	go func() {
		defer close(done)
		buf := make([]byte, 65535)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(append([]byte("re:"), buf[:n]...), from)
		}
	}()
	return pc.LocalAddr().String()
}

// pattern fills b with a position-dependent pattern so reordering or
// duplication would show.
func pattern(b []byte, seed uint32) {
	for i := 0; i+4 <= len(b); i += 4 {
		binary.BigEndian.PutUint32(b[i:], seed+uint32(i))
	}
}

func isRefused(err error) bool {
	var oe *net.OpError
	if errors.As(err, &oe) {
		return oe.Err != nil && (oe.Err.Error() == (&tcpip.ErrConnectionRefused{}).String())
	}
	return false
}
