package netstack

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// sendRoom writes pkt through the layer and returns the bytes that came
// out and whether the layer rewrote gVisor's packet in place.
func (tl *testLayer) sendRoom(t *testing.T, pkt *stack.PacketBuffer) ([]byte, bool) {
	t.Helper()
	defer pkt.DecRef()
	before := tl.mux.Stats.RewrittenInPlace.Load()
	var list stack.PacketBufferList
	list.PushBack(pkt)
	n, err := tl.l.WritePackets(list)
	require.Nil(t, err)
	require.Equal(t, 1, n)
	got := tl.ch.Read()
	require.NotNil(t, got)
	require.Nil(t, tl.ch.Read(), "one packet out")
	same := tl.mux.Stats.RewrittenInPlace.Load() == before+1
	buf := got.ToBuffer()
	defer buf.Release()
	got.DecRef()
	return buf.Flatten(), same
}

// normalized zeroes what may differ between a rebuilt and an in-place
// segment of a wire segment whose checksums were verified: the TCP
// checksum (the in-place update may yield the other ones'-complement
// zero), and the IPv4 flags and checksum (a rebuilt header sets DF, the
// in-place one keeps gVisor's).
func normalized(b []byte) []byte {
	b = append([]byte{}, b...)
	ipLen := header.IPv6MinimumSize
	if b[0]>>4 == 4 {
		ipLen = header.IPv4MinimumSize
		clear(b[6:8])   // flags, fragment offset
		clear(b[10:12]) // header checksum
	}
	header.TCP(b[ipLen:]).SetChecksum(0)
	return b
}

// TestLayerInPlace checks that rewriting gVisor's packet in place yields
// the same segment as rebuilding it, with valid checksums.
func TestLayerInPlace(t *testing.T) {
	t.Parallel()
	ts := cat([]byte{nop, nop}, tsOpt(0x01000001, 0x42424201))
	for _, tc := range []struct {
		name    string
		t       Tuple
		opts    []byte
		mp      []byte
		payload int
		room    int
		inPlace bool
		shrink  bool // the new option block is shorter: NOP padded in place
	}{
		{"v4 TS + DSS", tup4, ts, dssOpt(20, 0xab), 1400, maxTCPOptions, true, false},
		{"v6 TS + DSS", tup6, ts, dssOpt(28, 0x01), 1380, maxTCPOptions, true, false},
		{"v4 odd payload, odd option", tup4, ts, dssOpt(7, 0x01), 333, maxTCPOptions, true, false},
		{"v6 pure ACK", tup6, ts, dssOpt(8, 0x00), 0, maxTCPOptions, true, false},
		{"v4 one byte", tup4, nil, dssOpt(20, 0xff), 1, maxTCPOptions, true, false},
		{"v4 nothing to add", tup4, ts, nil, 100, 0, true, false},
		{"v4 SACK trimmed: options shrink, NOP padded", tup4, cat(ts, []byte{nop, nop}, sackOpt(3)), dssOpt(12, 0xee), 900, 0, true, true},
		{"v4 no headroom: rebuilt", tup4, ts, dssOpt(20, 0xab), 1400, 0, false, false},
		{"v6 too little headroom: rebuilt", tup6, ts, dssOpt(28, 0xab), 1400, 20, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tl := newTestLayer(t)
			tl.mux.Register(tc.t, &fakeFlow{out: func(_ int, seg *Segment) ([]byte, int) { return tc.mp, seg.PayloadLen }})
			in := rawSeg{t: tc.t, seq: 1000, ack: 77, flags: header.TCPFlagAck | header.TCPFlagPsh, wnd: 512, opts: tc.opts, payload: payloadOf(tc.payload)}
			got, same := tl.sendRoom(t, in.outPacketRoom(tc.room))
			require.Equal(t, tc.inPlace, same, "rewritten in place")
			w := parseWire(t, got)
			require.Equal(t, in.payload, w.payload)
			if tc.shrink {
				want := cat(compactOptions(nil, tc.opts, true), tc.mp)
				opts := w.tcp.Options()
				require.Len(t, opts, len(tc.opts), "as long as gVisor's block")
				require.Equal(t, want, []byte(opts[:len(want)]))
				for _, p := range opts[len(want):] {
					require.EqualValues(t, nop, p)
				}
				return
			}
			want, same := tl.sendRoom(t, in.outPacket())
			require.False(t, same && len(tc.mp) > 0, "without headroom the packet is rebuilt")
			parseWire(t, want)
			require.Equal(t, normalized(want), normalized(got))
		})
	}
}

