package tun

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
	wgtun "golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// Addresses inside the test's own namespace: the kernel side is .1/::1,
// gVisor .2/::2.
var (
	kernAddr4 = netip.MustParseAddr("10.213.0.1")
	gvAddr4   = netip.MustParseAddr("10.213.0.2")
	kernAddr6 = netip.MustParseAddr("fd00:213::1")
	gvAddr6   = netip.MustParseAddr("fd00:213::2")
)

const nicID = 1

// tb is what the helpers need from testing.T and testing.B.
type tb interface {
	testing.TB
}

func requireRoot(t tb) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces and TUN devices); CI runs these as root")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skipf("needs /dev/net/tun: %v", err)
	}
}

func suffix(t tb) string {
	t.Helper()
	b := make([]byte, 4)
	_, err := rand.Read(b)
	require.NoError(t, err)
	return hex.EncodeToString(b)
}

func run(t tb, args ...string) {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	require.NoError(t, err, "%s: %s", strings.Join(args, " "), out)
}

// newNetns creates a namespace removed in t.Cleanup.
func newNetns(t tb) string {
	t.Helper()
	ns := "mtt-" + suffix(t)
	run(t, "ip", "netns", "add", ns)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
			t.Logf("ip netns del %s: %v: %s", ns, err, out)
		}
	})
	run(t, "ip", "-n", ns, "link", "set", "lo", "up")
	return ns
}

// inNetns runs fn on a thread switched into ns. Sockets and devices created
// by fn stay in ns.
func inNetns(ns string, fn func() error) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		return fmt.Errorf("open own netns: %w", err)
	}
	defer orig.Close()
	target, err := os.Open("/run/netns/" + ns)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", ns, err)
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("setns %s: %w", ns, err)
	}
	defer func() {
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			// Leave the thread locked: it dies with the goroutine instead of
			// serving others from the wrong namespace.
			runtime.LockOSThread()
		}
	}()
	return fn()
}

// fixture is a TUN in a fresh namespace, configured on the kernel side.
type fixture struct {
	ns, name string
	dev      wgtun.Device
}

func newFixture(t tb, offloads bool, mtu int) *fixture {
	t.Helper()
	ns := newNetns(t)
	name := "mtt" + suffix(t)
	f := &fixture{ns: ns, name: name}
	require.NoError(t, inNetns(ns, func() error {
		dev, err := CreateTUN(name, mtu, offloads)
		f.dev = dev
		return err
	}))
	t.Cleanup(func() { _ = f.dev.Close() })
	run(t, "ip", "-n", ns, "addr", "add", kernAddr4.String()+"/24", "dev", name)
	run(t, "ip", "-n", ns, "addr", "add", kernAddr6.String()+"/64", "dev", name, "nodad")
	run(t, "ip", "-n", ns, "link", "set", name, "up")
	return f
}

// newStack builds a gVisor stack with ipv4, ipv6 and tcp on ep, a fifo
// qdisc, and the gVisor-side addresses.
func newStack(t tb, ep *Endpoint) *stack.Stack {
	t.Helper()
	s := stack.New(stack.Options{
		NetworkProtocols: []stack.NetworkProtocolFactory{
			ipv4.NewProtocol,
			ipv6.NewProtocolWithOptions(ipv6.Options{
				DADConfigs: stack.DADConfigurations{DupAddrDetectTransmits: 0},
			}),
		},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol},
	})
	t.Cleanup(func() {
		s.Close()
		s.Wait()
	})
	// Large buffers so that one flow is not window-limited on a fast link.
	sack := tcpip.TCPSACKEnabled(true)
	require.Nil(t, s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack))
	// As netstack.New does: gVisor's RACK recovery can sit for tens of
	// seconds with a backed-off RTO after a burst of losses (a TUN queue
	// overflowing on a loaded machine), which made this test time out.
	rec := tcpip.TCPRecovery(0)
	require.Nil(t, s.SetTransportProtocolOption(tcp.ProtocolNumber, &rec))
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: 4096, Default: 1 << 20, Max: 8 << 20}
	require.Nil(t, s.SetTransportProtocolOption(tcp.ProtocolNumber, &rcv))
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: 4096, Default: 4 << 20, Max: 8 << 20}
	require.Nil(t, s.SetTransportProtocolOption(tcp.ProtocolNumber, &snd))

	require.Nil(t, s.CreateNICWithOptions(nicID, ep.Link(), stack.NICOptions{QDisc: ep.NewQDisc(1000)}))
	for _, a := range []struct {
		proto tcpip.NetworkProtocolNumber
		addr  netip.Addr
		bits  int
	}{{ipv4.ProtocolNumber, gvAddr4, 24}, {ipv6.ProtocolNumber, gvAddr6, 64}} {
		require.Nil(t, s.AddProtocolAddress(nicID, tcpip.ProtocolAddress{
			Protocol: a.proto,
			AddressWithPrefix: tcpip.AddressWithPrefix{
				Address:   tcpip.AddrFromSlice(a.addr.AsSlice()),
				PrefixLen: a.bits,
			},
		}, stack.AddressProperties{}))
	}
	s.SetRouteTable([]tcpip.Route{
		{Destination: mustSubnet(t, "10.213.0.0/24"), NIC: nicID},
		{Destination: mustSubnet(t, "fd00:213::/64"), NIC: nicID},
	})
	return s
}

