package mptcpep

import (
	"context"
	"io"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestPeerWindowCoversReceiveBuffer: the connection-level window a sender
// sees is the receiver's subflow TCP window (the layer does not rewrite
// it), so gVisor's subflow receive buffer must be large from the start.
// gVisor grows a buffer by receive-buffer moderation only when the reader
// calls ModerateRecvBuf, which the subflow readers do not: with its 1 MiB
// default the window stayed at ~512 KiB (gVisor counts segment memory, about
// twice the payload), under 45 ms at 93 Mbit/s. Then a burst of tail drops
// on one uplink stalled the whole connection until that subflow recovered
// (a bonded download right after an upload: seconds at 30-70 Mbit/s,
// 100 ms slices at zero, the sender at PeerWindowFull).
func TestPeerWindowCoversReceiveBuffer(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	w := newWorld(t, []pathSpec{{}, {}}, Config{}, Config{})
	cc, sc := dialAccept(t, ctx, w, 80)
	waitSubflows(t, cc, 2)
	data := randomData(256<<10, 7)
	go func() { _, _ = sc.Write(data) }()
	_, err := io.ReadFull(cc, make([]byte, len(data)))
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		sc.mu.Lock()
		defer sc.mu.Unlock()
		return sc.snd.Una() == sc.sndNxt
	}, 5*time.Second, 10*time.Millisecond)
	sc.mu.Lock()
	win := int64(sc.sndEdge - sc.snd.Una())
	sc.mu.Unlock()
	t.Logf("peer window %d KiB", win>>10)
	require.GreaterOrEqual(t, win, int64(2<<20), "connection-level window the sender sees")
}
