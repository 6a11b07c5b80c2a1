package hostnet

import (
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func TestParseUplinkSpec(t *testing.T) {
	tests := []struct {
		in      string
		want    UplinkSpec
		wantErr string
	}{
		{in: "eth0", want: UplinkSpec{Iface: "eth0"}},
		{in: "eth0,via=10.0.0.1", want: UplinkSpec{Iface: "eth0", Via: netip.MustParseAddr("10.0.0.1")}},
		{in: "wlan0,backup", want: UplinkSpec{Iface: "wlan0", Backup: true}},
		{in: "eth1,via=10.1.0.1,backup", want: UplinkSpec{Iface: "eth1", Via: netip.MustParseAddr("10.1.0.1"), Backup: true}},
		{in: "eth1,backup,via=10.1.0.1", want: UplinkSpec{Iface: "eth1", Via: netip.MustParseAddr("10.1.0.1"), Backup: true}},
		{in: "ppp0,via=::ffff:10.2.0.1", want: UplinkSpec{Iface: "ppp0", Via: netip.MustParseAddr("10.2.0.1")}},
		{in: "", wantErr: "empty interface name"},
		{in: ",backup", wantErr: "empty interface name"},
		{in: "averyveryverylongname", wantErr: "longer than 15"},
		{in: "eth/0", wantErr: "invalid character"},
		{in: "eth0,via", wantErr: "via needs a gateway"},
		{in: "eth0,via=", wantErr: "via needs a gateway"},
		{in: "eth0,via=10.0.0.300", wantErr: "bad gateway"},
		{in: "eth0,via=0.0.0.0", wantErr: "not a unicast address"},
		{in: "eth0,via=fe80::1%eth0", wantErr: "must not carry a zone"},
		{in: "eth0,backup=yes", wantErr: "backup takes no value"},
		{in: "eth0,backup,backup", wantErr: "given twice"},
		{in: "eth0,,backup", wantErr: "empty option"},
		{in: "eth0,weight=3", wantErr: `unknown option "weight"`},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseUplinkSpec(tc.in)
			if tc.wantErr != "" {
				require.Error(t, err)
				require.Contains(t, err.Error(), tc.wantErr)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.want, got)
			again, err := ParseUplinkSpec(got.String())
			require.NoError(t, err)
			require.Equal(t, got, again)
		})
	}
}

func FuzzParseUplinkSpec(f *testing.F) {
	for _, s := range []string{"eth0", "eth0,via=10.0.0.1", "wlan0,backup", "eth1,via=10.1.0.1,backup", "x,via=::1", ",,", "a=b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		spec, err := ParseUplinkSpec(s)
		if err != nil {
			return
		}
		// Whatever parses must round-trip and name a valid interface.
		require.NoError(t, validateIfaceName(spec.Iface))
		again, err := ParseUplinkSpec(spec.String())
		require.NoError(t, err)
		require.Equal(t, spec, again)
	})
}

func TestParseCapEff(t *testing.T) {
	tests := []struct {
		name    string
		status  string
		want    uint64
		wantErr string
	}{
		{"root", "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n", 0x1ffffffffff, ""},
		{"unprivileged", "CapEff:\t0000000000000000\n", 0, ""},
		{"net admin only", "CapEff:\t0000000000001000\n", 1 << capNetAdmin, ""},
		{"missing", "Name:\tx\n", 0, "no CapEff line"},
		{"garbage", "CapEff:\tzz\n", 0, "bad CapEff line"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseCapEff(strings.NewReader(tc.status))
			if tc.wantErr != "" {
				require.ErrorContains(t, err, tc.wantErr)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.want, got)
		})
	}
}

func TestCheckTUNDevice(t *testing.T) {
	require.ErrorIs(t, checkTUNDevice(t.TempDir()+"/nope"), ErrNoTUN)
	require.ErrorContains(t, checkTUNDevice(t.TempDir()), "not a character device")
}

func TestPickGateway(t *testing.T) {
	def := prefixToIPNet(netip.MustParsePrefix("0.0.0.0/0"))
	sub := prefixToIPNet(netip.MustParsePrefix("10.5.0.0/16"))
	gw := func(s string) net.IP { return net.ParseIP(s) }
	tests := []struct {
		name   string
		routes []netlink.Route
		want   string
	}{
		{"none", nil, "invalid IP"},
		{"main default", []netlink.Route{{LinkIndex: 2, Dst: def, Gw: gw("10.0.0.1"), Table: unix.RT_TABLE_MAIN}}, "10.0.0.1"},
		{"nil dst is default", []netlink.Route{{LinkIndex: 2, Gw: gw("10.0.0.1"), Table: unix.RT_TABLE_MAIN}}, "10.0.0.1"},
		{"other interface ignored", []netlink.Route{{LinkIndex: 3, Dst: def, Gw: gw("10.0.0.1"), Table: unix.RT_TABLE_MAIN}}, "invalid IP"},
		{"main beats other table", []netlink.Route{
			{LinkIndex: 2, Dst: def, Gw: gw("10.0.0.9"), Table: 100},
			{LinkIndex: 2, Dst: def, Gw: gw("10.0.0.1"), Table: unix.RT_TABLE_MAIN},
		}, "10.0.0.1"},
		{"default in other table beats specific", []netlink.Route{
			{LinkIndex: 2, Dst: sub, Gw: gw("10.0.0.7"), Table: unix.RT_TABLE_MAIN},
			{LinkIndex: 2, Dst: def, Gw: gw("10.0.0.9"), Table: 100},
		}, "10.0.0.9"},
		{"specific route", []netlink.Route{{LinkIndex: 2, Dst: sub, Gw: gw("10.0.0.7"), Table: unix.RT_TABLE_MAIN}}, "10.0.0.7"},
		{"connected route has no gateway", []netlink.Route{{LinkIndex: 2, Dst: sub, Table: unix.RT_TABLE_MAIN}}, "invalid IP"},
		{"multipath nexthop", []netlink.Route{{Dst: def, Table: unix.RT_TABLE_MAIN, MultiPath: []*netlink.NexthopInfo{
			{LinkIndex: 3, Gw: gw("10.0.0.3")}, {LinkIndex: 2, Gw: gw("10.0.0.2")},
		}}}, "10.0.0.2"},
		{"blackhole ignored", []netlink.Route{{LinkIndex: 2, Dst: def, Gw: gw("10.0.0.1"), Type: unix.RTN_BLACKHOLE}}, "invalid IP"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, pickGateway(tc.routes, 2).String())
		})
	}
}

func TestSlotPrefix(t *testing.T) {
	tests := []struct {
		base string
		k    int
		want string
	}{
		{"198.18.0.0/16", 0, "198.18.0.0/30"},
		{"198.18.0.0/16", 3, "198.18.3.0/30"},
		{"100.64.8.0/22", 2, "100.64.10.0/30"},
	}
	for _, tc := range tests {
		require.Equal(t, tc.want, slotPrefix(netip.MustParsePrefix(tc.base), tc.k).String())
	}
}

func TestCheckPrivileges(t *testing.T) {
	err := CheckPrivileges()
	if os.Geteuid() == 0 {
		require.NoError(t, err)
		return
	}
	require.ErrorIs(t, err, ErrNotPrivileged)
	_, err = Setup(t.Context(), Config{Mode: ModeConnect, Uplinks: []UplinkSpec{{Iface: "lo"}}})
	require.ErrorIs(t, err, ErrNotPrivileged)
}
