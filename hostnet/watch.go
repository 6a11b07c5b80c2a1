package hostnet

import (
	"context"
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// LinkEventKind says what changed on an uplink.
type LinkEventKind int

const (
	LinkUp      LinkEventKind = iota + 1 // administratively up with carrier
	LinkDown                             // down or carrier lost
	AddrAdded                            // an IPv4 address appeared
	AddrRemoved                          // an IPv4 address went away
)

func (k LinkEventKind) String() string {
	switch k {
	case LinkUp:
		return "up"
	case LinkDown:
		return "down"
	case AddrAdded:
		return "addr-added"
	case AddrRemoved:
		return "addr-removed"
	default:
		return fmt.Sprintf("LinkEventKind(%d)", int(k))
	}
}

// LinkEvent is a change on one of the Host's uplinks.
type LinkEvent struct {
	Uplink *Uplink
	Kind   LinkEventKind
	Addr   netip.Prefix // AddrAdded/AddrRemoved only
}

// WatchLinks reports link state and IPv4 address changes of the uplinks to
// fn until ctx is done (then it returns nil). Link events are reported only
// when the up/down state actually changes. Call it before Close.
func (h *Host) WatchLinks(ctx context.Context, fn func(LinkEvent)) error {
	byIndex := map[int]*Uplink{}
	up := map[int]bool{}
	for _, u := range h.Uplinks {
		byIndex[u.linkIndex] = u
		l, err := h.nl.LinkByIndex(u.linkIndex)
		if err != nil {
			return fmt.Errorf("uplink %s: %w", u.Spec.Iface, err)
		}
		up[u.linkIndex] = linkIsUp(l)
	}
	done := make(chan struct{})
	defer close(done)
	links := make(chan netlink.LinkUpdate, 64)
	addrs := make(chan netlink.AddrUpdate, 64)
	errc := make(chan error, 2)
	onErr := func(err error) {
		select {
		case errc <- err:
		default:
		}
	}
	ns := h.ns
	if err := netlink.LinkSubscribeWithOptions(links, done, netlink.LinkSubscribeOptions{Namespace: &ns, ErrorCallback: onErr}); err != nil {
		return fmt.Errorf("subscribe to link events: %w", err)
	}
	if err := netlink.AddrSubscribeWithOptions(addrs, done, netlink.AddrSubscribeOptions{Namespace: &ns, ErrorCallback: onErr}); err != nil {
		return fmt.Errorf("subscribe to address events: %w", err)
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-errc:
			return fmt.Errorf("netlink subscription: %w", err)
		case lu, ok := <-links:
			if !ok {
				return errors.New("link subscription closed")
			}
			idx := int(lu.Index)
			u := byIndex[idx]
			if u == nil {
				continue
			}
			now := lu.Header.Type != unix.RTM_DELLINK && linkIsUp(lu.Link)
			if now == up[idx] {
				continue
			}
			up[idx] = now
			kind := LinkDown
			if now {
				kind = LinkUp
				if err := h.RestoreRoutes(u); err != nil {
					h.log.Warn("uplink back up, routes not restored", "uplink", u.Spec.Iface, "err", err)
				}
			}
			fn(LinkEvent{Uplink: u, Kind: kind})
		case au, ok := <-addrs:
			if !ok {
				return errors.New("address subscription closed")
			}
			u := byIndex[au.LinkIndex]
			ip, isV4 := netip.AddrFromSlice(au.LinkAddress.IP.To4())
			if u == nil || !isV4 {
				continue
			}
			ones, _ := au.LinkAddress.Mask.Size()
			kind := AddrRemoved
			if au.NewAddr {
				kind = AddrAdded
			}
			fn(LinkEvent{Uplink: u, Kind: kind, Addr: netip.PrefixFrom(ip, ones)})
		}
	}
}

// linkIsUp: administratively up and the lower layer (carrier) is up.
func linkIsUp(l netlink.Link) bool {
	return l.Attrs().RawFlags&unix.IFF_UP != 0 && l.Attrs().RawFlags&unix.IFF_LOWER_UP != 0
}
