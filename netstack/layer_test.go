package netstack

import (
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

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

func TestLayerMTU(t *testing.T) {
	tl := newTestLayer(t)
	require.EqualValues(t, 1500-OptionBudget, tl.l.MTU())
	require.EqualValues(t, maxTCPOptions, tl.l.MaxHeaderLength())
}

func TestLayerOutgoingAddsOptions(t *testing.T) {
	ts := cat([]byte{nop, nop}, tsOpt(0x01000001, 0x42424201))
	for _, tc := range []struct {
		name    string
		t       Tuple
		opts    []byte
		mp      []byte
		payload int
		flags   header.TCPFlags
	}{
		{"v4 TS + DSS", tup4, ts, dssOpt(20, 0xab), 1400, header.TCPFlagAck | header.TCPFlagPsh},
		{"v6 TS + DSS", tup6, ts, dssOpt(20, 0x01), 1380, header.TCPFlagAck},
		{"v4 odd option length padded", tup4, ts, dssOpt(7, 0x01), 333, header.TCPFlagAck},
		{"v6 pure ACK", tup6, ts, dssOpt(8, 0x00), 0, header.TCPFlagAck},
		{"v4 SYN with MP_CAPABLE", tup4, cat([]byte{header.TCPOptionMSS, 4, 5, 0x8c, header.TCPOptionSACKPermitted, 2}, tsOpt(9, 0), []byte{nop, header.TCPOptionWS, 3, 7}), []byte{30, 4, 0x01, 0x81}, 0, header.TCPFlagSyn},
		{"v4 nothing to add", tup4, ts, nil, 100, header.TCPFlagAck},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tl := newTestLayer(t)
			f := &fakeFlow{out: func(_ int, seg *Segment) ([]byte, int) { return tc.mp, seg.PayloadLen }}
			tl.mux.Register(tc.t, f)
			in := rawSeg{t: tc.t, seq: 1000, ack: 77, flags: tc.flags, wnd: 512, opts: tc.opts, payload: payloadOf(tc.payload)}
			out := tl.send(t, in)
			require.Len(t, out, 1)
			w := parseWire(t, out[0])
			require.Equal(t, tc.t.Local.Addr().Is6(), w.ipv6)
			require.EqualValues(t, 1000, w.tcp.SequenceNumber())
			require.EqualValues(t, 77, w.tcp.AckNumber())
			require.EqualValues(t, 512, w.tcp.WindowSize())
			require.Equal(t, tc.flags, w.tcp.Flags())
			require.Equal(t, in.payload, w.payload)
			want := cat(compactOptions(nil, tc.opts, false), tc.mp)
			got := w.tcp.Options()
			require.Equal(t, want, []byte(got[:len(want)]))
			require.Zero(t, len(got)%4)
			for _, p := range got[len(want):] {
				require.EqualValues(t, nop, p)
			}
			require.Len(t, f.outs, 1)
			s := f.outs[0]
			require.Equal(t, tc.payload, s.payloadLen)
			require.Equal(t, checksum.Checksum(in.payload, 0), s.payloadSum)
			require.Equal(t, maxTCPOptions-len(compactOptions(nil, tc.opts, false)), s.room)
			require.Same(t, tl.l, s.via)
			require.EqualValues(t, 1, tl.mux.Stats.SegmentsOut.Load())
		})
	}
}

