package hostnet

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// snapshot is everything in a namespace Setup may touch.
type snapshot struct {
	links     []string
	rules     []string
	routes    []string // all tables except local
	nftTables []string
	forward   string
}

func takeSnapshot(t *testing.T, tp *topo) snapshot {
	t.Helper()
	var s snapshot
	links, err := tp.cnl.LinkList()
	require.NoError(t, err)
	for _, l := range links {
		s.links = append(s.links, l.Attrs().Name)
	}
	rules, err := tp.cnl.RuleList(netlink.FAMILY_ALL)
	require.NoError(t, err)
	for _, r := range rules {
		s.rules = append(s.rules, r.String())
	}
	routes, err := tp.cnl.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	require.NoError(t, err)
	for _, r := range routes {
		if r.Table != unix.RT_TABLE_LOCAL {
			s.routes = append(s.routes, r.String())
		}
	}
	c, err := nftables.New(nftables.WithNetNSFd(int(tp.client)))
	require.NoError(t, err)
	tables, err := c.ListTables()
	require.NoError(t, err)
	for _, tb := range tables {
		s.nftTables = append(s.nftTables, tb.Name)
	}
	runIn(t, tp.client, func() error {
		s.forward, err = readSysctl(sysctlPath("net", "ipv4", "ip_forward"))
		return err
	})
	return s
}

func TestSetupCreatesAndCloseRemoves(t *testing.T) {
	requireRoot(t)
	tests := []struct {
		name string
		mode Mode
	}{
		{"connect", ModeConnect},
		{"listen", ModeListen},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tp := newTopo(t)
			before := takeSnapshot(t, tp)
			require.Equal(t, "0", before.forward)
			var h *Host
			runIn(t, tp.client, func() error {
				var err error
				h, err = Setup(context.Background(), Config{Mode: tc.mode, ListenPort: 443, Instance: "st",
					Uplinks: []UplinkSpec{{Iface: "c0"}, {Iface: "c1", Backup: true}}, MTU: 1400})
				return err
			})
			t.Cleanup(func() { _ = h.Close() })

			require.Equal(t, "nftables table ip mptun_st", "nftables table ip "+h.NFTable)
			want := []struct {
				tun, ext, stack string
				gw              netip.Addr
			}{
				{"mptstu0", "10.91.0.2", "198.18.0.2", netip.MustParseAddr("10.91.0.1")},
				{"mptstu1", "10.92.0.2", "198.18.1.2", netip.Addr{}}, // no route via c1: on-link
			}
			for i, u := range h.Uplinks {
				require.Equal(t, want[i].tun, u.TUNName)
				require.Equal(t, want[i].ext, u.ExternalAddr.String())
				require.Equal(t, want[i].stack, u.StackAddr.String())
				require.Equal(t, want[i].gw, u.Gateway)
				require.Equal(t, 1400, u.MTU)
				require.Equal(t, DefaultTableBase+i, u.Table)

				l, err := tp.cnl.LinkByName(u.TUNName)
				require.NoError(t, err)
				require.Equal(t, 1400, l.Attrs().MTU)
				require.NotZero(t, l.Attrs().Flags&(1<<0), "TUN must be up")
				addrs, err := tp.cnl.AddrList(l, netlink.FAMILY_V4)
				require.NoError(t, err)
				require.Len(t, addrs, 1)
				require.Equal(t, u.KernelAddr.String()+"/30", addrs[0].IPNet.String())

				rules, err := tp.cnl.RuleListFiltered(netlink.FAMILY_V4, &netlink.Rule{Table: u.Table}, netlink.RT_FILTER_TABLE)
				require.NoError(t, err)
				require.Len(t, rules, 2)
				var iifs, srcs []string
				for _, r := range rules {
					require.Equal(t, DefaultRulePriority, r.Priority)
					iifs = append(iifs, r.IifName)
					if r.Src != nil {
						srcs = append(srcs, r.Src.String())
					}
				}
				require.Contains(t, iifs, u.TUNName)
				require.Equal(t, []string{u.Prefix().Masked().String()}, srcs)

				routes, err := tp.cnl.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: u.Table}, netlink.RT_FILTER_TABLE)
				require.NoError(t, err)
				require.Len(t, routes, 3)
				var def *netlink.Route
				for i := range routes {
					if routes[i].Dst == nil || routes[i].Dst.String() == "0.0.0.0/0" {
						def = &routes[i]
					}
				}
				require.NotNil(t, def, "default route in table %d", u.Table)
				if u.Gateway.IsValid() {
					require.Equal(t, u.Gateway.String(), def.Gw.String())
				} else {
					require.Nil(t, def.Gw)
				}
			}
			c, err := nftables.New(nftables.WithNetNSFd(int(tp.client)))
			require.NoError(t, err)
			tbl, err := c.ListTableOfFamily(h.NFTable, nftables.TableFamilyIPv4)
			require.NoError(t, err)
			chainName := map[Mode]string{ModeConnect: "postrouting", ModeListen: "prerouting"}[tc.mode]
			ch, err := c.ListChain(tbl, chainName)
			require.NoError(t, err)
			nrules, err := c.GetRules(tbl, ch)
			require.NoError(t, err)
			require.Len(t, nrules, 2)
			require.Equal(t, "1", takeSnapshot(t, tp).forward)

			require.NoError(t, h.Close())
			require.NoError(t, h.Close(), "Close is idempotent")
			require.Equal(t, before, takeSnapshot(t, tp))
		})
	}
}

