package tun

import (
	"context"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	wgtun "golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

func TestNewEndpointErrors(t *testing.T) {
	t.Parallel()
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

// TestLifecycle, TestAttachDetachClose and TestTeardownUnderLoad count the
// endpoint's goroutines in the whole process, so they do not call
// t.Parallel (parallel tests run after them).

// TestLifecycle: against a real TUN, NewEndpoint starts nothing, the NIC
// starts the reader and the event loop, closing the stack stops them, and
// a new endpoint on the same device carries traffic again.
func TestLifecycle(t *testing.T) {
	requireRoot(t)
	f := newFixture(t, true, 1500)
	base := endpointGoroutines()

	ep := newEndpointIn(t, f, Options{GRO: true})
	require.False(t, ep.IsAttached())
	require.Equal(t, base, endpointGoroutines(), "NewEndpoint must start nothing")
	require.Equal(t, uint32(1500), ep.MTU())

	s := newStack(t, ep)
	require.True(t, ep.IsAttached())
	require.Equal(t, base+2, endpointGoroutines())
	waitReadyIn(t, f.ns, f.name)

	// Detach and re-attach: traffic must flow again afterwards.
	s.Close()
	s.Wait()
	require.False(t, ep.IsAttached())
	require.Equal(t, base, endpointGoroutines(), "stack close must stop the reader")

	ep2 := newEndpointIn(t, f, Options{GRO: true})
	s2 := newStack(t, ep2)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	ln, err := gonet.ListenTCP(s2, fullAddr(gvAddr4, 0), protoOf(gvAddr4))
	require.NoError(t, err)
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err == nil {
			_ = echo(c.(*gonet.TCPConn))
		}
	}()
	var client *net.TCPConn
	require.NoError(t, inNetns(f.ns, func() error {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", netip.AddrPortFrom(gvAddr4, uint16(ln.Addr().(*net.TCPAddr).Port)).String())
		if err == nil {
			client = c.(*net.TCPConn)
		}
		return err
	}))
	t.Cleanup(func() { _ = client.Close() })
	roundTrip(t, client, 1<<20, 7)

	require.NoError(t, ep2.Close())
	require.NoError(t, ep2.Close(), "Close must be idempotent")
	require.False(t, ep2.IsAttached())
	require.Equal(t, base, endpointGoroutines(), "Close must leave no goroutine")
	// The device stays usable: the endpoint does not own it by default.
	_, err = f.dev.File().SyscallConn()
	require.NoError(t, err)
}

// TestAttachDetachClose: every Attach starts a reader and the next stops
// it; after Close nothing starts again, writes fail and the device, which
// is not the endpoint's, stays open.
func TestAttachDetachClose(t *testing.T) {
	dev, peer := newFakeDev(t)
	ep, err := NewEndpoint(dev, Options{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = ep.Close() })

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

	p := buildPacket(t, true, header.UDPProtocolNumber, []byte("after close"))
	var l2 stack.PacketBufferList
	l2.PushBack(stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(p)}))
	t.Cleanup(l2.DecRef)
	_, terr := ep.WritePackets(l2)
	require.IsType(t, &tcpip.ErrClosedForSend{}, terr)
	// The device is not ours to close.
	_, err = dev.File().Write(p)
	require.NoError(t, err)
}

// TestCloseDevice: with Options.CloseDevice, Close runs the stack's close
// action once and closes the device.
func TestCloseDevice(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	f := newFixture(t, false, 1400)
	ep := newEndpointIn(t, f, Options{CloseDevice: true, MTU: 1300})
	require.Equal(t, uint32(1300), ep.MTU())
	require.Equal(t, 1, ep.readBufs)
	newStack(t, ep)
	require.True(t, ep.IsAttached())
	// The stack installed its own close action (remove the NIC); replace it
	// to observe that Close runs it.
	called := 0
	ep.SetOnCloseAction(func() { called++ })
	require.NoError(t, ep.Close())
	require.NoError(t, ep.Close())
	require.Equal(t, 1, called)
	// The device file is closed now.
	_, err := f.dev.File().Write([]byte{0x45})
	require.ErrorIs(t, err, os.ErrClosed)
}

// TestTeardownUnderLoad closes the stack while the kernel is sending into
// the TUN. gVisor's Stack.Wait holds the stack lock while it calls the
// link's Attach(nil) and Wait, and a reader in the middle of a delivery
// needs that lock: a Wait that joins such a reader deadlocks.
func TestTeardownUnderLoad(t *testing.T) {
	requireRoot(t)
	for round := 0; round < 4; round++ {
		t.Run(strings.Repeat("r", round+1), func(t *testing.T) {
			f := newFixture(t, true, 1500)
			ep := newEndpointIn(t, f, Options{GRO: round%2 == 0})
			s := newStack(t, ep)
			waitReadyIn(t, f.ns, f.name)
			ln, err := gonet.ListenTCP(s, fullAddr(gvAddr4, 0), protoOf(gvAddr4))
			require.NoError(t, err)
			go func() {
				c, err := ln.Accept()
				if err == nil {
					_, _ = io.Copy(io.Discard, c)
				}
			}()
			var kc net.Conn
			require.NoError(t, inNetns(f.ns, func() error {
				c, err := net.DialTimeout("tcp", netip.AddrPortFrom(gvAddr4, uint16(ln.Addr().(*net.TCPAddr).Port)).String(), 5*time.Second)
				kc = c
				return err
			}))
			t.Cleanup(func() { _ = kc.Close() })
			go func() {
				buf := make([]byte, 1<<20)
				for {
					if _, err := kc.Write(buf); err != nil {
						return
					}
				}
			}()
			time.Sleep(time.Duration(50+30*round) * time.Millisecond)
			done := make(chan struct{})
			go func() {
				s.Close()
				s.Wait()
				close(done)
			}()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("stack teardown under load deadlocked")
			}
			require.False(t, ep.IsAttached())
			require.Zero(t, endpointGoroutines())
		})
	}
}