func TestLayerSplit(t *testing.T) {
	ts := cat([]byte{nop, nop}, tsOpt(5, 6))
	for _, tc := range []struct {
		name    string
		t       Tuple
		payload int
		covers  []int // cover returned by the i-th Outgoing call
		flags   header.TCPFlags
	}{
		{"v4 in two, FIN+PSH last", tup4, 1400, []int{600, 800}, header.TCPFlagAck | header.TCPFlagPsh | header.TCPFlagFin},
		{"v6 one byte then rest", tup6, 1380, []int{1, 1379}, header.TCPFlagAck | header.TCPFlagPsh},
		{"v4 in three", tup4, 1200, []int{400, 400, 400}, header.TCPFlagAck | header.TCPFlagFin},
		{"v4 last cover beyond payload", tup4, 1000, []int{999, 5000}, header.TCPFlagAck | header.TCPFlagPsh},
		{"seq wraps", tup4, 1000, []int{500, 500}, header.TCPFlagAck},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tl := newTestLayer(t)
			f := &fakeFlow{out: func(i int, _ *Segment) ([]byte, int) {
				return dssOpt(20, byte(i+1)), tc.covers[i]
			}}
			tl.mux.Register(tc.t, f)
			seq := uint32(0x7000_0000)
			if tc.name == "seq wraps" {
				seq = 0xffff_ff00
			}
			in := rawSeg{t: tc.t, seq: seq, ack: 99, flags: tc.flags, wnd: 1000, opts: ts, payload: payloadOf(tc.payload)}
			out := tl.send(t, in)
			require.Len(t, out, len(tc.covers))
			off := 0
			for i, b := range out {
				w := parseWire(t, b)
				last := i == len(out)-1
				n := min(tc.covers[i], tc.payload-off)
				require.Equal(t, seq+uint32(off), w.tcp.SequenceNumber(), "piece %d seq", i)
				require.EqualValues(t, 99, w.tcp.AckNumber())
				require.Equal(t, in.payload[off:off+n], w.payload, "piece %d payload", i)
				wantFlags := tc.flags
				if !last {
					wantFlags &^= header.TCPFlagFin | header.TCPFlagPsh
				}
				require.Equal(t, wantFlags, w.tcp.Flags(), "piece %d flags", i)
				require.Equal(t, cat(ts, dssOpt(20, byte(i+1))), []byte(w.tcp.Options()), "piece %d options", i)
				// The flow saw each piece with its own seq, length and sum.
				s := f.outs[i]
				require.Equal(t, seq+uint32(off), s.seq)
				require.Equal(t, tc.payload-off, s.payloadLen)
				require.Equal(t, checksum.Checksum(in.payload[off:], 0), s.payloadSum)
				off += n
			}
			require.Equal(t, tc.payload, off)
			require.EqualValues(t, len(tc.covers)-1, tl.mux.Stats.SegmentsSplit.Load())
		})
	}
}

func TestLayerSACKTrim(t *testing.T) {
	ts := cat([]byte{nop, nop}, tsOpt(0x01010101, 0x01010101))
	for _, tc := range []struct {
		name      string
		opts      []byte
		mp        int
		wantRoom  int
		wantOpts  []byte
		wantTrims uint64
	}{
		{"3 blocks trimmed for DSS", cat(ts, []byte{nop, nop}, sackOpt(3)), 20, 28, cat(ts, dssOpt(20, 0xee)), 1},
		{"1 block fits next to DSS", cat(ts, []byte{nop, nop}, sackOpt(1)), 12, 28, cat(ts, []byte{nop, nop}, sackOpt(1), dssOpt(12, 0xee)), 0},
		{"2 blocks trimmed for a 12-byte DSS", cat(ts, []byte{nop, nop}, sackOpt(2)), 12, 28, cat(ts, dssOpt(12, 0xee)), 1},
		{"SACK without TS", cat([]byte{nop, nop}, sackOpt(4)), 28, 40, dssOpt(28, 0xee), 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tl := newTestLayer(t)
			f := &fakeFlow{out: func(_ int, seg *Segment) ([]byte, int) { return dssOpt(tc.mp, 0xee), seg.PayloadLen }}
			tl.mux.Register(tup4, f)
			in := rawSeg{t: tup4, seq: 1, ack: 2, flags: header.TCPFlagAck, wnd: 3, opts: tc.opts, payload: payloadOf(100)}
			out := tl.send(t, in)
			require.Len(t, out, 1)
			w := parseWire(t, out[0])
			got := []byte(w.tcp.Options())
			require.Equal(t, tc.wantOpts, got[:len(tc.wantOpts)])
			require.Equal(t, in.payload, w.payload)
			require.Equal(t, tc.wantRoom, f.outs[0].room)
			require.Equal(t, tc.wantTrims, tl.mux.Stats.SACKTrimmed.Load())
			require.Zero(t, tl.mux.Stats.NoRoomForOptions.Load())
		})
	}
}

