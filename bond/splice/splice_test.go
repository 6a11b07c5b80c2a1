package splice

import (
	"bytes"
	"errors"
	"io"
	"net"
	"testing"
	"testing/iotest"

	"github.com/stretchr/testify/require"
)

// tcpPair is a connected pair of loopback TCP connections.
func tcpPair(t *testing.T) (a, b *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	s := <-accepted
	require.NotNil(t, s)
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// TestCopyHalfCloses: after the source's EOF the destination's peer reads
// EOF, and the other direction still carries data.
func TestCopyHalfCloses(t *testing.T) {
	a, b := tcpPair(t)
	payload := bytes.Repeat([]byte("0123456789abcdef"), 10_000)
	var reads, sum int
	n, err := Copy(a, iotest.HalfReader(bytes.NewReader(payload)), make([]byte, 4096), func(k int) { reads++; sum += k })
	require.NoError(t, err)
	require.Equal(t, int64(len(payload)), n)
	require.Equal(t, len(payload), sum, "onRead saw every byte")
	require.Greater(t, reads, 1)

	got, err := io.ReadAll(b) // ends at the FIN
	require.NoError(t, err)
	require.Equal(t, payload, got)

	// Half-closed, not closed: b can still answer.
	_, err = b.Write([]byte("reply"))
	require.NoError(t, err)
	require.NoError(t, b.CloseWrite())
	got, err = io.ReadAll(a)
	require.NoError(t, err)
	require.Equal(t, "reply", string(got))
}

// TestCopyDataWithEOF: a read that returns bytes and EOF together still
// delivers the bytes before the half-close.
func TestCopyDataWithEOF(t *testing.T) {
	var dst halfClosingBuffer
	n, err := Copy(&dst, iotest.DataErrReader(bytes.NewReader([]byte("last words"))), make([]byte, 64), nil)
	require.NoError(t, err)
	require.Equal(t, int64(10), n)
	require.Equal(t, "last words", dst.String())
	require.True(t, dst.closed)
}

func TestCopyErrors(t *testing.T) {
	t.Run("destination cannot half-close", func(t *testing.T) {
		var dst bytes.Buffer
		n, err := Copy(&dst, bytes.NewReader([]byte("abc")), make([]byte, 2), nil)
		require.ErrorIs(t, err, ErrNoHalfClose)
		require.Equal(t, int64(3), n, "the data went through first")
		require.Equal(t, "abc", dst.String())
	})
	t.Run("read error", func(t *testing.T) {
		boom := errors.New("boom")
		var dst halfClosingBuffer
		src := io.MultiReader(bytes.NewReader([]byte("abc")), iotest.ErrReader(boom))
		n, err := Copy(&dst, src, make([]byte, 8), nil)
		require.ErrorIs(t, err, boom)
		require.Equal(t, int64(3), n)
		require.False(t, dst.closed, "no FIN after an error: the relay aborts instead")
	})
	t.Run("write error", func(t *testing.T) {
		n, err := Copy(shortWriter{}, bytes.NewReader([]byte("abcdef")), make([]byte, 8), nil)
		require.ErrorIs(t, err, io.ErrShortWrite)
		require.Equal(t, int64(2), n, "what was written counts")
	})
	t.Run("half-close error", func(t *testing.T) {
		fail := errors.New("fin failed")
		dst := halfClosingBuffer{closeErr: fail}
		_, err := Copy(&dst, bytes.NewReader(nil), make([]byte, 8), nil)
		require.ErrorIs(t, err, fail)
	})
}

type halfClosingBuffer struct {
	bytes.Buffer
	closed   bool
	closeErr error
}

func (b *halfClosingBuffer) CloseWrite() error {
	b.closed = true
	return b.closeErr
}

// shortWriter takes two bytes of every write.
type shortWriter struct{}

func (shortWriter) Write(p []byte) (int, error) { return min(2, len(p)), io.ErrShortWrite }
