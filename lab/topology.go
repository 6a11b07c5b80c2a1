package lab

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/mptun/mptun/lab/linkemu"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Path describes one client-server path. Rate, delay, jitter and loss apply
// to both directions; Outages take both directions down.
type Path struct {
	Name string
	// Direct joins client and server with a plain veth pair: no emulator,
	// offloads on, full kernel speed. Shaping fields must be zero.
	Direct bool
	// External builds the emulator namespace and its interfaces
	// (PathInfo.EmuIfA/EmuIfB) but starts no emulator: the caller forwards,
	// e.g. with the linkemu program. Nothing passes until it does.
	External bool
	// Rate in bit/s (0: unlimited), Delay and Jitter one way.
	Rate          uint64
	Delay, Jitter time.Duration
	Loss          float64
	// QueueBytes bounds the emulator's rate queue (0: linkemu default).
	QueueBytes int
	Outages    []linkemu.Outage
}

// Params are the emulator settings of one direction of the path.
func (p Path) Params() linkemu.Params {
	return linkemu.Params{Delay: p.Delay, Jitter: p.Jitter, Loss: p.Loss, Rate: p.Rate, QueueBytes: p.QueueBytes, Outages: p.Outages}
}

func (p Path) params(seed uint64) linkemu.Params {
	pp := p.Params()
	pp.Seed = seed
	return pp
}

// Spec declares a topology.
type Spec struct {
	// Prefix starts every namespace name; use your team's prefix so parallel
	// tests never collide. Up to 8 characters of [a-z0-9].
	Prefix string
	Paths  []Path
	// Net is the X in the 10.X.Y.0/24 path subnets (default 77).
	Net byte
	// MTU of the path links (default 1500).
	MTU int
	// IPv6 keeps IPv6 enabled on the links. Off by default: link-local
	// chatter (ND, MLD) would otherwise cross the emulators and skew counters.
	IPv6   bool
	Logger *slog.Logger
}

// PathInfo is what New built for one path. Path i uses subnet 10.X.(i+1).0/24,
// the client is .1 and the server .2.
type PathInfo struct {
	Path
	Index      int
	ClientAddr netip.Addr
	ServerAddr netip.Addr
	// ClientIf and ServerIf are the path interfaces in the client and server
	// namespaces (both named "p<i>").
	ClientIf, ServerIf string
	// EmuIfA faces the client and EmuIfB the server, in Topology.Emu
	// (empty for Direct paths).
	EmuIfA, EmuIfB string
	// Emulator is nil for Direct and External paths.
	Emulator *linkemu.Emulator
}

// Topology is a client and a server namespace joined by paths. The client
// namespace has source-based policy routing: a socket bound to a path's
// client address egresses that path whatever the destination, so the server
// can be reached on any of its addresses over any path.
type Topology struct {
	Client, Server *NS
	// Emu hosts the emulators; nil when every path is Direct.
	Emu   *NS
	Paths []*PathInfo

	log      *slog.Logger
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	emuErrs  chan error
	nsList   []*NS
	clientNL *netlink.Handle
	closed   sync.Once
	closeErr error
}

// PathCounters are the byte and packet counters of a path's client-side
// interface: Tx is upload, Rx is download.
type PathCounters struct {
	TxBytes, RxBytes, TxPackets, RxPackets uint64
}

func prefixOK(s string) bool {
	if s == "" || len(s) > 8 {
		return false
	}
	for _, r := range s {
		if (r < 'a' || r > 'z') && (r < '0' || r > '9') {
			return false
		}
	}
	return true
}

