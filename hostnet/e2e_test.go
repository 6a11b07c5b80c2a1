package hostnet

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
)

func setupIn(t *testing.T, tp *topo, cfg Config) *Host {
	t.Helper()
	var h *Host
	runIn(t, tp.client, func() error {
		var err error
		h, err = Setup(context.Background(), cfg)
		return err
	})
	t.Cleanup(func() { require.NoError(t, h.Close()) })
	return h
}

// addDockerLikeForwardDrop installs "table ip filter { chain forward { type
// filter hook forward priority 0; policy drop; } }" in ns, as Docker does.
func addDockerLikeForwardDrop(t *testing.T, tp *topo) (*nftables.Conn, *nftables.Table, *nftables.Chain) {
	t.Helper()
	c, err := nftables.New(nftables.WithNetNSFd(int(tp.client)))
	require.NoError(t, err)
	tbl := c.AddTable(&nftables.Table{Family: nftables.TableFamilyIPv4, Name: "filter"})
	drop := nftables.ChainPolicyDrop
	ch := c.AddChain(&nftables.Chain{Name: "forward", Table: tbl, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &drop})
	require.NoError(t, c.Flush())
	return c, tbl, ch
}

func TestConnectModeEndToEnd(t *testing.T) {
	requireRoot(t)
	tp := newTopo(t)
	c, tbl, fwd := addDockerLikeForwardDrop(t, tp)

	// The "server" in the peer namespace answers with the address it saw.
	var ln net.Listener
	runIn(t, tp.peer, func() error {
		var err error
		ln, err = net.Listen("tcp4", netip.AddrPortFrom(tp.serverAddr, 0).String())
		return err
	})
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			host, _, _ := net.SplitHostPort(conn.RemoteAddr().String())
			fmt.Fprintln(conn, host)
			conn.Close()
		}
	}()
	port := uint16(ln.Addr().(*net.TCPAddr).Port)

	h := setupIn(t, tp, Config{Mode: ModeConnect, Instance: "e2ec", Uplinks: []UplinkSpec{
		{Iface: "c0"}, {Iface: "c1", Via: netip.MustParseAddr("10.92.0.1")},
	}})
	require.Len(t, h.Uplinks, 2)

	for i, u := range h.Uplinks {
		t.Run(u.Spec.Iface, func(t *testing.T) {
			st := newTUNStack(t, u.TUN, u.StackAddr, u.MTU)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			conn, err := gonet.DialContextTCP(ctx, st.s, tcpip.FullAddress{
				Addr: tcpip.AddrFrom4(tp.serverAddr.As4()), Port: port}, ipv4.ProtocolNumber)
			require.NoError(t, err)
			defer conn.Close()
			require.NoError(t, conn.SetReadDeadline(time.Now().Add(5*time.Second)))
			line, err := bufio.NewReader(conn).ReadString('\n')
			require.NoError(t, err)
			// SNATed to this uplink's address: proves policy routing chose
			// the uplink of the TUN the packet came from.
			require.Equal(t, tp.clientAddrs[i], strings.TrimSpace(line))
		})
	}

	require.NoError(t, h.Close())
	rules, err := c.GetRules(tbl, fwd)
	require.NoError(t, err)
	require.Empty(t, rules, "accept rules in the foreign forward chain must be removed")
}

func TestListenModeEndToEnd(t *testing.T) {
	requireRoot(t)
	tp := newTopo(t)
	const port = 5555
	h := setupIn(t, tp, Config{Mode: ModeListen, ListenPort: port, Instance: "e2el", Uplinks: []UplinkSpec{
		{Iface: "c0"}, {Iface: "c1", Via: netip.MustParseAddr("10.92.0.1")},
	}})

	tests := []struct {
		name   string
		uplink int
		dialTo string
		wantBy string // the peer address the stack sees
	}{
		{"c0 own address", 0, "10.91.0.2", "10.91.0.1"},
		{"c1 own address", 1, "10.92.0.2", "10.92.0.1"},
		// Another local address of the host arriving over c0, as a joining
		// subflow targeting another uplink's address would.
		{"c0 other local address", 0, "10.95.0.1", "10.91.0.1"},
	}
	// One listener per stack for all cases: gVisor keeps a closed
	// listener's port reserved while its connections linger.
	listeners := make([]*gonet.TCPListener, len(h.Uplinks))
	for i, u := range h.Uplinks {
		st := newTUNStack(t, u.TUN, u.StackAddr, u.MTU)
		ln, err := gonet.ListenTCP(st.s, tcpip.FullAddress{Addr: tcpip.AddrFrom4(u.StackAddr.As4()), Port: port}, ipv4.ProtocolNumber)
		require.NoError(t, err)
		t.Cleanup(func() { ln.Close() })
		listeners[i] = ln
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ln := listeners[tc.uplink]
			got := make(chan string, 1)
			go func() {
				conn, err := ln.Accept()
				if err != nil {
					got <- "accept: " + err.Error()
					return
				}
				defer conn.Close()
				host, _, _ := net.SplitHostPort(conn.RemoteAddr().String())
				fmt.Fprintln(conn, "hello")
				got <- host
			}()
			var line string
			runIn(t, tp.peer, func() error {
				conn, err := net.DialTimeout("tcp4", net.JoinHostPort(tc.dialTo, fmt.Sprint(port)), 10*time.Second)
				if err != nil {
					return err
				}
				defer conn.Close()
				if err := conn.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
					return err
				}
				line, err = bufio.NewReader(conn).ReadString('\n')
				return err
			})
			require.Equal(t, "hello\n", line)
			select {
			case by := <-got:
				require.Equal(t, tc.wantBy, by)
			case <-time.After(5 * time.Second):
				t.Fatal("stack listener saw no connection")
			}
		})
	}
}
