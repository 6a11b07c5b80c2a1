package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
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
	mtu      int
}

func (c *commonFlags) register(fs *flag.FlagSet) {
	fs.Var(&c.uplinks, "uplink", "uplink `IFACE[,via=GATEWAY][,backup]` (repeatable)")
	fs.BoolVar(&c.checksum, "checksum", false, "request DSS checksums")
	fs.StringVar(&c.logLevel, "log-level", "warn", "log level")
	fs.BoolVar(&c.stats, "stats", false, "print statistics at the end")
	fs.IntVar(&c.mtu, "mtu", 0, "TUN MTU (0: the uplink's)")
}

// engine is the userspace stack on the host's uplinks.
type engine struct {
	host *hostnet.Host
	st   *netstack.Stack
	ep   *mptcpep.Endpoint
	tuns []*tun.Endpoint
	log  *slog.Logger

	locals []mptcpep.Local // one per uplink, as given to the endpoint
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
	e := &engine{host: host, log: log}
	st, err := netstack.New(netstack.Options{})
	if err != nil {
		e.Close()
		return nil, err
	}
	e.st = st
	var locals, announce []mptcpep.Local
	for i, u := range host.Uplinks {
		tep, err := tun.NewEndpoint(u.TUN, tun.Options{Logger: log})
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

// watchUplinks follows the uplinks until ctx ends: an uplink that goes
// down is withdrawn from new subflows and from the running connections
// (their data is reinjected on the others at once), and offered again when
// it comes back, so the path manager re-creates its subflows.
func (e *engine) watchUplinks(ctx context.Context, locals []mptcpep.Local) {
	down := make(map[uint8]bool)
	live := func() []mptcpep.Local {
		var out []mptcpep.Local
		for _, l := range locals {
			if !down[l.ID] {
				out = append(out, l)
			}
		}
		if len(out) == 0 {
			return locals // keep trying: a link may return unseen
		}
		return out
	}
	err := e.host.WatchLinks(ctx, func(ev hostnet.LinkEvent) {
		id := uint8(ev.Uplink.Index + 1)
		e.log.Warn("uplink changed", "iface", ev.Uplink.Spec.Iface, "event", ev.Kind.String())
		switch ev.Kind {
		case hostnet.LinkDown:
			down[id] = true
			e.ep.SetLocals(live())
			for _, c := range e.ep.Conns() {
				c.RemoveLocal(id)
			}
		case hostnet.LinkUp:
			delete(down, id)
			e.ep.SetLocals(live())
		}
	})
	if err != nil && ctx.Err() == nil {
		e.log.Error("watching uplinks failed: link changes go unnoticed", "err", err)
	}
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