// TestLayerInPlaceRandom compares both paths on random segments: the
// incremental checksum must be right for any payload and option block.
func TestLayerInPlaceRandom(t *testing.T) {
	t.Parallel()
	rng := rand.New(rand.NewPCG(1, 2))
	tl := newTestLayer(t)
	for i := range 300 {
		tup := tup4
		if i%2 == 1 {
			tup = tup6
		}
		opts := cat([]byte{nop, nop}, tsOpt(rng.Uint32(), rng.Uint32()))
		if rng.IntN(3) == 0 {
			opts = cat(opts, []byte{nop, nop}, sackOpt(1+rng.IntN(3)))
		}
		mp := dssOpt(4+rng.IntN(25), byte(rng.Uint32()))
		payload := make([]byte, rng.IntN(1461))
		for k := range payload {
			payload[k] = byte(rng.Uint32())
		}
		if rng.IntN(4) == 0 {
			clear(payload) // an all-zero payload sums to zero
		}
		tl.mux.Register(tup, &fakeFlow{out: func(_ int, seg *Segment) ([]byte, int) { return mp, seg.PayloadLen }})
		in := rawSeg{t: tup, seq: rng.Uint32(), ack: rng.Uint32(), flags: header.TCPFlagAck, wnd: uint16(rng.Uint32()), opts: opts, payload: payload}
		got, same := tl.sendRoom(t, in.outPacketRoom(maxTCPOptions))
		require.True(t, same, "case %d in place", i)
		parseWire(t, got)
		if len(compactOptions(nil, opts, false))+len(mp) > maxTCPOptions {
			continue // SACK trimmed: checked by TestLayerInPlace
		}
		want, _ := tl.sendRoom(t, in.outPacket())
		require.Equal(t, normalized(want), normalized(got), "case %d", i)
	}
}

// BenchmarkLayerOutbound is the option layer's cost per full-size segment
// (headers rewritten in place, checksum updated incrementally).
func BenchmarkLayerOutbound(b *testing.B) {
	tl := newTestLayer(b)
	mp := dssOpt(20, 0xab)
	tl.mux.Register(tup4, constFlow(mp))
	in := rawSeg{t: tup4, seq: 1000, ack: 77, flags: header.TCPFlagAck, wnd: 512, opts: cat([]byte{nop, nop}, tsOpt(1, 2)), payload: payloadOf(1400)}
	b.SetBytes(1400)
	b.ReportAllocs()
	for b.Loop() {
		pkt := in.outPacketRoom(maxTCPOptions)
		var list stack.PacketBufferList
		list.PushBack(pkt)
		if _, err := tl.l.WritePackets(list); err != nil {
			b.Fatal(err)
		}
		pkt.DecRef()
		tl.ch.Read().DecRef()
	}
}

// constFlow writes the same options on every segment and records nothing.
type constFlow []byte

func (constFlow) Incoming(*Segment) bool { return true }

func (f constFlow) Outgoing(seg *Segment, opt []byte) (int, int) {
	return copy(opt, f), seg.PayloadLen
}

// sendEarly is what gVisor's NIC does with a packet: AddHeader on the
// sending goroutine, then (after the qdisc) WritePackets. It returns the
// bytes that came out.
func (tl *testLayer) sendEarly(t *testing.T, pkt *stack.PacketBuffer) [][]byte {
	t.Helper()
	defer pkt.DecRef()
	tl.l.AddHeader(pkt)
	var list stack.PacketBufferList
	list.PushBack(pkt)
	n, err := tl.l.WritePackets(list)
	require.Nil(t, err)
	require.Equal(t, 1, n)
	require.Nil(t, pkt.Owner, "the handled mark does not leave the layer")
	return readOut(tl.ch)
}