// New builds the topology described by spec. On error everything already
// created is removed. Call Close when done (t.Cleanup(func(){ topo.Close() })).
func New(ctx context.Context, spec Spec) (_ *Topology, err error) {
	if !prefixOK(spec.Prefix) {
		return nil, fmt.Errorf("lab: prefix %q must be 1-8 characters of [a-z0-9]", spec.Prefix)
	}
	if len(spec.Paths) == 0 || len(spec.Paths) > 8 {
		return nil, fmt.Errorf("lab: need 1-8 paths, got %d", len(spec.Paths))
	}
	if spec.Net == 0 {
		spec.Net = 77
	}
	if spec.MTU == 0 {
		spec.MTU = 1500
	}
	log := spec.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if _, err := CleanupStale(ctx, spec.Prefix); err != nil {
		log.Warn("lab: stale cleanup failed", "err", err)
	}
	var rnd [3]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return nil, fmt.Errorf("lab: random id: %w", err)
	}
	// The pid lets CleanupStale tell crashed runs from live ones.
	base := fmt.Sprintf("%s-%d-%s", spec.Prefix, os.Getpid(), hex.EncodeToString(rnd[:]))
	t := &Topology{
		Client: &NS{Name: base + "-c"},
		Server: &NS{Name: base + "-s"},
		log:    log,
	}
	t.nsList = []*NS{t.Client, t.Server}
	for _, p := range spec.Paths {
		if !p.Direct {
			t.Emu = &NS{Name: base + "-e"}
			t.nsList = append(t.nsList, t.Emu)
			break
		}
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, t.Close())
		}
	}()
	if err := t.build(ctx, spec); err != nil {
		return nil, err
	}
	return t, nil
}

func (t *Topology) build(ctx context.Context, spec Spec) error {
	for _, ns := range t.nsList {
		if err := ipCmd(ctx, "netns", "add", ns.Name); err != nil {
			return fmt.Errorf("lab: %w", err)
		}
		if err := ipCmd(ctx, "-n", ns.Name, "link", "set", "lo", "up"); err != nil {
			return fmt.Errorf("lab: %w", err)
		}
	}
	if !spec.IPv6 {
		for _, ns := range t.nsList {
			for _, k := range []string{"all", "default"} {
				if err := ns.WriteSysctl("net/ipv6/conf/"+k+"/disable_ipv6", "1"); err != nil {
					return fmt.Errorf("lab: %w", err)
				}
			}
		}
	}
	for _, ns := range []*NS{t.Client, t.Server} {
		// Subflows reach the server's path-0 address over other paths, and
		// replies may arrive on another interface than the route points to.
		for _, k := range []string{"all", "default"} {
			if err := ns.WriteSysctl("net/ipv4/conf/"+k+"/rp_filter", "0"); err != nil {
				return fmt.Errorf("lab: %w", err)
			}
		}
	}
	mtu := strconv.Itoa(spec.MTU)
	netPrefix := fmt.Sprintf("10.%d.0.0/16", spec.Net)
	for i, p := range spec.Paths {
		if p.Direct && (p.Rate != 0 || p.Delay != 0 || p.Jitter != 0 || p.Loss != 0 || len(p.Outages) > 0) {
			return fmt.Errorf("lab: path %d is Direct but has shaping parameters", i)
		}
		pi := &PathInfo{
			Path:       p,
			Index:      i,
			ClientAddr: netip.AddrFrom4([4]byte{10, spec.Net, byte(i + 1), 1}),
			ServerAddr: netip.AddrFrom4([4]byte{10, spec.Net, byte(i + 1), 2}),
			ClientIf:   fmt.Sprintf("p%d", i),
			ServerIf:   fmt.Sprintf("p%d", i),
		}
		if pi.Name == "" {
			pi.Name = pi.ClientIf
		}
		if !p.Direct {
			pi.EmuIfA, pi.EmuIfB = fmt.Sprintf("c%d", i), fmt.Sprintf("s%d", i)
		}
		t.Paths = append(t.Paths, pi)
		c, s := t.Client.Name, t.Server.Name
		var cmds [][]string
		if p.Direct {
			cmds = append(cmds, []string{"-n", c, "link", "add", pi.ClientIf, "mtu", mtu, "type", "veth", "peer", "name", pi.ServerIf, "mtu", mtu, "netns", s})
		} else {
			e := t.Emu.Name
			ce, se := pi.EmuIfA, pi.EmuIfB
			cmds = append(cmds,
				[]string{"-n", c, "link", "add", pi.ClientIf, "mtu", mtu, "type", "veth", "peer", "name", ce, "mtu", mtu, "netns", e},
				[]string{"-n", s, "link", "add", pi.ServerIf, "mtu", mtu, "type", "veth", "peer", "name", se, "mtu", mtu, "netns", e},
				[]string{"-n", e, "link", "set", ce, "up"},
				[]string{"-n", e, "link", "set", se, "up"},
			)
		}
		cmds = append(cmds,
			[]string{"-n", c, "addr", "add", pi.ClientAddr.String() + "/24", "dev", pi.ClientIf},
			[]string{"-n", s, "addr", "add", pi.ServerAddr.String() + "/24", "dev", pi.ServerIf},
			[]string{"-n", c, "link", "set", pi.ClientIf, "up"},
			[]string{"-n", s, "link", "set", pi.ServerIf, "up"},
			// Source-based routing: each client address leaves by its path.
			[]string{"-n", c, "route", "add", netPrefix, "dev", pi.ClientIf, "table", strconv.Itoa(100 + i)},
			[]string{"-n", c, "rule", "add", "from", pi.ClientAddr.String(), "table", strconv.Itoa(100 + i), "pref", strconv.Itoa(1000 + i)},
		)
		for _, args := range cmds {
			if err := ipCmd(ctx, args...); err != nil {
				return fmt.Errorf("lab: path %d: %w", i, err)
			}
		}
		if !p.Direct {
			// The emulator must see real frames: no super-packets, no
			// checksums left for hardware that is not there.
			for _, x := range []struct {
				ns  *NS
				dev string
			}{{t.Client, pi.ClientIf}, {t.Server, pi.ServerIf}, {t.Emu, pi.EmuIfA}, {t.Emu, pi.EmuIfB}} {
				if err := DisableOffloads(ctx, x.ns, x.dev); err != nil {
					return err
				}
			}
		}
	}
	h, err := t.netlinkHandle(t.Client)
	if err != nil {
		return err
	}
	t.clientNL = h
	if err := t.startEmulators(ctx); err != nil {
		return err
	}
	return t.waitUp(ctx)
}

