package client

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	wgtun "golang.zx2c4.com/wireguard/tun"

	"github.com/mptun/mptun/tun"
)

// Defaults of TunnelConfig.
const (
	DefaultTUNName = "mptun0"
	DefaultTUNMTU  = 1500
	// DefaultTable and DefaultFwMark spell "mp"; the table holds the
	// default route into the tunnel, the mark lets a socket bypass it.
	DefaultTable  = 0x6d70
	DefaultFwMark = 0x6d70
	// DefaultPriority of the default-route rules. hostnet's per-uplink
	// rules ("iif <uplink TUN>" and "from <TUN /30>", priority 7200) must
	// be looked at first, or the subflows would be routed into the tunnel
	// they carry.
	DefaultPriority = 7300
)

// DefaultTunnelAddrs are the kernel's addresses on the tunnel TUN: a /24
// from the benchmarking range (hostnet uses 198.18.0.0/16) and a ULA /64.
func DefaultTunnelAddrs() []netip.Prefix {
	return []netip.Prefix{netip.MustParsePrefix("198.19.255.1/24"), netip.MustParsePrefix("fd6d:7074::1/64")}
}

// TunnelConfig describes the tunnel device and the routing into it.
type TunnelConfig struct {
	Name  string         // TUN name ("" = mptun0)
	MTU   int            // 0 = 1500
	Addrs []netip.Prefix // kernel-side addresses (nil = DefaultTunnelAddrs)
	// Routes are sent into the tunnel (main table).
	Routes []netip.Prefix
	// DefaultRoute sends everything into the tunnel the way wg-quick does:
	// a table of our own with default routes into the TUN, selected for
	// packets without FwMark, after the main table has had a chance with
	// everything but its default route (so connected networks, the
	// uplinks' gateways and hostnet's TUNs keep working).
	DefaultRoute bool
	// Exclude are addresses (the concentrator) that keep using the main
	// table when DefaultRoute is set.
	Exclude  []netip.Addr
	Table    int    // 0 = DefaultTable
	FwMark   uint32 // 0 = DefaultFwMark
	Priority int    // 0 = DefaultPriority; rules use Priority-1..Priority+1
	Logger   *slog.Logger
}

// Tunnel is the TUN device with its addresses, routes and rules. Close
// removes all of it.
type Tunnel struct {
	Dev  wgtun.Device
	Name string
	cfg  TunnelConfig
	log  *slog.Logger
	nl   *netlink.Handle

	mu   sync.Mutex
	undo []func() error
}

// SetupTunnel creates the TUN and the routing in the calling thread's
// network namespace. On error everything made so far is removed.
func SetupTunnel(cfg TunnelConfig) (*Tunnel, error) {
	if cfg.Name == "" {
		cfg.Name = DefaultTUNName
	}
	if cfg.MTU == 0 {
		cfg.MTU = DefaultTUNMTU
	}
	if cfg.Addrs == nil {
		cfg.Addrs = DefaultTunnelAddrs()
	}
	if cfg.Table == 0 {
		cfg.Table = DefaultTable
	}
	if cfg.FwMark == 0 {
		cfg.FwMark = DefaultFwMark
	}
	if cfg.Priority == 0 {
		cfg.Priority = DefaultPriority
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	nl, err := netlink.NewHandle()
	if err != nil {
		return nil, fmt.Errorf("tunnel: netlink: %w", err)
	}
	t := &Tunnel{Name: cfg.Name, cfg: cfg, log: cfg.Logger, nl: nl}
	if err := t.setup(); err != nil {
		if cerr := t.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("cleanup after failed setup: %w", cerr))
		}
		return nil, err
	}
	return t, nil
}

func (t *Tunnel) push(fn func() error) {
	t.mu.Lock()
	t.undo = append(t.undo, fn)
	t.mu.Unlock()
}

// Close undoes the setup in reverse order; idempotent.
func (t *Tunnel) Close() error {
	t.mu.Lock()
	undo := t.undo
	t.undo = nil
	t.mu.Unlock()
	var errs []error
	for i := len(undo) - 1; i >= 0; i-- {
		if err := undo[i](); err != nil {
			errs = append(errs, err)
		}
	}
	if t.nl != nil && undo != nil {
		t.nl.Close()
	}
	return errors.Join(errs...)
}

