package mptcpep

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	tcpheader "gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/mptun/mptun/netstack"
	"github.com/mptun/mptun/netstack/linkpipe"
)

// worldOpts extends newWorld for the robustness tests: middleboxes on the
// links and extra server addresses.
type worldOpts struct {
	paths      []pathSpec
	ccfg, scfg Config
	// serverExtra adds addresses to the server's NIC of a path (an address
	// the client reaches only over that path).
	serverExtra map[int][]netip.Addr
	// hookClient/hookServer put a middlebox on path i, in front of the
	// client's or the server's NIC (nil, or a nil Hook: none).
	hookClient, hookServer func(i int) linkpipe.Hook
}

// hookSide puts the middlebox mb in front of the server's NICs (server)
// or the client's.
func (o *worldOpts) hookSide(server bool, mb func(i int) linkpipe.Hook) {
	if server {
		o.hookServer = mb
	} else {
		o.hookClient = mb
	}
}

// newWorldOpts builds a world like newWorld, with the extras of o.
func newWorldOpts(t *testing.T, o worldOpts) *world {
	t.Helper()
	checkGoroutines(t)
	cs, err := netstack.New(netstack.Options{})
	require.NoError(t, err)
	ss, err := netstack.New(netstack.Options{})
	require.NoError(t, err)
	w := &world{cstack: cs, sstack: ss}
	ccfg, scfg := o.ccfg, o.scfg
	ccfg.Logger, scfg.Logger = testLogger(t), testLogger(t)
	w.client = New(cs, ccfg)
	w.server = New(ss, scfg)
	t.Cleanup(func() {
		w.client.Close()
		w.server.Close()
		cs.Close()
		ss.Close()
		for _, l := range w.links {
			l[0].Close()
			l[1].Close()
		}
	})
	var clocals []Local
	sa := netip.AddrFrom4([4]byte{10, 0, 0, 2})
	for i, p := range o.paths {
		d := linkpipe.Direction{Delay: p.delay, RateBps: p.rateBps, Loss: p.loss}
		a, b := linkpipe.New(linkpipe.Config{MTU: 1500, AtoB: d, BtoA: d, Seed: int64(i + 1)})
		w.links = append(w.links, [2]*linkpipe.Endpoint{a, b})
		// a sends towards the server, b towards the client.
		if o.hookServer != nil {
			a.SetHook(o.hookServer(i))
		}
		if o.hookClient != nil {
			b.SetHook(o.hookClient(i))
		}
		ca := netip.AddrFrom4([4]byte{10, byte(i + 1), 0, 1})
		_, err := cs.AddNIC(fmt.Sprintf("c%d", i), a, netip.PrefixFrom(ca, 32))
		require.NoError(t, err)
		sp := []netip.Prefix{netip.PrefixFrom(sa, 32)}
		for _, x := range o.serverExtra[i] {
			sp = append(sp, netip.PrefixFrom(x, 32))
		}
		_, err = ss.AddNIC(fmt.Sprintf("s%d", i), b, sp...)
		require.NoError(t, err)
		w.clientAddrs = append(w.clientAddrs, ca)
		w.serverAddrs = append(w.serverAddrs, sa)
		clocals = append(clocals, Local{Addr: ca, ID: uint8(i + 1), Backup: p.backup})
	}
	w.client.SetLocals(clocals)
	w.server.SetLocals([]Local{{Addr: sa, ID: 0}})
	return w
}

// middlebox may rewrite every IPv4 packet on its way to a NIC (the TCP
// checksum is fixed afterwards, as a NAT or a normalising firewall would)
// or drop it. Its hook method is the linkpipe.Hook to install.
type middlebox struct {
	mangle func(ip []byte) bool
	// drop, if set, drops the IPv4 packets it reports (a firewall).
	drop func(ip []byte) bool
	hits atomic.Uint64
}

func newMiddlebox(mangle func(ip []byte) bool) *middlebox {
	return &middlebox{mangle: mangle}
}

// onPath is a worldOpts hook that puts m on path n only.
func (m *middlebox) onPath(n int) func(i int) linkpipe.Hook {
	return func(i int) linkpipe.Hook {
		if i != n {
			return nil
		}
		return m.hook
	}
}

func (m *middlebox) hook(b []byte) bool {
	if len(b) < tcpheader.IPv4MinimumSize || b[0]>>4 != 4 {
		return true
	}
	if m.drop != nil && m.drop(b) {
		m.hits.Add(1)
		return false
	}
	if m.mangle != nil && m.mangle(b) {
		m.hits.Add(1)
		fixTCPChecksum(b)
	}
	return true
}

// tcpOf returns the TCP header and its options of an IPv4 packet (nil when
// it is not TCP).
func tcpOf(ip []byte) (tcp, opts []byte) {
	ihl := int(ip[0]&0xf) * 4
	if ip[9] != 6 || len(ip) < ihl+tcpheader.TCPMinimumSize {
		return nil, nil
	}
	tcp = ip[ihl:]
	off := int(tcp[12]>>4) * 4
	if off < tcpheader.TCPMinimumSize || off > len(tcp) {
		return nil, nil
	}
	return tcp, tcp[tcpheader.TCPMinimumSize:off]
}

