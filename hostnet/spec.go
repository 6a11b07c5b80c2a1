package hostnet

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
)

// UplinkSpec is one --uplink argument: the interface to send subflows over, an
// optional explicit gateway and whether the path is a backup path (RFC 8684
// MP_PRIO / MP_JOIN B flag).
type UplinkSpec struct {
	Iface  string
	Via    netip.Addr // invalid: discover from the routing table, else on-link
	Backup bool
}

// maxIfaceLen is IFNAMSIZ-1: the kernel rejects longer interface names.
const maxIfaceLen = 15

// ParseUplinkSpec parses "IFACE[,via=GATEWAY][,backup]", e.g. "eth0",
// "eth0,via=10.0.0.1", "wlan0,backup", "eth1,via=10.1.0.1,backup".
func ParseUplinkSpec(s string) (UplinkSpec, error) {
	parts := strings.Split(s, ",")
	var spec UplinkSpec
	if err := validateIfaceName(parts[0]); err != nil {
		return UplinkSpec{}, fmt.Errorf("uplink %q: %w", s, err)
	}
	spec.Iface = parts[0]
	seen := map[string]bool{}
	for _, p := range parts[1:] {
		key, val, hasVal := strings.Cut(p, "=")
		if seen[key] {
			return UplinkSpec{}, fmt.Errorf("uplink %q: option %q given twice", s, key)
		}
		seen[key] = true
		switch key {
		case "via":
			if !hasVal || val == "" {
				return UplinkSpec{}, fmt.Errorf("uplink %q: via needs a gateway address (via=GATEWAY)", s)
			}
			a, err := netip.ParseAddr(val)
			if err != nil {
				return UplinkSpec{}, fmt.Errorf("uplink %q: bad gateway %q: %w", s, val, err)
			}
			if a.Zone() != "" {
				return UplinkSpec{}, fmt.Errorf("uplink %q: gateway %q must not carry a zone", s, val)
			}
			if a.IsUnspecified() || a.IsMulticast() {
				return UplinkSpec{}, fmt.Errorf("uplink %q: gateway %s is not a unicast address", s, a)
			}
			spec.Via = a.Unmap()
		case "backup":
			if hasVal {
				return UplinkSpec{}, fmt.Errorf("uplink %q: backup takes no value", s)
			}
			spec.Backup = true
		case "":
			return UplinkSpec{}, fmt.Errorf("uplink %q: empty option", s)
		default:
			return UplinkSpec{}, fmt.Errorf("uplink %q: unknown option %q (want via=GATEWAY or backup)", s, key)
		}
	}
	return spec, nil
}

// String formats the spec so that ParseUplinkSpec(spec.String()) == spec.
func (u UplinkSpec) String() string {
	var b strings.Builder
	b.WriteString(u.Iface)
	if u.Via.IsValid() {
		b.WriteString(",via=")
		b.WriteString(u.Via.String())
	}
	if u.Backup {
		b.WriteString(",backup")
	}
	return b.String()
}

func validateIfaceName(name string) error {
	switch {
	case name == "":
		return errors.New("empty interface name")
	case len(name) > maxIfaceLen:
		return fmt.Errorf("interface name %q longer than %d bytes", name, maxIfaceLen)
	case name == "." || name == "..":
		return fmt.Errorf("invalid interface name %q", name)
	}
	for _, r := range name {
		// The kernel forbids '/', ':' and whitespace in names (dev_valid_name).
		if r == '/' || r == ':' || r == '=' || r <= ' ' || r > '~' {
			return fmt.Errorf("invalid character %q in interface name %q", r, name)
		}
	}
	return nil
}
