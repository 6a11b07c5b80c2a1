package hostnet

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/tun"
)

// resolveUplink finds the interface, its first global IPv4 address and its
// gateway: the explicit via, else a route through it naming one, else none.
func (h *Host) resolveUplink(i int, spec UplinkSpec) (*Uplink, error) {
	link, err := h.nl.LinkByName(spec.Iface)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil, fmt.Errorf("uplink %s: no such interface", spec.Iface)
		}
		return nil, fmt.Errorf("uplink %s: look up interface: %w", spec.Iface, err)
	}
	if link.Attrs().Flags&net.FlagLoopback != 0 {
		// An address on lo (a multi-homed host's one address) is reached
		// through the host's real interfaces: those are the uplinks.
		return nil, fmt.Errorf("uplink %s: a loopback interface carries no traffic from other hosts: "+
			"give --uplink for each interface your peers reach this host through (%s)", spec.Iface, h.uplinkCandidates())
	}
	addrs, err := h.nl.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("uplink %s: list addresses: %w", spec.Iface, err)
	}
	ext, ok := firstGlobalV4(addrs)
	if !ok {
		return nil, fmt.Errorf("uplink %s: no IPv4 address", spec.Iface)
	}
	u := &Uplink{
		Spec:         spec,
		Index:        i,
		ExternalAddr: ext.Addr(),
		ExternalNet:  ext.Masked(),
		MTU:          h.cfg.MTU,
		linkIndex:    link.Attrs().Index,
	}
	if u.MTU == 0 {
		// A TUN takes at most 65535 (an IP packet's limit); some links
		// report more (65536 on lo, jumbo virtual links).
		u.MTU = min(link.Attrs().MTU, maxTUNMTU)
	}
	if spec.Via.IsValid() {
		u.Gateway = spec.Via
		return u, nil
	}
	routes, err := h.nl.RouteListFiltered(netlink.FAMILY_V4,
		&netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("uplink %s: list routes: %w", spec.Iface, err)
	}
	u.Gateway = pickGateway(routes, u.linkIndex)
	return u, nil
}

// maxTUNMTU is the largest MTU a TUN device accepts.
const maxTUNMTU = 65535

// uplinkCandidates names the interfaces that are up, not loopback and hold
// a global IPv4 address, for an error that tells the user what to pass.
func (h *Host) uplinkCandidates() string {
	links, err := h.nl.LinkList()
	if err != nil {
		return "list interfaces: " + err.Error()
	}
	var names []string
	for _, l := range links {
		a := l.Attrs()
		if a.Flags&net.FlagLoopback != 0 || a.Flags&net.FlagUp == 0 {
			continue
		}
		if addrs, err := h.nl.AddrList(l, netlink.FAMILY_V4); err == nil {
			if _, ok := firstGlobalV4(addrs); ok {
				names = append(names, a.Name)
			}
		}
	}
	if len(names) == 0 {
		return "no interface here is up with a global IPv4 address"
	}
	return "candidates here: " + strings.Join(names, ", ")
}

func firstGlobalV4(addrs []netlink.Addr) (netip.Prefix, bool) {
	for _, a := range addrs {
		if a.Scope != unix.RT_SCOPE_UNIVERSE || a.IPNet == nil {
			continue
		}
		ip, ok := netip.AddrFromSlice(a.IP.To4())
		if !ok {
			continue
		}
		ones, _ := a.Mask.Size()
		return netip.PrefixFrom(ip, ones), true
	}
	return netip.Prefix{}, false
}

// pickGateway ranks the gateways of routes leaving through linkIndex: a
// default route in the main table first, then a default route in any table,
// then any other route with a gateway. Invalid = on-link.
func pickGateway(routes []netlink.Route, linkIndex int) netip.Addr {
	best, bestRank := netip.Addr{}, 3
	consider := func(r netlink.Route, li int, gw net.IP) {
		if li != linkIndex || gw == nil {
			return
		}
		a, ok := netip.AddrFromSlice(gw.To4())
		if !ok || a.IsUnspecified() {
			return
		}
		isDefault := r.Dst == nil
		if r.Dst != nil {
			ones, _ := r.Dst.Mask.Size()
			isDefault = ones == 0
		}
		rank := 2
		switch {
		case isDefault && r.Table == unix.RT_TABLE_MAIN:
			rank = 0
		case isDefault:
			rank = 1
		}
		if rank < bestRank {
			best, bestRank = a, rank
		}
	}
	for _, r := range routes {
		if r.Type != 0 && r.Type != unix.RTN_UNICAST {
			continue
		}
		consider(r, r.LinkIndex, r.Gw)
		for _, nh := range r.MultiPath {
			consider(r, nh.LinkIndex, nh.Gw)
		}
	}
	return best
}

