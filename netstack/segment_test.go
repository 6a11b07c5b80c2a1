package netstack

import (
	"net/netip"
	"testing"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

func TestCompactOptions(t *testing.T) {
	t.Parallel()
	mss := []byte{header.TCPOptionMSS, 4, 0x05, 0xb4}
	// Option data whose last byte equals NOP (0x01) or EOL (0x00): a trim
	// that looks at bytes instead of walking options would cut them off.
	tsEnds01 := tsOpt(0x01020301, 0x00000001)
	tsEnds00 := tsOpt(0x11223344, 0x55667700)
	wsEnds01 := []byte{header.TCPOptionWS, 3, 0x01}
	for _, tc := range []struct {
		name     string
		in       []byte
		dropSACK bool
		want     []byte
	}{
		{"empty", nil, false, []byte{}},
		{"only padding", []byte{nop, nop, nop, eol}, false, []byte{}},
		{"trailing NOPs removed", cat([]byte{nop, nop}, tsOpt(1, 2), []byte{nop, nop}), false, cat([]byte{nop, nop}, tsOpt(1, 2))},
		{"EOL ends the block", cat(mss, []byte{eol}, tsOpt(1, 2)), false, mss},
		{"EOL padding removed", cat(mss, []byte{eol, eol, eol, eol}), false, mss},
		{"TS value ending in 0x01 kept", cat([]byte{nop, nop}, tsEnds01), false, cat([]byte{nop, nop}, tsEnds01)},
		{"TS value ending in 0x00 kept", cat([]byte{nop, nop}, tsEnds00, []byte{eol, eol}), false, cat([]byte{nop, nop}, tsEnds00)},
		{"WS shift 1 kept", cat(mss, wsEnds01, []byte{nop}), false, cat(mss, wsEnds01)},
		{"SACK kept", cat([]byte{nop, nop}, tsOpt(5, 6), []byte{nop, nop}, sackOpt(2)), false, cat([]byte{nop, nop}, tsOpt(5, 6), []byte{nop, nop}, sackOpt(2))},
		{"SACK dropped with its NOPs", cat([]byte{nop, nop}, tsOpt(5, 6), []byte{nop, nop}, sackOpt(3)), true, cat([]byte{nop, nop}, tsOpt(5, 6))},
		{"SACK first dropped, rest kept", cat([]byte{nop, nop}, sackOpt(1), []byte{nop, nop}, tsEnds01), true, cat([]byte{nop, nop, nop, nop}, tsEnds01)},
		{"truncated option stops", cat(mss, []byte{header.TCPOptionTS, 10, 1, 2}), false, mss},
		{"length below 2 stops", cat(mss, []byte{30, 1, 0, 0}), false, mss},
		{"lone kind byte stops", cat(mss, []byte{30}), false, mss},
		{"unknown option kept", cat([]byte{30, 4, 0x01, 0x01}, []byte{nop}), false, []byte{30, 4, 0x01, 0x01}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := compactOptions(make([]byte, 0, 40), tc.in, tc.dropSACK)
			require.Equal(t, tc.want, got)
			// Compacting again changes nothing.
			require.Equal(t, got, compactOptions(make([]byte, 0, 40), got, tc.dropSACK))
		})
	}
}

func TestParseTCPOptions(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		in   []byte
		want TCPOptionsInfo
	}{
		{"empty", nil, TCPOptionsInfo{WScale: -1}},
		{"SYN set", cat([]byte{header.TCPOptionMSS, 4, 0x05, 0xb4, header.TCPOptionSACKPermitted, 2}, tsOpt(0xdeadbeef, 0), []byte{nop, header.TCPOptionWS, 3, 7}),
			TCPOptionsInfo{MSS: 1460, WScale: 7, SACKPermit: true, HasTS: true, TSVal: 0xdeadbeef}},
		{"TS after NOPs", cat([]byte{nop, nop}, tsOpt(1, 0x01000001)), TCPOptionsInfo{WScale: -1, HasTS: true, TSVal: 1, TSEc: 0x01000001}},
		{"EOL hides the rest", cat([]byte{eol}, tsOpt(1, 2)), TCPOptionsInfo{WScale: -1}},
		{"bad TS length ignored", []byte{header.TCPOptionTS, 6, 0, 0, 0, 1}, TCPOptionsInfo{WScale: -1}},
		{"bad MSS length ignored", []byte{header.TCPOptionMSS, 3, 5}, TCPOptionsInfo{WScale: -1}},
		{"bad WS length ignored", []byte{header.TCPOptionWS, 4, 5, 0}, TCPOptionsInfo{WScale: -1}},
		{"WS zero", []byte{header.TCPOptionWS, 3, 0}, TCPOptionsInfo{WScale: 0}},
		{"truncated TS", cat([]byte{header.TCPOptionMSS, 4, 0, 100}, tsOpt(1, 2)[:7]), TCPOptionsInfo{MSS: 100, WScale: -1}},
		{"zero length stops", []byte{30, 0, header.TCPOptionMSS, 4, 0, 100}, TCPOptionsInfo{WScale: -1}},
		{"MPTCP option skipped", cat([]byte{30, 4, 0x20, 0x01}, []byte{header.TCPOptionMSS, 4, 0, 200}), TCPOptionsInfo{MSS: 200, WScale: -1}},
		{"lone kind byte", []byte{header.TCPOptionMSS}, TCPOptionsInfo{WScale: -1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, ParseTCPOptions(tc.in))
		})
	}
}

