package netstack

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

func TestMuxAcceptor(t *testing.T) {
	t.Parallel()
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

func TestMuxSendControl(t *testing.T) {
	t.Parallel()
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

func TestMuxSendControlErrors(t *testing.T) {
	t.Parallel()
	tl := newTestLayer(t)
	require.Error(t, tl.mux.SendACK(tup4, nil), "unregistered flow")
	tl.mux.Register(tup4, &fakeFlow{})
	require.Error(t, tl.mux.SendACK(tup4, nil), "nothing sent yet")
	require.Len(t, tl.send(t, rawSeg{t: tup4, seq: 1, flags: header.TCPFlagAck, opts: cat([]byte{nop, nop}, tsOpt(1, 2))}), 1)
	require.Error(t, tl.mux.SendACK(tup4, make([]byte, 29)), "TS + 29 bytes exceed 40")
	require.NoError(t, tl.mux.SendACK(tup4, dssOpt(28, 0)))
	require.Len(t, readOut(tl.ch), 1)
}

// panicFlow panics on every segment, as a flow with a bug would.
type panicFlow struct{}

func (panicFlow) Incoming(*Segment) bool { panic("flow bug in Incoming") }

func (panicFlow) Outgoing(*Segment, []byte) (int, int) { panic("flow bug in Outgoing") }

func TestMuxContainsFlowPanics(t *testing.T) {
	t.Parallel()
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
				require.Contains(t, string(r.stack), "TestMuxContainsFlowPanics", "the stack shows where it panicked")
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
