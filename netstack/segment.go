package netstack

import (
	"encoding/binary"
	"errors"
	"net/netip"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	mpheader "github.com/mptun/mptun/mptcpep/header"
)

// Tuple identifies a TCP flow from our side of it.
type Tuple struct {
	Local, Remote netip.AddrPort
}

// Reverse swaps the two ends (an inbound packet's source is our Remote).
func (t Tuple) Reverse() Tuple { return Tuple{Local: t.Remote, Remote: t.Local} }

func (t Tuple) String() string { return t.Local.String() + "->" + t.Remote.String() }

// Segment is a parsed view of one TCP segment crossing the option layer. Its
// slices point into the packet and are valid only during the callback.
type Segment struct {
	Tuple      Tuple
	Flags      header.TCPFlags
	Seq, Ack   uint32
	Window     uint16
	Options    []byte // raw TCP options block
	PayloadLen int

	// Via is the NIC layer the segment crossed; replies go out through it.
	Via *Layer

	ipv6     bool
	payload  *buffer.Buffer   // outbound payload of a split segment
	outData  stack.PacketData // outbound packet data (unsplit segment)
	hasOut   bool
	inData   stack.PacketData // inbound packet data
	inOff    int              // offset of the payload in inData
	hasIn    bool
	sumValid bool
	sum      uint16
}

// IPv6 reports whether the segment travels over IPv6.
func (s *Segment) IPv6() bool { return s.ipv6 }

// SYN reports whether the segment carries SYN.
func (s *Segment) SYN() bool { return s.Flags&header.TCPFlagSyn != 0 }

// ACK reports whether the segment carries ACK.
func (s *Segment) ACK() bool { return s.Flags&header.TCPFlagAck != 0 }

// RST reports whether the segment carries RST.
func (s *Segment) RST() bool { return s.Flags&header.TCPFlagRst != 0 }

// FIN reports whether the segment carries FIN.
func (s *Segment) FIN() bool { return s.Flags&header.TCPFlagFin != 0 }

// PayloadSum is the ones'-complement sum of the payload (DSS checksum input).
func (s *Segment) PayloadSum() uint16 {
	if !s.sumValid {
		switch {
		case s.payload != nil:
			s.sum = s.payload.Checksum(0)
		case s.hasOut:
			s.sum = s.outData.Checksum()
		case s.hasIn:
			s.sum = s.inData.ChecksumAtOffset(s.inOff)
		}
		s.sumValid = true
	}
	return s.sum
}

// TCPOptionsInfo is what the handshake options of a SYN say.
type TCPOptionsInfo struct {
	MSS         uint16
	WScale      int // -1 when absent
	SACKPermit  bool
	HasTS       bool
	TSVal, TSEc uint32
}

// ParseTCPOptions extracts the standard options the option layer cares about.
func ParseTCPOptions(opts []byte) TCPOptionsInfo {
	info := TCPOptionsInfo{WScale: -1}
	// A malformed block yields what came before the bad option.
	_ = mpheader.WalkTCPOptions(opts, func(kind uint8, b []byte) error {
		switch kind {
		case header.TCPOptionMSS:
			if len(b) == 4 {
				info.MSS = binary.BigEndian.Uint16(b[2:])
			}
		case header.TCPOptionWS:
			if len(b) == 3 {
				info.WScale = int(b[2])
			}
		case header.TCPOptionSACKPermitted:
			info.SACKPermit = true
		case header.TCPOptionTS:
			if len(b) == 10 {
				info.HasTS = true
				info.TSVal = binary.BigEndian.Uint32(b[2:])
				info.TSEc = binary.BigEndian.Uint32(b[6:])
			}
		}
		return nil
	})
	return info
}

// compactOptions copies the options block into dst without trailing padding
// (an EOL would hide anything appended after it), and without SACK blocks
// when dropSACK is set (used when an MPTCP option does not fit otherwise).
func compactOptions(dst, opts []byte, dropSACK bool) []byte {
	dst = dst[:0]
	end := 0 // length of dst up to the end of the last real option
	for i := 0; i < len(opts); {
		k := opts[i]
		if k == header.TCPOptionEOL {
			break
		}
		if k == header.TCPOptionNOP {
			dst = append(dst, k)
			i++
			continue
		}
		if i+1 >= len(opts) {
			break
		}
		l := int(opts[i+1])
		if l < 2 || i+l > len(opts) {
			break
		}
		if !dropSACK || k != header.TCPOptionSACK {
			dst = append(dst, opts[i:i+l]...)
			end = len(dst)
		}
		i += l
	}
	// Trailing NOPs are padding (or were in front of a dropped block).
	return dst[:end]
}

var errNotTCP = errors.New("not a TCP segment")

// ipInfo describes the IP header in front of a TCP segment.
type ipInfo struct {
	ipv6     bool
	hdrLen   int
	src, dst tcpip.Address
}

