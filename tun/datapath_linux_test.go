package tun

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
)

// echoSize is what each case echoes: 64 MiB takes seconds per case, so
// -short echoes 4 MiB, still through every configuration both ways.
const echoSize, shortEchoSize = 64 << 20, 4 << 20

// TestEchoThroughTUN moves data both ways between kernel sockets and gVisor
// through a real TUN, with and without offloads, GRO and host GSO.
func TestEchoThroughTUN(t *testing.T) {
	requireRoot(t)
	// Each configuration owns its namespace and TUN, but they run one after
	// another: each moves data as fast as the machine allows.
	t.Parallel()
	size := echoSize
	if testing.Short() {
		size = shortEchoSize
	}
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
						roundTrip(t, client, size, uint64(i))
						select {
						case err := <-echoErr:
							require.NoError(t, err)
						case <-ctx.Done():
							t.Fatal("echo side did not finish")
						}
						after := ep.Stats()
						require.GreaterOrEqual(t, after.BytesIn-before.BytesIn, uint64(size))
						require.GreaterOrEqual(t, after.BytesOut-before.BytesOut, uint64(size))
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
