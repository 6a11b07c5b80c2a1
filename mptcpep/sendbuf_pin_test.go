package mptcpep

import (
	"io"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
)

// TestSendBufferPin checks that slices peeked before a Pin keep their bytes
// while acks free them and new writes arrive, and that Unpin frees them.
func TestSendBufferPin(t *testing.T) {
	for _, tc := range []struct {
		name   string
		stored int // bytes written before the pin
		ack    int // bytes acked while pinned
		more   int // bytes written while pinned
	}{
		{"ack all, write more", 3 * sendBlockSize / 2, 3 * sendBlockSize / 2, 2 * sendBlockSize},
		{"ack part", 3 * sendBlockSize, sendBlockSize + 17, sendBlockSize},
		{"ack all at a block edge", 2 * sendBlockSize, 2 * sendBlockSize, sendBlockSize + 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pool := &sync.Pool{}
			b := newSendBuffer(1000, 16*sendBlockSize)
			b.pool = pool
			require.Equal(t, tc.stored, b.Write(pattern(0, tc.stored)))
			peeked := make([][]byte, 0)
			for off := 0; off < tc.stored; {
				p := b.Peek(1000+uint64(off), tc.stored-off)
				peeked = append(peeked, p)
				off += len(p)
			}

			b.Pin()
			_, err := b.Ack(1000 + uint64(tc.ack))
			require.NoError(t, err)
			require.Equal(t, tc.stored-tc.ack, b.Len())
			require.Equal(t, tc.more, b.Write(pattern(tc.stored, tc.more)))
			var got []byte
			for _, p := range peeked {
				got = append(got, p...)
			}
			require.Equal(t, pattern(0, tc.stored), got, "pinned blocks were not reused")
			require.Equal(t, pattern(tc.ack, tc.stored-tc.ack+tc.more), peekAll(t, b, 1000+uint64(tc.ack), b.Len()))

			b.Unpin()
			require.Equal(t, tc.stored-tc.ack+tc.more, b.Len())
			require.Equal(t, pattern(tc.ack, b.Len()), peekAll(t, b, b.Una(), b.Len()))
			require.LessOrEqual(t, len(b.blocks), b.Len()/sendBlockSize+2, "acked blocks freed after Unpin")
			_, err = b.Ack(b.End())
			require.NoError(t, err)
			require.Empty(t, b.blocks)
			require.Equal(t, 100, b.Write(pattern(0, 100)))
			require.Equal(t, pattern(0, 100), peekAll(t, b, b.Una(), 100))
		})
	}
}

// TestChunkReader checks the Payloader push hands to gVisor: any read
// sizes give the concatenated parts, and sum matches a flat checksum also
// for parts of odd length.
func TestChunkReader(t *testing.T) {
	for _, tc := range []struct {
		name  string
		parts []int
		read  int
	}{
		{"one part", []int{1000}, 4096},
		{"two parts, odd split", []int{333, 4000}, 100},
		{"three parts, tiny reads", []int{1, 2, 3}, 1},
		{"reads across parts", []int{7, 9, 11}, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var rd chunkReader
			rd.reset()
			var flat []byte
			off := 0
			for _, n := range tc.parts {
				p := pattern(off, n)
				rd.add(p)
				flat = append(flat, p...)
				off += n
			}
			require.Equal(t, len(flat), rd.Len())
			for k := 0; k <= len(flat); k += max(1, len(flat)/7) {
				require.Equal(t, checksum.Checksum(flat[:k], 0), rd.sum(k), "sum of %d bytes", k)
			}
			var got []byte
			buf := make([]byte, tc.read)
			for {
				n, err := rd.Read(buf)
				got = append(got, buf[:n]...)
				if err == io.EOF {
					break
				}
				require.NoError(t, err)
				require.Equal(t, len(flat)-len(got), rd.Len())
			}
			require.Equal(t, flat, got)
		})
	}
}
