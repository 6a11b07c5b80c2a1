package mptcpep

import (
	"context"
	"crypto/sha256"
	"io"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestSlowReaderKeepsWindow: the application reads slower than the path
// delivers, with a connection receive buffer much smaller than gVisor's
// subflow buffer. The peer sends by gVisor's window, so the subflow reader
// must leave what does not fit the connection window in gVisor (closing
// its window) rather than read and drop it: dropped bytes were already
// acknowledged at the subflow level and come back only by an MPTCP-level
// retransmission.
func TestSlowReaderKeepsWindow(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	w := newWorld(t, []pathSpec{{}, {delay: time.Millisecond}}, Config{ReceiveBuffer: 256 << 10}, Config{})
	cc, sc := dialAccept(t, ctx, w, 80)
	down := randomData(8<<20, 5)
	errc := make(chan error, 1)
	go func() {
		_, err := sc.Write(down)
		if err == nil {
			err = sc.CloseWrite()
		}
		errc <- err
	}()
	require.NoError(t, cc.SetReadDeadline(time.Now().Add(50*time.Second)))
	h := sha256.New()
	buf := make([]byte, 16<<10)
	var n int
	for i := 0; ; i++ {
		k, err := cc.Read(buf)
		h.Write(buf[:k])
		n += k
		if err == io.EOF {
			break
		}
		require.NoError(t, err)
		if i%16 == 0 {
			time.Sleep(time.Millisecond) // slower than the paths
		}
	}
	require.NoError(t, <-errc)
	require.Equal(t, len(down), n)
	want := sha256.Sum256(down)
	require.Equal(t, want[:], h.Sum(nil))
	require.Zero(t, w.client.MIB.WindowDropBytes.Load(), mibString(&w.client.MIB))
	require.Zero(t, w.server.MIB.MPTCPRetransmits.Load(), mibString(&w.server.MIB))
}
