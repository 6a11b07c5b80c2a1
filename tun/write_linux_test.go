package tun

import (
	"bytes"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// TestWriteBatches: WritePackets needs no reader, writes in batches of
// Options.Batch and leaves the packets to the caller.
func TestWriteBatches(t *testing.T) {
	t.Parallel()
	dev, peer := newFakeDev(t)
	ep, err := NewEndpoint(dev, Options{Batch: 3})
	require.NoError(t, err)
	t.Cleanup(func() { _ = ep.Close() })

	// Writes work without a dispatcher, and split into batches of 3.
	var list stack.PacketBufferList
	var want [][]byte
	for i := 0; i < 7; i++ {
		b := buildPacket(t, i%2 == 0, header.UDPProtocolNumber, bytes.Repeat([]byte{byte(i)}, i*100))
		want = append(want, b)
		list.PushBack(stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(b)}))
	}
	n, terr := ep.WritePackets(list)
	require.Nil(t, terr)
	require.Equal(t, 7, n)
	// WritePackets must not release the packets: the caller still owns them.
	for _, p := range list.AsSlice() {
		require.Positive(t, p.ReadRefs())
	}
	list.DecRef()
	buf := make([]byte, 2048)
	for i, w := range want {
		require.NoError(t, peer.SetReadDeadline(time.Now().Add(5*time.Second)))
		m, err := peer.Read(buf)
		require.NoError(t, err)
		require.Equal(t, w, buf[:m], "packet %d", i)
	}
	st := ep.Stats()
	require.Equal(t, uint64(7), st.PacketsOut)
	require.Equal(t, uint64(3), st.WriteBatches)

}