// TestLayerAddHeader checks the rewrite done in AddHeader, before the
// qdisc: the common segment is finished there (the flow is asked once, the
// bytes are those of the WritePackets path); a segment that needs a split
// is left to WritePackets, which asks the flow again and splits it.
func TestLayerAddHeader(t *testing.T) {
	t.Parallel()
	ts := cat([]byte{nop, nop}, tsOpt(0x01000001, 0x42424201))
	seq := uint32(0x7000_0000)
	t.Run("in place", func(t *testing.T) {
		for _, tup := range []Tuple{tup4, tup6} {
			tl := newTestLayer(t)
			f := &fakeFlow{out: func(_ int, seg *Segment) ([]byte, int) { return dssOpt(20, 0xab), seg.PayloadLen }}
			tl.mux.Register(tup, f)
			in := rawSeg{t: tup, seq: seq, ack: 77, flags: header.TCPFlagAck | header.TCPFlagPsh, wnd: 512, opts: ts, payload: payloadOf(1400)}
			got := tl.sendEarly(t, in.outPacketRoom(maxTCPOptions))
			require.Len(t, got, 1)
			require.Len(t, f.outs, 1, "the flow is asked once")
			require.EqualValues(t, 1, tl.mux.Stats.RewrittenInPlace.Load())
			require.EqualValues(t, 1, tl.mux.Stats.SegmentsOut.Load())
			w := parseWire(t, got[0])
			require.Equal(t, in.payload, w.payload)
			want, _ := tl.sendRoom(t, in.outPacket())
			require.Equal(t, normalized(want), normalized(got[0]))
		}
	})
	t.Run("split left to WritePackets", func(t *testing.T) {
		tl := newTestLayer(t)
		// Answers by sequence number, as the engine does: the same segment
		// gets the same answer however often it is asked.
		f := &fakeFlow{out: func(_ int, seg *Segment) ([]byte, int) {
			if seg.Seq == seq {
				return dssOpt(20, 1), 600
			}
			return dssOpt(20, 2), seg.PayloadLen
		}}
		tl.mux.Register(tup4, f)
		in := rawSeg{t: tup4, seq: seq, ack: 77, flags: header.TCPFlagAck | header.TCPFlagPsh, wnd: 512, opts: ts, payload: payloadOf(1400)}
		got := tl.sendEarly(t, in.outPacketRoom(maxTCPOptions))
		require.Len(t, got, 2)
		require.Len(t, f.outs, 3, "first piece asked twice, second once")
		require.EqualValues(t, 0, tl.mux.Stats.RewrittenInPlace.Load())
		require.EqualValues(t, 1, tl.mux.Stats.SegmentsSplit.Load())
		off := 0
		for i, b := range got {
			w := parseWire(t, b)
			require.Equal(t, seq+uint32(off), w.tcp.SequenceNumber())
			require.Equal(t, cat(ts, dssOpt(20, byte(i+1))), []byte(w.tcp.Options()))
			off += len(w.payload)
		}
		require.Equal(t, 1400, off)
	})
	t.Run("not ours and owned packets pass", func(t *testing.T) {
		tl := newTestLayer(t)
		in := rawSeg{t: tup4, seq: seq, ack: 77, flags: header.TCPFlagAck, wnd: 512, opts: ts, payload: payloadOf(100)}
		got := tl.sendEarly(t, in.outPacketRoom(maxTCPOptions))
		require.Len(t, got, 1)
		require.Equal(t, ts, []byte(parseWire(t, got[0]).tcp.Options()))
		require.EqualValues(t, 1, tl.mux.Stats.PassThroughOut.Load(), "looked up once")

		// A packet with an owner is left to WritePackets (the flow is
		// asked there, once).
		f := &fakeFlow{out: func(_ int, seg *Segment) ([]byte, int) { return dssOpt(8, 3), seg.PayloadLen }}
		tl.mux.Register(tup4, f)
		pkt := in.outPacketRoom(maxTCPOptions)
		pkt.Owner = testOwner{}
		tl.l.AddHeader(pkt)
		require.Empty(t, f.outs)
		var list stack.PacketBufferList
		list.PushBack(pkt)
		_, err := tl.l.WritePackets(list)
		require.Nil(t, err)
		pkt.DecRef()
		out := readOut(tl.ch)
		require.Len(t, out, 1)
		require.Len(t, f.outs, 1)
		require.Equal(t, cat(ts, dssOpt(8, 3)), []byte(parseWire(t, out[0]).tcp.Options()))
	})
}

type testOwner struct{}

func (testOwner) KUID() uint32 { return 1 }

func (testOwner) KGID() uint32 { return 1 }