func mustSubnet(t tb, cidr string) tcpip.Subnet {
	t.Helper()
	p := netip.MustParsePrefix(cidr)
	sn, err := tcpip.NewSubnet(tcpip.AddrFromSlice(p.Addr().AsSlice()),
		tcpip.MaskFromBytes(net.CIDRMask(p.Bits(), p.Addr().BitLen())))
	require.NoError(t, err)
	return sn
}

func fullAddr(a netip.Addr, port uint16) tcpip.FullAddress {
	return tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFromSlice(a.AsSlice()), Port: port}
}

func protoOf(a netip.Addr) tcpip.NetworkProtocolNumber {
	if a.Is4() {
		return ipv4.ProtocolNumber
	}
	return ipv6.ProtocolNumber
}

func waitReadyIn(t tb, ns, name string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	require.NoError(t, inNetns(ns, func() error { return WaitReady(ctx, name) }))
}

// newEndpointIn creates the endpoint inside the fixture's namespace, where
// wireguard-go can look the device MTU up by name.
func newEndpointIn(t tb, f *fixture, opts Options) *Endpoint {
	t.Helper()
	var ep *Endpoint
	require.NoError(t, inNetns(f.ns, func() error {
		var err error
		ep, err = NewEndpoint(f.dev, opts)
		return err
	}))
	t.Cleanup(func() { _ = ep.Close() })
	return ep
}

// halfCloser is satisfied by *net.TCPConn and *gonet.TCPConn.
type halfCloser interface {
	net.Conn
	CloseWrite() error
}

// echo copies c back to itself until EOF, then half-closes.
func echo(c halfCloser) error {
	defer c.Close()
	if _, err := io.Copy(c, c); err != nil {
		return err
	}
	return c.CloseWrite()
}

// roundTrip sends size pseudo-random bytes on c, half-closes, reads the echo
// until EOF, and checks length and SHA-256.
func roundTrip(t *testing.T, c halfCloser, size int, seed uint64) {
	t.Helper()
	require.NoError(t, c.SetDeadline(time.Now().Add(60*time.Second)))
	sent := sha256.New()
	werr := make(chan error, 1)
	go func() {
		rng := mrand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)})
		buf := make([]byte, 256<<10)
		for left := size; left > 0; {
			n := min(left, len(buf))
			_, _ = rng.Read(buf[:n])
			sent.Write(buf[:n])
			if _, err := c.Write(buf[:n]); err != nil {
				werr <- err
				return
			}
			left -= n
		}
		werr <- c.CloseWrite()
	}()
	got := sha256.New()
	n, err := io.Copy(got, c)
	require.NoError(t, err)
	require.NoError(t, <-werr)
	require.Equal(t, int64(size), n)
	require.Equal(t, sent.Sum(nil), got.Sum(nil), "echoed data differs")
}

// endpointGoroutines counts the goroutines the endpoint started (reader and
// event loops). Other goroutines, like the qdisc's, may be inside an
// Endpoint method too, so the creator is what identifies them.
func endpointGoroutines() int {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	n := 0
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		if strings.Contains(string(g), "created by github.com/mptun/mptun/tun.(*Endpoint).Attach") {
			n++
		}
	}
	return n
}
