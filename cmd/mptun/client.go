package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/mptun/mptun/bond/client"
	"github.com/mptun/mptun/engine"
	"github.com/mptun/mptun/hostnet"
	"github.com/mptun/mptun/mptcpep"
	"github.com/mptun/mptun/mptcpep/mpkey"
	"github.com/mptun/mptun/tun"
)

// prefixFlags collects repeated --route values.
type prefixFlags []netip.Prefix

func (p *prefixFlags) String() string {
	s := make([]string, len(*p))
	for i, x := range *p {
		s[i] = x.String()
	}
	return strings.Join(s, " ")
}

func (p *prefixFlags) Set(v string) error {
	pf, err := netip.ParsePrefix(v)
	if err != nil {
		a, aerr := netip.ParseAddr(v)
		if aerr != nil {
			return fmt.Errorf("route %q: want a PREFIX like 192.0.2.0/24: %w", v, err)
		}
		pf = netip.PrefixFrom(a, a.BitLen())
	}
	*p = append(*p, pf.Masked())
	return nil
}

// cmdClient runs the bonding client until ctx ends.
func cmdClient(ctx context.Context, args []string, stderr io.Writer) error {
	f := newCmdFlags("client")
	fs := f.fs
	serverFlag := fs.String("server", "", "concentrator `ADDR:PORT`")
	keyFile := fs.String("key-file", "", "pre-shared key `FILE` (from `mptun genkey`)")
	var routes prefixFlags
	fs.Var(&routes, "route", "send `PREFIX` into the tunnel (repeatable)")
	defRoute := fs.Bool("default-route", false, "send everything into the tunnel except the concentrator and the uplinks' own networks")
	tunName := fs.String("tun", client.DefaultTUNName, "tunnel TUN `NAME`")
	tunMTU := fs.Int("tun-mtu", client.DefaultTUNMTU, "tunnel TUN MTU")
	quic := fs.String("quic", "reject", "UDP/443 (QUIC): carry, or reject with ICMP so browsers use TCP")
	udpIdle := fs.Duration("udp-idle", client.DefaultUDPIdle, "close UDP associations idle this long")
	setupTimeout := fs.Duration("setup-timeout", client.DefaultSetupTimeout, "bound on reaching the concentrator per flow")
	metrics := fs.String("metrics", "", "serve Prometheus metrics (flow counters, MPTCP MIB) on `ADDR` (/metrics)")
	unbound := fs.Bool("unbound-auth", false, "authenticate without binding the tag to the MPTCP keys: for a concentrator running `mptun server --kernel` (kernel sockets do not expose the keys) or accepting plain TCP; such a tag can be replayed")
	socket := fs.String("socket", "", "control socket `PATH` (default /run/mptun/<tun>.sock)")
	f.withConfig(func(fc *fileConfig) map[string][]string { return fc.Client.flagValues() })
	if err := f.parse(args, 0, "", stderr); err != nil {
		return err
	}
	if *serverFlag == "" {
		return usageError{errors.New("--server ADDR:PORT is required")}
	}
	srvAddr, err := netip.ParseAddrPort(*serverFlag)
	if err != nil || srvAddr.Port() == 0 {
		return usageError{fmt.Errorf("--server %q: want ADDR:PORT", *serverFlag)}
	}
	srvAddr = netip.AddrPortFrom(srvAddr.Addr().Unmap(), srvAddr.Port())
	if !srvAddr.Addr().Is4() {
		return usageError{fmt.Errorf("--server %s: the uplinks carry IPv4 only; give an IPv4 address", srvAddr)}
	}
	qp, err := client.ParseQUICPolicy(*quic)
	if err != nil {
		return usageError{err}
	}
	psk, err := readKeyFile(*keyFile)
	if err != nil {
		return err
	}
	log := f.log
	if *socket == "" {
		*socket = client.SocketPath(*tunName)
	}
	d := &clientDaemon{log: log, server: srvAddr, unboundAuth: *unbound, metricsAddr: *metrics}
	defer d.close()
	if err := d.start(ctx, f, client.TunnelConfig{
		Name: *tunName, MTU: *tunMTU, Routes: routes, DefaultRoute: *defRoute,
		Exclude: []netip.Addr{srvAddr.Addr()}, Logger: log,
	}, client.Config{PSK: psk, QUIC: qp, UDPIdle: *udpIdle, SetupTimeout: *setupTimeout, Logger: log}, *setupTimeout); err != nil {
		return err
	}
	stopCtl, err := client.ServeControl(ctx, *socket, func() any { return d.status(*tunName) }, log)
	if err != nil {
		return err
	}
	d.undo = append(d.undo, stopCtl)
	log.Warn("mptun client ready", "tun", *tunName, "server", srvAddr, "uplinks", f.uplinks.String(),
		"routes", routes.String(), "default_route", *defRoute, "quic", qp, "control", *socket)
	<-ctx.Done()
	log.Info("shutting down")
	return nil
}

// clientDaemon holds what the client built, in teardown order.
type clientDaemon struct {
	log     *slog.Logger
	server  netip.AddrPort
	started time.Time
	// unboundAuth: tags over zero keys (--unbound-auth).
	unboundAuth bool
	metricsAddr string
	eng         *engine.Engine
	cl          *client.Client
	meter       *client.RateMeter
	undo        []func() // run last-first by close
}

