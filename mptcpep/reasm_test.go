package mptcpep

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"
)

// refReasm is a byte-by-byte reference model of reassembly (without the
// segment cap).
type refReasm struct {
	window  int
	have    []bool
	readOff int
	rcvOff  int
	finOff  int // -1: none
}

func newRefReasm(streamLen, window int) *refReasm {
	return &refReasm{window: window, have: make([]bool, streamLen), finOff: -1}
}

// insert returns the bytes newly accepted and whether some were dropped
// beyond the window or the FIN.
func (m *refReasm) insert(off, n int) (added int, dropped bool) {
	for p := off; p < off+n; p++ {
		switch {
		case p < m.rcvOff:
		case p >= m.readOff+m.window || (m.finOff >= 0 && p >= m.finOff):
			dropped = true
		case !m.have[p]:
			m.have[p] = true
			added++
		}
	}
	for m.rcvOff < len(m.have) && m.have[m.rcvOff] {
		m.rcvOff++
	}
	return added, dropped
}

func (m *refReasm) buffered() int {
	n := 0
	for p := m.readOff; p < len(m.have); p++ {
		if m.have[p] {
			n++
		}
	}
	return n
}

func TestReassemblyOrders(t *testing.T) {
	const total = 100_000
	const seg = 1400
	type piece struct{ off, n int }
	inOrder := func() []piece {
		var ps []piece
		for off := 0; off < total; off += seg {
			ps = append(ps, piece{off, min(seg, total-off)})
		}
		return ps
	}
	tests := []struct {
		name   string
		isn    uint64
		pieces func() []piece
	}{
		{"in order", 1000, inOrder},
		{"in order across 2^64", math.MaxUint64 - 50_000, inOrder},
		{"reverse", 42, func() []piece {
			ps := inOrder()
			for i, j := 0, len(ps)-1; i < j; i, j = i+1, j-1 {
				ps[i], ps[j] = ps[j], ps[i]
			}
			return ps
		}},
		{"two subflows interleaved", math.MaxUint64 - 3, func() []piece {
			// Even pieces arrive first on one subflow, odd ones lag.
			ps := inOrder()
			var out []piece
			for i := 0; i < len(ps); i += 2 {
				out = append(out, ps[i])
			}
			for i := 1; i < len(ps); i += 2 {
				out = append(out, ps[i])
			}
			return out
		}},
		{"everything twice and overlapping", 7, func() []piece {
			var out []piece
			for off := 0; off < total; off += 1000 {
				out = append(out, piece{off, min(3000, total-off)})
			}
			return append(out, inOrder()...)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			stream := pattern(0, total)
			r := newReassembly(tt.isn, total)
			accepted := 0
			for _, p := range tt.pieces() {
				n, err := r.Insert(tt.isn+uint64(p.off), stream[p.off:p.off+p.n])
				require.NoError(t, err)
				accepted += n
			}
			require.Equal(t, total, accepted, "every byte accepted exactly once")
			require.Equal(t, tt.isn+total, r.RcvNxt())
			require.Equal(t, total, r.Readable())
			require.Equal(t, total, r.Buffered())
			require.Zero(t, r.OutOfOrder())
			out := make([]byte, total+10)
			require.Equal(t, total, r.Read(out))
			require.Equal(t, stream, out[:total])
			require.Zero(t, r.Readable())
			require.False(t, r.EOF())
		})
	}
}