func TestLayerInbound(t *testing.T) {
	ts := cat([]byte{nop, nop}, tsOpt(1, 2))
	corrupt := func(b []byte) []byte { b[len(b)-1] ^= 0x40; return b }
	// Link-layer padding beyond the IP length (short Ethernet frames) is
	// not part of the segment.
	pad := func(b []byte) []byte { return append(b, 0xde, 0xad, 0xbe, 0xef, 0x01) }
	// Zero the TCP checksum and put the missing sum into two bytes of
	// padding: summed to the end of the buffer it would look valid.
	sumInPadding := func(b []byte) []byte {
		th := header.TCP(b[len(b)-len(payloadOf(300))-header.TCPMinimumSize-20:])
		c := th.Checksum()
		th.SetChecksum(0)
		return append(b, byte(c>>8), byte(c))
	}
	for _, tc := range []struct {
		name       string
		t          Tuple // our side
		register   bool
		accept     bool
		flags      header.TCPFlags
		mangle     func([]byte) []byte
		wantFlow   bool
		wantUp     bool
		wantBadSum uint64
	}{
		{"v4 valid to flow", tup4, true, true, header.TCPFlagAck, nil, true, true, 0},
		{"v6 valid to flow", tup6, true, true, header.TCPFlagAck, nil, true, true, 0},
		{"flow drops it", tup4, true, false, header.TCPFlagAck, nil, true, false, 0},
		{"v4 bad checksum dropped", tup4, true, true, header.TCPFlagAck, corrupt, false, false, 1},
		{"v6 bad checksum dropped", tup6, true, true, header.TCPFlagAck, corrupt, false, false, 1},
		{"truncated packet dropped", tup4, true, true, header.TCPFlagAck, func(b []byte) []byte { return b[:len(b)-10] }, false, false, 1},
		{"v4 link padding trimmed", tup4, true, true, header.TCPFlagAck, pad, true, true, 0},
		{"v6 link padding trimmed", tup6, true, true, header.TCPFlagAck, pad, true, true, 0},
		{"v4 padding cannot validate a bad checksum", tup4, true, true, header.TCPFlagAck, sumInPadding, false, false, 1},
		{"v6 padding cannot validate a bad checksum", tup6, true, true, header.TCPFlagAck, sumInPadding, false, false, 1},
		{"unregistered passes through", tup4, false, true, header.TCPFlagAck, nil, false, true, 0},
		{"unregistered bad checksum left to gVisor", tup6, false, true, header.TCPFlagAck, corrupt, false, true, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tl := newTestLayer(t)
			f := &fakeFlow{accept: tc.accept}
			if tc.register {
				tl.mux.Register(tc.t, f)
			}
			r := rawSeg{t: tc.t.Reverse(), seq: 5000, ack: 6000, flags: tc.flags, wnd: 700, opts: cat(ts, dssOpt(8, 1)), payload: payloadOf(300)}
			b := r.bytes()
			if tc.mangle != nil {
				b = tc.mangle(b)
			}
			tl.receive(b)
			in := f.incoming()
			if tc.wantFlow {
				require.Len(t, in, 1)
				s := in[0]
				require.EqualValues(t, 5000, s.seq)
				require.EqualValues(t, 6000, s.ack)
				require.EqualValues(t, 700, s.wnd)
				require.Equal(t, tc.flags, s.flags)
				require.Equal(t, cat(ts, dssOpt(8, 1)), s.opts)
				require.Equal(t, 300, s.payloadLen)
				require.Equal(t, checksum.Checksum(r.payload, 0), s.payloadSum)
				require.Same(t, tl.l, s.via)
			} else {
				require.Empty(t, in)
			}
			up := tl.disp.delivered()
			if tc.wantUp {
				require.Len(t, up, 1)
				want := b
				if tc.register {
					want = r.bytes() // trimmed to the IP length
				}
				require.Equal(t, want, up[0], "delivered unchanged")
			} else {
				require.Empty(t, up)
				require.EqualValues(t, 1, tl.mux.Stats.DroppedIn.Load())
			}
			require.Equal(t, tc.wantBadSum, tl.mux.Stats.BadChecksumIn.Load())
		})
	}
}

// acceptFunc adapts a function to Acceptor.
type acceptFunc func(seg *Segment) (Flow, bool)

func (a acceptFunc) SYN(seg *Segment) (Flow, bool) { return a(seg) }

