package netstack

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// walkOptions splits an options block the way a receiver reads it: NOPs
// and whole options up to an EOL or a malformed option. It reports the
// non-NOP options and the bytes consumed.
func walkOptions(b []byte) (opts [][]byte, consumed int, clean bool) {
	i := 0
	for i < len(b) {
		switch b[i] {
		case eol:
			return opts, i, false
		case nop:
			i++
			continue
		}
		if i+1 >= len(b) || b[i+1] < 2 || i+int(b[i+1]) > len(b) {
			return opts, i, false
		}
		opts = append(opts, b[i:i+int(b[i+1])])
		i += int(b[i+1])
	}
	return opts, i, true
}

func fuzzOptionSeeds(f *testing.F) {
	for _, s := range [][]byte{
		nil,
		{nop, nop, eol},
		cat([]byte{nop, nop}, tsOpt(0x01020301, 0x00000001)),
		cat([]byte{nop, nop}, tsOpt(5, 6), []byte{nop, nop}, sackOpt(3)),
		cat([]byte{header.TCPOptionMSS, 4, 5, 0xb4, header.TCPOptionSACKPermitted, 2}, tsOpt(9, 0), []byte{nop, header.TCPOptionWS, 3, 7}),
		cat([]byte{nop, nop}, tsOpt(1, 2), dssOpt(20, 1)),
		{header.TCPOptionTS, 10, 1, 2},
		{30, 0, 1},
		{header.TCPOptionSACK, 1},
	} {
		f.Add(s, false)
		f.Add(s, true)
	}
}

func FuzzParseTCPOptions(f *testing.F) {
	fuzzOptionSeeds(f)
	f.Fuzz(func(t *testing.T, in []byte, _ bool) {
		info := ParseTCPOptions(in)
		require.GreaterOrEqual(t, info.WScale, -1)
		require.LessOrEqual(t, info.WScale, 255)
		opts, _, _ := walkOptions(in)
		if info.HasTS {
			ts := tsOpt(info.TSVal, info.TSEc)
			found := false
			for _, o := range opts {
				found = found || bytes.Equal(o, ts)
			}
			require.True(t, found, "TS %x/%x is an option of the input", info.TSVal, info.TSEc)
		}
		if info.MSS != 0 {
			mss := binary.BigEndian.AppendUint16([]byte{header.TCPOptionMSS, 4}, info.MSS)
			found := false
			for _, o := range opts {
				found = found || bytes.Equal(o, mss)
			}
			require.True(t, found, "MSS %d is an option of the input", info.MSS)
		}
		// Padding and dropped SACK blocks never change what is parsed.
		require.Equal(t, info, ParseTCPOptions(compactOptions(nil, in, false)))
		require.Equal(t, info, ParseTCPOptions(compactOptions(nil, in, true)))
	})
}

func FuzzCompactOptions(f *testing.F) {
	fuzzOptionSeeds(f)
	f.Fuzz(func(t *testing.T, in []byte, dropSACK bool) {
		out := compactOptions(make([]byte, 0, len(in)), in, dropSACK)
		require.LessOrEqual(t, len(out), len(in))
		got, consumed, clean := walkOptions(out)
		require.True(t, clean, "output %x parses to its end", out)
		require.Equal(t, len(out), consumed)
		if len(got) > 0 {
			// No trailing padding: the last real option ends the block (its
			// data may well end in a byte that equals NOP or EOL).
			last := got[len(got)-1]
			require.Same(t, &out[len(out)-len(last)], &last[0], "last option ends the block")
		} else {
			require.Empty(t, out, "no options, no padding")
		}
		// Every option of the output is an option of the input, in order;
		// only SACK blocks may be missing, and only when asked.
		all, _, _ := walkOptions(in)
		var want [][]byte
		for _, o := range all {
			if !dropSACK || o[0] != header.TCPOptionSACK {
				want = append(want, o)
			}
		}
		require.Equal(t, want, got)
		require.Equal(t, out, compactOptions(make([]byte, 0, len(out)), out, dropSACK), "idempotent")
	})
}

func FuzzInbound(f *testing.F) {
	ts := cat([]byte{nop, nop}, tsOpt(1, 2))
	for _, r := range []rawSeg{
		{t: tup4.Reverse(), seq: 1, ack: 2, flags: header.TCPFlagAck, wnd: 3, opts: cat(ts, dssOpt(20, 1)), payload: payloadOf(33)},
		{t: tup6.Reverse(), seq: 1, ack: 2, flags: header.TCPFlagAck | header.TCPFlagFin, wnd: 3, opts: ts, payload: payloadOf(8)},
		{t: Tuple{Local: tup4.Remote, Remote: netip.AddrPortFrom(tup4.Local.Addr(), 80)}, seq: 1, flags: header.TCPFlagSyn, opts: []byte{30, 4, 0x01, 0x81}},
		{t: tup4.Reverse(), seq: 1, ack: 2, flags: header.TCPFlagAck, wnd: 3, opts: cat(ts, []byte{nop, nop}, sackOpt(3))},
	} {
		f.Add(r.bytes())
	}
	f.Add([]byte{0x45})
	f.Add([]byte{0x60, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		tl := newTestLayer(t)
		flows := map[Tuple]*fakeFlow{tup4: {accept: true}, tup6: {accept: true}}
		for tp, fl := range flows {
			tl.mux.Register(tp, fl)
		}
		accepted := &fakeFlow{accept: true}
		syns := 0
		tl.mux.SetAcceptor(80, acceptFunc(func(seg *Segment) (Flow, bool) {
			syns++
			_ = ParseTCPOptions(seg.Options)
			_ = seg.PayloadSum()
			return accepted, seg.PayloadLen > 0
		}))
		tl.receive(b)
		seen := syns + len(accepted.incoming())
		for _, fl := range flows {
			seen += len(fl.incoming())
		}
		if seen > 0 {
			require.True(t, tcpSumOK(b), "a flow saw a segment with a bad checksum")
		}
		require.LessOrEqual(t, len(tl.disp.delivered()), 1)
	})
}
