package tun

import (
	"bytes"
	"context"
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
)

const echoSize = 64 << 20

// halfCloser is satisfied by *net.TCPConn and *gonet.TCPConn.
type halfCloser interface {
	net.Conn
	CloseWrite() error
}

// echo copies c back to itself until EOF, then half-closes.
func echo(c halfCloser) error {
	defer c.Close()
	if _, err := io.Copy(c, c); err != nil {
		return err
	}
	return c.CloseWrite()
}

// roundTrip sends size pseudo-random bytes on c, half-closes, reads the echo
// until EOF, and checks length and SHA-256.
func roundTrip(t *testing.T, c halfCloser, size int, seed uint64) {
	t.Helper()
	require.NoError(t, c.SetDeadline(time.Now().Add(60*time.Second)))
	sent := sha256.New()
	werr := make(chan error, 1)
	go func() {
		rng := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)})
		buf := make([]byte, 256<<10)
		for left := size; left > 0; {
			n := min(left, len(buf))
			_, _ = rng.Read(buf[:n])
			sent.Write(buf[:n])
			if _, err := c.Write(buf[:n]); err != nil {
				werr <- err
				return
			}
			left -= n
		}
		werr <- c.CloseWrite()
	}()
	got := sha256.New()
	n, err := io.Copy(got, c)
	require.NoError(t, err)
	require.NoError(t, <-werr)
	require.Equal(t, int64(size), n)
	require.Equal(t, sent.Sum(nil), got.Sum(nil), "echoed data differs")
}

func TestEchoThroughTUN(t *testing.T) {
	requireRoot(t)
	for _, cfg := range []struct {
		name                   string
		offloads, gro, hostGSO bool
	}{
		{"offloads/gro", true, true, false},
		{"offloads/nogro", true, false, false},
		{"nooffloads/gro", false, true, false},
		{"offloads/gro/hostgso", true, true, true},
	} {
		{
			offloads := cfg.offloads
			t.Run(cfg.name, func(t *testing.T) {
				f := newFixture(t, offloads, 1500)
				ep := newEndpointIn(t, f, Options{GRO: cfg.gro, HostGSO: cfg.hostGSO})
				require.Equal(t, offloads, ep.Offload())
				s := newStack(t, ep)
				waitReadyIn(t, f.ns, f.name)

				tests := []struct {
					name       string
					kern, gv   netip.Addr
					kernelDial bool
				}{
					{"v4/kernel-dials-gvisor", kernAddr4, gvAddr4, true},
					{"v4/gvisor-dials-kernel", kernAddr4, gvAddr4, false},
					{"v6/kernel-dials-gvisor", kernAddr6, gvAddr6, true},
					{"v6/gvisor-dials-kernel", kernAddr6, gvAddr6, false},
				}
				for i, tc := range tests {
					t.Run(tc.name, func(t *testing.T) {
						ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
						t.Cleanup(cancel)
						before := ep.Stats()
						t.Cleanup(func() {
							if t.Failed() {
								st := s.Stats()
								t.Logf("endpoint %+v", ep.Stats())
								t.Logf("ip malformed %d, tcp checksum errors %d, invalid %d, retransmits %d, timeouts %d",
									st.IP.MalformedPacketsReceived.Value(), st.TCP.ChecksumErrors.Value(),
									st.TCP.InvalidSegmentsReceived.Value(), st.TCP.Retransmits.Value(), st.TCP.Timeouts.Value())
							}
						})
						echoErr := make(chan error, 1)
						var client halfCloser
						if tc.kernelDial {
							ln, err := gonet.ListenTCP(s, fullAddr(tc.gv, 0), protoOf(tc.gv))
							require.NoError(t, err)
							t.Cleanup(func() { _ = ln.Close() })
							port := ln.Addr().(*net.TCPAddr).Port
							go func() {
								c, err := ln.Accept()
								if err != nil {
									echoErr <- err
									return
								}
								echoErr <- echo(c.(*gonet.TCPConn))
							}()
							require.NoError(t, inNetns(f.ns, func() error {
								var d net.Dialer
								c, err := d.DialContext(ctx, "tcp", netip.AddrPortFrom(tc.gv, uint16(port)).String())
								if err == nil {
									client = c.(*net.TCPConn)
								}
								return err
							}))
						} else {
							var ln net.Listener
							require.NoError(t, inNetns(f.ns, func() error {
								var err error
								ln, err = net.Listen("tcp", netip.AddrPortFrom(tc.kern, 0).String())
								return err
							}))
							t.Cleanup(func() { _ = ln.Close() })
							go func() {
								c, err := ln.Accept()
								if err != nil {
									echoErr <- err
									return
								}
								echoErr <- echo(c.(*net.TCPConn))
							}()
							port := uint16(ln.Addr().(*net.TCPAddr).Port)
							c, err := gonet.DialContextTCP(ctx, s, fullAddr(tc.kern, port), protoOf(tc.kern))
							require.NoError(t, err)
							client = c
						}
						t.Cleanup(func() { _ = client.Close() })
						roundTrip(t, client, echoSize, uint64(i))
						select {
						case err := <-echoErr:
							require.NoError(t, err)
						case <-ctx.Done():
							t.Fatal("echo side did not finish")
						}
						after := ep.Stats()
						require.GreaterOrEqual(t, after.BytesIn-before.BytesIn, uint64(echoSize))
						require.GreaterOrEqual(t, after.BytesOut-before.BytesOut, uint64(echoSize))
						require.Zero(t, after.ReadErrors)
						require.Zero(t, after.ChecksumErrors)
						outAvg := (after.BytesOut - before.BytesOut) / max(after.PacketsOut-before.PacketsOut, 1)
						if cfg.hostGSO {
							require.Greater(t, outAvg, uint64(1500), "host GSO must hand over super-segments")
						} else {
							require.LessOrEqual(t, outAvg, uint64(1500), "without host GSO every segment fits the MTU")
						}
						t.Logf("stats delta: in %d pkts/%d batches, out %d pkts/%d batches, drops %d",
							after.PacketsIn-before.PacketsIn, after.ReadBatches-before.ReadBatches,
							after.PacketsOut-before.PacketsOut, after.WriteBatches-before.WriteBatches,
							after.Drops-before.Drops)
					})
				}
			})
		}
	}
}

// endpointGoroutines counts the goroutines the endpoint started (reader and
// event loops). Other goroutines, like the qdisc's, may be inside an
// Endpoint method too, so the creator is what identifies them.
func endpointGoroutines() int {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	n := 0
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		if strings.Contains(string(g), "created by github.com/mptun/mptun/tun.(*Endpoint).Attach") {
			n++
		}
	}
	return n
}

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

func TestCloseDevice(t *testing.T) {
	requireRoot(t)
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
