package hostnet

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"runtime"
	"strconv"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.zx2c4.com/wireguard/tun"
)

// Mode selects which NAT Setup installs.
type Mode int

const (
	// ModeConnect: the stack dials out; subflows leaving a TUN are SNATed to
	// their uplink's address.
	ModeConnect Mode = iota + 1
	// ModeListen: connections to ListenPort arriving on an uplink are DNATed
	// to the stack's address on that uplink's TUN.
	ModeListen
)

func (m Mode) String() string {
	switch m {
	case ModeConnect:
		return "connect"
	case ModeListen:
		return "listen"
	default:
		return "Mode(" + strconv.Itoa(int(m)) + ")"
	}
}

// Defaults used when the corresponding Config field is zero.
const (
	DefaultPrefix       = "mpt"
	DefaultTableBase    = 7200
	DefaultRulePriority = 7200
	// NFTablePrefix starts the name of every nftables table mptun creates.
	NFTablePrefix = "mptun_"
	// maxInstanceLen keeps "<prefix><instance>u<NN>" within IFNAMSIZ-1.
	maxInstanceLen = 8
)

// DefaultAddrBase is the RFC 2544 benchmarking range: real networks rarely
// use it, so the kernel/stack /30s on the TUNs do not shadow real routes.
func DefaultAddrBase() netip.Prefix { return netip.MustParsePrefix("198.18.0.0/16") }

// Config describes the plumbing Setup creates.
type Config struct {
	Mode       Mode
	Uplinks    []UplinkSpec
	ListenPort uint16 // ModeListen only
	// MTU of every TUN; 0 = the uplink's own MTU.
	MTU int
	// Instance distinguishes concurrent mptun processes in device, table and
	// nft names; "" = a random 4-hex-digit id.
	Instance string
	// AddrBase holds one /24 per uplink slot, of which a /30 is used:
	// .1 kernel side, .2 stack side. Zero = DefaultAddrBase.
	AddrBase netip.Prefix
	// TableBase is the first routing table number tried; tables in use are
	// skipped. Zero = DefaultTableBase.
	TableBase int
	// RulePriority of the policy rules. Zero = DefaultRulePriority.
	RulePriority int
	Logger       *slog.Logger
}

// Uplink is the plumbing made for one UplinkSpec.
type Uplink struct {
	Spec         UplinkSpec
	Index        int        // position in Config.Uplinks
	TUN          tun.Device // feeds the userspace stack; owned by Host
	TUNName      string
	StackAddr    netip.Addr // the userspace stack's address on this TUN
	KernelAddr   netip.Addr // the kernel's address on this TUN
	ExternalAddr netip.Addr // the uplink's own address (SNAT source / DNAT target)
	ExternalNet  netip.Prefix
	Gateway      netip.Addr // invalid = on-link
	MTU          int
	Table        int // policy routing table

	linkIndex int // of the uplink interface
	// uplinkRoutes are the table's routes through the uplink; the kernel
	// flushes them when the link goes administratively down.
	uplinkRoutes []*netlink.Route
	tunIndex     int
}

// Prefix is the /30 shared by KernelAddr and StackAddr.
func (u *Uplink) Prefix() netip.Prefix { return netip.PrefixFrom(u.KernelAddr, 30) }

// Host owns everything Setup made. Close removes it.
type Host struct {
	Uplinks  []*Uplink
	Instance string
	NFTable  string // name of our nftables table (family ip)
	Mode     Mode

	cfg    Config
	log    *slog.Logger
	ns     netns.NsHandle
	nl     *netlink.Handle
	prefix string // TUN name prefix including the instance id

	mu     sync.Mutex
	undo   []undoStep
	closed bool
}

type undoStep struct {
	what string
	fn   func() error
}

func (h *Host) push(what string, fn func() error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.undo = append(h.undo, undoStep{what: what, fn: fn})
}

// Setup creates one TUN per uplink plus the routes, rules, nftables table and
// sysctls that connect it to its uplink. It acts on the network namespace of
// the calling OS thread. It is all or nothing: on error everything made so
// far is removed again.
func Setup(ctx context.Context, cfg Config) (*Host, error) {
	if err := cfg.normalize(); err != nil {
		return nil, err
	}
	if err := CheckPrivileges(); err != nil {
		return nil, err
	}
	// Pin the thread: the namespace handle, TUN creation and sysctl writes
	// must all see the same namespace.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	ns, err := netns.Get()
	if err != nil {
		return nil, fmt.Errorf("get current netns: %w", err)
	}
	nl, err := netlink.NewHandleAt(ns)
	if err != nil {
		ns.Close()
		return nil, fmt.Errorf("open netlink handle: %w", err)
	}
	h := &Host{
		Instance: cfg.Instance,
		NFTable:  NFTablePrefix + cfg.Instance,
		Mode:     cfg.Mode,
		cfg:      cfg,
		log:      cfg.Logger.With("instance", cfg.Instance),
		ns:       ns,
		nl:       nl,
		prefix:   DefaultPrefix + cfg.Instance,
	}
	if err := h.setup(ctx); err != nil {
		if cerr := h.Close(); cerr != nil {
			return nil, errors.Join(err, fmt.Errorf("cleanup after failed setup: %w", cerr))
		}
		return nil, err
	}
	return h, nil
}

