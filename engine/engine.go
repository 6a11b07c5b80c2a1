// Package engine assembles mptun's userspace MPTCP stack on the host's
// uplinks: the host plumbing (hostnet: a TUN per uplink, policy routing,
// NAT), a gVisor stack with each TUN as a NIC behind the option layer
// (tun, netstack), and an MPTCP endpoint (mptcpep) with one local address
// per uplink. It also follows the uplinks' link state and withdraws a
// downed uplink from the endpoint and its connections.
//
// `mptun connect`, `listen`, `client` and `server` build their engine here;
// the benchmarks run the mptun binary and so use it through those commands.
package engine

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/mptun/mptun/hostnet"
	"github.com/mptun/mptun/mptcpep"
	"github.com/mptun/mptun/netstack"
	"github.com/mptun/mptun/netstack/cc"
	"github.com/mptun/mptun/tun"
)

// Config describes an engine.
type Config struct {
	// Mode is hostnet.ModeConnect (the endpoint dials; subflows are SNATed
	// to their uplink's address) or hostnet.ModeListen (ListenPort on each
	// uplink is DNATed into its TUN, and the uplinks are announced with
	// ADD_ADDR).
	Mode    hostnet.Mode
	Uplinks []hostnet.UplinkSpec
	// ListenPort is the port accepted on in ModeListen (required there,
	// zero in ModeConnect).
	ListenPort uint16
	// MTU of the TUNs (0: each uplink's own).
	MTU int
	// Checksum requests DSS checksums.
	Checksum bool
	// DenyJoinInitialAddr refuses joins to the address a connection began
	// on and says so with the MP_CAPABLE C flag (mptcpep.Config), for a
	// listener behind a load balancer that would not steer joins to it.
	// ModeListen only: only a listener is joined.
	DenyJoinInitialAddr bool
	// CongestionControl names the subflows' controller (netstack/cc;
	// "": cubic).
	CongestionControl string
	// Logger (nil: slog.Default()).
	Logger *slog.Logger
}

// ConfigError is a Config that Start refuses before touching the host: a
// caller's mistake (a command reports it as a usage error).
type ConfigError struct{ Reason string }

func (e *ConfigError) Error() string { return e.Reason }

// Validate reports what Start would refuse without trying it. The host
// side (interface names, gateways, MTU range) is checked by hostnet.Setup,
// which needs privileges.
func (c *Config) Validate() error {
	switch c.Mode {
	case hostnet.ModeConnect:
		if c.ListenPort != 0 {
			return &ConfigError{"a listen port is for listen mode only"}
		}
		if c.DenyJoinInitialAddr {
			return &ConfigError{"refusing joins to the initial address is for listen mode only"}
		}
	case hostnet.ModeListen:
		if c.ListenPort == 0 {
			return &ConfigError{"listen mode needs a port"}
		}
	default:
		return &ConfigError{fmt.Sprintf("unknown mode %v", c.Mode)}
	}
	if c.CongestionControl != "" {
		if err := cc.Valid(c.CongestionControl); err != nil {
			return &ConfigError{err.Error()}
		}
	}
	if len(c.Uplinks) == 0 {
		return &ConfigError{"at least one --uplink is required"}
	}
	return nil
}

// LocalID is the MPTCP local address ID of the uplink at index i of
// Config.Uplinks (0 is reserved for a connection's initial address).
func LocalID(i int) uint8 { return uint8(i + 1) }

// Engine is the userspace stack on the host's uplinks.
type Engine struct {
	host *hostnet.Host
	st   *netstack.Stack
	ep   *mptcpep.Endpoint
	tuns []*tun.Endpoint
	log  *slog.Logger

	uplinks *uplinkSet

	watchMu     sync.Mutex
	watchCancel context.CancelFunc // nil: not watching
	watchDone   chan struct{}
}