// waitUp waits until every path interface reports carrier, so the first
// packets of a test are not lost to links still coming up.
func (t *Topology) waitUp(ctx context.Context) error {
	srvNL, err := t.netlinkHandle(t.Server)
	if err != nil {
		return err
	}
	defer srvNL.Close()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	for _, p := range t.Paths {
		for _, x := range []struct {
			h   *netlink.Handle
			dev string
		}{{t.clientNL, p.ClientIf}, {srvNL, p.ServerIf}} {
			for {
				l, err := x.h.LinkByName(x.dev)
				if err != nil {
					return fmt.Errorf("lab: link %s: %w", x.dev, err)
				}
				if l.Attrs().OperState == netlink.OperUp {
					break
				}
				select {
				case <-ctx.Done():
					return fmt.Errorf("lab: %s of path %d not up (%v): %w", x.dev, p.Index, l.Attrs().OperState, ctx.Err())
				case <-time.After(10 * time.Millisecond):
				}
			}
		}
	}
	return nil
}

// DisableOffloads turns off segmentation, GRO and checksum offloads of dev
// in ns with ethtool.
func DisableOffloads(ctx context.Context, ns *NS, dev string) error {
	if _, err := ns.Run(ctx, "ethtool", "-K", dev, "tx", "off", "rx", "off", "sg", "off", "tso", "off", "gso", "off", "gro", "off"); err != nil {
		return fmt.Errorf("lab: disable offloads: %w", err)
	}
	return nil
}

func (t *Topology) netlinkHandle(ns *NS) (*netlink.Handle, error) {
	nsh, err := netns.GetFromPath(NetnsDir + "/" + ns.Name)
	if err != nil {
		return nil, fmt.Errorf("lab: open netns %s: %w", ns.Name, err)
	}
	defer nsh.Close()
	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		return nil, fmt.Errorf("lab: netlink handle in %s: %w", ns.Name, err)
	}
	return h, nil
}