// walkOpts calls f for every option (kind, whole option bytes).
func walkOpts(opts []byte, f func(kind byte, raw []byte)) {
	for i := 0; i < len(opts); {
		switch opts[i] {
		case 0:
			return
		case 1:
			i++
			continue
		}
		if i+1 >= len(opts) || opts[i+1] < 2 || i+int(opts[i+1]) > len(opts) {
			return
		}
		n := int(opts[i+1])
		f(opts[i], opts[i:i+n])
		i += n
	}
}

// stripMPTCP overwrites every MPTCP option with NOPs; it reports whether
// there was one.
func stripMPTCP(opts []byte) bool {
	hit := false
	walkOpts(opts, func(kind byte, raw []byte) {
		if kind == 30 {
			for k := range raw {
				raw[k] = 1
			}
			hit = true
		}
	})
	return hit
}

func fixTCPChecksum(ip []byte) {
	ihl := int(ip[0]&0xf) * 4
	total := int(binary.BigEndian.Uint16(ip[2:4]))
	tcp := ip[ihl:total]
	tcp[16], tcp[17] = 0, 0
	src, dst := tcpip.AddrFrom4Slice(ip[12:16]), tcpip.AddrFrom4Slice(ip[16:20])
	sum := tcpheader.PseudoHeaderChecksum(tcpheader.TCPProtocolNumber, src, dst, uint16(len(tcp)))
	binary.BigEndian.PutUint16(tcp[16:], ^checksum.Checksum(tcp, sum))
}

const (
	tcpFlagSYN = 0x02
	tcpFlagACK = 0x10
)

// halfConn is a net.Conn with half-close (both *Conn and gonet.TCPConn).
type halfConn interface {
	net.Conn
	CloseWrite() error
}

// exchangeErr sends up from a to b and down from b to a concurrently, each
// followed by a half-close, and reports the first problem.
func exchangeErr(ctx context.Context, a, b halfConn, up, down []byte) error {
	type result struct {
		who string
		err error
	}
	ch := make(chan result, 4)
	write := func(who string, c halfConn, data []byte) {
		_, err := io.Copy(c, bytes.NewReader(data))
		if err == nil {
			err = c.CloseWrite()
		}
		ch <- result{who + " write", err}
	}
	read := func(who string, c halfConn, want []byte) {
		h := sha256.New()
		n, err := io.Copy(h, c)
		if err == nil && (int(n) != len(want) || !bytes.Equal(h.Sum(nil), sha256Of(want))) {
			err = fmt.Errorf("got %d bytes, want %d, or the content differs", n, len(want))
		}
		ch <- result{who + " read", err}
	}
	go write("a", a, up)
	go write("b", b, down)
	go read("b", b, up)
	go read("a", a, down)
	for i := 0; i < 4; i++ {
		select {
		case r := <-ch:
			if r.err != nil {
				return fmt.Errorf("%s: %w", r.who, r.err)
			}
		case <-ctx.Done():
			return fmt.Errorf("exchange: %w", ctx.Err())
		}
	}
	return nil
}

func sha256Of(b []byte) []byte {
	s := sha256.Sum256(b)
	return s[:]
}

// roundTrip moves n bytes each way without closing (the connection stays
// usable) and checks them.
func roundTrip(t *testing.T, ctx context.Context, cc, sc *Conn, n int, seed uint64) {
	t.Helper()
	up, down := randomData(n, seed), randomData(n, seed+1)
	errs := make(chan error, 4)
	send := func(c *Conn, b []byte) {
		_, err := c.Write(b)
		errs <- err
	}
	recv := func(c *Conn, want []byte) {
		got := make([]byte, len(want))
		_, err := io.ReadFull(c, got)
		if err == nil && !bytes.Equal(got, want) {
			err = fmt.Errorf("data differs")
		}
		errs <- err
	}
	go send(cc, up)
	go send(sc, down)
	go recv(sc, up)
	go recv(cc, down)
	for i := 0; i < 4; i++ {
		select {
		case err := <-errs:
			require.NoError(t, err)
		case <-ctx.Done():
			// Unblock the helpers before failing.
			cc.Abort()
			sc.Abort()
			t.Fatalf("round trip timed out:\nclient %s\n%s\nserver %s\n%s", summary(cc), mibString(&cc.e.MIB), summary(sc), mibString(&sc.e.MIB))
		}
	}
}

// when runs act once cond holds (polled), unless ctx ends first. The test
// waits for it before its cleanup.
func when(t *testing.T, ctx context.Context, cond func() bool, act func(ctx context.Context)) {
	t.Helper()
	var wg sync.WaitGroup
	wg.Add(1)
	t.Cleanup(wg.Wait)
	go func() {
		defer wg.Done()
		tk := time.NewTicker(2 * time.Millisecond)
		defer tk.Stop()
		for !cond() {
			select {
			case <-ctx.Done():
				return
			case <-tk.C:
			}
		}
		act(ctx)
	}()
}

// bytesByPath sums the bytes a connection sent per client address (the
// path), over all its subflows, closed ones included.
func bytesByPath(c *Conn, clientSide bool) map[netip.Addr]uint64 {
	out := make(map[netip.Addr]uint64)
	for _, s := range c.Stats().Subflows {
		a := s.Local.Addr()
		if !clientSide {
			a = s.Remote.Addr()
		}
		out[a] += s.BytesSent
	}
	return out
}