// ipv4Header builds an IPv4 header independently of buildHeaders.
func ipv4Header(hdrLen int, proto uint8, flags uint8, fragOff uint16, src, dst tcpip.Address) []byte {
	b := make([]byte, hdrLen)
	header.IPv4(b).Encode(&header.IPv4Fields{
		TotalLength:    uint16(hdrLen + header.TCPMinimumSize),
		TTL:            64,
		Protocol:       proto,
		Flags:          flags,
		FragmentOffset: fragOff,
		SrcAddr:        src,
		DstAddr:        dst,
	})
	b[0] = 0x40 | byte(hdrLen/4)
	return b
}

func ipv6Header(next uint8, src, dst tcpip.Address) []byte {
	b := make([]byte, header.IPv6MinimumSize)
	header.IPv6(b).Encode(&header.IPv6Fields{
		PayloadLength:     header.TCPMinimumSize,
		TransportProtocol: tcpip.TransportProtocolNumber(next),
		HopLimit:          64,
		SrcAddr:           src,
		DstAddr:           dst,
	})
	return b
}

var (
	v4a = tcpip.AddrFrom4([4]byte{10, 0, 0, 1})
	v4b = tcpip.AddrFrom4([4]byte{10, 0, 0, 2})
	v6a = tcpip.AddrFrom16([16]byte{0: 0xfd, 15: 1})
	v6b = tcpip.AddrFrom16([16]byte{0: 0xfd, 15: 2})
)

