package mptcpep

import (
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestRxMappingsAdd(t *testing.T) {
	var dsn uint64 = math.MaxUint64 - 100_000 // the DSN space wraps inside these tests
	var top uint32 = math.MaxUint32 - 10      // SSNs computed from it wrap
	type add struct {
		m       rxMapping
		wantErr error
	}
	type lookup struct {
		ssn     uint32
		ok      bool
		dsn     uint64
		n       int
		dataFin bool
	}
	tests := []struct {
		name    string
		first   uint32
		adds    []add
		wantLen int
		lookups []lookup
	}{
		{
			name:  "in order",
			first: 1,
			adds: []add{
				{m: rxMapping{SSN: 1, DSN: dsn, Len: 1000}},
				{m: rxMapping{SSN: 1001, DSN: dsn + 5000, Len: 500}},
			},
			wantLen: 2,
			lookups: []lookup{
				{ssn: 0, ok: false},
				{ssn: 1, ok: true, dsn: dsn, n: 1000},
				{ssn: 1000, ok: true, dsn: dsn + 999, n: 1},
				{ssn: 1001, ok: true, dsn: dsn + 5000, n: 500},
				{ssn: 1500, ok: true, dsn: dsn + 5499, n: 1},
				{ssn: 1501, ok: false},
			},
		},
		{
			name:  "repeated on every segment of a GSO super-segment",
			first: 1,
			adds: []add{
				{m: rxMapping{SSN: 1, DSN: dsn, Len: 65320}},
				{m: rxMapping{SSN: 1, DSN: dsn, Len: 65320}},
				{m: rxMapping{SSN: 1, DSN: dsn, Len: 65320}},
			},
			wantLen: 1,
			lookups: []lookup{{ssn: 1449, ok: true, dsn: dsn + 1448, n: 65320 - 1448}},
		},
		{
			name:  "arrives out of order",
			first: 1,
			adds: []add{
				{m: rxMapping{SSN: 3001, DSN: dsn + 3000, Len: 1000}},
				{m: rxMapping{SSN: 1, DSN: dsn, Len: 1000}},
				{m: rxMapping{SSN: 1001, DSN: dsn + 9000, Len: 2000}},
				{m: rxMapping{SSN: 1, DSN: dsn, Len: 1000}},
			},
			wantLen: 3,
			lookups: []lookup{
				{ssn: 500, ok: true, dsn: dsn + 499, n: 501},
				{ssn: 2000, ok: true, dsn: dsn + 9999, n: 1001},
				{ssn: 3001, ok: true, dsn: dsn + 3000, n: 1000},
			},
		},
		{
			name:  "consistent overlap extends",
			first: 1,
			adds: []add{
				{m: rxMapping{SSN: 1, DSN: dsn, Len: 1000}},
				{m: rxMapping{SSN: 501, DSN: dsn + 500, Len: 1000}},
				{m: rxMapping{SSN: 2001, DSN: dsn + 2000, Len: 10}},
				{m: rxMapping{SSN: 1400, DSN: dsn + 1399, Len: 602}}, // bridges both
			},
			wantLen: 1,
			lookups: []lookup{{ssn: 1, ok: true, dsn: dsn, n: 2010}},
		},
		{
			name:  "conflicting DSN for the same bytes",
			first: 1,
			adds: []add{
				{m: rxMapping{SSN: 1, DSN: dsn, Len: 1000}},
				{m: rxMapping{SSN: 1, DSN: dsn + 1, Len: 1000}, wantErr: ErrMappingConflict},
				{m: rxMapping{SSN: 900, DSN: dsn + 5000, Len: 1000}, wantErr: ErrMappingConflict},
			},
			wantLen: 1,
			lookups: []lookup{{ssn: 900, ok: true, dsn: dsn + 899, n: 101}},
		},
		{
			name:  "checksummed mappings must match exactly",
			first: 1,
			adds: []add{
				{m: rxMapping{SSN: 1, DSN: dsn, Len: 1000, HasCsum: true, Checksum: 7}},
				{m: rxMapping{SSN: 1, DSN: dsn, Len: 1000, HasCsum: true, Checksum: 7}},
				{m: rxMapping{SSN: 1, DSN: dsn, Len: 1200, HasCsum: true, Checksum: 8}, wantErr: ErrMappingConflict},
			},
			wantLen: 1,
			lookups: []lookup{{ssn: 1, ok: true, dsn: dsn, n: 1000}},
		},
		{
			name:  "data mapped beyond DATA_FIN",
			first: 1,
			adds: []add{
				{m: rxMapping{SSN: 1, DSN: dsn, Len: 100, DataFin: true}},
				{m: rxMapping{SSN: 1, DSN: dsn, Len: 200}, wantErr: ErrMappingConflict},
				{m: rxMapping{SSN: 50, DSN: dsn + 49, Len: 51}},
			},
			wantLen: 1,
			lookups: []lookup{{ssn: 1, ok: true, dsn: dsn, n: 100, dataFin: true}},
		},
		{
			name:  "below the consumed offset is ignored",
			first: 5000,
			adds: []add{
				{m: rxMapping{SSN: 1, DSN: dsn, Len: 4999}},
				{m: rxMapping{SSN: 4000, DSN: dsn + 3999, Len: 2000}}, // tail still unread
			},
			wantLen: 1,
			lookups: []lookup{{ssn: 5000, ok: true, dsn: dsn + 4999, n: 1000}},
		},
		{
			name:  "subflow sequence wraps",
			first: math.MaxUint32 - 99,
			adds: []add{
				{m: rxMapping{SSN: math.MaxUint32 - 99, DSN: dsn, Len: 300}},
				{m: rxMapping{SSN: 200, DSN: dsn + 300, Len: 100}},
				{m: rxMapping{SSN: 150, DSN: dsn + 250, Len: 100}}, // overlaps both, consistent
			},
			wantLen: 1,
			lookups: []lookup{
				{ssn: math.MaxUint32, ok: true, dsn: dsn + 99, n: 301},
				{ssn: 0, ok: true, dsn: dsn + 100, n: 300},
				{ssn: 299, ok: true, dsn: dsn + 399, n: 1},
				{ssn: 300, ok: false},
			},
		},
		{
			name:  "too far ahead",
			first: top,
			adds: []add{
				{m: rxMapping{SSN: top + 1<<30 + 1, DSN: dsn, Len: 10}, wantErr: ErrBadMapping},
				{m: rxMapping{SSN: top + 1<<30, DSN: dsn, Len: 10}},
				{m: rxMapping{SSN: top - 1<<31, DSN: dsn, Len: 10}}, // far behind: ignored
			},
			wantLen: 1,
			lookups: []lookup{{ssn: top + 1<<30 + 9, ok: true, dsn: dsn + 9, n: 1}},
		},
		{
			name:  "invalid lengths",
			first: 1,
			adds: []add{
				{m: rxMapping{SSN: 1, DSN: dsn, Len: 0}, wantErr: ErrBadMapping},
				{m: rxMapping{SSN: 1, DSN: dsn, Len: 65536}, wantErr: ErrBadMapping},
			},
			wantLen: 0,
			lookups: []lookup{{ssn: 1, ok: false}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tab := newRxMappings(tt.first)
			for i, a := range tt.adds {
				err := tab.Add(a.m)
				if a.wantErr != nil {
					require.ErrorIs(t, err, a.wantErr, "add %d", i)
				} else {
					require.NoError(t, err, "add %d", i)
				}
			}
			require.Equal(t, tt.wantLen, tab.Len())
			for _, l := range tt.lookups {
				dsn, n, ok := tab.Lookup(l.ssn)
				require.Equal(t, l.ok, ok, "ssn %d", l.ssn)
				require.Equal(t, l.dsn, dsn, "ssn %d", l.ssn)
				require.Equal(t, l.n, n, "ssn %d", l.ssn)
				if ok {
					m, _ := tab.Find(l.ssn)
					require.Equal(t, l.dataFin, m.DataFin, "ssn %d", l.ssn)
				}
			}
		})
	}
}

func TestRxMappingsConsumeAndBound(t *testing.T) {
	tab := newRxMappings(1)
	for i := range maxRxMappings {
		require.NoError(t, tab.Add(rxMapping{SSN: 1 + uint32(i)*10, DSN: uint64(i) * 100, Len: 10}))
	}
	err := tab.Add(rxMapping{SSN: 1 + maxRxMappings*10, DSN: 1, Len: 10})
	require.ErrorIs(t, err, ErrTooManyMappings)
	require.NoError(t, tab.Add(rxMapping{SSN: 1, DSN: 0, Len: 10}), "a repeat still works when full")

	// Consuming frees room; a partly consumed mapping stays.
	tab.Consume(1 + 10*10 + 5)
	require.Equal(t, maxRxMappings-10, tab.Len())
	_, _, ok := tab.Lookup(100)
	require.False(t, ok)
	dsn, n, ok := tab.Lookup(1 + 10*10 + 5)
	require.True(t, ok)
	require.Equal(t, uint64(1000+5), dsn)
	require.Equal(t, 5, n)
	require.NoError(t, tab.Add(rxMapping{SSN: 1 + maxRxMappings*10, DSN: 1, Len: 10}))
	tab.Consume(50) // old: no effect
	require.Equal(t, maxRxMappings-9, tab.Len())

	// Everything consumed: the table is empty and reusable.
	tab.Consume(1 + (maxRxMappings+1)*10)
	require.Zero(t, tab.Len())
	require.NoError(t, tab.Add(rxMapping{SSN: 1 + (maxRxMappings+1)*10, DSN: 7, Len: 1}))
	require.Equal(t, 1, tab.Len())
}

// TestRxMappingsRandom feeds a stream of mappings in random order with
// repeats and checks every byte's DSN against a reference.
func TestRxMappingsRandom(t *testing.T) {
	for seed := range uint64(20) {
		rng := rand.New(rand.NewPCG(seed, 1))
		first := rng.Uint32()
		var ms []rxMapping
		ssn, dsn := first, rng.Uint64()
		for range 200 {
			m := rxMapping{SSN: ssn, DSN: dsn, Len: 1 + rng.IntN(maxMappingLen)}
			ms = append(ms, m)
			ssn += uint32(m.Len)
			dsn += uint64(m.Len) + uint64(rng.IntN(3))*1_000_000 // other subflows' data between
		}
		tab := newRxMappings(first)
		consumed := first
		next := 0 // mappings [0,next) were added at least once
		for next < len(ms) || tab.Len() > 0 {
			switch rng.IntN(3) {
			case 0: // the next few mappings, shuffled, some repeated
				k := min(next+1+rng.IntN(4), len(ms))
				idx := rng.Perm(k - max(next-2, 0))
				for _, i := range idx {
					require.NoError(t, tab.Add(ms[max(next-2, 0)+i]))
				}
				next = k
			default: // consume a random amount of the added data
				if next == 0 {
					continue
				}
				end := ms[next-1].end()
				avail := int(end - consumed)
				if avail == 0 {
					continue
				}
				upTo := consumed + uint32(1+rng.IntN(avail))
				for s := consumed; s != upTo; {
					d, n, ok := tab.Lookup(s)
					require.True(t, ok, "seed %d ssn %d", seed, s)
					m := ms[findMapping(ms, s)]
					require.Equal(t, m.DSN+uint64(s-m.SSN), d)
					require.Equal(t, int(m.end()-s), n)
					s += uint32(min(n, int(upTo-s)))
				}
				tab.Consume(upTo)
				consumed = upTo
			}
			live := 0
			for _, m := range ms[:next] {
				if ssnLT(consumed, m.end()) {
					live++
				}
			}
			require.Equal(t, live, tab.Len(), "consumed mappings are dropped")
		}
	}
}

func findMapping(ms []rxMapping, ssn uint32) int {
	for i, m := range ms {
		if covers(m.SSN, m.Len, ssn) {
			return i
		}
	}
	return -1
}

func TestTxMappings(t *testing.T) {
	var dsn uint64 = math.MaxUint64 - 70_000
	tests := []struct {
		name  string
		first uint32
	}{
		{"from 1", 1},
		{"across 2^32", math.MaxUint32 - 70_000},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := tt.first
			tab := newTxMappings(s)
			require.Equal(t, s, tab.Next())
			require.NoError(t, tab.Add(s, dsn, 1000))
			require.NoError(t, tab.Add(s+1000, dsn+1000, 1000)) // contiguous: still a mapping of its own
			require.Equal(t, 2, tab.Len())
			require.NoError(t, tab.Add(s+2000, dsn+50_000, 100_000)) // split at 65535
			require.Equal(t, 4, tab.Len())
			require.ErrorIs(t, tab.Add(s+5, dsn, 10), ErrNonContiguous)
			require.NoError(t, tab.Add(s+102_000, dsn+150_000, 0))
			require.Equal(t, s+102_000, tab.Next())

			m, ok := tab.Find(s + 1500)
			require.True(t, ok)
			require.Equal(t, txMapping{SSN: s + 1000, DSN: dsn + 1000, Len: 1000}, m)
			d, n, ok := tab.Lookup(s + 1500)
			require.True(t, ok)
			require.Equal(t, uint64(dsn+1500), d)
			require.Equal(t, 500, n)
			d, n, ok = tab.Lookup(s + 2000 + 65535)
			require.True(t, ok)
			require.Equal(t, uint64(dsn+50_000+65535), d)
			require.Equal(t, 100_000-65535, n)
			_, _, ok = tab.Lookup(s + 102_000)
			require.False(t, ok)
			_, _, ok = tab.Lookup(s - 1)
			require.False(t, ok)

			// Contiguous data is never appended to a mapping.
			require.NoError(t, tab.Add(s+102_000, dsn+150_000, 10))
			m, _ = tab.Find(s + 2000 + 65535)
			require.Equal(t, 100_000-65535, m.Len)

			require.Equal(t, []span{
				{DSN: dsn, Len: 1000},
				{DSN: dsn + 1000, Len: 1000},
				{DSN: dsn + 50_000, Len: 65535},
				{DSN: dsn + 50_000 + 65535, Len: 100_000 - 65535},
				{DSN: dsn + 150_000, Len: 10},
			}, tab.Unacked())

			// Partial ack: the mapping stays whole for retransmissions,
			// Unacked shrinks.
			tab.Ack(s + 1500)
			m, ok = tab.Find(s + 1600)
			require.True(t, ok)
			require.Equal(t, txMapping{SSN: s + 1000, DSN: dsn + 1000, Len: 1000}, m)
			require.Equal(t, span{DSN: dsn + 1500, Len: 500}, tab.Unacked()[0])
			tab.Ack(s + 10) // old
			require.Equal(t, span{DSN: dsn + 1500, Len: 500}, tab.Unacked()[0])

			tab.Ack(s + 2000 + 65535)
			require.Equal(t, 2, tab.Len())
			_, ok = tab.Find(s + 1999)
			require.False(t, ok)

			// An ack covering a subflow FIN goes one beyond the data.
			tab.Ack(tab.Next() + 1)
			require.Zero(t, tab.Len())
			require.Nil(t, tab.Unacked())
			require.NoError(t, tab.Add(tab.Next(), 5, 5))
			require.Equal(t, []span{{DSN: 5, Len: 5}}, tab.Unacked())
		})
	}
}