func (d *clientDaemon) close() {
	for i := len(d.undo) - 1; i >= 0; i-- {
		d.undo[i]()
	}
	d.undo = nil
}

func (d *clientDaemon) start(ctx context.Context, f *cmdFlags, tc client.TunnelConfig, cc client.Config, setupTimeout time.Duration) error {
	d.started = time.Now()
	// A client or server killed with SIGKILL leaves policy rules and nft
	// tables (its TUNs vanished with it); remove them before adding ours.
	if err := hostnet.CleanupStale(hostnet.DefaultPrefix); err != nil {
		d.log.Warn("removing leftovers of a crashed mptun", "err", err)
	}
	eng, err := f.startEngine(ctx, hostnet.ModeConnect, 0)
	if err != nil {
		return err
	}
	d.eng = eng
	d.undo = append(d.undo, eng.Close)

	// The concentrator must answer before we take over any routing: a
	// wrong address should not black-hole the host's traffic.
	pctx, cancel := context.WithTimeout(ctx, setupTimeout)
	probe, err := eng.Endpoint().Dial(pctx, d.server)
	cancel()
	if err != nil {
		return fmt.Errorf("concentrator %s unreachable over the uplinks (%s): %w", d.server, f.uplinks.String(), err)
	}
	d.log.Info("concentrator reachable", "server", d.server, "mptcp", probe.MultipathTCP())
	probe.Abort()

	tunnel, err := client.SetupTunnel(tc)
	if err != nil {
		return err
	}
	d.undo = append(d.undo, func() {
		if err := tunnel.Close(); err != nil {
			d.log.Error("tunnel cleanup", "err", err)
		}
	})
	tep, err := tun.NewEndpoint(tunnel.Dev, tun.Options{GRO: true, Logger: d.log})
	if err != nil {
		return fmt.Errorf("tunnel %s: %w", tunnel.Name, err)
	}
	st, err := client.NewStack(tep.Link(), client.StackOptions{Name: tunnel.Name, QDisc: tep.NewQDisc(1000)})
	if err != nil {
		_ = tep.Close()
		return err
	}
	d.undo = append(d.undo, func() {
		st.Close()
		_ = tep.Close()
		st.Wait()
	})
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	err = tun.WaitReady(wctx, tunnel.Name)
	cancel()
	if err != nil {
		return fmt.Errorf("tunnel %s not ready: %w", tunnel.Name, err)
	}
	cc.Stack = st
	cc.Dial = func(ctx context.Context) (client.Upstream, error) {
		c, err := eng.Endpoint().Dial(ctx, d.server)
		if err != nil || !d.unboundAuth {
			return c, err
		}
		return unboundUpstream{c}, nil
	}
	cl, err := client.New(cc)
	if err != nil {
		return err
	}
	d.cl = cl
	d.undo = append(d.undo, cl.Close)
	if d.metricsAddr != "" {
		stop, err := serveMetrics(ctx, d.metricsAddr, func(w io.Writer) error {
			return writeClientMetrics(w, cl.Stats(), d.eng.Endpoint().MIB.Snapshot())
		}, d.log)
		if err != nil {
			return err
		}
		d.undo = append(d.undo, stop)
	}

	mctx, mcancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	d.undo = append(d.undo, func() {
		mcancel()
		wg.Wait()
	})
	d.meter = client.NewRateMeter()
	wg.Add(1)
	go func() {
		defer wg.Done()
		d.meter.Run(mctx, time.Second, eng.Endpoint().Conns)
	}()
	eng.WatchUplinks(ctx)
	return nil
}

func (d *clientDaemon) status(name string) client.Status {
	conns := d.eng.Endpoint().Conns()
	cs, iv := d.meter.Conns(conns)
	st := client.Status{Name: name, PID: os.Getpid(), Server: d.server.String(), Started: d.started,
		Flows: d.cl.Stats(), Conns: cs, MIB: nonZero(d.eng.Endpoint().MIB.Snapshot()), Interval: iv.Seconds()}
	for i, u := range d.eng.Uplinks() {
		us := client.UplinkStatus{Iface: u.Spec.Iface, TUN: u.TUNName, Addr: u.ExternalAddr.String(),
			Backup: u.Spec.Backup, Up: !d.eng.UplinkDown(engine.LocalID(i))}
		if u.Gateway.IsValid() {
			us.Gateway = u.Gateway.String()
		}
		for _, c := range cs {
			for _, sf := range c.Subflows {
				if sf.LocalID == engine.LocalID(i) || (sf.LocalID == 0 && strings.HasPrefix(sf.Local, u.StackAddr.String()+":")) {
					if sf.State == "established" {
						us.Subflows++
					}
					us.TxBps += sf.TxBps
					us.RxBps += sf.RxBps
				}
			}
		}
		st.Uplinks = append(st.Uplinks, us)
	}
	return st
}

// unboundUpstream authenticates with zero keys (see --unbound-auth).
type unboundUpstream struct{ *mptcpep.Conn }

// Keys reports no keys, as a kernel-socket concentrator sees them.
func (unboundUpstream) Keys() (local, remote mpkey.Key) { return 0, 0 }
