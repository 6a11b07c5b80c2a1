package hostnet

import (
	"bytes"
	"errors"
	"fmt"
	"runtime"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/userdata"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// instanceOf returns the instance id of a TUN name "<prefix><id>u<N>".
func instanceOf(prefix, name string) (string, bool) {
	rest, ok := strings.CutPrefix(name, prefix)
	if !ok {
		return "", false
	}
	i := strings.LastIndexByte(rest, 'u')
	if i <= 0 || i == len(rest)-1 {
		return "", false
	}
	for _, r := range rest[i+1:] {
		if r < '0' || r > '9' {
			return "", false
		}
	}
	return rest[:i], true
}

// CleanupStale removes what crashed instances left behind in the calling
// thread's network namespace: nft tables named mptun_<id>, accept rules
// tagged mptun_<id> in other tables' forward chains, policy rules from TUNs
// named <prefix><id>u<N> and the routes of their tables, and such TUNs if they
// persist without a process attached. An instance counts as alive while one
// of its TUNs is attached: our TUNs are not persistent, so they vanish when
// their process dies. Do not run it while another instance is in Setup.
func CleanupStale(prefix string) error {
	if prefix == "" {
		return errors.New("cleanup: empty prefix")
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	ns, err := netns.Get()
	if err != nil {
		return fmt.Errorf("cleanup: get current netns: %w", err)
	}
	defer ns.Close()
	nl, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("cleanup: netlink handle: %w", err)
	}
	defer nl.Close()

	links, err := nl.LinkList()
	if err != nil {
		return fmt.Errorf("cleanup: list links: %w", err)
	}
	live := map[string]bool{}
	var staleTUNs []netlink.Link
	for _, l := range links {
		inst, ok := instanceOf(prefix, l.Attrs().Name)
		if !ok || l.Type() != "tuntap" {
			continue
		}
		// A TUN with a process attached has carrier; ours are always up.
		if l.Attrs().RawFlags&unix.IFF_LOWER_UP != 0 {
			live[inst] = true
		} else {
			staleTUNs = append(staleTUNs, l)
		}
	}
	var errs []error
	for _, l := range staleTUNs {
		if err := ignoreGone(nl.LinkDel(l)); err != nil {
			errs = append(errs, fmt.Errorf("cleanup: delete TUN %s: %w", l.Attrs().Name, err))
		}
	}

	rules, err := nl.RuleList(netlink.FAMILY_V4)
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("cleanup: list rules: %w", err))...)
	}
	type tableKey struct{ table, prio int }
	stale := map[tableKey]bool{}
	for _, r := range rules {
		if inst, ok := instanceOf(prefix, r.IifName); ok && !live[inst] {
			stale[tableKey{r.Table, r.Priority}] = true
		}
	}
	for _, r := range rules {
		if !stale[tableKey{r.Table, r.Priority}] {
			continue
		}
		if err := ignoreGone(nl.RuleDel(&r)); err != nil {
			errs = append(errs, fmt.Errorf("cleanup: delete rule %s: %w", r, err))
		}
	}
	for k := range stale {
		routes, err := nl.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: k.table}, netlink.RT_FILTER_TABLE)
		if err != nil {
			errs = append(errs, fmt.Errorf("cleanup: list routes of table %d: %w", k.table, err))
			continue
		}
		for _, rt := range routes {
			if err := ignoreGone(nl.RouteDel(&rt)); err != nil {
				errs = append(errs, fmt.Errorf("cleanup: delete route %s: %w", rt, err))
			}
		}
	}

	if err := cleanupStaleNFT(ns, live); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func cleanupStaleNFT(ns netns.NsHandle, live map[string]bool) error {
	c, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		return fmt.Errorf("cleanup: nftables: %w", err)
	}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return fmt.Errorf("cleanup: list nft tables: %w", err)
	}
	for _, t := range tables {
		if inst, ok := strings.CutPrefix(t.Name, NFTablePrefix); ok && !live[inst] {
			c.DelTable(t)
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("cleanup: delete nft tables: %w", err)
	}
	chains, err := dropForwardChains(c, "")
	if err != nil {
		return err
	}
	var errs []error
	for _, ch := range chains {
		rules, err := c.GetRules(ch.Table, ch)
		if err != nil {
			errs = append(errs, fmt.Errorf("cleanup: rules of %s %s: %w", ch.Table.Name, ch.Name, err))
			continue
		}
		for _, r := range rules {
			comment, ok := userdata.GetString(r.UserData, userdata.TypeComment)
			inst, ours := strings.CutPrefix(comment, NFTablePrefix)
			if ok && ours && !live[inst] && bytes.Equal(r.UserData, markerFor(inst)) {
				if err := c.DelRule(r); err != nil {
					errs = append(errs, fmt.Errorf("cleanup: delete rule in %s %s: %w", ch.Table.Name, ch.Name, err))
				}
			}
		}
	}
	if err := c.Flush(); err != nil {
		errs = append(errs, fmt.Errorf("cleanup: delete forward rules: %w", err))
	}
	return errors.Join(errs...)
}