func (c *Config) normalize() error {
	switch c.Mode {
	case ModeConnect:
	case ModeListen:
		if c.ListenPort == 0 {
			return errors.New("listen mode needs a port")
		}
	default:
		return fmt.Errorf("unknown mode %v", c.Mode)
	}
	if len(c.Uplinks) == 0 {
		return errors.New("no uplinks given")
	}
	seen := map[string]bool{}
	for _, u := range c.Uplinks {
		if err := validateIfaceName(u.Iface); err != nil {
			return fmt.Errorf("uplink %s: %w", u.Iface, err)
		}
		if seen[u.Iface] {
			return fmt.Errorf("uplink %s: given twice", u.Iface)
		}
		seen[u.Iface] = true
		if u.Via.IsValid() && !u.Via.Is4() {
			return fmt.Errorf("uplink %s: gateway %s is not IPv4", u.Iface, u.Via)
		}
	}
	if c.MTU != 0 && (c.MTU < 576 || c.MTU > 65535) {
		return fmt.Errorf("MTU %d out of range 576..65535", c.MTU)
	}
	if c.Instance == "" {
		var b [2]byte
		if _, err := rand.Read(b[:]); err != nil {
			return fmt.Errorf("random instance id: %w", err)
		}
		c.Instance = hex.EncodeToString(b[:])
	}
	if len(c.Instance) > maxInstanceLen {
		return fmt.Errorf("instance %q longer than %d characters", c.Instance, maxInstanceLen)
	}
	for _, r := range c.Instance {
		if (r < 'a' || r > 'z') && (r < '0' || r > '9') {
			return fmt.Errorf("instance %q: only a-z and 0-9 allowed", c.Instance)
		}
	}
	if !c.AddrBase.IsValid() {
		c.AddrBase = DefaultAddrBase()
	}
	c.AddrBase = c.AddrBase.Masked()
	if !c.AddrBase.Addr().Is4() || c.AddrBase.Bits() > 24 {
		return fmt.Errorf("address base %s: need an IPv4 prefix of /24 or shorter", c.AddrBase)
	}
	if c.TableBase == 0 {
		c.TableBase = DefaultTableBase
	}
	if c.TableBase < 1 || c.TableBase > 1<<31-1-1000 {
		return fmt.Errorf("table base %d out of range", c.TableBase)
	}
	if c.RulePriority == 0 {
		c.RulePriority = DefaultRulePriority
	}
	if c.RulePriority < 1 || c.RulePriority >= 32766 {
		// 32766 is the main table's rule: ours must come before it.
		return fmt.Errorf("rule priority %d out of range 1..32765", c.RulePriority)
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return nil
}

func (h *Host) setup(ctx context.Context) error {
	for i, spec := range h.cfg.Uplinks {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("setup cancelled: %w", err)
		}
		u, err := h.resolveUplink(i, spec)
		if err != nil {
			return err
		}
		h.Uplinks = append(h.Uplinks, u)
	}
	if err := h.allocate(); err != nil {
		return err
	}
	if err := h.enableForwarding(); err != nil {
		return err
	}
	for _, u := range h.Uplinks {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("setup cancelled: %w", err)
		}
		if err := h.setupTUN(u); err != nil {
			return fmt.Errorf("uplink %s: %w", u.Spec.Iface, err)
		}
		if err := h.setupRouting(u); err != nil {
			return fmt.Errorf("uplink %s: %w", u.Spec.Iface, err)
		}
	}
	if err := h.setupNFT(); err != nil {
		return err
	}
	for _, u := range h.Uplinks {
		h.log.Info("uplink ready", "uplink", u.Spec.Iface, "tun", u.TUNName,
			"stack", u.StackAddr, "external", u.ExternalAddr, "gateway", u.Gateway,
			"table", u.Table, "mode", h.Mode)
	}
	return nil
}

// Close removes every device, route, rule and nftables object Setup made and
// restores the sysctls it changed. It is safe to call more than once and
// from any goroutine.
func (h *Host) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil
	}
	h.closed = true
	var errs []error
	for i := len(h.undo) - 1; i >= 0; i-- {
		st := h.undo[i]
		if err := st.fn(); err != nil {
			h.log.Warn("teardown step failed", "step", st.what, "err", err)
			errs = append(errs, fmt.Errorf("%s: %w", st.what, err))
		}
	}
	h.undo = nil
	h.nl.Close()
	if err := h.ns.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close netns handle: %w", err))
	}
	return errors.Join(errs...)
}