func TestLayerAcceptor(t *testing.T) {
	for _, tc := range []struct {
		name     string
		port     uint16
		flags    header.TCPFlags
		giveFlow bool
		drop     bool
		wantSYN  int
		wantUp   int
		wantFlow int // segments the registered flow saw (SYN excluded)
	}{
		{"SYN registers flow", 80, header.TCPFlagSyn, true, false, 1, 2, 1},
		{"SYN refused", 80, header.TCPFlagSyn, false, true, 1, 1, 0},
		{"SYN left to gVisor", 80, header.TCPFlagSyn, false, false, 1, 2, 0},
		{"other port ignored", 81, header.TCPFlagSyn, true, false, 0, 2, 0},
		{"SYN-ACK not an accept", 80, header.TCPFlagSyn | header.TCPFlagAck, true, false, 0, 2, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tl := newTestLayer(t)
			f := &fakeFlow{accept: true}
			syns := 0
			tl.mux.SetAcceptor(80, acceptFunc(func(seg *Segment) (Flow, bool) {
				syns++
				require.True(t, seg.SYN())
				if tc.giveFlow {
					return f, tc.drop
				}
				return nil, tc.drop
			}))
			local := netip.AddrPortFrom(tup4.Local.Addr(), tc.port)
			peer := Tuple{Local: tup4.Remote, Remote: local}
			tl.receive(rawSeg{t: peer, seq: 1, flags: tc.flags, wnd: 100, opts: []byte{header.TCPOptionMSS, 4, 5, 0xb4}}.bytes())
			tl.receive(rawSeg{t: peer, seq: 2, ack: 9, flags: header.TCPFlagAck, wnd: 100, payload: payloadOf(10)}.bytes())
			require.Equal(t, tc.wantSYN, syns)
			require.Len(t, tl.disp.delivered(), tc.wantUp)
			require.Len(t, f.incoming(), tc.wantFlow)
			tl.mux.SetAcceptor(80, nil)
			tl.receive(rawSeg{t: Tuple{Local: netip.MustParseAddrPort("10.9.9.9:1"), Remote: netip.AddrPortFrom(tup4.Local.Addr(), 80)}, seq: 1, flags: header.TCPFlagSyn}.bytes())
			require.Equal(t, tc.wantSYN, syns, "acceptor removed")
		})
	}
}

func TestLayerPassThroughOut(t *testing.T) {
	tl := newTestLayer(t)
	f := &fakeFlow{out: func(int, *Segment) ([]byte, int) { return dssOpt(20, 1), 0 }}
	tl.mux.Register(tup6, f) // another flow: must not touch ours
	r := rawSeg{t: tup4, seq: 10, ack: 20, flags: header.TCPFlagAck | header.TCPFlagPsh, wnd: 30, opts: cat([]byte{nop, nop}, tsOpt(1, 1)), payload: payloadOf(99)}
	out := tl.send(t, r)
	require.Len(t, out, 1)
	require.Equal(t, r.bytes(), out[0])
	require.Empty(t, f.outs)
	require.EqualValues(t, 1, tl.mux.Stats.PassThroughOut.Load())
	require.Zero(t, tl.mux.Stats.SegmentsOut.Load())

	// After Unregister the flow's own segments pass through too.
	tl.mux.Register(tup4, f)
	tl.mux.Unregister(tup4)
	out = tl.send(t, r)
	require.Equal(t, [][]byte{r.bytes()}, out)
	require.Empty(t, f.outs)
}