// TestReassemblyRandom checks random permutations with duplicates,
// overlaps, a small window and interleaved reads against the model.
func TestReassemblyRandom(t *testing.T) {
	for seed := range uint64(40) {
		rng := rand.New(rand.NewPCG(seed, 99))
		total := 1 + rng.IntN(200_000)
		window := 1 + rng.IntN(100_000)
		isn := rng.Uint64()
		if seed%4 == 0 {
			isn = math.MaxUint64 - uint64(rng.IntN(total))
		}
		stream := pattern(0, total)
		r := newReassembly(isn, window)
		m := newRefReasm(total, window)
		var out []byte
		buf := make([]byte, 50_000)
		for step := 0; len(out) < total; step++ {
			require.Less(t, step, 100_000, "seed %d makes no progress", seed)
			if rng.IntN(4) == 0 {
				n := r.Read(buf[:rng.IntN(len(buf))])
				out = append(out, buf[:n]...)
				m.readOff += n
				continue
			}
			// Mostly near rcv_nxt, sometimes old or far ahead.
			off := max(m.rcvOff+rng.IntN(window+3000)-2000, 0)
			if off >= total {
				continue
			}
			n := 1 + rng.IntN(min(5000, total-off))
			wantAdded, wantDrop := m.insert(off, n)
			added, err := r.Insert(isn+uint64(off), stream[off:off+n])
			if wantDrop {
				require.ErrorIs(t, err, ErrBeyondWindow)
			} else {
				require.NoError(t, err)
			}
			require.Equal(t, wantAdded, added, "seed %d insert [%d,+%d)", seed, off, n)
			require.Equal(t, isn+uint64(m.rcvOff), r.RcvNxt())
			require.Equal(t, m.rcvOff-m.readOff, r.Readable())
			require.Equal(t, m.buffered(), r.Buffered())
			require.LessOrEqual(t, r.Buffered(), window)
		}
		require.Equal(t, stream, out, "seed %d", seed)
	}
}

func TestReassemblyWindowEdge(t *testing.T) {
	var isn uint64 = math.MaxUint64 - 10
	stream := pattern(0, 300)
	r := newReassembly(isn, 100)

	// Exactly up to the window edge is accepted.
	n, err := r.Insert(isn+50, stream[50:100])
	require.NoError(t, err)
	require.Equal(t, 50, n)
	// One byte beyond is dropped and counted; the rest kept.
	n, err = r.Insert(isn+90, stream[90:101])
	require.ErrorIs(t, err, ErrBeyondWindow)
	require.Zero(t, n)
	require.Equal(t, uint64(1), r.Stats().WindowDropBytes)
	require.Equal(t, uint64(10), r.Stats().DupBytes)
	// Far beyond, including DSNs that would overflow offsets.
	for _, dsn := range []uint64{isn + 100, isn + 1<<40, isn + 1<<63 - 1} {
		n, err = r.Insert(dsn, stream[:10])
		require.ErrorIs(t, err, ErrBeyondWindow)
		require.Zero(t, n)
	}
	n, err = r.Insert(isn, stream[:50])
	require.NoError(t, err)
	require.Equal(t, 50, n)
	require.Equal(t, 100, r.Readable())

	// The window counts from the read position: nothing more until read.
	n, err = r.Insert(isn+100, stream[100:110])
	require.ErrorIs(t, err, ErrBeyondWindow)
	require.Zero(t, n)
	out := make([]byte, 30)
	require.Equal(t, 30, r.Read(out))
	require.Equal(t, stream[:30], out)
	n, err = r.Insert(isn+100, stream[100:140])
	require.ErrorIs(t, err, ErrBeyondWindow)
	require.Equal(t, 30, n)

	// Old data far below (a huge negative distance) is a duplicate.
	n, err = r.Insert(isn-1<<62, stream[:10])
	require.NoError(t, err)
	require.Zero(t, n)

	require.Equal(t, 100, r.Window())
	_, ok := r.FinDSN()
	require.False(t, ok)
	require.NoError(t, r.SetFin(isn+130))
	fin, ok := r.FinDSN()
	require.True(t, ok)
	require.Equal(t, isn+130, fin)
	require.Equal(t, isn+131, r.RcvNxt(), "FIN right at rcv_nxt is reached at once")
}