func TestTxMappingsRandom(t *testing.T) {
	for seed := range uint64(20) {
		rng := rand.New(rand.NewPCG(seed, 2))
		first := rng.Uint32()
		tab := newTxMappings(first)
		type byteMap struct {
			ssn uint32
			dsn uint64
		}
		var sent []byteMap // one entry per chunk start, for reference
		var chunks []int
		dsn := rng.Uint64()
		acked := first
		for range 300 {
			if rng.IntN(3) > 0 {
				n := 1 + rng.IntN(20_000)
				if rng.IntN(2) == 0 {
					dsn += uint64(rng.IntN(100_000))
				}
				sent = append(sent, byteMap{tab.Next(), dsn})
				chunks = append(chunks, n)
				require.NoError(t, tab.Add(tab.Next(), dsn, n))
				dsn += uint64(n)
			} else {
				if tab.Next() == acked {
					continue
				}
				acked += uint32(rng.IntN(int(tab.Next()-acked) + 1))
				tab.Ack(acked)
			}
			// Every unacked byte maps to the DSN it was added with, and no
			// mapping exceeds the DSS limit.
			for i, c := range sent {
				last := c.ssn + uint32(chunks[i]) - 1
				if ssnLT(last, acked) {
					continue
				}
				for _, s := range []uint32{c.ssn, last, c.ssn + uint32(chunks[i]/2)} {
					if ssnLT(s, acked) {
						continue
					}
					d, n, ok := tab.Lookup(s)
					require.True(t, ok)
					require.Equal(t, c.dsn+uint64(s-c.ssn), d)
					require.Positive(t, n)
					m, _ := tab.Find(s)
					require.LessOrEqual(t, m.Len, maxMappingLen)
				}
			}
			total := 0
			for _, sp := range tab.Unacked() {
				total += sp.Len
			}
			require.Equal(t, int(tab.Next()-acked), total)
		}
	}
}

