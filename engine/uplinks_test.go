package engine

import (
	"net/netip"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/mptun/mptun/hostnet"
	"github.com/mptun/mptun/mptcpep"
)

// threeUplinks are the uplinks and locals Start would make for three
// --uplink flags, the second a backup.
func threeUplinks() ([]*hostnet.Uplink, []mptcpep.Local) {
	var ups []*hostnet.Uplink
	var locals []mptcpep.Local
	for i := range 3 {
		u := &hostnet.Uplink{
			Spec:         hostnet.UplinkSpec{Iface: "eth" + string(rune('0'+i)), Backup: i == 1},
			Index:        i,
			StackAddr:    netip.AddrFrom4([4]byte{198, 18, byte(i), 2}),
			ExternalAddr: netip.AddrFrom4([4]byte{192, 0, 2, byte(10 + i)}),
		}
		ups = append(ups, u)
		locals = append(locals, mptcpep.Local{Addr: u.StackAddr, ID: LocalID(i), Backup: u.Spec.Backup, Public: u.ExternalAddr})
	}
	return ups, locals
}

func ids(ls []mptcpep.Local) []uint8 {
	var out []uint8
	for _, l := range ls {
		out = append(out, l.ID)
	}
	return out
}

func TestUplinkPolicy(t *testing.T) {
	ups, locals := threeUplinks()
	s := newUplinkSet(locals)
	ev := func(i int, k hostnet.LinkEventKind) linkAction {
		return s.apply(hostnet.LinkEvent{Uplink: ups[i], Kind: k})
	}

	// A downed uplink leaves the endpoint and every connection.
	a := ev(1, hostnet.LinkDown)
	require.Equal(t, []uint8{1, 3}, ids(a.locals))
	require.Equal(t, uint8(2), a.withdraw)
	require.False(t, a.natAddrChanged)
	require.True(t, s.isDown(2))
	require.False(t, s.isDown(1))

	a = ev(0, hostnet.LinkDown)
	require.Equal(t, []uint8{3}, ids(a.locals))
	require.Equal(t, uint8(1), a.withdraw)

	// With every uplink down the endpoint keeps them all: a link that
	// comes back unnoticed can still carry a dial.
	a = ev(2, hostnet.LinkDown)
	require.Equal(t, []uint8{1, 2, 3}, ids(a.locals))
	require.Equal(t, uint8(3), a.withdraw)
	require.Equal(t, locals, a.locals, "the locals as given (backup flag, public address)")

	// A returning uplink is offered again; nothing is withdrawn.
	a = ev(1, hostnet.LinkUp)
	require.Equal(t, []uint8{2}, ids(a.locals))
	require.Zero(t, a.withdraw)
	require.False(t, s.isDown(2))
	require.True(t, s.isDown(1) && s.isDown(3))
	a = ev(0, hostnet.LinkUp)
	require.Equal(t, []uint8{1, 2}, ids(a.locals))
	a = ev(2, hostnet.LinkUp)
	require.Equal(t, locals, a.locals)

	// A repeated event changes nothing.
	require.Equal(t, locals, ev(2, hostnet.LinkUp).locals)

	// Address events leave the locals alone; only the uplink's own (SNAT)
	// address matters, and only as a warning.
	a = s.apply(hostnet.LinkEvent{Uplink: ups[0], Kind: hostnet.AddrRemoved, Addr: netip.PrefixFrom(ups[0].ExternalAddr, 24)})
	require.Equal(t, linkAction{natAddrChanged: true}, a)
	a = s.apply(hostnet.LinkEvent{Uplink: ups[0], Kind: hostnet.AddrAdded, Addr: netip.MustParsePrefix("192.0.2.99/24")})
	require.Equal(t, linkAction{}, a)
	require.Equal(t, linkAction{}, s.apply(hostnet.LinkEvent{Uplink: ups[0], Kind: hostnet.LinkEventKind(99)}))
}

// TestUplinkPolicyCopiesLocals: the caller's slice and the slices handed
// out are not the set's own.
func TestUplinkPolicyCopiesLocals(t *testing.T) {
	ups, locals := threeUplinks()
	s := newUplinkSet(locals)
	locals[0].ID = 99
	a := s.apply(hostnet.LinkEvent{Uplink: ups[1], Kind: hostnet.LinkUp})
	require.Equal(t, uint8(1), a.locals[0].ID)
	a.locals[0].ID = 42
	require.Equal(t, uint8(1), s.apply(hostnet.LinkEvent{Uplink: ups[1], Kind: hostnet.LinkUp}).locals[0].ID)
}