func (t *Tunnel) setup() error {
	if l, err := t.nl.LinkByName(t.Name); err == nil {
		return fmt.Errorf("tunnel: device %s already exists (type %s): another mptun client running? use --tun", t.Name, l.Type())
	}
	// A client killed with SIGKILL leaves its rules (its TUN vanished with
	// the process, and routes with the TUN): remove them before adding ours.
	if err := t.removeStaleRules(); err != nil {
		return err
	}
	dev, err := tun.CreateTUN(t.Name, t.cfg.MTU, true)
	if err != nil {
		return fmt.Errorf("tunnel: %w (is /dev/net/tun available?)", err)
	}
	t.Dev = dev
	t.push(func() error {
		// Non-persistent TUN: closing it deletes the device, its
		// addresses and every route through it.
		if err := dev.Close(); err != nil {
			return fmt.Errorf("close TUN %s: %w", t.Name, err)
		}
		return t.waitGone()
	})
	link, err := t.nl.LinkByName(t.Name)
	if err != nil {
		return fmt.Errorf("tunnel: look up %s: %w", t.Name, err)
	}
	for _, a := range t.cfg.Addrs {
		addr := &netlink.Addr{IPNet: ipNet(a)}
		if a.Addr().Is6() {
			// No DAD: nobody else is on a TUN, and the address must be
			// usable as a source at once.
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := t.nl.AddrAdd(link, addr); err != nil {
			return fmt.Errorf("tunnel: add address %s to %s: %w", a, t.Name, err)
		}
	}
	if err := t.nl.LinkSetUp(link); err != nil {
		return fmt.Errorf("tunnel: set %s up: %w", t.Name, err)
	}
	idx := link.Attrs().Index
	for _, p := range t.cfg.Routes {
		r := &netlink.Route{Dst: ipNet(p.Masked()), LinkIndex: idx, Scope: netlink.SCOPE_LINK}
		if err := t.nl.RouteAdd(r); err != nil {
			return fmt.Errorf("tunnel: route %s dev %s: %w", p, t.Name, err)
		}
		// The route goes with the device; deleting first keeps Close
		// correct if the device is kept alive by someone else.
		t.push(func() error { return ignoreGone(t.nl.RouteDel(r)) })
	}
	if t.cfg.DefaultRoute {
		return t.setupDefaultRoute(idx)
	}
	return nil
}

// setupDefaultRoute installs, for IPv4 and IPv6:
//
//	Priority-1: to <exclude> lookup main
//	Priority:   lookup main suppress_prefixlength 0
//	Priority+1: not fwmark FwMark lookup Table
//	table Table: default dev <tun>
func (t *Tunnel) setupDefaultRoute(idx int) error {
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		def := netip.MustParsePrefix("0.0.0.0/0")
		if fam == netlink.FAMILY_V6 {
			def = netip.MustParsePrefix("::/0")
		}
		r := &netlink.Route{Dst: ipNet(def), LinkIndex: idx, Scope: netlink.SCOPE_LINK, Table: t.cfg.Table}
		if fam == netlink.FAMILY_V6 {
			r.Scope = netlink.SCOPE_UNIVERSE
		}
		if err := t.nl.RouteAdd(r); err != nil {
			return fmt.Errorf("tunnel: default route dev %s table %d: %w", t.Name, t.cfg.Table, err)
		}
		t.push(func() error { return ignoreGone(t.nl.RouteDel(r)) })

		var rules []*netlink.Rule
		for _, ex := range t.cfg.Exclude {
			if ex.Is4() != (fam == netlink.FAMILY_V4) {
				continue
			}
			rule := netlink.NewRule()
			rule.Family = fam
			rule.Priority = t.cfg.Priority - 1
			rule.Table = unix.RT_TABLE_MAIN
			rule.Dst = ipNet(netip.PrefixFrom(ex, ex.BitLen()))
			rules = append(rules, rule)
		}
		sup := netlink.NewRule()
		sup.Family = fam
		sup.Priority = t.cfg.Priority
		sup.Table = unix.RT_TABLE_MAIN
		sup.SuppressPrefixlen = 0
		rules = append(rules, sup)
		mark := netlink.NewRule()
		mark.Family = fam
		mark.Priority = t.cfg.Priority + 1
		mark.Table = t.cfg.Table
		mark.Mark = t.cfg.FwMark
		mark.Invert = true
		rules = append(rules, mark)
		for _, rule := range rules {
			if err := t.nl.RuleAdd(rule); err != nil {
				return fmt.Errorf("tunnel: add rule %s: %w", rule, err)
			}
			t.push(func() error { return ignoreGone(t.nl.RuleDel(rule)) })
		}
	}
	t.log.Info("default route into the tunnel", "tun", t.Name, "table", t.cfg.Table, "fwmark", fmt.Sprintf("%#x", t.cfg.FwMark), "priority", t.cfg.Priority)
	return nil
}

// removeStaleRules deletes rules at our priorities that point to our table
// or are our suppress/exclude rules into main.
func (t *Tunnel) removeStaleRules() error {
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rules, err := t.nl.RuleList(fam)
		if err != nil {
			return fmt.Errorf("tunnel: list rules: %w", err)
		}
		for _, r := range rules {
			p := r.Priority
			ours := (p == t.cfg.Priority+1 && r.Table == t.cfg.Table) ||
				(p == t.cfg.Priority && r.Table == unix.RT_TABLE_MAIN && r.SuppressPrefixlen == 0) ||
				(p == t.cfg.Priority-1 && r.Table == unix.RT_TABLE_MAIN && r.Dst != nil)
			if !ours {
				continue
			}
			t.log.Warn("removing stale rule of a previous mptun client", "rule", r.String())
			if err := ignoreGone(t.nl.RuleDel(&r)); err != nil {
				return fmt.Errorf("tunnel: delete stale rule %s: %w", r, err)
			}
		}
	}
	return nil
}

func (t *Tunnel) waitGone() error {
	for range 200 {
		if _, err := t.nl.LinkByName(t.Name); err != nil {
			var nf netlink.LinkNotFoundError
			if errors.As(err, &nf) {
				return nil
			}
			return fmt.Errorf("look up %s: %w", t.Name, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("TUN %s still exists 2s after close", t.Name)
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// ignoreGone treats "already gone" as success: the kernel removes routes
// together with their device.
func ignoreGone(err error) error {
	if err == nil || errors.Is(err, unix.ESRCH) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) {
		return nil
	}
	return err
}
