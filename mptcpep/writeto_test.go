package mptcpep

import (
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestWriteToPipe receives over two lossy paths into a pipe through
// WriteTo (writev of the reassembly's blocks), with subflow readers
// placing in-order bytes in place and reinjections arriving as
// duplicates.
func TestWriteToPipe(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	w := newWorld(t, []pathSpec{{loss: 0.01}, {delay: 2 * time.Millisecond, loss: 0.01}}, Config{}, Config{})
	cc, sc := dialAccept(t, ctx, w, 80)
	waitSubflows(t, cc, 2)
	data := randomData(8<<20, 11)
	go func() {
		_, _ = sc.Write(data)
		_ = sc.CloseWrite()
	}()
	pr, pw, err := os.Pipe()
	require.NoError(t, err)
	t.Cleanup(func() { pr.Close(); pw.Close() })
	sum := make(chan [32]byte, 1)
	go func() {
		h := sha256.New()
		_, _ = io.Copy(h, pr)
		var s [32]byte
		copy(s[:], h.Sum(nil))
		sum <- s
	}()
	n, err := cc.WriteTo(pw)
	require.NoError(t, err)
	require.Equal(t, int64(len(data)), n)
	pw.Close()
	select {
	case s := <-sum:
		require.Equal(t, sha256.Sum256(data), s)
	case <-ctx.Done():
		t.Fatal("pipe reader timed out")
	}
	require.NotZero(t, w.client.MIB.RxInPlaceReads.Load(), mibString(&w.client.MIB))
}

// failAfter takes n bytes, then fails.
type failAfter struct {
	n   int
	got []byte
}

var errSink = errors.New("sink failed")

func (f *failAfter) Write(p []byte) (int, error) {
	k := min(len(p), f.n-len(f.got))
	f.got = append(f.got, p[:k]...)
	if k < len(p) {
		return k, errSink
	}
	return k, nil
}

// TestWriteToWriterError: a failing writer ends WriteTo with its error
// and the bytes it did not take stay for the next Read.
func TestWriteToWriterError(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	w := newWorld(t, []pathSpec{{}}, Config{}, Config{})
	cc, sc := dialAccept(t, ctx, w, 80)
	data := randomData(4<<20, 12)
	go func() {
		_, _ = sc.Write(data)
		_ = sc.CloseWrite()
	}()
	f := &failAfter{n: 1<<20 + 12345}
	n, err := cc.WriteTo(f)
	require.ErrorIs(t, err, errSink)
	require.Equal(t, int64(f.n), n)
	rest, err := io.ReadAll(struct{ io.Reader }{cc})
	require.NoError(t, err)
	require.Equal(t, data, append(f.got, rest...))
}

func TestVecWriter(t *testing.T) {
	for _, tc := range []struct {
		name   string
		sizes  []int
		writes []int
		wantN  []int
		short  bool
	}{
		{"fits", []int{3, 5}, []int{2, 6}, []int{2, 6}, false},
		{"spans all", []int{1, 1, 1}, []int{3}, []int{3}, false},
		{"short", []int{4, 4}, []int{5, 5}, []int{5, 3}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var bufs [][]byte
			total := 0
			for _, n := range tc.sizes {
				bufs = append(bufs, make([]byte, n))
				total += n
			}
			var v vecWriter
			v.reset(bufs)
			require.Equal(t, total, v.size)
			var in []byte
			for i, n := range tc.writes {
				p := make([]byte, n)
				for j := range p {
					p[j] = byte(len(in) + j + 1)
				}
				k, err := v.Write(p)
				require.Equal(t, tc.wantN[i], k)
				if tc.short && i == len(tc.writes)-1 {
					require.ErrorIs(t, err, errShortBuffer)
				} else {
					require.NoError(t, err)
				}
				in = append(in, p[:k]...)
			}
			var got []byte
			for _, b := range bufs {
				got = append(got, b...)
			}
			require.Equal(t, in, got[:len(in)])
			v.release()
			require.Empty(t, v.bufs)
			require.Nil(t, v.bufs[:cap(v.bufs)][0])
		})
	}
}
