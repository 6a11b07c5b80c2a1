package engine

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/mptun/mptun/hostnet"
	"github.com/mptun/mptun/lab"
)

// TestEngineFollowsUplinks builds an engine on two veth uplinks (root:
// namespaces, TUNs, rules, nft) against a kernel MPTCP echo server, takes
// the second uplink down and up again under a running connection, and
// checks that Close leaves no TUN behind.
func TestEngineFollowsUplinks(t *testing.T) {
	lab.NeedRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	topo, err := lab.New(ctx, lab.Spec{Prefix: "mte", Paths: []lab.Path{{Name: "a", Direct: true}, {Name: "b", Direct: true}}})
	require.NoError(t, err)
	t.Cleanup(func() { _ = topo.Close() })
	require.NoError(t, topo.EnableKernelMPTCP(ctx))

	var ln net.Listener
	require.NoError(t, topo.Server.Do(func() error {
		var lc net.ListenConfig
		lc.SetMultipathTCP(true)
		var err error
		ln, err = lc.Listen(ctx, "tcp", netip.AddrPortFrom(topo.Paths[0].ServerAddr, 0).String())
		return err
	}))
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()

	var eng *Engine
	require.NoError(t, topo.Client.Do(func() error {
		var err error
		eng, err = Start(ctx, Config{
			Mode:    hostnet.ModeConnect,
			Uplinks: []hostnet.UplinkSpec{{Iface: topo.Paths[0].ClientIf}, {Iface: topo.Paths[1].ClientIf}},
			Logger:  slog.New(slog.NewTextHandler(io.Discard, nil)),
		})
		return err
	}))
	closed := false
	t.Cleanup(func() {
		if !closed {
			eng.Close()
		}
	})
	require.Len(t, eng.Uplinks(), 2)
	eng.WatchUplinks(ctx)

	conn, err := eng.Endpoint().Dial(ctx, netip.MustParseAddrPort(ln.Addr().String()))
	require.NoError(t, err)
	defer conn.Close()
	echo := func(msg string) {
		t.Helper()
		require.NoError(t, conn.SetDeadline(time.Now().Add(10*time.Second)))
		_, err := conn.Write([]byte(msg))
		require.NoError(t, err)
		got := make([]byte, len(msg))
		_, err = io.ReadFull(conn, got)
		require.NoError(t, err)
		require.Equal(t, msg, string(got))
	}
	echo("before")
	second := eng.Uplinks()[1].StackAddr
	onSecond := func() bool {
		for _, sf := range conn.Stats().Subflows {
			if sf.Local.Addr() == second && sf.State == "established" {
				return true
			}
		}
		return false
	}
	require.Eventually(t, onSecond, 10*time.Second, 50*time.Millisecond, "a subflow joins over the second uplink: %+v", conn.Stats().Subflows)

	link := func(state string) {
		t.Helper()
		_, err := topo.Client.Run(ctx, "ip", "link", "set", topo.Paths[1].ClientIf, state)
		require.NoError(t, err)
	}
	link("down")
	require.Eventually(t, func() bool { return eng.UplinkDown(LocalID(1)) }, 10*time.Second, 20*time.Millisecond)
	require.False(t, eng.UplinkDown(LocalID(0)))
	require.Eventually(t, func() bool { return !onSecond() }, 10*time.Second, 20*time.Millisecond,
		"the downed uplink's subflow is withdrawn at once: %+v", conn.Stats().Subflows)
	echo("during")

	link("up")
	require.Eventually(t, func() bool { return !eng.UplinkDown(LocalID(1)) }, 10*time.Second, 20*time.Millisecond)
	require.Eventually(t, onSecond, 20*time.Second, 50*time.Millisecond, "the returning uplink is joined again: %+v", conn.Stats().Subflows)
	echo("after")
	require.True(t, conn.MultipathTCP())

	conn.Abort()
	eng.Close()
	closed = true
	out, err := topo.Client.Run(ctx, "ip", "-o", "link", "show")
	require.NoError(t, err)
	for _, l := range strings.Split(string(out), "\n") {
		require.NotContains(t, l, ": "+hostnet.DefaultPrefix, "a TUN survived Close")
	}
}