func TestParseIP(t *testing.T) {
	t.Parallel()
	tcpProto := uint8(header.TCPProtocolNumber)
	for _, tc := range []struct {
		name    string
		in      []byte
		wantErr bool
		want    ipInfo
	}{
		{"IPv4 TCP", ipv4Header(20, tcpProto, 0, 0, v4a, v4b), false, ipInfo{hdrLen: 20, src: v4a, dst: v4b}},
		{"IPv4 TCP DF", ipv4Header(20, tcpProto, header.IPv4FlagDontFragment, 0, v4a, v4b), false, ipInfo{hdrLen: 20, src: v4a, dst: v4b}},
		{"IPv4 with IP options", ipv4Header(24, tcpProto, 0, 0, v4b, v4a), false, ipInfo{hdrLen: 24, src: v4b, dst: v4a}},
		{"IPv4 UDP", ipv4Header(20, uint8(header.UDPProtocolNumber), 0, 0, v4a, v4b), true, ipInfo{}},
		{"IPv4 first fragment", ipv4Header(20, tcpProto, header.IPv4FlagMoreFragments, 0, v4a, v4b), true, ipInfo{}},
		{"IPv4 later fragment", ipv4Header(20, tcpProto, 0, 1480, v4a, v4b), true, ipInfo{}},
		{"IPv4 short", ipv4Header(20, tcpProto, 0, 0, v4a, v4b)[:19], true, ipInfo{}},
		{"IPv4 IHL below 5", func() []byte { b := ipv4Header(20, tcpProto, 0, 0, v4a, v4b); b[0] = 0x44; return b }(), true, ipInfo{}},
		{"IPv4 IHL beyond buffer", func() []byte { b := ipv4Header(20, tcpProto, 0, 0, v4a, v4b); b[0] = 0x4f; return b }(), true, ipInfo{}},
		{"IPv6 TCP", ipv6Header(tcpProto, v6a, v6b), false, ipInfo{ipv6: true, hdrLen: 40, src: v6a, dst: v6b}},
		{"IPv6 UDP", ipv6Header(uint8(header.UDPProtocolNumber), v6a, v6b), true, ipInfo{}},
		{"IPv6 fragment header", ipv6Header(uint8(header.IPv6FragmentHeader), v6a, v6b), true, ipInfo{}},
		{"IPv6 hop-by-hop", ipv6Header(uint8(header.IPv6HopByHopOptionsExtHdrIdentifier), v6a, v6b), true, ipInfo{}},
		{"IPv6 short", ipv6Header(tcpProto, v6a, v6b)[:39], true, ipInfo{}},
		{"empty", nil, true, ipInfo{}},
		{"version 5", []byte{0x50, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, true, ipInfo{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseIP(tc.in)
			if tc.wantErr {
				require.ErrorIs(t, err, errNotTCP)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.want, got)
		})
	}
}

func TestBuildHeaders(t *testing.T) {
	t.Parallel()
	t4 := Tuple{Local: netip.MustParseAddrPort("10.0.0.1:40000"), Remote: netip.MustParseAddrPort("10.0.0.2:80")}
	t6 := Tuple{Local: netip.MustParseAddrPort("[fd00::1]:40000"), Remote: netip.MustParseAddrPort("[fd00::2]:443")}
	payload := make([]byte, 1001) // odd length exercises the odd-byte sum
	for i := range payload {
		payload[i] = byte(i*7 + 3)
	}
	for _, tc := range []struct {
		name    string
		ipv6    bool
		opts    []byte
		payload []byte
	}{
		{"v4 no options no payload", false, nil, nil},
		{"v4 TS", false, cat([]byte{nop, nop}, tsOpt(0x01010101, 0x01)), payload},
		{"v4 odd options", false, []byte{30, 3, 0x01}, payload},
		{"v4 13 bytes of options", false, cat([]byte{30, 3, 0x01}, tsOpt(1, 0x01)), payload[:10]},
		{"v4 40 bytes of options", false, cat([]byte{nop, nop}, tsOpt(1, 2), []byte{30, 28}, make([]byte, 26)), payload},
		{"v6 no options", true, nil, payload[:1]},
		{"v6 odd options", true, []byte{30, 5, 1, 2, 3}, payload},
		{"v6 TS and DSS", true, cat([]byte{nop, nop}, tsOpt(7, 8), []byte{30, 20}, make([]byte, 18)), payload},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tup := t4
			if tc.ipv6 {
				tup = t6
			}
			const seq, ack, wnd = 0xfffffff0, 12345, 5000
			flags := header.TCPFlagAck | header.TCPFlagPsh
			psum := checksum.Checksum(tc.payload, 0)
			b := buildHeaders(tc.ipv6, tup, seq, ack, flags, wnd, tc.opts, len(tc.payload), psum, 33)
			pad := (len(tc.opts) + 3) &^ 3
			var th header.TCP
			var src, dst tcpip.Address
			if tc.ipv6 {
				ip := header.IPv6(b)
				require.Len(t, b, header.IPv6MinimumSize+header.TCPMinimumSize+pad)
				require.EqualValues(t, 6, ip[0]>>4)
				require.Equal(t, header.TCPProtocolNumber, ip.TransportProtocol())
				require.EqualValues(t, header.TCPMinimumSize+pad+len(tc.payload), ip.PayloadLength())
				require.EqualValues(t, 33, ip.HopLimit())
				src, dst = ip.SourceAddress(), ip.DestinationAddress()
				th = header.TCP(b[header.IPv6MinimumSize:])
			} else {
				ip := header.IPv4(b)
				require.Len(t, b, header.IPv4MinimumSize+header.TCPMinimumSize+pad)
				require.True(t, ip.IsChecksumValid(), "IPv4 header checksum")
				require.True(t, ip.IsValid(len(b)+len(tc.payload)))
				require.EqualValues(t, len(b)+len(tc.payload), ip.TotalLength())
				require.EqualValues(t, 33, ip.TTL())
				require.Equal(t, uint8(header.IPv4FlagDontFragment), ip.Flags())
				src, dst = ip.SourceAddress(), ip.DestinationAddress()
				th = header.TCP(b[header.IPv4MinimumSize:])
			}
			require.Equal(t, tcpipAddr(tup.Local.Addr()), src)
			require.Equal(t, tcpipAddr(tup.Remote.Addr()), dst)
			require.Equal(t, tup.Local.Port(), th.SourcePort())
			require.Equal(t, tup.Remote.Port(), th.DestinationPort())
			require.EqualValues(t, seq, th.SequenceNumber())
			require.EqualValues(t, ack, th.AckNumber())
			require.EqualValues(t, wnd, th.WindowSize())
			require.Equal(t, flags, th.Flags())
			require.EqualValues(t, header.TCPMinimumSize+pad, th.DataOffset())
			o := th.Options()
			require.Equal(t, string(tc.opts), string(o[:len(tc.opts)]), "options at their offsets")
			for _, p := range o[len(tc.opts):] {
				require.EqualValues(t, nop, p, "padding is NOPs")
			}
			// Verify against gVisor's own checksum routine, and by summing
			// the whole pseudo-header + segment to 0xffff.
			require.True(t, th.IsChecksumValid(src, dst, psum, uint16(len(tc.payload))))
			seg := append(append([]byte{}, th...), tc.payload...)
			sum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(len(seg)))
			require.EqualValues(t, 0xffff, checksum.Checksum(seg, sum))
		})
	}
}