func (t *Topology) startEmulators(ctx context.Context) error {
	if t.Emu == nil {
		return nil
	}
	var emus []*linkemu.Emulator
	err := t.Emu.Do(func() error {
		for _, pi := range t.Paths {
			if pi.Direct || pi.External {
				continue
			}
			e, err := linkemu.Open(linkemu.Config{
				IfA:    pi.EmuIfA,
				IfB:    pi.EmuIfB,
				AtoB:   pi.params(uint64(2*pi.Index + 1)),
				BtoA:   pi.params(uint64(2*pi.Index + 2)),
				Logger: t.log.With("path", pi.Name),
			})
			if err != nil {
				return fmt.Errorf("lab: emulator for path %d: %w", pi.Index, err)
			}
			pi.Emulator = e
			emus = append(emus, e)
		}
		return nil
	})
	if err != nil {
		for _, e := range emus {
			e.Close()
		}
		return err
	}
	// The emulators outlive New's ctx: they stop in Close.
	rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	t.cancel = cancel
	t.emuErrs = make(chan error, len(emus))
	now := time.Now()
	for _, e := range emus {
		e.SetEpoch(now)
		t.wg.Add(1)
		go func() {
			defer t.wg.Done()
			if err := e.Run(rctx); err != nil {
				t.log.Error("lab: emulator failed", "err", err)
				t.emuErrs <- err
			}
		}()
	}
	return nil
}

// StartClock makes scripted outages of every path relative to now; call it
// when the measurement starts.
func (t *Topology) StartClock() time.Time {
	now := time.Now()
	for _, p := range t.Paths {
		if p.Emulator != nil {
			p.Emulator.SetEpoch(now)
		}
	}
	return now
}

// Counters returns the client-side interface counters of every path.
func (t *Topology) Counters() ([]PathCounters, error) {
	out := make([]PathCounters, len(t.Paths))
	for i, p := range t.Paths {
		l, err := t.clientNL.LinkByName(p.ClientIf)
		if err != nil {
			return nil, fmt.Errorf("lab: link %s: %w", p.ClientIf, err)
		}
		st := l.Attrs().Statistics
		if st == nil {
			return nil, fmt.Errorf("lab: link %s has no statistics", p.ClientIf)
		}
		out[i] = PathCounters{TxBytes: st.TxBytes, RxBytes: st.RxBytes, TxPackets: st.TxPackets, RxPackets: st.RxPackets}
	}
	return out, nil
}

// Close stops the emulators, kills processes left in the namespaces and
// deletes the namespaces (which deletes their veths). Safe to call twice.
func (t *Topology) Close() error {
	t.closed.Do(func() {
		var errs []error
		if t.cancel != nil {
			t.cancel()
			t.wg.Wait()
			close(t.emuErrs)
			for err := range t.emuErrs {
				errs = append(errs, err)
			}
		}
		if t.clientNL != nil {
			t.clientNL.Close()
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		for _, ns := range t.nsList {
			if err := deleteNS(ctx, ns.Name); err != nil {
				errs = append(errs, err)
			}
		}
		t.closeErr = errors.Join(errs...)
	})
	return t.closeErr
}

// deleteNS kills the processes inside a namespace and deletes it; a
// namespace that does not exist is not an error.
func deleteNS(ctx context.Context, name string) error {
	if _, err := os.Stat(NetnsDir + "/" + name); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if out, err := run(execIP(ctx, "netns", "pids", name)); err == nil {
		for _, f := range strings.Fields(string(out)) {
			if pid, err := strconv.Atoi(f); err == nil && pid != os.Getpid() {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	if err := ipCmd(ctx, "netns", "del", name); err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	return nil
}

// CleanupStale deletes namespaces named "<prefix>-<pid>-..." whose creating
// process no longer exists (crashed runs). Live runs are left alone.
func CleanupStale(ctx context.Context, prefix string) ([]string, error) {
	ents, err := os.ReadDir(NetnsDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("lab: list namespaces: %w", err)
	}
	var removed []string
	var errs []error
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), prefix+"-")
		if !ok {
			continue
		}
		pidStr, _, _ := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pidAlive(pid) {
			continue
		}
		if err := deleteNS(ctx, e.Name()); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, e.Name())
	}
	return removed, errors.Join(errs...)
}

func pidAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}
