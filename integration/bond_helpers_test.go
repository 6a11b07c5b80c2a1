package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/mptun/mptun/bond/client"
	"github.com/mptun/mptun/lab"
)

// The bonding topology (all inside namespaces named mbc-<id>-<role>):
//
//	cli  u1 10.202.1.2 ─ r1 10.202.1.1  rtr  rs 10.202.3.1 ─ s0 10.202.3.2  srv  sw 10.202.4.1 ─ w0 10.202.4.2 web
//	     u2 10.202.2.2 ─ r2 10.202.2.1                                           fd20:4::1        fd20:4::2
//
// u1/u2 are rate-limited with tbf in both directions (cli egress = upload,
// rtr egress towards cli = download). The concentrator (mptun server)
// listens on 10.202.3.2; the web host runs the test servers.
const (
	bondServerAddr = "10.202.3.2"
	bondServerPort = "4433"
	bondWebV4      = "10.202.4.2"
	bondWebV6      = "fd20:4::2"
	bondSinkPort   = 5001 // counts what it receives
	bondSourcePort = 5002 // sends until the peer closes
	bondEchoPort   = 5003 // request: 4-byte length; response: that many pattern bytes
	bondDNSPort    = 53   // UDP: answers "re:" + query
)

type bondTopo struct {
	id                 string
	cli, rtr, srv, web *lab.NS
	dir                string
	keyFile            string
	sinkBytes          atomic.Int64
	sinkOpen           atomic.Int64 // sink connections not ended yet
}

func bondNS(id, role string) *lab.NS { return &lab.NS{Name: "mbc-" + id + "-" + role} }

func bondRun(t *testing.T, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	require.NoError(t, err, "%s: %s", strings.Join(args, " "), out)
}

// bondNewTopo builds the namespaces; rateMbit limits each uplink.
func bondNewTopo(t *testing.T, rateMbit int) *bondTopo {
	t.Helper()
	mpiRequireRoot(t)
	id := fmt.Sprintf("%04x", rand.Uint32()&0xffff)
	b := &bondTopo{id: id, cli: bondNS(id, "c"), rtr: bondNS(id, "r"), srv: bondNS(id, "s"), web: bondNS(id, "w"), dir: t.TempDir()}
	for _, ns := range []*lab.NS{b.cli, b.rtr, b.srv, b.web} {
		bondRun(t, "ip", "netns", "add", ns.Name)
		name := ns.Name
		t.Cleanup(func() {
			// Kill what still runs inside (a failed test's mptun), then
			// delete: processes keep a namespace and its devices alive.
			out, _ := exec.Command("ip", "netns", "pids", name).Output()
			for _, f := range strings.Fields(string(out)) {
				var pid int
				// The test's own pid is listed too (lab.NS.Do threads).
				if _, err := fmt.Sscan(f, &pid); err == nil && pid != os.Getpid() {
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
			}
			if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
				t.Errorf("ip netns del %s: %v: %s", name, err, out)
			}
		})
		bondRun(t, "ip", "-n", ns.Name, "link", "set", "lo", "up")
	}
	veth := func(a *lab.NS, an string, bns *lab.NS, bn string) {
		bondRun(t, "ip", "link", "add", an, "netns", a.Name, "type", "veth", "peer", "name", bn, "netns", bns.Name)
		bondRun(t, "ip", "-n", a.Name, "link", "set", an, "up")
		bondRun(t, "ip", "-n", bns.Name, "link", "set", bn, "up")
	}
	addr := func(ns *lab.NS, dev, a string) {
		bondRun(t, "ip", "-n", ns.Name, "addr", "add", a, "dev", dev, "nodad")
	}
	veth(b.cli, "u1", b.rtr, "r1")
	veth(b.cli, "u2", b.rtr, "r2")
	veth(b.rtr, "rs", b.srv, "s0")
	veth(b.srv, "sw", b.web, "w0")
	addr(b.cli, "u1", "10.202.1.2/24")
	addr(b.cli, "u2", "10.202.2.2/24")
	addr(b.rtr, "r1", "10.202.1.1/24")
	addr(b.rtr, "r2", "10.202.2.1/24")
	addr(b.rtr, "rs", "10.202.3.1/24")
	addr(b.srv, "s0", bondServerAddr+"/24")
	addr(b.srv, "sw", "10.202.4.1/24")
	addr(b.srv, "sw", "fd20:4::1/64")
	addr(b.web, "w0", bondWebV4+"/24")
	addr(b.web, "w0", bondWebV6+"/64")
	// The client host's own default route (as on a real host): the tunnel
	// must take precedence over it with --default-route.
	bondRun(t, "ip", "-n", b.cli.Name, "route", "add", "default", "via", "10.202.1.1")
	bondRun(t, "ip", "-n", b.srv.Name, "route", "add", "default", "via", "10.202.3.1")
	require.NoError(t, b.rtr.WriteSysctl("net/ipv4/ip_forward", "1"))
	for _, ns := range []*lab.NS{b.cli, b.rtr, b.srv} {
		require.NoError(t, ns.WriteSysctl("net/ipv4/conf/all/rp_filter", "0"))
	}
	if rateMbit > 0 {
		for _, x := range []struct {
			ns  *lab.NS
			dev string
		}{{b.cli, "u1"}, {b.cli, "u2"}, {b.rtr, "r1"}, {b.rtr, "r2"}} {
			bondRun(t, "ip", "netns", "exec", x.ns.Name, "tc", "qdisc", "add", "dev", x.dev, "root", "tbf",
				"rate", fmt.Sprintf("%dmbit", rateMbit), "burst", "64kb", "latency", "50ms")
		}
	}
	// Pre-shared key.
	b.keyFile = filepath.Join(b.dir, "key")
	out, err := exec.Command(mpiBinary.path(t), "genkey").Output()
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(b.keyFile, out, 0o600))
	b.startWebServers(t)
	return b
}