func BenchmarkRxMappingsInOrder(b *testing.B) {
	// The kernel's pattern: one mapping per GSO super-segment of 46
	// segments, repeated on each; the reader looks up and consumes each
	// segment.
	const seg = 1420
	const mapLen = 46 * seg
	tab := newRxMappings(1)
	var ssn uint32 = 1
	var mapStart uint32 = 1
	b.SetBytes(seg)
	b.ReportAllocs()
	for b.Loop() {
		if ssn-mapStart >= mapLen {
			mapStart = ssn
		}
		if err := tab.Add(rxMapping{SSN: mapStart, DSN: uint64(mapStart) * 3, Len: mapLen}); err != nil {
			b.Fatal(err)
		}
		for left := seg; left > 0; {
			_, n, ok := tab.Lookup(ssn)
			if !ok {
				b.Fatal("no mapping")
			}
			c := min(n, left)
			ssn += uint32(c)
			left -= c
		}
		tab.Consume(ssn)
	}
}

func BenchmarkTxMappings(b *testing.B) {
	// The scheduler writes 16 KiB chunks; the option layer looks up each
	// 1400-byte segment; acks follow.
	const chunk = 16 << 10
	const seg = 1400
	tab := newTxMappings(1)
	var dsn uint64
	var sent uint32 = 1
	b.SetBytes(chunk)
	b.ReportAllocs()
	for b.Loop() {
		start := tab.Next()
		if err := tab.Add(start, dsn, chunk); err != nil {
			b.Fatal(err)
		}
		dsn += chunk
		for ; ssnLT(sent, tab.Next()); sent += seg {
			if _, _, ok := tab.Lookup(sent); !ok {
				b.Fatal("no mapping")
			}
		}
		tab.Ack(start)
	}
}