func TestSetupFailureLeavesNothing(t *testing.T) {
	requireRoot(t)
	tests := []struct {
		name    string
		prepare func(t *testing.T, tp *topo)
		uplinks []UplinkSpec
		wantErr string
	}{
		{
			name:    "missing uplink",
			uplinks: []UplinkSpec{{Iface: "c0"}, {Iface: "eth9"}},
			wantErr: "uplink eth9: no such interface",
		},
		{
			name: "uplink without IPv4",
			prepare: func(t *testing.T, tp *topo) {
				require.NoError(t, tp.cnl.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "d0"}, PeerName: "d0p"}))
			},
			uplinks: []UplinkSpec{{Iface: "c0"}, {Iface: "d0"}},
			wantErr: "uplink d0: no IPv4 address",
		},
		{
			// A multi-homed server's address on lo: packets for it arrive
			// on the real interfaces, which the error names.
			name: "loopback uplink",
			prepare: func(t *testing.T, tp *topo) {
				lo, err := tp.cnl.LinkByName("lo")
				require.NoError(t, err)
				require.NoError(t, tp.cnl.AddrAdd(lo, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 77, 0, 1), Mask: net.CIDRMask(32, 32)}}))
			},
			uplinks: []UplinkSpec{{Iface: "lo"}},
			wantErr: "uplink lo: a loopback interface carries no traffic from other hosts: give --uplink for each interface your peers reach this host through (candidates here: c0, c1)",
		},
		{
			// Fails after uplink c0 is fully plumbed: the second TUN's name
			// is taken, so the rollback is exercised.
			name: "second TUN fails",
			prepare: func(t *testing.T, tp *topo) {
				require.NoError(t, tp.cnl.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "mptfailu1"}, PeerName: "mptfailx"}))
			},
			uplinks: []UplinkSpec{{Iface: "c0"}, {Iface: "c1"}},
			wantErr: "uplink c1: TUN name mptfailu1 is taken",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tp := newTopo(t)
			if tc.prepare != nil {
				tc.prepare(t, tp)
			}
			before := takeSnapshot(t, tp)
			var err error
			require.NoError(t, inNS(tp.client, func() error {
				var h *Host
				h, err = Setup(context.Background(), Config{Mode: ModeConnect, Instance: "fail", Uplinks: tc.uplinks})
				if h != nil {
					t.Error("Setup returned a Host together with an error")
				}
				return nil
			}))
			require.Error(t, err)
			require.True(t, strings.Contains(err.Error(), tc.wantErr), "error %q lacks %q", err, tc.wantErr)
			require.Equal(t, before, takeSnapshot(t, tp))
		})
	}
}

func TestSetupCancelled(t *testing.T) {
	requireRoot(t)
	tp := newTopo(t)
	before := takeSnapshot(t, tp)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var err error
	require.NoError(t, inNS(tp.client, func() error {
		_, err = Setup(ctx, Config{Mode: ModeConnect, Uplinks: []UplinkSpec{{Iface: "c0"}}})
		return nil
	}))
	require.ErrorIs(t, err, context.Canceled)
	require.Equal(t, before, takeSnapshot(t, tp))
}