func TestSendControl(t *testing.T) {
	ts := cat([]byte{nop, nop}, tsOpt(0xaabbcc01, 0x01))
	for _, tc := range []struct {
		name    string
		t       Tuple
		segs    []rawSeg // sent by gVisor before the control segment
		rst     bool
		opts    []byte
		wantSeq uint32
		wantAck uint32
		wantWnd uint16
		wantTS  bool
	}{
		{"ACK after data", tup4, []rawSeg{{seq: 1000, ack: 50, flags: header.TCPFlagAck | header.TCPFlagPsh, wnd: 900, opts: ts, payload: payloadOf(100)}},
			false, dssOpt(12, 7), 1100, 50, 900, true},
		{"v6 ACK after SYN", tup6, []rawSeg{{seq: 0xffffffff, flags: header.TCPFlagSyn, wnd: 65535, opts: ts}},
			false, dssOpt(8, 7), 0, 0, 0, true},
		{"retransmission does not move snd.nxt back", tup4, []rawSeg{
			{seq: 1000, ack: 50, flags: header.TCPFlagAck, wnd: 900, opts: ts, payload: payloadOf(100)},
			{seq: 1100, ack: 60, flags: header.TCPFlagAck, wnd: 800, opts: ts, payload: payloadOf(100)},
			{seq: 1000, ack: 70, flags: header.TCPFlagAck, wnd: 700, opts: ts, payload: payloadOf(100)},
		}, false, dssOpt(12, 7), 1200, 70, 700, true},
		{"FIN counts", tup4, []rawSeg{{seq: 1, ack: 2, flags: header.TCPFlagAck | header.TCPFlagFin, wnd: 3, opts: ts, payload: payloadOf(9)}},
			false, nil, 11, 2, 3, true},
		{"no TS without TS", tup4, []rawSeg{{seq: 1, ack: 2, flags: header.TCPFlagAck, wnd: 3, payload: payloadOf(9)}},
			false, dssOpt(28, 1), 10, 2, 3, false},
		{"RST carries no TS", tup6, []rawSeg{{seq: 1000, ack: 50, flags: header.TCPFlagAck, wnd: 900, opts: ts, payload: payloadOf(10)}},
			true, []byte{30, 4, 0x70, 0x01}, 1010, 50, 900, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tl := newTestLayer(t)
			tl.mux.Register(tc.t, &fakeFlow{})
			for _, s := range tc.segs {
				s.t = tc.t
				require.Len(t, tl.send(t, s), 1)
			}
			var err error
			if tc.rst {
				err = tl.mux.SendRST(tc.t, tc.opts)
			} else {
				err = tl.mux.SendACK(tc.t, tc.opts)
			}
			require.NoError(t, err)
			out := readOut(tl.ch)
			require.Len(t, out, 1)
			w := parseWire(t, out[0])
			require.Equal(t, tcpipAddr(tc.t.Local.Addr()), w.src)
			require.Equal(t, tcpipAddr(tc.t.Remote.Addr()), w.dst)
			require.Equal(t, tc.t.Local.Port(), w.tcp.SourcePort())
			require.Equal(t, tc.t.Remote.Port(), w.tcp.DestinationPort())
			require.Equal(t, tc.wantSeq, w.tcp.SequenceNumber())
			require.Equal(t, tc.wantAck, w.tcp.AckNumber())
			require.Equal(t, tc.wantWnd, w.tcp.WindowSize())
			wantFlags := header.TCPFlagAck
			if tc.rst {
				wantFlags |= header.TCPFlagRst
			}
			require.Equal(t, wantFlags, w.tcp.Flags())
			require.Empty(t, w.payload)
			want := tc.opts
			if tc.wantTS {
				want = cat(ts, tc.opts)
			}
			got := []byte(w.tcp.Options())
			require.Equal(t, want, got[:len(want)])
			info := ParseTCPOptions(got)
			require.Equal(t, tc.wantTS, info.HasTS)
			require.EqualValues(t, 1, tl.mux.Stats.ControlSent.Load())
		})
	}
}

func TestSendControlErrors(t *testing.T) {
	tl := newTestLayer(t)
	require.Error(t, tl.mux.SendACK(tup4, nil), "unregistered flow")
	tl.mux.Register(tup4, &fakeFlow{})
	require.Error(t, tl.mux.SendACK(tup4, nil), "nothing sent yet")
	require.Len(t, tl.send(t, rawSeg{t: tup4, seq: 1, flags: header.TCPFlagAck, opts: cat([]byte{nop, nop}, tsOpt(1, 2))}), 1)
	require.Error(t, tl.mux.SendACK(tup4, make([]byte, 29)), "TS + 29 bytes exceed 40")
	require.NoError(t, tl.mux.SendACK(tup4, dssOpt(28, 0)))
	require.Len(t, readOut(tl.ch), 1)
}

// withIPv4Options inserts n bytes of IPv4 NOP options into a v4 packet.
func withIPv4Options(b []byte, n int) []byte {
	out := append([]byte{}, b[:header.IPv4MinimumSize]...)
	for range n {
		out = append(out, 1) // IPOPT_NOP
	}
	out = append(out, b[header.IPv4MinimumSize:]...)
	ip := header.IPv4(out)
	ip.SetHeaderLength(uint8(header.IPv4MinimumSize + n))
	ip.SetTotalLength(uint16(len(out)))
	ip.SetChecksum(0)
	ip.SetChecksum(^ip.CalculateChecksum())
	return out
}

