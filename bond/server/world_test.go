package server

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"

	"github.com/mptun/mptun/bond/convert"
	"github.com/mptun/mptun/mptcpep"
	"github.com/mptun/mptun/netstack"
	"github.com/mptun/mptun/netstack/linkpipe"
)

// The test world:
//
//	client netstack ==(2 links)== server netstack (MPTCP listener :443)
//	server's egress gVisor stack 10.200.0.1 --link-- destination stack 10.200.0.2
//
// The concentrator accepts on the MPTCP stack and dials through the egress
// stack, as a real one accepts on its TUNs and dials with host sockets.
var (
	serverAddr  = netip.MustParseAddr("10.0.0.2")
	egressAddr  = netip.MustParseAddr("10.200.0.1")
	destAddr    = netip.MustParseAddr("10.200.0.2")
	egressAddr6 = netip.MustParseAddr("fd00:200::1")
	destAddr6   = netip.MustParseAddr("fd00:200::2")
)

const (
	listenPort = 443
	echoPort   = 7  // TCP: reads to EOF, answers with sha256 + downSize bytes
	udpPort    = 53 // UDP: echoes with a prefix
	downSize   = 512 << 10
)

type world struct {
	client  *mptcpep.Endpoint
	cstack  *netstack.Stack
	server  *Server
	srvEP   *mptcpep.Endpoint
	psk     []byte
	dstConn atomic.Int64 // TCP connections the destination accepted
}

func testLogger() *slog.Logger {
	lvl := slog.LevelError
	if os.Getenv("MPTUN_DEBUG") != "" {
		lvl = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
}

func addAddr(t *testing.T, s *stack.Stack, nic tcpip.NICID, p netip.Prefix) {
	t.Helper()
	proto := ipv4.ProtocolNumber
	if p.Addr().Is6() {
		proto = ipv6.ProtocolNumber
	}
	require.Nil(t, s.AddProtocolAddress(nic, tcpip.ProtocolAddress{Protocol: proto, AddressWithPrefix: tcpip.AddressWithPrefix{
		Address: tcpip.AddrFromSlice(p.Addr().AsSlice()), PrefixLen: p.Bits(),
	}}, stack.AddressProperties{}))
	sub, err := tcpip.NewSubnet(tcpip.AddrFromSlice(p.Masked().Addr().AsSlice()), tcpip.MaskFromBytes(net.CIDRMask(p.Bits(), p.Addr().BitLen())))
	require.NoError(t, err)
	s.AddRoute(tcpip.Route{Destination: sub, NIC: nic})
}

// plainStack is a gVisor stack with TCP and UDP on one link.
func plainStack(t *testing.T, link stack.LinkEndpoint, addrs ...netip.Prefix) *stack.Stack {
	t.Helper()
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
	})
	require.Nil(t, s.CreateNIC(1, link))
	for _, a := range addrs {
		addAddr(t, s, 1, a)
	}
	t.Cleanup(func() {
		s.Close()
		s.Wait()
	})
	return s
}

