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
	"gvisor.dev/gvisor/pkg/tcpip"
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

func (d *fakeDev) MTU() (int, error) { return 1500, nil }

func (d *fakeDev) Name() (string, error) { return "fake", nil }

func (d *fakeDev) Events() <-chan wgtun.Event { return d.events }

func (d *fakeDev) BatchSize() int { return 1 }

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