// startWebServers runs the test servers in the web namespace.
func (b *bondTopo) startWebServers(t *testing.T) {
	var lns []io.Closer
	var wg sync.WaitGroup
	t.Cleanup(func() {
		for _, l := range lns {
			l.Close()
		}
		wg.Wait()
	})
	serve := func(addr string, port int, handle func(net.Conn)) {
		var ln net.Listener
		require.NoError(t, b.web.Do(func() error {
			var err error
			ln, err = net.Listen("tcp", net.JoinHostPort(addr, fmt.Sprint(port)))
			return err
		}))
		lns = append(lns, ln)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					defer c.Close()
					handle(c)
				}()
			}
		}()
	}
	sink := func(c net.Conn) {
		b.sinkOpen.Add(1)
		defer b.sinkOpen.Add(-1)
		buf := make([]byte, 256<<10)
		for {
			n, err := c.Read(buf)
			b.sinkBytes.Add(int64(n))
			if err != nil {
				return
			}
		}
	}
	source := func(c net.Conn) {
		buf := make([]byte, 256<<10)
		_ = c.SetDeadline(time.Now().Add(2 * time.Minute))
		for {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	}
	echo := func(c net.Conn) {
		_ = c.SetDeadline(time.Now().Add(time.Minute))
		var hdr [4]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		n := int(hdr[0])<<24 | int(hdr[1])<<16 | int(hdr[2])<<8 | int(hdr[3])
		resp := make([]byte, n)
		bondPattern(resp, hdr)
		_, _ = c.Write(resp)
		// Half-close, then wait for the client's FIN: both directions of
		// the splice are exercised.
		_ = c.(*net.TCPConn).CloseWrite()
		_, _ = io.Copy(io.Discard, c)
	}
	for _, a := range []string{bondWebV4, bondWebV6} {
		serve(a, bondSinkPort, sink)
		serve(a, bondSourcePort, source)
		serve(a, bondEchoPort, echo)
	}
	var pc net.PacketConn
	require.NoError(t, b.web.Do(func() error {
		var err error
		pc, err = net.ListenPacket("udp", fmt.Sprintf(":%d", bondDNSPort))
		return err
	}))
	lns = append(lns, pc)
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(append([]byte("re:"), buf[:n]...), from)
		}
	}()
}

func bondPattern(b []byte, seed [4]byte) {
	x := uint32(seed[0])<<24 | uint32(seed[1])<<16 | uint32(seed[2])<<8 | uint32(seed[3])
	for i := range b {
		x = x*1664525 + 1013904223
		b[i] = byte(x >> 24)
	}
}

// bondProc is an mptun process in a namespace.
type bondProc struct {
	cmd    *exec.Cmd
	stderr *lab.SyncBuffer
	done   chan error
}

func (b *bondTopo) start(t *testing.T, ns *lab.NS, args ...string) *bondProc {
	t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns.Name, mpiBinary.path(t)}, args...)...)
	p := &bondProc{cmd: cmd, stderr: &lab.SyncBuffer{}, done: make(chan error, 1)}
	cmd.Stderr = p.stderr
	require.NoError(t, cmd.Start())
	go func() { p.done <- cmd.Wait() }()
	t.Cleanup(func() {
		p.stop(syscall.SIGTERM, 10*time.Second)
		if t.Failed() {
			t.Logf("mptun %s stderr:\n%s", args[0], p.stderr.String())
		}
	})
	return p
}

// stop signals the process and waits; it reports whether it exited in time
// (it is killed otherwise).
func (p *bondProc) stop(sig syscall.Signal, d time.Duration) (exited bool, err error) {
	if p.cmd.ProcessState != nil {
		return true, nil
	}
	_ = p.cmd.Process.Signal(sig)
	select {
	case err := <-p.done:
		p.done <- err
		return true, err
	case <-time.After(d):
		_ = p.cmd.Process.Kill()
		err := <-p.done
		p.done <- err
		return false, err
	}
}

func (b *bondTopo) startServer(t *testing.T) *bondProc {
	return b.startServerWith(t, "--log-level", "info")
}

