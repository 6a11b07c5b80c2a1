package tun

import (
	"testing"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

var (
	src4 = tcpip.AddrFrom4([4]byte{10, 0, 0, 1})
	dst4 = tcpip.AddrFrom4([4]byte{10, 0, 0, 2})
	src6 = tcpip.AddrFrom16([16]byte{0xfd, 15: 1})
	dst6 = tcpip.AddrFrom16([16]byte{0xfd, 15: 2})
)

// buildPacket returns a valid IPv4 or IPv6 packet carrying a transport
// header of proto and payload, with correct checksums.
func buildPacket(t testing.TB, v6 bool, proto tcpip.TransportProtocolNumber, payload []byte) []byte {
	t.Helper()
	var l4 []byte
	switch proto {
	case header.TCPProtocolNumber:
		l4 = make([]byte, header.TCPMinimumSize+len(payload))
		header.TCP(l4).Encode(&header.TCPFields{SrcPort: 1, DstPort: 2, SeqNum: 7, DataOffset: header.TCPMinimumSize, Flags: header.TCPFlagAck, WindowSize: 100})
	case header.UDPProtocolNumber:
		l4 = make([]byte, header.UDPMinimumSize+len(payload))
		header.UDP(l4).Encode(&header.UDPFields{SrcPort: 1, DstPort: 2, Length: uint16(len(l4))})
	case header.ICMPv4ProtocolNumber, header.ICMPv6ProtocolNumber:
		l4 = make([]byte, 8+len(payload))
		l4[0] = 8
	default:
		l4 = make([]byte, len(payload))
	}
	copy(l4[len(l4)-len(payload):], payload)
	src, dst := src4, dst4
	if v6 {
		src, dst = src6, dst6
	}
	switch proto {
	case header.TCPProtocolNumber:
		h := header.TCP(l4)
		h.SetChecksum(^checksum.Checksum(l4, header.PseudoHeaderChecksum(proto, src, dst, uint16(len(l4)))))
	case header.UDPProtocolNumber:
		h := header.UDP(l4)
		h.SetChecksum(^checksum.Checksum(l4, header.PseudoHeaderChecksum(proto, src, dst, uint16(len(l4)))))
	case header.ICMPv4ProtocolNumber:
		header.ICMPv4(l4).SetChecksum(^checksum.Checksum(l4, 0))
	case header.ICMPv6ProtocolNumber:
		header.ICMPv6(l4).SetChecksum(^checksum.Checksum(l4, header.PseudoHeaderChecksum(proto, src, dst, uint16(len(l4)))))
	}
	if v6 {
		b := make([]byte, header.IPv6MinimumSize+len(l4))
		header.IPv6(b).Encode(&header.IPv6Fields{PayloadLength: uint16(len(l4)), TransportProtocol: proto, HopLimit: 64, SrcAddr: src, DstAddr: dst})
		copy(b[header.IPv6MinimumSize:], l4)
		return b
	}
	b := make([]byte, header.IPv4MinimumSize+len(l4))
	ip := header.IPv4(b)
	ip.Encode(&header.IPv4Fields{TotalLength: uint16(len(b)), TTL: 64, Protocol: uint8(proto), SrcAddr: src, DstAddr: dst})
	ip.SetChecksum(^ip.CalculateChecksum())
	copy(b[header.IPv4MinimumSize:], l4)
	return b
}

func TestValidChecksums(t *testing.T) {
	t.Parallel()
	payload := []byte("mptun checksum test payload")
	type mutate func(b []byte)
	flipLast := func(b []byte) { b[len(b)-1] ^= 0x40 }
	tests := []struct {
		name  string
		v6    bool
		proto tcpip.TransportProtocolNumber
		mut   mutate
		want  bool
	}{
		{"v4 tcp ok", false, header.TCPProtocolNumber, nil, true},
		{"v4 tcp payload corrupt", false, header.TCPProtocolNumber, flipLast, false},
		{"v4 header checksum corrupt", false, header.TCPProtocolNumber, func(b []byte) { b[8]-- }, false},
		{"v4 total length beyond packet", false, header.TCPProtocolNumber, func(b []byte) {
			header.IPv4(b).SetTotalLength(uint16(len(b) + 1))
			header.IPv4(b).SetChecksum(0)
			header.IPv4(b).SetChecksum(^header.IPv4(b).CalculateChecksum())
		}, false},
		{"v4 udp ok", false, header.UDPProtocolNumber, nil, true},
		{"v4 udp corrupt", false, header.UDPProtocolNumber, flipLast, false},
		{"v4 udp zero checksum means none", false, header.UDPProtocolNumber, func(b []byte) {
			header.UDP(b[header.IPv4MinimumSize:]).SetChecksum(0)
			flipLast(b)
		}, true},
		{"v4 icmp ok", false, header.ICMPv4ProtocolNumber, nil, true},
		{"v4 icmp corrupt", false, header.ICMPv4ProtocolNumber, flipLast, false},
		{"v4 fragment: header only", false, header.TCPProtocolNumber, func(b []byte) {
			ip := header.IPv4(b)
			ip.SetFlagsFragmentOffset(header.IPv4FlagMoreFragments, 0)
			ip.SetChecksum(0)
			ip.SetChecksum(^ip.CalculateChecksum())
			flipLast(b)
		}, true},
		{"v6 tcp ok", true, header.TCPProtocolNumber, nil, true},
		{"v6 tcp corrupt", true, header.TCPProtocolNumber, flipLast, false},
		{"v6 udp ok", true, header.UDPProtocolNumber, nil, true},
		{"v6 udp corrupt", true, header.UDPProtocolNumber, flipLast, false},
		{"v6 icmp ok", true, header.ICMPv6ProtocolNumber, nil, true},
		{"v6 icmp corrupt", true, header.ICMPv6ProtocolNumber, flipLast, false},
		{"v6 payload length beyond packet", true, header.TCPProtocolNumber, func(b []byte) {
			header.IPv6(b).SetPayloadLength(uint16(len(b)))
		}, false},
		{"v4 tcp shorter than a tcp header", false, header.TCPProtocolNumber, func(b []byte) {
			ip := header.IPv4(b)
			ip.SetTotalLength(header.IPv4MinimumSize + 10)
			ip.SetChecksum(0)
			ip.SetChecksum(^ip.CalculateChecksum())
		}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := buildPacket(t, tc.v6, tc.proto, payload)
			if tc.mut != nil {
				tc.mut(b)
			}
			require.Equal(t, tc.want, validChecksums(b))
		})
	}
	t.Run("garbage", func(t *testing.T) {
		for _, b := range [][]byte{nil, {0x45}, {0x60, 0}, {0x00, 1, 2, 3}, make([]byte, 19)} {
			require.False(t, validChecksums(b), "%x", b)
		}
	})
}

// FuzzValidChecksums checks that arbitrary input never panics and that a
// packet accepted once is still accepted after trailing bytes are added
// (lengths come from the IP header, not from the buffer).
func FuzzValidChecksums(f *testing.F) {
	for _, v6 := range []bool{false, true} {
		for _, p := range []tcpip.TransportProtocolNumber{header.TCPProtocolNumber, header.UDPProtocolNumber, header.ICMPv4ProtocolNumber, header.ICMPv6ProtocolNumber} {
			f.Add(buildPacket(f, v6, p, []byte("seed")))
		}
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		ok := validChecksums(b)
		if ok {
			padded := append(append([]byte(nil), b...), 0xde, 0xad)
			require.True(t, validChecksums(padded))
		}
	})
}
