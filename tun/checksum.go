package tun

import (
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// validChecksums verifies the IPv4 header checksum and the TCP, UDP,
// ICMPv4 or ICMPv6 checksum of the IP packet b.
//
// Why the endpoint verifies checksums itself: gVisor's NIC overwrites
// pkt.RXChecksumValidated with the link's CapabilityRXChecksumOffload, and
// GRO super-packets carry a stale IP header checksum and a TCP checksum that
// only covers the first segment. So the endpoint must advertise the
// capability, and then nothing above it checks what GRO did not. GRO
// verifies every TCP segment it accepts; this covers everything else.
//
// Packets whose transport checksum cannot be checked here (IPv4 fragments,
// IPv6 extension headers, other protocols) pass with a valid IP header: the
// kernel side of a TUN generates or has already routed them.
func validChecksums(b []byte) bool {
	switch header.IPVersion(b) {
	case header.IPv4Version:
		ip := header.IPv4(b)
		if !ip.IsValid(len(b)) || !ip.IsChecksumValid() {
			return false
		}
		if ip.More() || ip.FragmentOffset() != 0 {
			return true
		}
		hl := int(ip.HeaderLength())
		payload := b[hl:ip.TotalLength()]
		return transportValid(tcpip.TransportProtocolNumber(ip.Protocol()), ip.SourceAddress(), ip.DestinationAddress(), payload, false)
	case header.IPv6Version:
		if len(b) < header.IPv6MinimumSize {
			return false
		}
		ip := header.IPv6(b)
		end := header.IPv6MinimumSize + int(ip.PayloadLength())
		if end > len(b) {
			return false
		}
		return transportValid(tcpip.TransportProtocolNumber(ip.NextHeader()), ip.SourceAddress(), ip.DestinationAddress(), b[header.IPv6MinimumSize:end], true)
	default:
		return false
	}
}

func transportValid(proto tcpip.TransportProtocolNumber, src, dst tcpip.Address, payload []byte, v6 bool) bool {
	switch proto {
	case header.TCPProtocolNumber:
		if len(payload) < header.TCPMinimumSize {
			return false
		}
	case header.UDPProtocolNumber:
		if len(payload) < header.UDPMinimumSize {
			return false
		}
		// A zero UDP checksum means "none" over IPv4 (RFC 768).
		if !v6 && header.UDP(payload).Checksum() == 0 {
			return true
		}
	case header.ICMPv4ProtocolNumber:
		if v6 {
			return true
		}
		return checksum.Checksum(payload, 0) == 0xffff
	case header.ICMPv6ProtocolNumber:
		if !v6 {
			return true
		}
	default:
		return true
	}
	sum := header.PseudoHeaderChecksum(proto, src, dst, uint16(len(payload)))
	return checksum.Checksum(payload, sum) == 0xffff
}