func TestReassemblySegmentCap(t *testing.T) {
	r := newReassembly(0, 1<<20)
	r.maxSegs = 3
	one := []byte{1}
	for _, off := range []uint64{10, 20, 30} {
		n, err := r.Insert(off, one)
		require.NoError(t, err)
		require.Equal(t, 1, n)
	}
	// A fourth separate range is dropped.
	n, err := r.Insert(40, one)
	require.ErrorIs(t, err, ErrTooManySegments)
	require.Zero(t, n)
	require.Equal(t, uint64(1), r.Stats().SegmentDrops)
	// Extending or bridging existing ranges, and in-order data, still work.
	n, err = r.Insert(11, one)
	require.NoError(t, err)
	require.Equal(t, 1, n)
	n, err = r.Insert(12, make([]byte, 8))
	require.NoError(t, err)
	require.Equal(t, 8, n)
	require.Equal(t, 2, r.OutOfOrder(), "[10,21) and [30,31)")
	n, err = r.Insert(0, make([]byte, 10))
	require.NoError(t, err)
	require.Equal(t, 10, n)
	require.Equal(t, uint64(21), r.RcvNxt())
	require.Equal(t, 1, r.OutOfOrder())
	require.Equal(t, 22, r.Buffered())
}

func TestReassemblyFin(t *testing.T) {
	const isn = 1 << 40
	stream := pattern(0, 100)
	type step struct {
		finAt   int    // -1: Insert; otherwise SetFin(isn+finAt)
		off, n  int    // Insert
		wantErr error  // from either
		wantN   int    // Insert's accepted bytes
		rcvNxt  uint64 // after the step, relative to isn
		eofRead bool   // read all, then expect EOF
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"fin after data", []step{
			{finAt: -1, off: 0, n: 100, wantN: 100, rcvNxt: 100},
			{finAt: 100, rcvNxt: 101, eofRead: true},
			{finAt: 100, rcvNxt: 101, eofRead: true},
		}},
		{"fin before data arrives", []step{
			{finAt: 100, rcvNxt: 0},
			{finAt: -1, off: 50, n: 50, wantN: 50, rcvNxt: 0},
			{finAt: -1, off: 0, n: 50, wantN: 50, rcvNxt: 101, eofRead: true},
		}},
		{"fin on empty stream", []step{
			{finAt: 0, rcvNxt: 1, eofRead: true},
			{finAt: -1, off: 0, n: 10, wantErr: ErrDataAfterFin, rcvNxt: 1, eofRead: true},
		}},
		{"data beyond fin is dropped", []step{
			{finAt: 60, rcvNxt: 0},
			{finAt: -1, off: 0, n: 100, wantErr: ErrDataAfterFin, wantN: 60, rcvNxt: 61, eofRead: true},
		}},
		{"conflicting second fin", []step{
			{finAt: 60},
			{finAt: 61, wantErr: ErrFinConflict},
		}},
		{"fin below received data", []step{
			{finAt: -1, off: 0, n: 50, wantN: 50, rcvNxt: 50},
			{finAt: 49, wantErr: ErrFinConflict, rcvNxt: 50},
		}},
		{"fin below out-of-order data", []step{
			{finAt: -1, off: 70, n: 10, wantN: 10},
			{finAt: 75, wantErr: ErrFinConflict},
			{finAt: 80},
		}},
		{"fin beyond window", []step{
			{finAt: 1001, wantErr: ErrBeyondWindow},
			{finAt: 1000},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newReassembly(isn, 1000)
			for i, s := range tt.steps {
				var err error
				if s.finAt >= 0 {
					err = r.SetFin(isn + uint64(s.finAt))
				} else {
					var n int
					n, err = r.Insert(isn+uint64(s.off), stream[s.off:s.off+s.n])
					require.Equal(t, s.wantN, n, "step %d", i)
				}
				if s.wantErr != nil {
					require.ErrorIs(t, err, s.wantErr, "step %d", i)
				} else {
					require.NoError(t, err, "step %d", i)
				}
				require.Equal(t, isn+s.rcvNxt, r.RcvNxt(), "step %d", i)
				if s.eofRead {
					r.Read(make([]byte, 200))
					require.True(t, r.EOF(), "step %d", i)
				} else {
					require.False(t, r.EOF(), "step %d", i)
				}
			}
		})
	}
}