// FuzzRxMappings feeds arbitrary mappings, consumes and lookups: the table
// must never panic, stay sorted, bounded and free of overlaps, and every
// lookup must agree with a mapping that Add accepted.
func FuzzRxMappings(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0, 1, 0, 100, 0, 0, 0, 0, 0, 50, 0, 10, 2, 0, 0, 0, 60, 0, 0, 0, 0})
	f.Add([]byte{0, 255, 255, 255, 200, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 5, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, script []byte) {
		const first = math.MaxUint32 - 1000 // wraps during the script
		tab := newRxMappings(first)
		consumed := uint32(first)
		var accepted []rxMapping
		for len(script) >= 12 {
			op := script[0] % 3
			ssn := first + binary.BigEndian.Uint32(script[1:5])%4000
			dsn := uint64(script[5])<<8 | uint64(script[6])
			n := int(binary.BigEndian.Uint16(script[7:9])) % 3000
			flags := script[9]
			script = script[12:]
			switch op {
			case 0:
				m := rxMapping{SSN: ssn, DSN: dsn, Len: n, DataFin: flags&1 != 0, HasCsum: flags&2 != 0}
				if tab.Add(m) == nil && n > 0 && ssnLT(consumed, m.end()) {
					accepted = append(accepted, m)
				}
			case 1:
				if ssnLT(consumed, ssn) {
					consumed = ssn
				}
				tab.Consume(ssn)
				// Dropped mappings are forgotten: a later mapping may map
				// those consumed bytes differently without conflict.
				accepted = slices.DeleteFunc(accepted, func(m rxMapping) bool {
					return ssnLEQ(m.end(), consumed)
				})
			case 2:
				d, left, ok := tab.Lookup(ssn)
				if !ok {
					continue
				}
				require.Positive(t, left)
				// Some accepted mapping covering ssn places it at d (merged
				// mappings extend accepted ones consistently).
				found := false
				for _, m := range accepted {
					if covers(m.SSN, m.Len, ssn) {
						require.Equal(t, m.DSN+uint64(ssn-m.SSN), d, "ssn %d", ssn)
						found = true
					}
				}
				require.True(t, found, "lookup of %d hit no accepted mapping", ssn)
			}
			live := tab.maps[tab.head:]
			require.LessOrEqual(t, len(live), maxRxMappings)
			for i := 1; i < len(live); i++ {
				require.True(t, ssnLEQ(live[i-1].end(), live[i].SSN), "sorted, disjoint")
			}
			for _, m := range live {
				require.True(t, ssnLT(consumed, m.end()), "consumed mappings dropped")
				require.LessOrEqual(t, m.Len, 1<<31)
			}
		}
	})
}