// slotPrefix is the /30 of address slot k: one /24 per slot, so the default
// base gives 198.18.<k>.0/30.
func slotPrefix(base netip.Prefix, k int) netip.Prefix {
	b := base.Addr().As4()
	v := binary.BigEndian.Uint32(b[:]) + uint32(k)<<8
	binary.BigEndian.PutUint32(b[:], v)
	return netip.PrefixFrom(netip.AddrFrom4(b), 30)
}

// allocate picks, per uplink, an address slot no address on the host
// overlaps and a routing table no rule or route uses, so that a second
// instance (or anything else) is not disturbed.
func (h *Host) allocate() error {
	addrs, err := h.nl.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list addresses: %w", err)
	}
	var taken []netip.Prefix
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP.To4())
		if !ok {
			continue
		}
		ones, _ := a.Mask.Size()
		taken = append(taken, netip.PrefixFrom(ip, ones).Masked())
	}
	usedTables := map[int]bool{0: true, unix.RT_TABLE_COMPAT: true, unix.RT_TABLE_DEFAULT: true,
		unix.RT_TABLE_MAIN: true, unix.RT_TABLE_LOCAL: true}
	rules, err := h.nl.RuleList(netlink.FAMILY_ALL)
	if err != nil {
		return fmt.Errorf("list rules: %w", err)
	}
	for _, r := range rules {
		usedTables[r.Table] = true
	}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := h.nl.RouteListFiltered(fam, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return fmt.Errorf("list routes: %w", err)
		}
		for _, r := range routes {
			usedTables[r.Table] = true
		}
	}

	slots := 1 << (24 - h.cfg.AddrBase.Bits())
	slot, table := 0, h.cfg.TableBase
	for _, u := range h.Uplinks {
		for ; slot < slots; slot++ {
			p := slotPrefix(h.cfg.AddrBase, slot)
			if !overlapsAny(p, taken) {
				break
			}
		}
		if slot >= slots {
			return fmt.Errorf("uplink %s: no free /30 left in %s", u.Spec.Iface, h.cfg.AddrBase)
		}
		p := slotPrefix(h.cfg.AddrBase, slot)
		u.KernelAddr = p.Addr().Next()
		u.StackAddr = u.KernelAddr.Next()
		slot++
		for usedTables[table] {
			table++
		}
		u.Table = table
		usedTables[table] = true
		u.TUNName = h.prefix + "u" + strconv.Itoa(u.Index)
	}
	return nil
}

func overlapsAny(p netip.Prefix, list []netip.Prefix) bool {
	for _, q := range list {
		if p.Overlaps(q) {
			return true
		}
	}
	return false
}

// enableForwarding turns on IPv4 forwarding and remembers to turn it off
// again only if it was off.
func (h *Host) enableForwarding() error {
	path := sysctlPath("net", "ipv4", "ip_forward")
	var old string
	err := inNS(h.ns, func() error {
		var err error
		if old, err = readSysctl(path); err != nil {
			return err
		}
		if old == "1" {
			return nil
		}
		return writeSysctl(path, "1")
	})
	if err != nil {
		return fmt.Errorf("enable IPv4 forwarding: %w", err)
	}
	if old != "1" {
		h.push("restore net.ipv4.ip_forward", func() error {
			return inNS(h.ns, func() error { return writeSysctl(path, old) })
		})
	}
	return nil
}

func (h *Host) setupTUN(u *Uplink) error {
	if _, err := h.nl.LinkByName(u.TUNName); err == nil {
		return fmt.Errorf("TUN name %s is taken (another instance with id %q?)", u.TUNName, h.Instance)
	}
	var dev tun.Device
	// CreateTUN opens /dev/net/tun in the calling thread's namespace.
	err := inNS(h.ns, func() error {
		var err error
		dev, err = tun.CreateTUN(u.TUNName, u.MTU)
		return err
	})
	if err != nil {
		return fmt.Errorf("create TUN %s: %w", u.TUNName, err)
	}
	u.TUN = dev
	h.push("close TUN "+u.TUNName, func() error {
		// Non-persistent TUN: closing the last fd deletes the device and
		// with it its addresses and routes.
		if err := dev.Close(); err != nil {
			return err
		}
		return h.waitLinkGone(u.TUNName)
	})
	link, err := h.nl.LinkByName(u.TUNName)
	if err != nil {
		return fmt.Errorf("look up TUN %s: %w", u.TUNName, err)
	}
	u.tunIndex = link.Attrs().Index
	// No IPv6 on the TUN: router solicitations and DAD would only be noise
	// for the userspace stack. Missing IPv6 support is fine.
	_ = inNS(h.ns, func() error {
		return writeSysctl(sysctlPath("net", "ipv6", "conf", u.TUNName, "disable_ipv6"), "1")
	})
	// Loose reverse-path filtering: the stack's source addresses are only
	// reachable through this TUN in our own tables.
	err = inNS(h.ns, func() error {
		return writeSysctl(sysctlPath("net", "ipv4", "conf", u.TUNName, "rp_filter"), "2")
	})
	if err != nil {
		return fmt.Errorf("TUN %s: %w", u.TUNName, err)
	}
	addr := &netlink.Addr{IPNet: prefixToIPNet(netip.PrefixFrom(u.KernelAddr, 30))}
	if err := h.nl.AddrAdd(link, addr); err != nil {
		return fmt.Errorf("TUN %s: add address %s: %w", u.TUNName, u.KernelAddr, err)
	}
	if err := h.nl.LinkSetUp(link); err != nil {
		return fmt.Errorf("TUN %s: set up: %w", u.TUNName, err)
	}
	return nil
}