// parseIP parses the IP header of b (IPv4 or IPv6 without extension headers)
// and returns the offset of the TCP header. Fragments and other protocols
// return errNotTCP so they pass through untouched.
func parseIP(b []byte) (ipInfo, error) {
	if len(b) < 1 {
		return ipInfo{}, errNotTCP
	}
	switch b[0] >> 4 {
	case 4:
		if len(b) < header.IPv4MinimumSize {
			return ipInfo{}, errNotTCP
		}
		ip := header.IPv4(b)
		hl := int(ip.HeaderLength())
		if hl < header.IPv4MinimumSize || hl > len(b) || ip.Protocol() != uint8(header.TCPProtocolNumber) {
			return ipInfo{}, errNotTCP
		}
		if ip.More() || ip.FragmentOffset() != 0 {
			return ipInfo{}, errNotTCP
		}
		return ipInfo{hdrLen: hl, src: ip.SourceAddress(), dst: ip.DestinationAddress()}, nil
	case 6:
		if len(b) < header.IPv6MinimumSize {
			return ipInfo{}, errNotTCP
		}
		ip := header.IPv6(b)
		if ip.NextHeader() != uint8(header.TCPProtocolNumber) {
			return ipInfo{}, errNotTCP
		}
		return ipInfo{ipv6: true, hdrLen: header.IPv6MinimumSize, src: ip.SourceAddress(), dst: ip.DestinationAddress()}, nil
	}
	return ipInfo{}, errNotTCP
}

func addrPort(a tcpip.Address, port uint16) netip.AddrPort {
	ad, _ := netip.AddrFromSlice(a.AsSlice())
	return netip.AddrPortFrom(ad, port)
}

func tcpipAddr(a netip.Addr) tcpip.Address {
	if a.Is4() {
		return tcpip.AddrFrom4(a.As4())
	}
	return tcpip.AddrFrom16(a.As16())
}

// buildHeaders writes an IP header and a TCP header (with options) for a
// segment with the given payload length and payload sum into a fresh slice.
func buildHeaders(ipv6 bool, t Tuple, seq, ack uint32, flags header.TCPFlags, wnd uint16, opts []byte, payloadLen int, payloadSum uint16, ttl uint8) []byte {
	b := make([]byte, header.IPv6MinimumSize+header.TCPMinimumSize+maxTCPOptions)
	return buildHeadersInto(b, ipv6, t, seq, ack, flags, wnd, opts, payloadLen, payloadSum, ttl)
}

// buildHeadersInto is buildHeaders writing into out (which must hold 120
// bytes); it returns the used part of out.
func buildHeadersInto(out []byte, ipv6 bool, t Tuple, seq, ack uint32, flags header.TCPFlags, wnd uint16, opts []byte, payloadLen int, payloadSum uint16, ttl uint8) []byte {
	optLen := (len(opts) + 3) &^ 3
	tcpLen := header.TCPMinimumSize + optLen
	ipLen := header.IPv4MinimumSize
	if ipv6 {
		ipLen = header.IPv6MinimumSize
	}
	b := out[:ipLen+tcpLen]
	clear(b)
	src, dst := tcpipAddr(t.Local.Addr()), tcpipAddr(t.Remote.Addr())
	if ipv6 {
		header.IPv6(b).Encode(&header.IPv6Fields{
			PayloadLength:     uint16(tcpLen + payloadLen),
			TransportProtocol: header.TCPProtocolNumber,
			HopLimit:          ttl,
			SrcAddr:           src,
			DstAddr:           dst,
		})
	} else {
		ip := header.IPv4(b)
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(ipLen + tcpLen + payloadLen),
			Flags:       header.IPv4FlagDontFragment,
			TTL:         ttl,
			Protocol:    uint8(header.TCPProtocolNumber),
			SrcAddr:     src,
			DstAddr:     dst,
		})
		ip.SetChecksum(^ip.CalculateChecksum())
	}
	tcp := header.TCP(b[ipLen:])
	tcp.Encode(&header.TCPFields{
		SrcPort:    t.Local.Port(),
		DstPort:    t.Remote.Port(),
		SeqNum:     seq,
		AckNum:     ack,
		DataOffset: uint8(tcpLen),
		Flags:      flags,
		WindowSize: wnd,
	})
	o := tcp[header.TCPMinimumSize:]
	n := copy(o, opts)
	for i := n; i < len(o); i++ {
		o[i] = header.TCPOptionNOP
	}
	// NOP padding in front would be nicer for alignment, but appending keeps
	// the options gVisor wrote at their offsets.
	sum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(tcpLen+payloadLen))
	sum = checksum.Combine(sum, payloadSum)
	tcp.SetChecksum(^tcp.CalculateChecksum(sum))
	return b
}
