package lab_test

import (
	"context"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/mptun/mptun/lab"
	"github.com/stretchr/testify/require"
)

func newTopo(t *testing.T, paths ...lab.Path) *lab.Topology {
	t.Helper()
	lab.NeedRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	topo, err := lab.New(ctx, lab.Spec{Prefix: "mtl", Paths: paths})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, topo.Close()) })
	return topo
}

// listen starts a TCP server in the server namespace that discards input
// and returns the listener address.
func listen(t *testing.T, topo *lab.Topology, addr netip.Addr, mptcp bool) *net.TCPAddr {
	t.Helper()
	var ln net.Listener
	require.NoError(t, topo.Server.Do(func() error {
		var lc net.ListenConfig
		lc.SetMultipathTCP(mptcp)
		var err error
		ln, err = lc.Listen(context.Background(), "tcp4", netip.AddrPortFrom(addr, 0).String())
		return err
	}))
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(io.Discard, c) }()
		}
	}()
	return ln.Addr().(*net.TCPAddr)
}

func dial(t *testing.T, topo *lab.Topology, from netip.Addr, to *net.TCPAddr, mptcp bool) *net.TCPConn {
	t.Helper()
	var c net.Conn
	require.NoError(t, topo.Client.Do(func() error {
		d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(from, 0))}
		d.SetMultipathTCP(mptcp)
		var err error
		c, err = d.Dial("tcp4", to.String())
		return err
	}))
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

func TestSourceAddressSelectsPath(t *testing.T) {
	topo := newTopo(t, lab.Path{Direct: true}, lab.Path{Direct: true}, lab.Path{Direct: true})
	require.Nil(t, topo.Emu, "all-direct topologies need no emulator namespace")
	srv := listen(t, topo, netip.IPv4Unspecified(), false)
	tests := []struct{ from, to int }{{0, 0}, {1, 0}, {2, 0}, {2, 1}}
	for _, tc := range tests {
		before, err := topo.Counters()
		require.NoError(t, err)
		to := &net.TCPAddr{IP: topo.Paths[tc.to].ServerAddr.AsSlice(), Port: srv.Port}
		c := dial(t, topo, topo.Paths[tc.from].ClientAddr, to, false)
		_, err = c.Write(make([]byte, 1<<20))
		require.NoError(t, err)
		// The server closes after reading everything: then all has been sent.
		require.NoError(t, c.CloseWrite())
		require.NoError(t, c.SetReadDeadline(time.Now().Add(5*time.Second)))
		_, err = io.Copy(io.Discard, c)
		require.NoError(t, err)
		after, err := topo.Counters()
		require.NoError(t, err)
		for i := range topo.Paths {
			sent := after[i].TxBytes - before[i].TxBytes
			if i == tc.from {
				require.Greater(t, sent, uint64(1<<20), "path %d->server %d: data must leave by path %d", tc.from, tc.to, i)
			} else {
				require.Less(t, sent, uint64(64<<10), "path %d->server %d: path %d carried data", tc.from, tc.to, i)
			}
		}
	}
}

func TestKernelMPTCPUsesBothEmulatedPaths(t *testing.T) {
	p := lab.Path{Rate: 40_000_000, Delay: 5 * time.Millisecond}
	topo := newTopo(t, p, p)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, topo.EnableKernelMPTCP(ctx))
	srv := listen(t, topo, topo.Paths[0].ServerAddr, true)
	before, err := topo.Counters()
	require.NoError(t, err)
	c := dial(t, topo, topo.Paths[0].ClientAddr, srv, true)
	mp, err := c.MultipathTCP()
	require.NoError(t, err)
	require.True(t, mp, "kernel MPTCP fell back to TCP")
	buf := make([]byte, 64<<10)
	deadline := time.Now().Add(1500 * time.Millisecond)
	require.NoError(t, c.SetWriteDeadline(deadline.Add(time.Second)))
	for time.Now().Before(deadline) {
		_, err := c.Write(buf)
		require.NoError(t, err)
	}
	after, err := topo.Counters()
	require.NoError(t, err)
	var total uint64
	sent := make([]uint64, 2)
	for i := range sent {
		sent[i] = after[i].TxBytes - before[i].TxBytes
		total += sent[i]
	}
	t.Logf("path bytes: %v", sent)
	// 1.5 s at 2x40 Mbit/s is ~15 MB; one path alone cannot carry 10 MB.
	require.Greater(t, total, uint64(9<<20))
	for i := range sent {
		require.Greater(t, float64(sent[i])/float64(total), 0.2, "path %d share", i)
	}
}

func TestCloseAndCleanupStale(t *testing.T) {
	lab.NeedRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	topo, err := lab.New(ctx, lab.Spec{Prefix: "mtl", Paths: []lab.Path{{Delay: time.Millisecond}, {Direct: true}}})
	require.NoError(t, err)
	t.Cleanup(func() { _ = topo.Close() })
	names := []string{topo.Client.Name, topo.Server.Name, topo.Emu.Name}

	// A crashed run: pid 999999999 is above any pid_max.
	stale := &lab.NS{Name: "mtl-999999999-dead-c"}
	require.NoError(t, sh(ctx, "ip", "netns", "add", stale.Name))
	t.Cleanup(func() { _ = sh(context.Background(), "ip", "netns", "del", stale.Name) })

	removed, err := lab.CleanupStale(ctx, "mtl")
	require.NoError(t, err)
	require.Contains(t, removed, stale.Name)
	for _, n := range names {
		require.NotContains(t, removed, n, "live topology must survive")
		require.FileExists(t, lab.NetnsDir+"/"+n)
	}

	require.NoError(t, topo.Close())
	require.NoError(t, topo.Close(), "second Close is a no-op")
	for _, n := range names {
		_, err := os.Stat(lab.NetnsDir + "/" + n)
		require.ErrorIs(t, err, os.ErrNotExist)
	}
}

func TestSpecValidation(t *testing.T) {
	lab.NeedRoot(t)
	tests := []struct {
		name string
		spec lab.Spec
	}{
		{"bad prefix", lab.Spec{Prefix: "MTL!", Paths: []lab.Path{{}}}},
		{"no paths", lab.Spec{Prefix: "mtl"}},
		{"direct with delay", lab.Spec{Prefix: "mtl", Paths: []lab.Path{{Direct: true, Delay: time.Millisecond}}}},
		{"bad loss", lab.Spec{Prefix: "mtl", Paths: []lab.Path{{Loss: 2}}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			topo, err := lab.New(ctx, tc.spec)
			require.Error(t, err)
			require.Nil(t, topo)
		})
	}
	// Failed builds must not leave namespaces behind.
	ents, err := os.ReadDir(lab.NetnsDir)
	require.NoError(t, err)
	for _, e := range ents {
		require.NotContains(t, e.Name(), "mtl-"+strconv.Itoa(os.Getpid())+"-", "leftover %s", e.Name())
	}
}