// A segment of a registered flow must reach the flow whatever its header
// sizes: if it slipped past, gVisor would deliver bytes without a mapping.
func TestLayerInboundLongHeaders(t *testing.T) {
	ts := cat([]byte{nop, nop}, tsOpt(1, 2))
	for _, tc := range []struct {
		name   string
		ipOpts int
		tcpOpt []byte
	}{
		{"no IP options, 40 bytes of TCP options", 0, cat(ts, dssOpt(28, 3))},
		{"20 bytes of IP options, 40 of TCP", 20, cat(ts, dssOpt(28, 3))},
		{"40 bytes of IP options, 40 of TCP", 40, cat(ts, dssOpt(28, 3))},
		{"40 bytes of IP options, 12 of TCP", 40, ts},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tl := newTestLayer(t)
			f := &fakeFlow{accept: true}
			tl.mux.Register(tup4, f)
			r := rawSeg{t: tup4.Reverse(), seq: 10, ack: 20, flags: header.TCPFlagAck, wnd: 30, opts: tc.tcpOpt, payload: payloadOf(50)}
			b := withIPv4Options(r.bytes(), tc.ipOpts)
			require.True(t, tcpSumOK(b))
			tl.receive(b)
			in := f.incoming()
			require.Len(t, in, 1, "the flow sees the segment")
			require.Equal(t, tc.tcpOpt, in[0].opts)
			require.Equal(t, 50, in[0].payloadLen)
			require.Len(t, tl.disp.delivered(), 1)
		})
	}
}

// panicFlow panics on every segment, as a flow with a bug would.
type panicFlow struct{}

func (panicFlow) Incoming(*Segment) bool               { panic("flow bug in Incoming") }
func (panicFlow) Outgoing(*Segment, []byte) (int, int) { panic("flow bug in Outgoing") }

func TestLayerContainsFlowPanics(t *testing.T) {
	for _, tc := range []struct {
		name string
		run  func(t *testing.T, tl *testLayer)
	}{
		{"incoming", func(t *testing.T, tl *testLayer) {
			tl.mux.Register(tup4, panicFlow{})
			tl.receive(rawSeg{t: tup4.Reverse(), seq: 2, ack: 9, flags: header.TCPFlagAck, wnd: 100, payload: payloadOf(10)}.bytes())
		}},
		{"outgoing", func(t *testing.T, tl *testLayer) {
			tl.mux.Register(tup4, panicFlow{})
			out := tl.send(t, rawSeg{t: tup4, seq: 2, ack: 9, flags: header.TCPFlagAck, wnd: 100, payload: payloadOf(10)})
			require.Len(t, out, 1, "the segment leaves as plain TCP")
		}},
		{"acceptor", func(t *testing.T, tl *testLayer) {
			tl.mux.SetAcceptor(tup4.Local.Port(), acceptFunc(func(*Segment) (Flow, bool) { panic("acceptor bug") }))
			tl.receive(rawSeg{t: tup4.Reverse(), seq: 1, flags: header.TCPFlagSyn, wnd: 100}.bytes())
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tl := newTestLayer(t)
			type report struct {
				t     Tuple
				v     any
				stack []byte
			}
			got := make(chan report, 1)
			tl.mux.SetPanicHandler(func(tu Tuple, _ Flow, v any, st []byte) { got <- report{tu, v, st} })
			tc.run(t, tl)
			require.Empty(t, tl.disp.delivered(), "a segment whose flow panicked is dropped")
			require.EqualValues(t, 1, tl.mux.Stats.FlowPanics.Load())
			select {
			case r := <-got:
				require.Equal(t, tup4, r.t)
				require.Contains(t, fmt.Sprint(r.v), "bug")
				require.Contains(t, string(r.stack), "TestLayerContainsFlowPanics", "the stack shows where it panicked")
			case <-time.After(5 * time.Second):
				t.Fatal("panic handler not called")
			}
			require.Nil(t, tl.mux.lookup(tup4), "the flow is unregistered")
			// The layer goes on serving other flows.
			other := &fakeFlow{accept: true}
			tl.mux.Register(tup6, other)
			tl.receive(rawSeg{t: tup6.Reverse(), seq: 2, ack: 9, flags: header.TCPFlagAck, wnd: 100, payload: payloadOf(10)}.bytes())
			require.Len(t, other.incoming(), 1)
		})
	}
}
