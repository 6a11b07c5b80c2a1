package client

import (
	"fmt"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
)

// NICID is the tunnel NIC of stack A.
const NICID tcpip.NICID = 1

// StackOptions tune stack A.
type StackOptions struct {
	// Name of the NIC (the TUN's name, for logs).
	Name string
	// QDisc batches writes to the link (tun.Endpoint.NewQDisc); nil writes
	// one packet per call.
	QDisc stack.QueueingDiscipline
	// SendBuffer and ReceiveBuffer bound the per-flow TCP buffers (0: 4 MiB
	// and 6 MiB).
	SendBuffer, ReceiveBuffer int
}

// NewStack builds stack A: IPv4 and IPv6, TCP, UDP and ICMP, one NIC on
// link that is promiscuous and may spoof, with a default route per family
// into it, so it terminates flows to any destination and answers from that
// destination's address.
func NewStack(link stack.LinkEndpoint, o StackOptions) (*stack.Stack, error) {
	if o.SendBuffer == 0 {
		o.SendBuffer = 4 << 20
	}
	if o.ReceiveBuffer == 0 {
		o.ReceiveBuffer = 6 << 20
	}
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
		HandleLocal:        false,
	})
	fail := func(what string, err tcpip.Error) (*stack.Stack, error) {
		s.Destroy()
		return nil, fmt.Errorf("client stack: %s: %s", what, err)
	}
	sack := tcpip.TCPSACKEnabled(true)
	mod := tcpip.TCPModerateReceiveBufferOption(true)
	for _, e := range []struct {
		opt  tcpip.SettableTransportProtocolOption
		what string
	}{
		{&sack, "SACK"},
		{&mod, "receive buffer moderation"},
		{&tcpip.TCPSendBufferSizeRangeOption{Min: 4096, Default: 1 << 20, Max: o.SendBuffer}, "send buffer"},
		{&tcpip.TCPReceiveBufferSizeRangeOption{Min: 4096, Default: 1 << 20, Max: o.ReceiveBuffer}, "receive buffer"},
	} {
		if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, e.opt); err != nil {
			return fail(e.what, err)
		}
	}
	if err := s.CreateNICWithOptions(NICID, link, stack.NICOptions{Name: o.Name, QDisc: o.QDisc}); err != nil {
		return fail("create NIC", err)
	}
	if err := s.SetPromiscuousMode(NICID, true); err != nil {
		return fail("promiscuous mode", err)
	}
	if err := s.SetSpoofing(NICID, true); err != nil {
		return fail("spoofing", err)
	}
	s.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: NICID},
		{Destination: header.IPv6EmptySubnet, NIC: NICID},
	})
	return s, nil
}
