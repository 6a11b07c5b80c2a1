package netstack

import (
	"encoding/binary"
	"net/netip"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// Shared by the tests of the option layer and the Mux: segments built
// independently of the layer's own encoders, a fake flow and a layer on a
// channel endpoint.

var (
	tup4 = Tuple{Local: netip.MustParseAddrPort("10.0.0.1:40000"), Remote: netip.MustParseAddrPort("10.0.0.2:80")}
	tup6 = Tuple{Local: netip.MustParseAddrPort("[fd00::1]:40000"), Remote: netip.MustParseAddrPort("[fd00::2]:80")}
)

// rawSeg describes a TCP segment from the sender's point of view (t.Local
// is the source).
type rawSeg struct {
	t        Tuple
	seq, ack uint32
	flags    header.TCPFlags
	wnd      uint16
	opts     []byte // padded with NOPs to a multiple of 4 here
	payload  []byte
}

// encode builds the segment's IP and TCP headers with gVisor's encoders,
// independently of buildHeaders, with valid checksums.
func (r rawSeg) encode() (hdr []byte, ipLen int) {
	opts := append([]byte{}, r.opts...)
	for len(opts)%4 != 0 {
		opts = append(opts, nop)
	}
	tcpLen := header.TCPMinimumSize + len(opts)
	v6 := r.t.Local.Addr().Is6()
	ipLen = header.IPv4MinimumSize
	if v6 {
		ipLen = header.IPv6MinimumSize
	}
	hdr = make([]byte, ipLen+tcpLen)
	src, dst := tcpipAddr(r.t.Local.Addr()), tcpipAddr(r.t.Remote.Addr())
	if v6 {
		header.IPv6(hdr).Encode(&header.IPv6Fields{
			PayloadLength: uint16(tcpLen + len(r.payload)), TransportProtocol: header.TCPProtocolNumber,
			HopLimit: 64, SrcAddr: src, DstAddr: dst,
		})
	} else {
		ip := header.IPv4(hdr)
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(ipLen + tcpLen + len(r.payload)), TTL: 64,
			Protocol: uint8(header.TCPProtocolNumber), SrcAddr: src, DstAddr: dst,
		})
		ip.SetChecksum(^ip.CalculateChecksum())
	}
	th := header.TCP(hdr[ipLen:])
	th.Encode(&header.TCPFields{
		SrcPort: r.t.Local.Port(), DstPort: r.t.Remote.Port(), SeqNum: r.seq, AckNum: r.ack,
		DataOffset: uint8(tcpLen), Flags: r.flags, WindowSize: r.wnd,
	})
	copy(th[header.TCPMinimumSize:], opts)
	sum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(tcpLen+len(r.payload)))
	sum = checksum.Combine(sum, checksum.Checksum(r.payload, 0))
	th.SetChecksum(^th.CalculateChecksum(sum))
	return hdr, ipLen
}

func (r rawSeg) bytes() []byte {
	h, _ := r.encode()
	return append(h, r.payload...)
}

// outPacket is the segment as gVisor's TCP hands it to the link: headers
// pushed, payload in Data.
func (r rawSeg) outPacket() *stack.PacketBuffer {
	hdr, ipLen := r.encode()
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		ReserveHeaderBytes: len(hdr),
		Payload:            buffer.MakeWithData(append([]byte{}, r.payload...)),
	})
	copy(pkt.TransportHeader().Push(len(hdr)-ipLen), hdr[ipLen:])
	pkt.TransportProtocolNumber = header.TCPProtocolNumber
	copy(pkt.NetworkHeader().Push(ipLen), hdr[:ipLen])
	pkt.NetworkProtocolNumber = header.IPv4ProtocolNumber
	if ipLen == header.IPv6MinimumSize {
		pkt.NetworkProtocolNumber = header.IPv6ProtocolNumber
	}
	return pkt
}

// outPacketRoom is outPacket with headroom in front of the headers, as
// gVisor leaves it when the layer reports MaxHeaderLength.
func (r rawSeg) outPacketRoom(room int) *stack.PacketBuffer {
	hdr, ipLen := r.encode()
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		ReserveHeaderBytes: len(hdr) + room,
		Payload:            buffer.MakeWithData(append([]byte{}, r.payload...)),
	})
	copy(pkt.TransportHeader().Push(len(hdr)-ipLen), hdr[ipLen:])
	pkt.TransportProtocolNumber = header.TCPProtocolNumber
	copy(pkt.NetworkHeader().Push(ipLen), hdr[:ipLen])
	pkt.NetworkProtocolNumber = protoOf(hdr)
	return pkt
}