// waitLinkGone polls briefly: unregistering a device completes
// asynchronously after the last fd is closed.
func (h *Host) waitLinkGone(name string) error {
	for range 200 {
		if _, err := h.nl.LinkByName(name); err != nil {
			var nf netlink.LinkNotFoundError
			if errors.As(err, &nf) {
				return nil
			}
			return fmt.Errorf("look up %s: %w", name, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("TUN %s still exists 2s after close", name)
}

// setupRouting fills the uplink's table and adds the rules that select it
// for whatever the stack sends through the TUN.
func (h *Host) setupRouting(u *Uplink) error {
	tunNet := netip.PrefixFrom(u.KernelAddr, 30).Masked()
	routes := []*netlink.Route{
		// Kernel-originated packets to the stack (ICMP errors) come from the
		// TUN's /30 and match the from-rule below; keep them on the TUN.
		{Dst: prefixToIPNet(tunNet), LinkIndex: u.tunIndex, Scope: netlink.SCOPE_LINK,
			Src: u.KernelAddr.AsSlice(), Table: u.Table},
		{Dst: prefixToIPNet(u.ExternalNet), LinkIndex: u.linkIndex, Scope: netlink.SCOPE_LINK,
			Src: u.ExternalAddr.AsSlice(), Table: u.Table},
	}
	def := &netlink.Route{Dst: prefixToIPNet(netip.MustParsePrefix("0.0.0.0/0")), LinkIndex: u.linkIndex, Table: u.Table}
	if u.Gateway.IsValid() {
		def.Gw = u.Gateway.AsSlice()
		if !u.ExternalNet.Contains(u.Gateway) {
			// An explicit via outside the connected subnet (point-to-point
			// links): tell the kernel the gateway is reachable on the link.
			def.Flags = int(netlink.FLAG_ONLINK)
		}
	} else {
		def.Scope = netlink.SCOPE_LINK
	}
	routes = append(routes, def)
	u.uplinkRoutes = []*netlink.Route{routes[1], def}
	for _, r := range routes {
		if err := h.nl.RouteAdd(r); err != nil {
			return fmt.Errorf("add route %s table %d: %w", r, u.Table, err)
		}
		h.push(fmt.Sprintf("delete route %s table %d", r.Dst, u.Table), func() error {
			return ignoreGone(h.nl.RouteDel(r))
		})
	}

	iifRule := netlink.NewRule()
	iifRule.Family = netlink.FAMILY_V4
	iifRule.Priority = h.cfg.RulePriority
	iifRule.Table = u.Table
	iifRule.IifName = u.TUNName
	// The from-rule makes reverse-path checks on the uplink (strict
	// rp_filter) see the same route as the forward path, and routes replies
	// of DNATed connections out of the uplink they came in on.
	fromRule := netlink.NewRule()
	fromRule.Family = netlink.FAMILY_V4
	fromRule.Priority = h.cfg.RulePriority
	fromRule.Table = u.Table
	fromRule.Src = prefixToIPNet(tunNet)
	for _, r := range []*netlink.Rule{iifRule, fromRule} {
		if err := h.nl.RuleAdd(r); err != nil {
			return fmt.Errorf("add rule %s: %w", r, err)
		}
		h.push("delete rule "+r.String(), func() error { return ignoreGone(h.nl.RuleDel(r)) })
	}
	return nil
}

// RestoreRoutes puts back the uplink's routes in its table (the kernel
// deletes routes through a link that goes administratively down and does
// not bring them back). Idempotent.
func (h *Host) RestoreRoutes(u *Uplink) error {
	for _, r := range u.uplinkRoutes {
		if err := h.nl.RouteReplace(r); err != nil {
			return fmt.Errorf("uplink %s: restore route %s table %d: %w", u.Spec.Iface, r.Dst, u.Table, err)
		}
	}
	return nil
}

func prefixToIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// ignoreGone treats "already gone" as success so teardown is idempotent
// when the kernel removed an object first (e.g. its device vanished).
func ignoreGone(err error) error {
	if errors.Is(err, unix.ESRCH) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) {
		return nil
	}
	return err
}