func TestReassemblyMemoryBounded(t *testing.T) {
	const window = 256 << 10
	r := newReassembly(0, window)
	rng := rand.New(rand.NewPCG(3, 4))
	data := make([]byte, 1400)
	// A hostile peer: single bytes all over the window, never in order.
	for range 50_000 {
		_, _ = r.Insert(1+uint64(rng.IntN(1<<30)), data[:1])
		_, _ = r.Insert(1+uint64(rng.IntN(window)), data[:1+rng.IntN(len(data))])
	}
	require.LessOrEqual(t, r.OutOfOrder(), reasmMaxSegments)
	require.LessOrEqual(t, r.Buffered(), window)
	blocks := 0
	for _, b := range r.slots {
		if b != nil {
			blocks++
		}
	}
	require.LessOrEqual(t, blocks*reasmBlockSize, window+reasmBlockSize)

	// Trim on an empty buffer releases every block.
	r2 := newReassembly(0, window)
	_, err := r2.Insert(0, data)
	require.NoError(t, err)
	require.Equal(t, len(data), r2.Read(make([]byte, 2000)))
	r2.Trim()
	for _, b := range r2.slots {
		require.Nil(t, b)
	}
	require.Empty(t, r2.spare)
}

func TestReassemblyPeekDiscard(t *testing.T) {
	stream := pattern(0, 3*reasmBlockSize)
	r := newReassembly(5, len(stream))
	require.Nil(t, r.Peek())
	_, err := r.Insert(5+100, stream[100:])
	require.NoError(t, err)
	require.Nil(t, r.Peek(), "out-of-order data is not readable")
	_, err = r.Insert(5, stream[:100])
	require.NoError(t, err)
	p := r.Peek()
	require.Len(t, p, reasmBlockSize, "contiguous up to a block boundary")
	require.Equal(t, stream[:reasmBlockSize], p)
	require.Equal(t, 10, r.Discard(10))
	require.Equal(t, stream[10:reasmBlockSize], r.Peek())
	require.Equal(t, len(stream)-10, r.Discard(math.MaxInt))
	require.Zero(t, r.Discard(1))
}