func protoOf(b []byte) tcpip.NetworkProtocolNumber {
	if len(b) > 0 && b[0]>>4 == 6 {
		return header.IPv6ProtocolNumber
	}
	return header.IPv4ProtocolNumber
}

// inPacket is raw bytes as a link endpoint delivers them.
func inPacket(b []byte) *stack.PacketBuffer {
	return stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(append([]byte{}, b...))})
}

// wireSeg is a segment read back from the wire, checked independently.
type wireSeg struct {
	ipv6     bool
	src, dst tcpip.Address
	tcp      header.TCP
	payload  []byte
}

// parseWire parses b and requires valid IP and TCP checksums.
func parseWire(t *testing.T, b []byte) wireSeg {
	t.Helper()
	var w wireSeg
	var ipLen, total int
	switch b[0] >> 4 {
	case 4:
		ip := header.IPv4(b)
		require.True(t, ip.IsValid(len(b)), "valid IPv4 header")
		require.True(t, ip.IsChecksumValid(), "IPv4 header checksum")
		ipLen, total = int(ip.HeaderLength()), int(ip.TotalLength())
		w.src, w.dst = ip.SourceAddress(), ip.DestinationAddress()
	case 6:
		ip := header.IPv6(b)
		require.GreaterOrEqual(t, len(b), header.IPv6MinimumSize)
		w.ipv6 = true
		ipLen, total = header.IPv6MinimumSize, header.IPv6MinimumSize+int(ip.PayloadLength())
		w.src, w.dst = ip.SourceAddress(), ip.DestinationAddress()
	default:
		t.Fatalf("IP version %d", b[0]>>4)
	}
	require.Equal(t, len(b), total, "IP length covers the packet exactly")
	seg := b[ipLen:]
	sum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, w.src, w.dst, uint16(len(seg)))
	require.EqualValues(t, 0xffff, checksum.Checksum(seg, sum), "TCP checksum")
	w.tcp = header.TCP(seg)
	off := int(w.tcp.DataOffset())
	require.GreaterOrEqual(t, off, header.TCPMinimumSize)
	require.LessOrEqual(t, off, len(seg))
	w.payload = seg[off:]
	return w
}

// readOut returns the bytes of every packet the lower endpoint was given.
func readOut(ch *channel.Endpoint) [][]byte {
	var out [][]byte
	for pkt := ch.Read(); pkt != nil; pkt = ch.Read() {
		buf := pkt.ToBuffer()
		out = append(out, buf.Flatten())
		buf.Release()
		pkt.DecRef()
	}
	return out
}

// seenSeg is what a fake flow recorded of a Segment.
type seenSeg struct {
	seq, ack   uint32
	flags      header.TCPFlags
	wnd        uint16
	opts       []byte
	payloadLen int
	payloadSum uint16
	room       int
	via        *Layer
}

func record(seg *Segment, room int) seenSeg {
	return seenSeg{
		seq: seg.Seq, ack: seg.Ack, flags: seg.Flags, wnd: seg.Window,
		opts: append([]byte{}, seg.Options...), payloadLen: seg.PayloadLen,
		payloadSum: seg.PayloadSum(), room: room, via: seg.Via,
	}
}

// fakeFlow answers Outgoing with scripted options and covers and records
// every segment it sees.
type fakeFlow struct {
	mu sync.Mutex
	// out returns the options to write and the cover for the i-th call.
	out    func(i int, seg *Segment) ([]byte, int)
	accept bool
	in     []seenSeg
	outs   []seenSeg
}

func (f *fakeFlow) Incoming(seg *Segment) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.in = append(f.in, record(seg, 0))
	return f.accept
}

func (f *fakeFlow) Outgoing(seg *Segment, opt []byte) (int, int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	i := len(f.outs)
	f.outs = append(f.outs, record(seg, len(opt)))
	if f.out == nil {
		return 0, seg.PayloadLen
	}
	o, cover := f.out(i, seg)
	return copy(opt, o), cover
}