func newWorld(t *testing.T, cfg Config) *world {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w := &world{psk: []byte("0123456789abcdef0123456789abcdef")}

	cs, err := netstack.New(netstack.Options{})
	require.NoError(t, err)
	ss, err := netstack.New(netstack.Options{})
	require.NoError(t, err)
	var clocals []mptcpep.Local
	var links []*linkpipe.Endpoint
	for i := range 2 {
		a, b := linkpipe.New(linkpipe.Config{MTU: 1500, Seed: int64(i + 1)})
		links = append(links, a, b)
		ca := netip.AddrFrom4([4]byte{10, byte(i + 1), 0, 1})
		_, err := cs.AddNIC(fmt.Sprintf("c%d", i), a, netip.PrefixFrom(ca, 32))
		require.NoError(t, err)
		_, err = ss.AddNIC(fmt.Sprintf("s%d", i), b, netip.PrefixFrom(serverAddr, 32))
		require.NoError(t, err)
		clocals = append(clocals, mptcpep.Local{Addr: ca, ID: uint8(i + 1)})
	}
	w.cstack = cs
	w.client = mptcpep.New(cs, mptcpep.Config{Logger: testLogger()})
	w.client.SetLocals(clocals)
	w.srvEP = mptcpep.New(ss, mptcpep.Config{Logger: testLogger()})
	w.srvEP.SetLocals([]mptcpep.Local{{Addr: serverAddr}})
	l, err := w.srvEP.Listen(listenPort)
	require.NoError(t, err)

	ea, db := linkpipe.New(linkpipe.Config{MTU: 1500, Seed: 9})
	links = append(links, ea, db)
	egress := plainStack(t, ea, netip.PrefixFrom(egressAddr, 24), netip.PrefixFrom(egressAddr6, 64))
	dst := plainStack(t, db, netip.PrefixFrom(destAddr, 24), netip.PrefixFrom(destAddr6, 64))
	w.startDestination(t, ctx, dst)

	cfg.PSK = w.psk
	cfg.Dial = NetstackDial(egress)
	if cfg.OwnAddrs == nil {
		cfg.OwnAddrs = func() []netip.Addr { return []netip.Addr{serverAddr, egressAddr, egressAddr6} }
	}
	cfg.Logger = testLogger()
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 500 * time.Millisecond
	}
	w.server, err = New(cfg)
	require.NoError(t, err)
	served := make(chan error, 1)
	go func() { served <- w.server.Serve(ctx, l) }()

	t.Cleanup(func() {
		cancel()
		select {
		case err := <-served:
			require.ErrorIs(t, err, context.Canceled)
		case <-time.After(10 * time.Second):
			t.Error("Serve did not return after cancel")
		}
		w.client.Close()
		w.srvEP.Close()
		cs.Close()
		ss.Close()
		for _, l := range links {
			l.Close()
		}
	})
	return w
}

// startDestination runs the TCP and UDP servers on the destination stack.
func (w *world) startDestination(t *testing.T, ctx context.Context, dst *stack.Stack) {
	t.Helper()
	for _, a := range []netip.Addr{destAddr, destAddr6} {
		proto := ipv4.ProtocolNumber
		if a.Is6() {
			proto = ipv6.ProtocolNumber
		}
		full := tcpip.FullAddress{Addr: tcpip.AddrFromSlice(a.AsSlice()), Port: echoPort}
		ln, err := gonet.ListenTCP(dst, full, proto)
		require.NoError(t, err)
		context.AfterFunc(ctx, func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				w.dstConn.Add(1)
				go func() {
					defer c.Close()
					h := sha256.New()
					if _, err := io.Copy(h, c); err != nil {
						return
					}
					// The client's half-close arrived: answer afterwards.
					if _, err := c.Write(h.Sum(nil)); err != nil {
						return
					}
					_, _ = c.Write(pattern(downSize))
				}()
			}
		}()
		full.Port = udpPort
		uc, err := gonet.DialUDP(dst, &full, nil, proto)
		require.NoError(t, err)
		context.AfterFunc(ctx, func() { uc.Close() })
		go func() {
			buf := make([]byte, 65535)
			for {
				n, from, err := uc.ReadFrom(buf)
				if err != nil {
					return
				}
				_, _ = uc.WriteTo(append([]byte("echo:"), buf[:n]...), from)
			}
		}()
	}
}

func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i>>8)
	}
	return b
}

// open dials the concentrator and sends a request authenticated with psk
// (nil: no Auth TLV); it returns the connection and the reply.
func (w *world) open(t *testing.T, psk []byte, kind convert.Kind, dest netip.AddrPort) (*mptcpep.Conn, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := w.client.Dial(ctx, netip.AddrPortFrom(serverAddr, listenPort))
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	req := convert.Request{Kind: kind, Dest: dest}
	if psk != nil {
		lk, rk := c.Keys()
		require.NotZero(t, lk)
		req.HasAuth = true
		req.Auth = convert.AuthTag(psk, lk, rk)
	}
	require.NoError(t, convert.WriteRequest(c, req))
	require.NoError(t, c.SetReadDeadline(time.Now().Add(10*time.Second)))
	err = convert.ReadReply(c)
	require.NoError(t, c.SetReadDeadline(time.Time{}))
	return c, err
}

func requireCode(t *testing.T, err error, code convert.ErrorCode) {
	t.Helper()
	var ce *convert.ConvertError
	require.True(t, errors.As(err, &ce), "want Convert error %v, got %v", code, err)
	require.Equal(t, code, ce.Code)
}

// eventually polls cond for up to 5 s.
func eventually(t *testing.T, cond func() bool, msg string) {
	t.Helper()
	require.Eventually(t, cond, 5*time.Second, 10*time.Millisecond, msg)
}
