package mptcpep

import (
	"context"
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestSendBufferTail fills the buffer in place through Tail and Commit,
// with acks arriving while a fill is pinned (they must not recycle the
// block being filled), and checks the stream read back by Peek.
func TestSendBufferTail(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	const isn = 5000
	b := newSendBuffer(isn, 5*sendBlockSize/2)
	var want []byte
	acked := 0
	for round := 0; round < 400; round++ {
		tail := b.Tail()
		if b.Free() == 0 {
			require.Empty(t, tail)
		} else {
			require.NotEmpty(t, tail)
			require.LessOrEqual(t, len(tail), b.Free())
		}
		b.Pin()
		n := min(len(tail), rng.IntN(sendBlockSize))
		chunk := pattern(len(want), n)
		copy(tail, chunk)
		// An ack while the tail is being filled, sometimes of everything.
		if stored := len(want) - acked; stored > 0 && rng.IntN(2) == 0 {
			k := stored
			if rng.IntN(3) > 0 {
				k = rng.IntN(stored + 1)
			}
			_, err := b.Ack(isn + uint64(acked+k))
			require.NoError(t, err)
			acked += k
		}
		b.Commit(n)
		b.Unpin()
		want = append(want, chunk...)
		require.Equal(t, len(want)-acked, b.Len())
		// Everything not acked reads back intact.
		got := []byte{}
		for off := acked; off < len(want); {
			p := b.Peek(isn+uint64(off), len(want)-off)
			require.NotEmpty(t, p)
			got = append(got, p...)
			off += len(p)
		}
		require.Equal(t, want[acked:], got, "round %d", round)
	}
}

// oddReader hands out its data in reads of random sizes.
type oddReader struct {
	data []byte
	rng  *rand.Rand
}

func (r *oddReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, io.EOF
	}
	n := min(len(p), len(r.data), 1+r.rng.IntN(100_000))
	copy(p, r.data[:n])
	r.data = r.data[n:]
	return n, nil
}

// TestReadFrom sends through Conn.ReadFrom (what io.Copy uses) with a send
// buffer small enough that it waits for DATA_ACKs, over two paths.
func TestReadFrom(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	w := newWorld(t, []pathSpec{{}, {delay: 2 * time.Millisecond}}, Config{SendBuffer: 256 << 10}, Config{})
	cc, sc := dialAccept(t, ctx, w, 80)
	up := randomData(16<<20, 9)
	errc := make(chan error, 1)
	go func() {
		n, err := cc.ReadFrom(&oddReader{data: up, rng: rand.New(rand.NewPCG(1, 1))})
		if err == nil && n != int64(len(up)) {
			err = io.ErrShortWrite
		}
		if err == nil {
			err = cc.CloseWrite()
		}
		errc <- err
	}()
	require.NoError(t, sc.SetReadDeadline(time.Now().Add(50*time.Second)))
	h := sha256.New()
	n, err := io.Copy(h, sc)
	require.NoError(t, err)
	require.EqualValues(t, len(up), n)
	require.NoError(t, <-errc)
	want := sha256.Sum256(up)
	require.Equal(t, want[:], h.Sum(nil))

	// After CloseWrite, ReadFrom refuses.
	_, err = cc.ReadFrom(&oddReader{data: []byte("late"), rng: rand.New(rand.NewPCG(2, 2))})
	require.ErrorIs(t, err, ErrClosed)
}