// testMappingIndex checks the index both mapping tables share, for one
// element type (mk builds a mapping of n subflow bytes from ssn to dsn).
func testMappingIndex[M ssnMapping](t *testing.T, mk func(ssn uint32, dsn uint64, n int) M) {
	for _, base := range []uint32{10, math.MaxUint32 - 12} {
		// Three mappings with a gap: [b, b+5) [b+10, b+20) [b+20, b+21).
		build := func() *mappingIndex[M] {
			return &mappingIndex[M]{maps: []M{mk(base, 100, 5), mk(base+10, 200, 10), mk(base+20, 300, 1)}}
		}
		lookups := []struct {
			name string
			ssn  uint32
			dsn  uint64
			n    int
			ok   bool
		}{
			{"before the first", base - 1, 0, 0, false},
			{"first byte", base, 100, 5, true},
			{"last byte of a mapping", base + 4, 104, 1, true},
			{"in the gap", base + 5, 0, 0, false},
			{"end of the gap", base + 9, 0, 0, false},
			{"second mapping", base + 10, 200, 10, true},
			{"middle", base + 15, 205, 5, true},
			{"adjacent third", base + 20, 300, 1, true},
			{"beyond the last", base + 21, 0, 0, false},
		}
		t.Run(fmt.Sprintf("lookup from %d", base), func(t *testing.T) {
			x := build()
			// In order (the fast path), then backwards (the search).
			for pass := 0; pass < 2; pass++ {
				for i := range lookups {
					tc := lookups[i]
					if pass == 1 {
						tc = lookups[len(lookups)-1-i]
					}
					dsn, n, ok := x.Lookup(tc.ssn)
					require.Equal(t, tc.ok, ok, "%s (pass %d)", tc.name, pass)
					require.Equal(t, tc.dsn, dsn, "%s (pass %d)", tc.name, pass)
					require.Equal(t, tc.n, n, "%s (pass %d)", tc.name, pass)
					m, ok := x.Find(tc.ssn)
					require.Equal(t, tc.ok, ok, tc.name)
					if ok {
						_, mdsn, _ := m.place()
						require.Equal(t, tc.dsn-uint64(tc.ssn-firstSSN(m)), mdsn, tc.name)
					}
				}
			}
		})
		drops := []struct {
			name  string
			upTo  uint32
			left  int
			first uint32 // SSN of the first mapping left
		}{
			{"nothing below", base, 3, base},
			{"part of a mapping keeps it", base + 3, 3, base},
			{"one whole mapping", base + 5, 2, base + 10},
			{"into the gap", base + 7, 2, base + 10},
			{"two", base + 20, 1, base + 20},
			{"all", base + 21, 0, 0},
			{"beyond all", base + 1000, 0, 0},
		}
		for _, tc := range drops {
			t.Run(fmt.Sprintf("dropBelow from %d: %s", base, tc.name), func(t *testing.T) {
				x := build()
				_, _, _ = x.Lookup(base + 20) // last points at the third
				x.dropBelow(tc.upTo)
				require.Equal(t, tc.left, x.Len())
				if tc.left == 0 {
					require.Zero(t, x.head, "an empty index starts over")
					require.Empty(t, x.maps)
					return
				}
				require.Equal(t, tc.first, firstSSN(x.live()[0]))
				_, _, ok := x.Lookup(base + 20)
				require.True(t, ok, "what is left is still found")
			})
		}
	}
	t.Run("compact", func(t *testing.T) {
		x := &mappingIndex[M]{maps: make([]M, 0, 4)}
		for i := range 4 {
			x.maps = append(x.maps, mk(uint32(10*i), uint64(100*i), 10))
		}
		require.Zero(t, x.compact(), "nothing consumed: nothing to move")
		_, _, _ = x.Lookup(35) // last = 3
		x.dropBelow(20)
		require.Equal(t, 2, x.compact())
		require.Equal(t, 0, x.head)
		require.Equal(t, 1, x.last, "last follows its mapping")
		require.Equal(t, 2, x.Len())
		dsn, n, ok := x.Lookup(25)
		require.True(t, ok)
		require.Equal(t, uint64(205), dsn)
		require.Equal(t, 5, n)
		require.Zero(t, x.compact(), "room left after compacting")
	})
}

func firstSSN[M ssnMapping](m M) uint32 {
	ssn, _, _ := m.place()
	return ssn
}

func TestMappingIndex(t *testing.T) {
	t.Run("rx", func(t *testing.T) {
		testMappingIndex(t, func(ssn uint32, dsn uint64, n int) rxMapping {
			return rxMapping{SSN: ssn, DSN: dsn, Len: n}
		})
	})
	t.Run("tx", func(t *testing.T) {
		testMappingIndex(t, func(ssn uint32, dsn uint64, n int) txMapping {
			return txMapping{SSN: ssn, DSN: dsn, Len: n}
		})
	})
}
