package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/mptun/mptun/hostnet"
	"github.com/mptun/mptun/mptcpep"
	"github.com/mptun/mptun/netstack"
	"github.com/mptun/mptun/tun"
)

// uplinkFlags collects repeated --uplink values.
type uplinkFlags []hostnet.UplinkSpec

func (u *uplinkFlags) String() string {
	var s []string
	for _, x := range *u {
		s = append(s, x.String())
	}
	return strings.Join(s, " ")
}

func (u *uplinkFlags) Set(v string) error {
	spec, err := hostnet.ParseUplinkSpec(v)
	if err != nil {
		return err
	}
	*u = append(*u, spec)
	return nil
}

// commonFlags are shared by connect and listen.
type commonFlags struct {
	uplinks  uplinkFlags
	checksum bool
	logLevel string
	stats    bool
	every    time.Duration
	mtu      int
}

func (c *commonFlags) register(fs *flag.FlagSet) {
	fs.Var(&c.uplinks, "uplink", "uplink `IFACE[,via=GATEWAY][,backup]` (repeatable)")
	fs.BoolVar(&c.checksum, "checksum", false, "request DSS checksums")
	fs.StringVar(&c.logLevel, "log-level", "warn", "log level")
	fs.BoolVar(&c.stats, "stats", false, "print statistics at the end")
	fs.DurationVar(&c.every, "stats-every", 0, "print per-subflow rates, RTT and cwnd to stderr this often (0: never)")
	fs.IntVar(&c.mtu, "mtu", 0, "TUN MTU (0: the uplink's)")
}

// engine is the userspace stack on the host's uplinks.
type engine struct {
	host *hostnet.Host
	st   *netstack.Stack
	ep   *mptcpep.Endpoint
	tuns []*tun.Endpoint
	log  *slog.Logger

	locals []mptcpep.Local // one per uplink (ID = index + 1), as given to the endpoint

	downMu sync.Mutex
	down   map[uint8]bool // local IDs whose link is down
}

// startEngine builds TUNs, routing and NAT for the uplinks, a gVisor stack
// on the TUNs and an MPTCP endpoint on the stack. Close undoes all of it.
func startEngine(ctx context.Context, mode hostnet.Mode, cf *commonFlags, port uint16, log *slog.Logger) (*engine, error) {
	if len(cf.uplinks) == 0 {
		return nil, usageError{fmt.Errorf("at least one --uplink is required")}
	}
	if err := hostnet.CheckPrivileges(); err != nil {
		return nil, err
	}
	host, err := hostnet.Setup(ctx, hostnet.Config{Mode: mode, Uplinks: cf.uplinks, ListenPort: port, MTU: cf.mtu, Logger: log})
	if err != nil {
		return nil, err
	}
	e := &engine{host: host, log: log, down: make(map[uint8]bool)}
	st, err := netstack.New(netstack.Options{})
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
		id := uint8(i + 1)
		locals = append(locals, mptcpep.Local{Addr: u.StackAddr, ID: id, Backup: u.Spec.Backup, Public: u.ExternalAddr})
		announce = append(announce, mptcpep.Local{Addr: u.StackAddr, ID: id, Public: u.ExternalAddr})
		log.Info("uplink ready", "iface", u.Spec.Iface, "tun", u.TUNName, "stack", u.StackAddr, "external", u.ExternalAddr, "gateway", u.Gateway)
	}
	e.ep = mptcpep.New(st, mptcpep.Config{Checksum: cf.checksum, Logger: log})
	e.ep.SetLocals(locals)
	e.locals = locals
	if mode == hostnet.ModeListen {
		e.ep.SetAnnounce(announce)
	}
	return e, nil
}

// watchUplinks follows the uplinks until ctx ends (then it returns nil)
// or the netlink subscription fails (logged and returned).
func (e *engine) watchUplinks(ctx context.Context) error {
	err := e.host.WatchLinks(ctx, e.onLinkEvent)
	if err != nil && ctx.Err() == nil {
		e.log.Error("watching uplinks failed: link changes go unnoticed", "err", err)
		return err
	}
	return nil
}

// onLinkEvent withdraws an uplink that went down from new subflows and
// from the running connections (their data is reinjected on the others at
// once instead of after retransmission timeouts), and offers it again when
// it comes back, so the path manager re-creates its subflows.
func (e *engine) onLinkEvent(ev hostnet.LinkEvent) {
	id := uint8(ev.Uplink.Index + 1)
	e.log.Warn("uplink changed", "iface", ev.Uplink.Spec.Iface, "event", ev.Kind.String(), "addr", ev.Addr)
	switch ev.Kind {
	case hostnet.LinkDown:
		e.downMu.Lock()
		e.down[id] = true
		e.downMu.Unlock()
		e.ep.SetLocals(e.liveLocals())
		for _, c := range e.ep.Conns() {
			c.RemoveLocal(id)
		}
	case hostnet.LinkUp:
		e.downMu.Lock()
		delete(e.down, id)
		e.downMu.Unlock()
		e.ep.SetLocals(e.liveLocals())
	case hostnet.AddrRemoved, hostnet.AddrAdded:
		if ev.Addr.Addr() == ev.Uplink.ExternalAddr {
			e.log.Warn("the uplink's SNAT address changed: restart mptun to use the new one", "iface", ev.Uplink.Spec.Iface)
		}
	}
}

// liveLocals are the uplinks not known to be down. With all of them down
// it keeps them all, so dialing still tries when a link returns unseen.
func (e *engine) liveLocals() []mptcpep.Local {
	e.downMu.Lock()
	defer e.downMu.Unlock()
	var out []mptcpep.Local
	for _, l := range e.locals {
		if !e.down[l.ID] {
			out = append(out, l)
		}
	}
	if len(out) == 0 {
		return append([]mptcpep.Local(nil), e.locals...)
	}
	return out
}

// uplinkDown reports whether the uplink with local address ID id is down.
func (e *engine) uplinkDown(id uint8) bool {
	e.downMu.Lock()
	defer e.downMu.Unlock()
	return e.down[id]
}

// Close tears everything down; safe on a partly built engine.
func (e *engine) Close() {
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
