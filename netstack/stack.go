// Package netstack assembles the gVisor stack the MPTCP engine runs on and
// holds the option layer that turns gVisor TCP endpoints into MPTCP subflows.
package netstack

import (
	"fmt"
	"net/netip"
	"sync"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/link/qdisc/fifo"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"

	"github.com/mptun/mptun/netstack/cc"
)

// Options tune the gVisor stack.
type Options struct {
	// SendBuffer and ReceiveBuffer are the per-subflow maximum buffer sizes
	// (0: 4 MiB send, 6 MiB receive).
	SendBuffer, ReceiveBuffer int
	// CongestionControl is the default controller of the stack's TCP
	// endpoints: "cubic" (default), "reno" (gVisor's own) or one of ours
	// (package cc: "bbr"). A Flow may choose its own (CongestionControlled).
	CongestionControl string
	// QueueLen is the fifo qdisc length per NIC (0: 1000 packets).
	QueueLen int
}

// Stack is a gVisor stack whose NICs all sit behind MPTCP option layers.
type Stack struct {
	S   *stack.Stack
	Mux *Mux

	mu   sync.Mutex
	nics map[tcpip.NICID]*NIC
	next tcpip.NICID
	opts Options
}

// NIC is one uplink of the stack.
type NIC struct {
	ID    tcpip.NICID
	Name  string
	Layer *Layer
	Addrs []netip.Prefix
}

// New builds a stack with IPv4, IPv6 and TCP (SACK on, moderate receive
// buffers) and no NICs.
func New(o Options) (*Stack, error) {
	if o.SendBuffer == 0 {
		o.SendBuffer = 4 << 20
	}
	if o.ReceiveBuffer == 0 {
		o.ReceiveBuffer = 6 << 20
	}
	if o.CongestionControl == "" {
		o.CongestionControl = "cubic"
	}
	if o.QueueLen == 0 {
		o.QueueLen = 1000
	}
	if err := cc.Valid(o.CongestionControl); err != nil {
		return nil, fmt.Errorf("netstack: %w", err)
	}
	ns := &Stack{Mux: NewMux(), nics: make(map[tcpip.NICID]*NIC), next: 1, opts: o}
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocolCongestionControl(ns.ccFactory)},
		HandleLocal:        false,
	})
	ns.S = s
	set := func(opt tcpip.SettableTransportProtocolOption, what string) error {
		if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, opt); err != nil {
			return fmt.Errorf("netstack: set %s: %s", what, err)
		}
		return nil
	}
	sack := tcpip.TCPSACKEnabled(true)
	mod := tcpip.TCPModerateReceiveBufferOption(true)
	// gVisor's own controller where ours are not chosen (cc.New is nil).
	gcc := tcpip.CongestionControlOption(cc.NameCubic)
	if o.CongestionControl == cc.NameReno {
		gcc = cc.NameReno
	}
	// RACK off: after an outage that loses a whole window, gVisor's RACK
	// recovery at this version sits in SACK recovery with cwnd 5 and a
	// backed-off RTO (~3 s), retransmitting one segment per RTO, so a
	// returning uplink stays useless for 5-12 s or for good (mptcpep
	// TestSubflowLossReinjection). Classic SACK/RTO recovery resumes it
	// within ~100 ms.
	rec := tcpip.TCPRecovery(0)
	for _, e := range []struct {
		opt  tcpip.SettableTransportProtocolOption
		what string
	}{
		{&sack, "SACK"},
		{&mod, "receive buffer moderation"},
		{&gcc, "congestion control"},
		{&rec, "loss recovery"},
		{&tcpip.TCPSendBufferSizeRangeOption{Min: 4096, Default: 1 << 20, Max: o.SendBuffer}, "send buffer"},
		{&tcpip.TCPReceiveBufferSizeRangeOption{Min: 4096, Default: 1 << 20, Max: o.ReceiveBuffer}, "receive buffer"},
	} {
		if err := set(e.opt, e.what); err != nil {
			s.Destroy()
			return nil, err
		}
	}
	return ns, nil
}

// AddNIC attaches link behind an option layer, with the given addresses and
// an on-link default route per address family, and returns it.
func (s *Stack) AddNIC(name string, link stack.LinkEndpoint, addrs ...netip.Prefix) (*NIC, error) {
	s.mu.Lock()
	id := s.next
	s.next++
	s.mu.Unlock()
	layer := NewLayer(link, s.Mux)
	layer.raw = func(proto tcpip.NetworkProtocolNumber, b buffer.Buffer) tcpip.Error {
		return s.S.WriteRawPacket(id, proto, b)
	}
	if err := s.S.CreateNICWithOptions(id, layer, stack.NICOptions{
		Name:  name,
		QDisc: fifo.New(layer, 1, s.opts.QueueLen),
	}); err != nil {
		return nil, fmt.Errorf("netstack: create NIC %s: %s", name, err)
	}
	for _, a := range addrs {
		proto := ipv4.ProtocolNumber
		if a.Addr().Is6() {
			proto = ipv6.ProtocolNumber
		}
		pa := tcpip.ProtocolAddress{
			Protocol: proto,
			AddressWithPrefix: tcpip.AddressWithPrefix{
				Address:   tcpip.AddrFromSlice(a.Addr().AsSlice()),
				PrefixLen: a.Bits(),
			},
		}
		if err := s.S.AddProtocolAddress(id, pa, stack.AddressProperties{}); err != nil {
			s.S.RemoveNIC(id)
			return nil, fmt.Errorf("netstack: NIC %s: add address %v: %s", name, a, err)
		}
		var dst tcpip.Subnet
		if a.Addr().Is6() {
			dst, _ = tcpip.NewSubnet(tcpip.AddrFrom16([16]byte{}), tcpip.MaskFromBytes(make([]byte, 16)))
		} else {
			dst, _ = tcpip.NewSubnet(tcpip.AddrFrom4([4]byte{}), tcpip.MaskFromBytes(make([]byte, 4)))
		}
		s.S.AddRoute(tcpip.Route{Destination: dst, NIC: id})
	}
	n := &NIC{ID: id, Name: name, Layer: layer, Addrs: addrs}
	s.mu.Lock()
	s.nics[id] = n
	s.mu.Unlock()
	return n, nil
}

// RemoveNIC detaches a NIC (an uplink that vanished).
func (s *Stack) RemoveNIC(id tcpip.NICID) {
	s.mu.Lock()
	delete(s.nics, id)
	s.mu.Unlock()
	s.S.RemoveNIC(id)
}

// NICs returns the current NICs.
func (s *Stack) NICs() []*NIC {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*NIC, 0, len(s.nics))
	for id := tcpip.NICID(1); id < s.next; id++ {
		if n, ok := s.nics[id]; ok {
			out = append(out, n)
		}
	}
	return out
}

// NICFor returns the NIC that holds local address a.
func (s *Stack) NICFor(a netip.Addr) *NIC {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, n := range s.nics {
		for _, p := range n.Addrs {
			if p.Addr() == a {
				return n
			}
		}
	}
	return nil
}

// Close destroys the stack and its NICs.
func (s *Stack) Close() {
	s.S.Close()
	s.S.Wait()
	s.S.Destroy()
}
