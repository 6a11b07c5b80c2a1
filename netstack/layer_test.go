package netstack

import (
	"testing"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

func TestLayerMTU(t *testing.T) {
	t.Parallel()
	tl := newTestLayer(t)
	require.EqualValues(t, 1500-OptionBudget, tl.l.MTU())
	require.EqualValues(t, maxTCPOptions, tl.l.MaxHeaderLength())
}

func TestLayerOutgoingAddsOptions(t *testing.T) {
	t.Parallel()
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
	t.Parallel()
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
	t.Parallel()
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
	t.Parallel()
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

func TestLayerPassThroughOut(t *testing.T) {
	t.Parallel()
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

// TestLayerFlowCache checks that the layer's cached flow follows Register
// and Unregister of the same tuple.
func TestLayerFlowCache(t *testing.T) {
	t.Parallel()
	tl := newTestLayer(t)
	in := rawSeg{t: tup4, seq: 1, ack: 2, flags: header.TCPFlagAck, wnd: 3, opts: cat([]byte{nop, nop}, tsOpt(1, 2)), payload: payloadOf(10)}
	a, b := &fakeFlow{}, &fakeFlow{}
	steps := []struct {
		name         string
		do           func()
		wantA, wantB int
		passThrough  uint64
	}{
		{"registered", func() { tl.mux.Register(tup4, a) }, 1, 0, 0},
		{"cached", func() {}, 2, 0, 0},
		{"unregistered", func() { tl.mux.Unregister(tup4) }, 2, 0, 1},
		{"registered again", func() { tl.mux.Register(tup4, a) }, 3, 0, 1},
		{"replaced", func() { tl.mux.Register(tup4, b) }, 3, 1, 1},
	}
	for _, st := range steps {
		st.do()
		tl.send(t, in)
		require.Len(t, a.outs, st.wantA, st.name)
		require.Len(t, b.outs, st.wantB, st.name)
		require.Equal(t, st.passThrough, tl.mux.Stats.PassThroughOut.Load(), st.name)
	}
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
	t.Parallel()
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
