package server

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// NetstackDial reaches destinations through a gVisor stack (with TCP and,
// for UDP associations, UDP) instead of the host's sockets. Its errors
// wrap the errno equivalents of gVisor's, so ErrorCodeFor maps them as it
// maps the host's.
func NetstackDial(s *stack.Stack) DialFunc {
	return func(ctx context.Context, network string, dest netip.AddrPort) (net.Conn, error) {
		proto := ipv4.ProtocolNumber
		if dest.Addr().Unmap().Is6() {
			proto = ipv6.ProtocolNumber
		}
		full := tcpip.FullAddress{Addr: tcpip.AddrFromSlice(dest.Addr().Unmap().AsSlice()), Port: dest.Port()}
		switch network {
		case "tcp":
			return dialTCP(ctx, s, full, proto, dest)
		case "udp":
			c, err := gonet.DialUDP(s, nil, &full, proto)
			if err != nil {
				return nil, fmt.Errorf("dial udp %s: %w", dest, err)
			}
			return c, nil
		}
		return nil, fmt.Errorf("dial %s %s: unsupported network", network, dest)
	}
}

func dialTCP(ctx context.Context, s *stack.Stack, full tcpip.FullAddress, proto tcpip.NetworkProtocolNumber, dest netip.AddrPort) (net.Conn, error) {
	var wq waiter.Queue
	ep, terr := s.NewEndpoint(tcp.ProtocolNumber, proto, &wq)
	if terr != nil {
		return nil, fmt.Errorf("dial tcp %s: %w", dest, errnoFor(terr))
	}
	entry, ch := waiter.NewChannelEntry(waiter.WritableEvents)
	wq.EventRegister(&entry)
	defer wq.EventUnregister(&entry)
	terr = ep.Connect(full)
	if _, ok := terr.(*tcpip.ErrConnectStarted); ok {
		select {
		case <-ctx.Done():
			ep.Close()
			return nil, fmt.Errorf("dial tcp %s: %w", dest, ctx.Err())
		case <-ch:
		}
		terr = ep.LastError()
	}
	if terr != nil {
		ep.Close()
		return nil, fmt.Errorf("dial tcp %s: %w", dest, errnoFor(terr))
	}
	return gonet.NewTCPConn(&wq, ep), nil
}

// errnoFor translates gVisor's connection errors to errnos.
func errnoFor(e tcpip.Error) error {
	switch e.(type) {
	case *tcpip.ErrConnectionRefused:
		return syscall.ECONNREFUSED
	case *tcpip.ErrConnectionReset:
		return syscall.ECONNRESET
	case *tcpip.ErrConnectionAborted:
		return syscall.ECONNABORTED
	case *tcpip.ErrHostUnreachable, *tcpip.ErrHostDown:
		return syscall.EHOSTUNREACH
	case *tcpip.ErrNetworkUnreachable:
		return syscall.ENETUNREACH
	case *tcpip.ErrTimeout:
		return syscall.ETIMEDOUT
	case *tcpip.ErrNoBufferSpace:
		return syscall.ENOBUFS
	}
	return errors.New(e.String())
}
