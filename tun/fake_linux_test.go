package tun

import (
	"bytes"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
	wgtun "golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// fakeDev is a tun.Device over one end of a SOCK_SEQPACKET socketpair, so
// the endpoint can be tested without root. It behaves like a TUN without
// offloads: one packet per Read, one write per packet.
type fakeDev struct {
	file   *os.File
	events chan wgtun.Event
	once   sync.Once
}

var _ wgtun.Device = (*fakeDev)(nil)

// newFakeDev returns the device and the peer end ("the kernel side").
func newFakeDev(t *testing.T) (*fakeDev, *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	// Non-blocking so os.NewFile registers with the poller (deadlines work).
	require.NoError(t, unix.SetNonblock(fds[0], true))
	require.NoError(t, unix.SetNonblock(fds[1], true))
	d := &fakeDev{file: os.NewFile(uintptr(fds[0]), "fake-tun"), events: make(chan wgtun.Event, 1)}
	peer := os.NewFile(uintptr(fds[1]), "fake-peer")
	t.Cleanup(func() {
		_ = d.Close()
		_ = peer.Close()
	})
	return d, peer
}

func (d *fakeDev) File() *os.File { return d.file }
func (d *fakeDev) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	n, err := d.file.Read(bufs[0][offset:])
	if err != nil {
		return 0, err
	}
	sizes[0] = n
	return 1, nil
}

func (d *fakeDev) Write(bufs [][]byte, offset int) (int, error) {
	total := 0
	for _, b := range bufs {
		n, err := d.file.Write(b[offset:])
		if err != nil {
			return total, err
		}
		total += n
	}
	return total, nil
}
func (d *fakeDev) MTU() (int, error)          { return 1500, nil }
func (d *fakeDev) Name() (string, error)      { return "fake", nil }
func (d *fakeDev) Events() <-chan wgtun.Event { return d.events }
func (d *fakeDev) BatchSize() int             { return 1 }
func (d *fakeDev) Close() error {
	var err error
	d.once.Do(func() {
		close(d.events)
		err = d.file.Close()
	})
	return err
}

// recorder is a NetworkDispatcher that keeps copies of delivered packets.
type recorder struct {
	mu   sync.Mutex
	pkts [][]byte
	got  chan struct{}
}

func newRecorder() *recorder { return &recorder{got: make(chan struct{}, 100)} }

func (r *recorder) DeliverNetworkPacket(_ tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	v := pkt.ToView()
	r.mu.Lock()
	r.pkts = append(r.pkts, bytes.Clone(v.AsSlice()))
	r.mu.Unlock()
	v.Release()
	r.got <- struct{}{}
}

func (r *recorder) DeliverLinkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer) {}

func (r *recorder) wait(t *testing.T, n int) [][]byte {
	t.Helper()
	for i := 0; i < n; i++ {
		select {
		case <-r.got:
		case <-time.After(5 * time.Second):
			t.Fatalf("only %d of %d packets delivered", i, n)
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.pkts
}

func TestFakeReceive(t *testing.T) {
	tests := []struct {
		name      string
		gro       bool
		trust     bool
		corrupt   bool
		delivered bool
	}{
		{"valid", false, false, false, true},
		{"valid gro", true, false, false, true},
		{"corrupt dropped", false, false, true, false},
		{"corrupt dropped by gro path", true, false, true, false},
		{"corrupt passes when trusted", false, true, true, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dev, peer := newFakeDev(t)
			ep, err := NewEndpoint(dev, Options{GRO: tc.gro, TrustRXChecksums: tc.trust})
			require.NoError(t, err)
			t.Cleanup(func() { _ = ep.Close() })
			require.False(t, ep.Offload())
			rec := newRecorder()
			ep.Attach(rec)

			bad := buildPacket(t, false, header.TCPProtocolNumber, []byte("payload"))
			if tc.corrupt {
				bad[len(bad)-1] ^= 1
			}
			good := buildPacket(t, true, header.UDPProtocolNumber, []byte("marker"))
			_, err = peer.Write(bad)
			require.NoError(t, err)
			_, err = peer.Write(good)
			require.NoError(t, err)

			want := 1
			if tc.delivered {
				want = 2
			}
			pkts := rec.wait(t, want)
			require.Len(t, pkts, want)
			require.Equal(t, good, pkts[len(pkts)-1])
			if tc.delivered {
				require.Equal(t, bad, pkts[0])
			}
			// Counters are updated after the batch was delivered.
			require.Eventually(t, func() bool { return ep.Stats().PacketsIn == 2 }, 5*time.Second, time.Millisecond)
			st := ep.Stats()
			require.Equal(t, uint64(len(bad)+len(good)), st.BytesIn)
			if tc.corrupt && !tc.trust {
				require.Equal(t, uint64(1), st.ChecksumErrors)
			} else {
				require.Zero(t, st.ChecksumErrors)
			}
		})
	}
}

func TestFakeWriteAndLifecycle(t *testing.T) {
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

	// Attach, detach, re-attach: the reader must see packets each time.
	for round := 0; round < 3; round++ {
		rec := newRecorder()
		ep.Attach(rec)
		require.True(t, ep.IsAttached())
		p := buildPacket(t, false, header.UDPProtocolNumber, []byte{byte(round)})
		_, err := peer.Write(p)
		require.NoError(t, err)
		require.Equal(t, p, rec.wait(t, 1)[0])
		ep.Attach(nil)
		require.False(t, ep.IsAttached())
		ep.Wait()
		require.Zero(t, endpointGoroutines(), "round %d", round)
	}

	ep.Attach(newRecorder())
	require.NoError(t, ep.Close())
	require.NoError(t, ep.Close())
	require.Zero(t, endpointGoroutines())
	require.False(t, ep.IsAttached())
	ep.Attach(newRecorder())
	require.False(t, ep.IsAttached(), "Attach after Close must not start a reader")

	var l2 stack.PacketBufferList
	l2.PushBack(stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(want[0])}))
	t.Cleanup(l2.DecRef)
	_, terr = ep.WritePackets(l2)
	require.IsType(t, &tcpip.ErrClosedForSend{}, terr)
	// The device is not ours to close.
	_, err = dev.File().Write(want[0])
	require.NoError(t, err)
}

func TestNewEndpointErrors(t *testing.T) {
	_, err := NewEndpoint(nil, Options{})
	require.Error(t, err)
	dev, _ := newFakeDev(t)
	_, err = NewEndpoint(dev, Options{Batch: -1})
	require.Error(t, err)
	// A regular file has no deadlines: the endpoint could not stop its
	// reader, so it refuses the device.
	f, err := os.CreateTemp(t.TempDir(), "nodeadline")
	require.NoError(t, err)
	t.Cleanup(func() { _ = f.Close() })
	_, err = NewEndpoint(&fakeDev{file: f, events: make(chan wgtun.Event)}, Options{})
	require.ErrorIs(t, err, os.ErrNoDeadline)

	ep, err := NewEndpoint(dev, Options{MTU: 1280})
	require.NoError(t, err)
	require.Equal(t, uint32(1280), ep.MTU())
	ep.SetMTU(1400)
	require.Equal(t, uint32(1400), ep.MTU())
}