func (f *fakeFlow) incoming() []seenSeg {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]seenSeg{}, f.in...)
}

// acceptFunc adapts a function to Acceptor.
type acceptFunc func(seg *Segment) (Flow, bool)

func (a acceptFunc) SYN(seg *Segment) (Flow, bool) { return a(seg) }

// fakeDispatcher stands in for the gVisor stack above the layer.
type fakeDispatcher struct {
	mu   sync.Mutex
	pkts [][]byte
}

func (d *fakeDispatcher) DeliverNetworkPacket(_ tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	buf := pkt.Data().ToBuffer()
	d.mu.Lock()
	d.pkts = append(d.pkts, buf.Flatten())
	d.mu.Unlock()
	buf.Release()
}

func (d *fakeDispatcher) DeliverLinkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer) {}

func (d *fakeDispatcher) delivered() [][]byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([][]byte{}, d.pkts...)
}

type testLayer struct {
	l    *Layer
	ch   *channel.Endpoint
	mux  *Mux
	disp *fakeDispatcher
}

func newTestLayer(t testing.TB) *testLayer {
	t.Helper()
	ch := channel.New(64, 1500, "")
	mux := NewMux()
	tl := &testLayer{l: NewLayer(ch, mux), ch: ch, mux: mux, disp: &fakeDispatcher{}}
	tl.l.Attach(tl.disp)
	t.Cleanup(ch.Close)
	return tl
}

// send writes one gVisor-built segment through the layer.
func (tl *testLayer) send(t *testing.T, r rawSeg) [][]byte {
	t.Helper()
	pkt := r.outPacket()
	defer pkt.DecRef()
	var list stack.PacketBufferList
	list.PushBack(pkt)
	n, err := tl.l.WritePackets(list)
	require.Nil(t, err)
	require.Equal(t, 1, n, "WritePackets counts gVisor's packets, not the pieces")
	return readOut(tl.ch)
}

func (tl *testLayer) receive(b []byte) {
	pkt := inPacket(b)
	defer pkt.DecRef()
	tl.ch.InjectInbound(protoOf(b), pkt)
}

func payloadOf(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*31 + 7)
	}
	return b
}

func dssOpt(n int, fill byte) []byte {
	b := []byte{30, byte(n), 0x20, 0x05}
	for len(b) < n {
		b = append(b, fill)
	}
	return b
}

const (
	nop = header.TCPOptionNOP
	eol = header.TCPOptionEOL
)

// tsOpt is a timestamp option (kind 8, length 10).
func tsOpt(val, ecr uint32) []byte {
	b := []byte{header.TCPOptionTS, 10}
	b = binary.BigEndian.AppendUint32(b, val)
	return binary.BigEndian.AppendUint32(b, ecr)
}

// sackOpt is a SACK option with n blocks of 8 bytes.
func sackOpt(n int) []byte {
	b := []byte{header.TCPOptionSACK, byte(2 + 8*n)}
	for i := range n {
		b = binary.BigEndian.AppendUint32(b, uint32(1000*(i+1)))
		b = binary.BigEndian.AppendUint32(b, uint32(1000*(i+1)+500))
	}
	return b
}

func cat(parts ...[]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// tcpSumOK checks an IP packet's TCP checksum independently of the layer,
// over the length the IP header claims.
func tcpSumOK(b []byte) bool {
	if len(b) < 1 {
		return false
	}
	var hl, total int
	var src, dst tcpip.Address
	switch b[0] >> 4 {
	case 4:
		if len(b) < header.IPv4MinimumSize {
			return false
		}
		hl = int(b[0]&0xf) * 4
		total = int(binary.BigEndian.Uint16(b[2:])) - hl
		src, dst = tcpip.AddrFrom4Slice(b[12:16]), tcpip.AddrFrom4Slice(b[16:20])
	case 6:
		if len(b) < header.IPv6MinimumSize {
			return false
		}
		hl = header.IPv6MinimumSize
		total = int(binary.BigEndian.Uint16(b[4:]))
		src, dst = tcpip.AddrFrom16Slice(b[8:24]), tcpip.AddrFrom16Slice(b[24:40])
	default:
		return false
	}
	if total < header.TCPMinimumSize || hl+total > len(b) {
		return false
	}
	sum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(total))
	return checksum.Checksum(b[hl:hl+total], sum) == 0xffff
}