// Start builds TUNs, routing and NAT for the uplinks, a gVisor stack on
// the TUNs and an MPTCP endpoint on the stack. Close undoes all of it;
// on error Start has undone it already.
func Start(ctx context.Context, cfg Config) (*Engine, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	if err := hostnet.CheckPrivileges(); err != nil {
		return nil, err
	}
	host, err := hostnet.Setup(ctx, hostnet.Config{Mode: cfg.Mode, Uplinks: cfg.Uplinks, ListenPort: cfg.ListenPort, MTU: cfg.MTU, Logger: log})
	if err != nil {
		return nil, err
	}
	e := &Engine{host: host, log: log}
	st, err := netstack.New(netstack.Options{CongestionControl: cfg.CongestionControl})
	if err != nil {
		e.Close()
		return nil, err
	}
	e.st = st
	var locals, announce []mptcpep.Local
	for i, u := range host.Uplinks {
		// GRO merges only segments whose TCP options are identical, so a
		// merged segment carries one DSS mapping that covers all of it: the
		// option layer loses nothing, and gVisor handles (and acknowledges)
		// a kernel TSO burst once instead of per segment.
		tep, err := tun.NewEndpoint(u.TUN, tun.Options{GRO: true, Logger: log})
		if err != nil {
			e.Close()
			return nil, fmt.Errorf("uplink %s: %w", u.Spec.Iface, err)
		}
		e.tuns = append(e.tuns, tep)
		if _, err := st.AddNIC(u.TUNName, tep.Link(), netip.PrefixFrom(u.StackAddr, 30)); err != nil {
			e.Close()
			return nil, fmt.Errorf("uplink %s: %w", u.Spec.Iface, err)
		}
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err = tun.WaitReady(wctx, u.TUNName)
		cancel()
		if err != nil {
			e.Close()
			return nil, fmt.Errorf("uplink %s: TUN %s not ready: %w", u.Spec.Iface, u.TUNName, err)
		}
		id := LocalID(i)
		locals = append(locals, mptcpep.Local{Addr: u.StackAddr, ID: id, Backup: u.Spec.Backup, Public: u.ExternalAddr})
		announce = append(announce, mptcpep.Local{Addr: u.StackAddr, ID: id, Public: u.ExternalAddr})
		log.Info("uplink ready", "iface", u.Spec.Iface, "tun", u.TUNName, "stack", u.StackAddr, "external", u.ExternalAddr, "gateway", u.Gateway)
	}
	e.ep = mptcpep.New(st, mptcpep.Config{Checksum: cfg.Checksum, DenyJoinInitialAddr: cfg.DenyJoinInitialAddr, Logger: log})
	e.ep.SetLocals(locals)
	e.uplinks = newUplinkSet(locals)
	if cfg.Mode == hostnet.ModeListen {
		e.ep.SetAnnounce(announce)
	}
	return e, nil
}

// Endpoint is the MPTCP endpoint: Dial, Listen, Conns, MIB. Its Stack is
// the gVisor stack on the TUNs.
func (e *Engine) Endpoint() *mptcpep.Endpoint { return e.ep }

// Uplinks are the uplinks' plumbing, in Config.Uplinks order.
func (e *Engine) Uplinks() []*hostnet.Uplink { return e.host.Uplinks }

// UplinkDown reports whether the uplink with local address ID id (see
// LocalID) is known to be down.
func (e *Engine) UplinkDown(id uint8) bool { return e.uplinks.isDown(id) }

// WatchUplinks follows the uplinks' link state in the background until ctx
// ends or Close (the first call only): a downed uplink is withdrawn from
// new subflows and from the running connections, and offered again when it
// returns. A failed netlink subscription is logged; links then go
// unwatched.
func (e *Engine) WatchUplinks(ctx context.Context) {
	e.watchMu.Lock()
	defer e.watchMu.Unlock()
	if e.watchCancel != nil {
		return
	}
	ctx, cancel := context.WithCancel(ctx)
	e.watchCancel, e.watchDone = cancel, make(chan struct{})
	go func() {
		defer close(e.watchDone)
		err := e.host.WatchLinks(ctx, e.onLinkEvent)
		if err != nil && ctx.Err() == nil {
			e.log.Error("watching uplinks failed: link changes go unnoticed", "err", err)
		}
	}()
}

// stopWatching ends WatchUplinks and waits for it: hostnet wants its
// watcher gone before Host.Close.
func (e *Engine) stopWatching() {
	e.watchMu.Lock()
	cancel, done := e.watchCancel, e.watchDone
	e.watchMu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
}

// onLinkEvent applies the uplink policy (uplinkSet.apply) to the endpoint
// and its connections.
func (e *Engine) onLinkEvent(ev hostnet.LinkEvent) {
	e.log.Warn("uplink changed", "iface", ev.Uplink.Spec.Iface, "event", ev.Kind.String(), "addr", ev.Addr)
	a := e.uplinks.apply(ev)
	if a.locals != nil {
		e.ep.SetLocals(a.locals)
	}
	if a.withdraw != 0 {
		for _, c := range e.ep.Conns() {
			c.RemoveLocal(a.withdraw)
		}
	}
	if a.natAddrChanged {
		e.log.Warn("the uplink's SNAT address changed: restart mptun to use the new one", "iface", ev.Uplink.Spec.Iface)
	}
}

// Close tears everything down; safe on a partly built engine.
func (e *Engine) Close() {
	e.stopWatching()
	if e.ep != nil {
		e.ep.Close()
	}
	// The TUN readers stop first: gVisor's Stack.Close waits for the link
	// endpoints while holding the stack lock a running reader may need.
	for _, t := range e.tuns {
		_ = t.Close()
	}
	if e.st != nil {
		e.st.Close()
	}
	if e.host != nil {
		if err := e.host.Close(); err != nil {
			e.log.Error("cleanup", "err", err)
		}
	}
}
