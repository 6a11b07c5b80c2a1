package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/mptun/mptun/bond/server"
	"github.com/mptun/mptun/hostnet"
)

// cmdServer runs the concentrator until ctx ends.
func cmdServer(ctx context.Context, args []string, stderr io.Writer) error {
	f := newCmdFlags("server")
	fs := f.fs
	listen := fs.String("listen", "", "accept clients on `ADDR:PORT`")
	keyFile := fs.String("key-file", "", "pre-shared key `FILE` (from `mptun genkey`)")
	kernel := fs.Bool("kernel", false, "accept with the kernel's MPTCP sockets instead of the userspace stack")
	metrics := fs.String("metrics", "", "serve Prometheus metrics on `ADDR` (/metrics)")
	allowPrivate := fs.Bool("allow-private", false, "let clients reach loopback, link-local and the server's own addresses")
	allowFallback := fs.Bool("allow-fallback", false, "accept clients whose MPTCP keys are unknown (plain TCP): their authenticator is replayable")
	perClient := fs.Int("max-conns-per-client", 256, "concurrent connections per client address")
	tcpIdle := fs.Duration("tcp-idle", 2*time.Hour, "close TCP flows idle this long")
	udpIdle := fs.Duration("udp-idle", 60*time.Second, "close UDP associations idle this long")
	f.withDenyJoinInitial()
	f.withConfig(func(fc *fileConfig) map[string][]string { return fc.Server.flagValues() })
	if err := f.parse(args, 0, "", stderr); err != nil {
		return err
	}
	if *listen == "" {
		return usageError{errors.New("--listen ADDR:PORT is required")}
	}
	ap, err := netip.ParseAddrPort(*listen)
	if err != nil || ap.Port() == 0 {
		return usageError{fmt.Errorf("--listen %q: want ADDR:PORT", *listen)}
	}
	psk, err := readKeyFile(*keyFile)
	if err != nil {
		return err
	}
	log := f.log
	own := &ownAddrs{}
	cfg := server.Config{
		PSK:               psk,
		AllowPrivate:      *allowPrivate,
		AllowUnbound:      *allowFallback,
		OwnAddrs:          own.get,
		MaxConnsPerClient: *perClient,
		TCPIdle:           *tcpIdle,
		UDPIdle:           *udpIdle,
		Logger:            log,
	}
	var l net.Listener
	var mib func() map[string]uint64
	if *kernel {
		if f.denyJoinInitial {
			return usageError{errors.New("--deny-join-initial is for the userspace engine; with --kernel set the sysctl net.mptcp.allow_join_initial_addr_port=0")}
		}
		// The kernel does not expose the MPTCP keys of its sockets, so the
		// authenticator cannot be bound to them: clients must use zero keys.
		cfg.AllowUnbound = true
		log.Warn("kernel mode: authentication is not bound to MPTCP keys (a captured request can be replayed)")
		var lc net.ListenConfig
		lc.SetMultipathTCP(true)
		kl, err := lc.Listen(ctx, "tcp", ap.String())
		if err != nil {
			return fmt.Errorf("listen %s: %w", ap, err)
		}
		l = kl
	} else {
		if len(f.uplinks) == 0 {
			iface, err := ifaceHolding(ap.Addr())
			if err != nil {
				return usageError{fmt.Errorf("--uplink not given and %w", err)}
			}
			spec, err := hostnet.ParseUplinkSpec(iface)
			if err != nil {
				return err
			}
			f.uplinks = append(f.uplinks, spec)
		}
		eng, err := f.startEngine(ctx, hostnet.ModeListen, ap.Port())
		if err != nil {
			return err
		}
		defer eng.Close()
		ml, err := eng.Endpoint().Listen(ap.Port())
		if err != nil {
			return err
		}
		l = ml
		mib = eng.Endpoint().MIB.Snapshot
	}
	srv, err := server.New(cfg)
	if err != nil {
		return err
	}
	if *metrics != "" {
		stop, err := serveMetrics(ctx, *metrics, func(w io.Writer) error {
			var m map[string]uint64
			if mib != nil {
				m = mib()
			}
			return srv.WriteMetrics(w, m)
		}, log)
		if err != nil {
			return err
		}
		defer stop()
	}
	log.Info("concentrator ready", "listen", ap, "kernel", *kernel, "uplinks", f.uplinks.String())
	err = srv.Serve(ctx, l)
	if errors.Is(err, context.Canceled) {
		log.Info("shutting down")
		return nil
	}
	return err
}

// ifaceHolding returns the interface that holds a.
func ifaceHolding(a netip.Addr) (string, error) {
	if a.IsUnspecified() {
		return "", fmt.Errorf("listen address %s is unspecified: name the interfaces with --uplink", a)
	}
	ifs, err := net.Interfaces()
	if err != nil {
		return "", fmt.Errorf("list interfaces: %w", err)
	}
	for _, ifc := range ifs {
		addrs, err := ifc.Addrs()
		if err != nil {
			continue
		}
		for _, x := range addrs {
			if p, err := netip.ParsePrefix(x.String()); err == nil && p.Addr().Unmap() == a.Unmap() {
				return ifc.Name, nil
			}
		}
	}
	return "", fmt.Errorf("no interface holds %s", a)
}

// ownAddrs caches the host's addresses for the destination policy
// (refreshed at most every 10 s: addresses change rarely, requests often).
type ownAddrs struct {
	mu    sync.Mutex
	at    time.Time
	addrs []netip.Addr
}

func (o *ownAddrs) get() []netip.Addr {
	o.mu.Lock()
	defer o.mu.Unlock()
	if time.Since(o.at) < 10*time.Second {
		return o.addrs
	}
	as, err := net.InterfaceAddrs()
	if err != nil {
		return o.addrs
	}
	// A new slice: callers may still be reading the old one.
	var addrs []netip.Addr
	for _, x := range as {
		if p, err := netip.ParsePrefix(x.String()); err == nil {
			addrs = append(addrs, p.Addr().Unmap())
		}
	}
	o.at, o.addrs = time.Now(), addrs
	return addrs
}
