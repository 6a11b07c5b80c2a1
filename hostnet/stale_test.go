package hostnet

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
)

func TestInstanceOf(t *testing.T) {
	tests := []struct {
		name, want string
		ok         bool
	}{
		{"mptab12u0", "ab12", true},
		{"mptab12u13", "ab12", true},
		{"mptuu1", "u", true},
		{"mptab12u", "", false},
		{"mptu0", "", false},
		{"mptab12x0", "", false},
		{"eth0", "", false},
		{"mptab12u0a", "", false},
	}
	for _, tc := range tests {
		got, ok := instanceOf("mpt", tc.name)
		require.Equal(t, tc.ok, ok, tc.name)
		require.Equal(t, tc.want, got, tc.name)
	}
}

func TestCleanupStaleKeepsLiveInstance(t *testing.T) {
	requireRoot(t)
	tp := newTopo(t)
	fc, ftbl, fwd := addDockerLikeForwardDrop(t, tp)
	before := takeSnapshot(t, tp)

	live := setupIn(t, tp, Config{Mode: ModeListen, ListenPort: 80, Instance: "live", Uplinks: []UplinkSpec{{Iface: "c1"}}})
	liveState := takeSnapshot(t, tp)

	var crashed *Host
	runIn(t, tp.client, func() error {
		var err error
		crashed, err = Setup(context.Background(), Config{Mode: ModeConnect, Instance: "dead",
			Uplinks: []UplinkSpec{{Iface: "c0"}, {Iface: "c1"}}})
		return err
	})
	// A crash: the process dies, its TUN fds close, nothing else is undone.
	for _, u := range crashed.Uplinks {
		require.NoError(t, u.TUN.Close())
	}
	require.Eventually(t, func() bool {
		_, err := tp.cnl.LinkByName("mptdeadu0")
		return err != nil
	}, 2*time.Second, 10*time.Millisecond)
	fwdRules, err := fc.GetRules(ftbl, fwd)
	require.NoError(t, err)
	require.Len(t, fwdRules, 2+4, "live: 2 accept rules, dead: 4")

	runIn(t, tp.client, func() error { return CleanupStale(DefaultPrefix) })
	require.Equal(t, liveState, takeSnapshot(t, tp), "only the dead instance's leftovers go")

	// The crashed Host's own Close copes with everything being gone already.
	require.NoError(t, crashed.Close())
	require.NoError(t, live.Close())
	after := takeSnapshot(t, tp)
	require.Equal(t, before, after)
}

func TestWatchLinks(t *testing.T) {
	requireRoot(t)
	tp := newTopo(t)
	h := setupIn(t, tp, Config{Mode: ModeConnect, Instance: "w", Uplinks: []UplinkSpec{{Iface: "c0"}, {Iface: "c1"}}})

	ctx, cancel := context.WithCancel(context.Background())
	events := make(chan LinkEvent, 64)
	werr := make(chan error, 1)
	go func() { werr <- h.WatchLinks(ctx, func(e LinkEvent) { events <- e }) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-werr)
	})
	time.Sleep(100 * time.Millisecond) // let the subscriptions open

	c1, err := tp.cnl.LinkByName("c1")
	require.NoError(t, err)
	next := func() LinkEvent {
		t.Helper()
		select {
		case e := <-events:
			return e
		case <-time.After(5 * time.Second):
			t.Fatal("no link event")
			return LinkEvent{}
		}
	}
	steps := []struct {
		name string
		do   func() error
		want LinkEvent
	}{
		{"down", func() error { return tp.cnl.LinkSetDown(c1) }, LinkEvent{Uplink: h.Uplinks[1], Kind: LinkDown}},
		{"up", func() error { return tp.cnl.LinkSetUp(c1) }, LinkEvent{Uplink: h.Uplinks[1], Kind: LinkUp}},
		{"addr added", func() error {
			return tp.cnl.AddrAdd(c1, &netlink.Addr{IPNet: prefixToIPNet(netip.MustParsePrefix("10.93.0.2/24"))})
		}, LinkEvent{Uplink: h.Uplinks[1], Kind: AddrAdded, Addr: netip.MustParsePrefix("10.93.0.2/24")}},
		{"addr removed", func() error {
			return tp.cnl.AddrDel(c1, &netlink.Addr{IPNet: prefixToIPNet(netip.MustParsePrefix("10.93.0.2/24"))})
		}, LinkEvent{Uplink: h.Uplinks[1], Kind: AddrRemoved, Addr: netip.MustParsePrefix("10.93.0.2/24")}},
	}
	for _, st := range steps {
		require.NoError(t, st.do(), st.name)
		var got LinkEvent
		for {
			// Bringing c1 down removes and re-adds no addresses, but the
			// kernel may report flags changes in between: skip repeats.
			got = next()
			if got.Kind == st.want.Kind {
				break
			}
			if st.want.Kind == LinkUp && got.Kind == AddrAdded {
				continue
			}
			break
		}
		require.Equal(t, st.want, got, st.name)
	}
}

// TestWatchLinksRestoresRoutes: an uplink set administratively down loses
// the routes of its table (the kernel flushes them); WatchLinks puts them
// back when it comes up, so subflows can use it again.
func TestWatchLinksRestoresRoutes(t *testing.T) {
	requireRoot(t)
	tp := newTopo(t)
	h := setupIn(t, tp, Config{Mode: ModeConnect, Instance: "r", Uplinks: []UplinkSpec{{Iface: "c0"}, {Iface: "c1"}}})
	u := h.Uplinks[1]
	tableRoutes := func() int {
		rs, err := tp.cnl.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: u.Table}, netlink.RT_FILTER_TABLE)
		require.NoError(t, err)
		n := 0
		for _, r := range rs {
			if r.LinkIndex == u.linkIndex {
				n++
			}
		}
		return n
	}
	require.Equal(t, 2, tableRoutes(), "subnet and default route through the uplink")

	ctx, cancel := context.WithCancel(context.Background())
	werr := make(chan error, 1)
	go func() { werr <- h.WatchLinks(ctx, func(LinkEvent) {}) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-werr)
	})
	time.Sleep(100 * time.Millisecond) // let the subscriptions open
	c1, err := tp.cnl.LinkByName("c1")
	require.NoError(t, err)
	require.NoError(t, tp.cnl.LinkSetDown(c1))
	require.Eventually(t, func() bool { return tableRoutes() == 0 }, 5*time.Second, 20*time.Millisecond, "kernel flushed the routes")
	require.NoError(t, tp.cnl.LinkSetUp(c1))
	require.Eventually(t, func() bool { return tableRoutes() == 2 }, 5*time.Second, 20*time.Millisecond, "routes restored")
}