// FuzzReassembly runs a script of inserts, reads and DATA_FINs against the
// reference model: the output must equal the stream, and Insert's results
// must match the model.
func FuzzReassembly(f *testing.F) {
	f.Add([]byte{0, 0, 0, 10, 0, 0, 10, 10, 2, 255, 0, 0})
	f.Add([]byte{0, 0, 50, 40, 0, 0, 0, 60, 1, 0, 100, 0, 2, 200, 0, 0})
	f.Add([]byte{3, 1, 0, 0, 0, 0, 200, 255, 0, 0, 0, 255, 2, 255, 0, 0})
	f.Add([]byte{1, 0, 40, 20, 3, 1, 30, 10, 3, 1, 200, 255, 2, 255, 0, 0, 3, 1, 255, 255})
	f.Fuzz(func(t *testing.T, script []byte) {
		const total = 4096
		const window = 1500
		isn := math.MaxUint64 - 1000 + uint64(len(script))
		stream := pattern(0, total)
		r := newReassembly(isn, window)
		r.maxSegs = 16
		m := newRefReasm(total, window)
		var out []byte
		buf := make([]byte, 512)
		finSet := false
		for len(script) >= 4 {
			op, arg := script[0]%4, script[1:4]
			script = script[4:]
			switch op {
			case 0, 1:
				off := int(binary.BigEndian.Uint16(arg[:2])) % total
				n := min(1+int(arg[2])*int(op+1), total-off)
				before := r.OutOfOrder()
				added, err := r.Insert(isn+uint64(off), stream[off:off+n])
				if errors.Is(err, ErrTooManySegments) {
					// Dropped whole; the model must not see it.
					require.Zero(t, added)
					require.Equal(t, before, r.OutOfOrder())
					continue
				}
				wantAdded, dropped := m.insert(off, n)
				require.Equal(t, wantAdded, added)
				require.Equal(t, dropped, err != nil, "err %v", err)
			case 2:
				n := r.Read(buf[:int(arg[0])*2])
				out = append(out, buf[:n]...)
				m.readOff += n
			case 3:
				if arg[0]%8 == 1 {
					// An in-place read: reserve at rcv_nxt, a reinjected
					// copy of the same and following bytes arrives
					// meanwhile (the reserved part is a duplicate), then
					// the first n reserved bytes are committed.
					want := min(int(arg[1])*8+1, total-m.rcvOff)
					parts := r.Reserve(nil, isn+uint64(m.rcvOff), want)
					resvOff, resvLen := m.rcvOff, 0
					for _, b := range parts {
						resvLen += len(b)
					}
					require.LessOrEqual(t, resvLen, want)
					for p := resvOff; p < resvOff+resvLen; p++ {
						require.False(t, m.have[p])
					}
					if resvLen > 0 {
						if end := min(resvOff+resvLen+int(arg[2]), total); end > resvOff {
							added, err := r.Insert(isn+uint64(resvOff), stream[resvOff:end])
							if errors.Is(err, ErrTooManySegments) {
								require.Zero(t, added) // dropped whole
							} else {
								wantAdded, dropped := 0, false
								for p := resvOff + resvLen; p < end; p++ {
									a, d := m.insert(p, 1)
									wantAdded += a
									dropped = dropped || d
								}
								require.Equal(t, wantAdded, added)
								require.Equal(t, dropped, err != nil, "err %v", err)
							}
						}
					}
					n := min(int(arg[2]), resvLen)
					var w vecWriter
					w.reset(parts)
					_, _ = w.Write(stream[resvOff : resvOff+n])
					r.Commit(n)
					for p := resvOff; p < resvOff+n; p++ {
						m.have[p] = true
					}
					for m.rcvOff < total && m.have[m.rcvOff] {
						m.rcvOff++
					}
					if m.finOff >= 0 && m.rcvOff > m.finOff {
						m.rcvOff = m.finOff
					}
					break
				}
				if finSet || arg[0]%8 != 0 {
					continue
				}
				// The FIN goes at the stream end so the stream stays whole.
				err := r.SetFin(isn + total)
				if total > m.readOff+window {
					require.ErrorIs(t, err, ErrBeyondWindow)
					continue
				}
				require.NoError(t, err)
				m.finOff = total
				finSet = true
			}
			require.Equal(t, isn+uint64(m.rcvOff), r.RcvNxt()-b2u(m.finOff == m.rcvOff))
			require.Equal(t, m.rcvOff-m.readOff, r.Readable())
			require.Equal(t, m.buffered(), r.Buffered())
			require.True(t, bytes.Equal(out, stream[:len(out)]), "output diverges from the stream")
		}
		// Drain: deliver everything in order and read it all.
		for len(out) < total {
			n := r.Read(buf)
			out = append(out, buf[:n]...)
			if n == 0 {
				off := len(out)
				added, _ := r.Insert(isn+uint64(off), stream[off:min(off+window, total)])
				require.Positive(t, added, "drain stalls at %d", off)
			}
		}
		require.True(t, bytes.Equal(stream, out), "output differs from the stream")
		require.Equal(t, finSet, r.EOF())
	})
}

func b2u(b bool) uint64 {
	if b {
		return 1
	}
	return 0
}

func BenchmarkReassemblyInOrder(b *testing.B) {
	const seg = 1400
	r := newReassembly(99, 4<<20)
	data := pattern(0, seg)
	out := make([]byte, 64<<10)
	b.SetBytes(seg)
	b.ReportAllocs()
	dsn := uint64(99)
	for b.Loop() {
		if n, err := r.Insert(dsn, data); err != nil || n != seg {
			b.Fatal(n, err)
		}
		dsn += seg
		if r.Readable() >= len(out) {
			r.Read(out)
		}
	}
}

func BenchmarkReassemblyTwoSubflows(b *testing.B) {
	// Two subflows deliver alternate 1400-byte segments, one running 32
	// segments ahead of the other: half the data goes out of order.
	const seg = 1400
	const lead = 32
	r := newReassembly(0, 4<<20)
	data := pattern(0, seg)
	out := make([]byte, 64<<10)
	b.SetBytes(seg)
	b.ReportAllocs()
	var fast, slow uint64 // segments delivered: fast takes even, slow odd
	for b.Loop() {
		var k uint64
		if fast-slow < lead {
			k = 2 * fast
			fast++
		} else {
			k = 2*slow + 1
			slow++
		}
		if _, err := r.Insert(k*seg, data); err != nil {
			b.Fatal(err)
		}
		if r.Readable() >= len(out) {
			r.Read(out)
		}
	}
}