// startServerWith starts the concentrator with extra flags and waits until
// its port accepts.
func (b *bondTopo) startServerWith(t *testing.T, extra ...string) *bondProc {
	args := append([]string{"server", "--listen", bondServerAddr + ":" + bondServerPort, "--key-file", b.keyFile}, extra...)
	p := b.start(t, b.srv, args...)
	// Ready when the port accepts (DNAT into the userspace stack is in
	// place, or the kernel socket listens) - probe from the router
	// namespace.
	require.Eventually(t, func() bool {
		var ok bool
		_ = b.rtr.Do(func() error {
			c, err := net.DialTimeout("tcp", bondServerAddr+":"+bondServerPort, 300*time.Millisecond)
			if err == nil {
				ok = true
				c.Close()
			}
			return nil
		})
		return ok
	}, 15*time.Second, 100*time.Millisecond, "server did not come up: %s", p.stderr)
	return p
}

type bondClientOpts struct {
	keyFile string
	extra   []string
}

func (b *bondTopo) socket() string { return filepath.Join(b.dir, "client.sock") }

func (b *bondTopo) startClient(t *testing.T, o bondClientOpts) *bondProc {
	key := o.keyFile
	if key == "" {
		key = b.keyFile
	}
	args := []string{"client", "--server", bondServerAddr + ":" + bondServerPort, "--key-file", key,
		"--uplink", "u1,via=10.202.1.1", "--uplink", "u2,via=10.202.2.1", "--default-route",
		"--socket", b.socket(), "--log-level", "info"}
	p := b.start(t, b.cli, append(args, o.extra...)...)
	require.Eventually(t, func() bool {
		select {
		case <-p.done:
			return true
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, err := client.QueryControl(ctx, b.socket())
		return err == nil
	}, 20*time.Second, 100*time.Millisecond, "client did not come up")
	require.Nil(t, p.cmd.ProcessState, "client exited: %s", p.stderr)
	return p
}

func (b *bondTopo) status(t *testing.T) client.Status {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	raw, err := client.QueryControl(ctx, b.socket())
	require.NoError(t, err)
	var st client.Status
	require.NoError(t, json.Unmarshal(raw, &st))
	return st
}

// dial opens a TCP connection from the client namespace (routed into the
// tunnel by the kernel, like any application's).
func (b *bondTopo) dial(t *testing.T, addr string, port int) (net.Conn, error) {
	var c net.Conn
	err := b.cli.Do(func() error {
		var err error
		c, err = net.DialTimeout("tcp", net.JoinHostPort(addr, fmt.Sprint(port)), 10*time.Second)
		return err
	})
	return c, err
}

// goodput samples a byte counter every interval while fn runs and returns
// the per-interval rates in Mbit/s.
func bondSample(counter func() int64, interval time.Duration, stop <-chan struct{}) []float64 {
	var rates []float64
	t := time.NewTicker(interval)
	defer t.Stop()
	last := counter()
	for {
		select {
		case <-stop:
			return rates
		case <-t.C:
			c := counter()
			rates = append(rates, float64(c-last)*8/interval.Seconds()/1e6)
			last = c
		}
	}
}

func bondMean(x []float64) float64 {
	if len(x) == 0 {
		return 0
	}
	var s float64
	for _, v := range x {
		s += v
	}
	return s / float64(len(x))
}

// bondMedian is the median of x (the sustained rate of a series of
// one-second samples, robust to a single stalled second).
func bondMedian(x []float64) float64 {
	if len(x) == 0 {
		return 0
	}
	y := append([]float64(nil), x...)
	sort.Float64s(y)
	if n := len(y); n%2 == 1 {
		return y[n/2]
	} else {
		return (y[n/2-1] + y[n/2]) / 2
	}
}

// bondLeftovers lists mptun devices, policy rules and nft tables in ns.
func bondLeftovers(t *testing.T, ns *lab.NS) string {
	var out []string
	links, err := ns.Run(context.Background(), "ip", "-o", "link", "show")
	require.NoError(t, err)
	for _, l := range strings.Split(string(links), "\n") {
		if strings.Contains(l, "mptun") || strings.Contains(l, ": mpt") {
			out = append(out, "link: "+l)
		}
	}
	for _, fam := range []string{"-4", "-6"} {
		rules, err := ns.Run(context.Background(), "ip", fam, "rule", "show")
		require.NoError(t, err)
		for _, r := range strings.Split(strings.TrimSpace(string(rules)), "\n") {
			if !strings.HasPrefix(r, "0:") && !strings.HasPrefix(r, "32766:") && !strings.HasPrefix(r, "32767:") && r != "" {
				out = append(out, "rule: "+r)
			}
		}
	}
	tables, err := ns.Run(context.Background(), "nft", "list", "tables")
	require.NoError(t, err)
	if s := strings.TrimSpace(string(tables)); s != "" {
		out = append(out, "nft: "+s)
	}
	return strings.Join(out, "\n")
}
