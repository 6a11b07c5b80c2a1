package mptcpep

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"
)

// pattern returns n bytes of a stream that differs at every offset within
// a period much longer than any block.
func pattern(off, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		x := uint32(off + i)
		b[i] = byte(x ^ x>>8 ^ x>>16*3)
	}
	return b
}

// peekAll gathers n bytes at dsn through repeated Peeks.
func peekAll(t *testing.T, b *sendBuffer, dsn uint64, n int) []byte {
	t.Helper()
	var out []byte
	for len(out) < n {
		p := b.Peek(dsn+uint64(len(out)), n-len(out))
		require.NotEmpty(t, p, "peek at %d", dsn+uint64(len(out)))
		out = append(out, p...)
	}
	return out
}

func TestSendBufferBasics(t *testing.T) {
	isns := []struct {
		name string
		isn  uint64
	}{
		{"zero", 0},
		{"random", 0x0123_4567_89ab_cdef},
		{"wraps 2^64", math.MaxUint64 - 100_000},
	}
	for _, tt := range isns {
		t.Run(tt.name, func(t *testing.T) {
			const capacity = 200_000
			b := newSendBuffer(tt.isn, capacity)
			require.Equal(t, tt.isn, b.Una())
			require.Equal(t, tt.isn, b.End())
			require.Equal(t, capacity, b.Free())
			require.Nil(t, b.Peek(tt.isn, 10))

			data := pattern(0, 250_000)
			n := b.Write(data)
			require.Equal(t, capacity, n, "write stops at capacity")
			require.Equal(t, 0, b.Free())
			require.Equal(t, 0, b.Write(data[n:]))
			require.Equal(t, tt.isn+capacity, b.End())

			// Peek stops at block boundaries but gathers the right bytes.
			require.Equal(t, data[:capacity], peekAll(t, b, tt.isn, capacity))
			first := b.Peek(tt.isn, capacity)
			require.Len(t, first, sendBlockSize)
			require.Equal(t, data[1000:1010], b.Peek(tt.isn+1000, 10))
			require.Nil(t, b.Peek(tt.isn+capacity, 1), "peek at End")
			require.Nil(t, b.Peek(tt.isn-1, 1), "peek below Una")

			// Old and beyond-end acks.
			acked, err := b.Ack(tt.isn)
			require.NoError(t, err)
			require.Zero(t, acked)
			acked, err = b.Ack(tt.isn - 5)
			require.NoError(t, err)
			require.Zero(t, acked)
			_, err = b.Ack(tt.isn + capacity + 1)
			require.ErrorIs(t, err, ErrAckBeyondEnd)
			require.Equal(t, tt.isn, b.Una())

			acked, err = b.Ack(tt.isn + 70_000)
			require.NoError(t, err)
			require.Equal(t, 70_000, acked)
			require.Equal(t, tt.isn+70_000, b.Una())
			require.Equal(t, 70_000, b.Free())
			require.Nil(t, b.Peek(tt.isn+69_999, 1), "acked bytes are gone")

			n = b.Write(data[capacity:])
			require.Equal(t, 50_000, n)
			require.Equal(t, data[70_000:250_000], peekAll(t, b, tt.isn+70_000, 180_000))

			acked, err = b.Ack(tt.isn + 250_000)
			require.NoError(t, err)
			require.Equal(t, 180_000, acked)
			require.Zero(t, b.Len())
			require.Empty(t, b.blocks, "fully acked buffer holds no blocks")
			require.LessOrEqual(t, len(b.spare), sendSpareBlocks)
		})
	}
}

func TestSendBufferSetCapacity(t *testing.T) {
	b := newSendBuffer(10, 100)
	require.Equal(t, 100, b.Write(pattern(0, 100)))
	b.SetCapacity(50)
	require.Equal(t, 0, b.Free())
	require.Equal(t, 100, b.Len(), "lowering keeps stored bytes")
	_, err := b.Ack(10 + 60)
	require.NoError(t, err)
	require.Equal(t, 10, b.Free())
	b.SetCapacity(1000)
	require.Equal(t, 960, b.Free())
	require.Equal(t, 1000, b.Capacity())
}

// TestSendBufferRandom drives random writes, acks and peeks against a
// reference stream.
func TestSendBufferRandom(t *testing.T) {
	for seed := range uint64(20) {
		rng := rand.New(rand.NewPCG(seed, 7))
		isn := rng.Uint64()
		capacity := 1 + rng.IntN(300_000)
		b := newSendBuffer(isn, capacity)
		written := 0
		una := 0
		for range 2000 {
			switch rng.IntN(3) {
			case 0:
				n := rng.IntN(40_000)
				got := b.Write(pattern(written, n))
				require.Equal(t, min(n, capacity-(written-una)), got)
				written += got
			case 1:
				to := una + rng.IntN(written-una+1)
				acked, err := b.Ack(isn + uint64(to))
				require.NoError(t, err)
				require.Equal(t, to-una, acked)
				una = to
			case 2:
				if written == una {
					require.Nil(t, b.Peek(isn+uint64(una), 1))
					continue
				}
				at := una + rng.IntN(written-una)
				n := 1 + rng.IntN(written-at)
				require.Equal(t, pattern(at, n), peekAll(t, b, isn+uint64(at), n))
			}
			require.Equal(t, isn+uint64(una), b.Una())
			require.Equal(t, isn+uint64(written), b.End())
			require.Equal(t, capacity-(written-una), b.Free())
			// Memory stays bounded by the data plus a block and spares.
			require.LessOrEqual(t, len(b.blocks), (written-una)/sendBlockSize+2)
		}
	}
}

func BenchmarkSendBuffer(b *testing.B) {
	const chunk = 16 << 10
	buf := newSendBuffer(12345, 4<<20)
	data := pattern(0, chunk)
	b.SetBytes(chunk)
	b.ReportAllocs()
	for b.Loop() {
		dsn := buf.End()
		if buf.Write(data) != chunk {
			b.Fatal("short write")
		}
		for off := 0; off < chunk; {
			p := buf.Peek(dsn+uint64(off), chunk-off)
			off += len(p)
		}
		// Keep about 1 MiB in flight, as a connection with data
		// outstanding would.
		if buf.Len() > 1<<20 {
			if _, err := buf.Ack(buf.End() - 1<<20); err != nil {
				b.Fatal(err)
			}
		}
	}
}