// TestReassemblyReserveRandom mixes in-place reads (Reserve, fill,
// Commit, possibly short) with Inserts of the same and other bytes (a
// second subflow's reinjections) and Reads, against the reference model
// in which reserved bytes are neither held nor insertable.
func TestReassemblyReserveRandom(t *testing.T) {
	for seed := range uint64(40) {
		rng := rand.New(rand.NewPCG(seed, 7))
		total := 1 + rng.IntN(200_000)
		window := 1 + rng.IntN(100_000)
		isn := rng.Uint64()
		stream := pattern(0, total)
		r := newReassembly(isn, window)
		m := newRefReasm(total, window)
		var out []byte
		buf := make([]byte, 50_000)
		var resv []byte
		var resvParts [][]byte
		resvOff := 0
		inPlace := 0
		for step := 0; len(out) < total; step++ {
			require.Less(t, step, 200_000, "seed %d makes no progress", seed)
			switch k := rng.IntN(8); {
			case k < 2:
				n := r.Read(buf[:rng.IntN(len(buf))])
				out = append(out, buf[:n]...)
				m.readOff += n
			case k < 4 && resv == nil:
				want := min(rng.IntN(40_000), total-m.rcvOff)
				resvParts = r.Reserve(resvParts[:0], isn+uint64(m.rcvOff)+uint64(rng.IntN(2)*rng.IntN(10)), want)
				if len(resvParts) == 0 {
					continue
				}
				// The parts are consecutive stretches of the stream, one
				// per block; resv is a flat copy for the bounds checks.
				resv = nil
				for _, b := range resvParts {
					require.NotEmpty(t, b)
					require.LessOrEqual(t, len(b), reasmBlockSize)
					resv = append(resv, b...)
				}
				resvOff = m.rcvOff
				require.LessOrEqual(t, len(resv), want)
				require.LessOrEqual(t, resvOff+len(resv), m.readOff+window)
				for p := resvOff; p < resvOff+len(resv); p++ {
					require.False(t, m.have[p], "seed %d: reserved byte %d is held", seed, p)
				}
				require.Empty(t, r.Reserve(nil, isn+uint64(m.rcvOff), 1), "one reservation at a time")
			case k < 5 && resv != nil:
				n := rng.IntN(len(resv) + 1)
				if rng.IntN(2) == 0 {
					n = len(resv)
				}
				var w vecWriter
				w.reset(resvParts)
				k, err := w.Write(stream[resvOff : resvOff+n])
				require.NoError(t, err)
				require.Equal(t, n, k)
				r.Commit(n)
				for p := resvOff; p < resvOff+n; p++ {
					m.have[p] = true
				}
				for m.rcvOff < total && m.have[m.rcvOff] {
					m.rcvOff++
				}
				resv = nil
				inPlace += n
			default:
				off := max(m.rcvOff+rng.IntN(window+3000)-2000, 0)
				if off >= total {
					continue
				}
				n := 1 + rng.IntN(min(5000, total-off))
				// Reserved bytes are skipped, as if already held.
				lo, hi := resvOff, resvOff+len(resv)
				wantAdded, wantDrop := 0, false
				for p := off; p < off+n; p++ {
					if p >= lo && p < hi {
						continue
					}
					a, d := m.insert(p, 1)
					wantAdded += a
					wantDrop = wantDrop || d
				}
				added, err := r.Insert(isn+uint64(off), stream[off:off+n])
				if wantDrop {
					require.ErrorIs(t, err, ErrBeyondWindow)
				} else {
					require.NoError(t, err)
				}
				require.Equal(t, wantAdded, added, "seed %d insert [%d,+%d) resv [%d,%d)", seed, off, n, lo, hi)
			}
			require.Equal(t, isn+uint64(m.rcvOff), r.RcvNxt(), "seed %d step %d", seed, step)
			require.Equal(t, m.rcvOff-m.readOff, r.Readable())
			require.Equal(t, m.buffered(), r.Buffered())
		}
		require.Equal(t, stream, out, "seed %d", seed)
		require.NotZero(t, inPlace, "seed %d placed nothing in place", seed)
	}
}
