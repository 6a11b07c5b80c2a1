package mptcpep

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"

	"github.com/mptun/mptun/netstack"
	"github.com/mptun/mptun/netstack/linkpipe"
)

// benchNet is two netstack stacks (option layers on every NIC) joined by
// ideal linkpipe paths: zero delay, unlimited rate, no loss.
type benchNet struct {
	cs, ss *netstack.Stack
	caddrs []netip.Addr
	saddr  netip.Addr
}

func newBenchNet(tb testing.TB, paths int) *benchNet {
	tb.Helper()
	cs, err := netstack.New(netstack.Options{})
	if err != nil {
		tb.Fatal(err)
	}
	ss, err := netstack.New(netstack.Options{})
	if err != nil {
		cs.Close()
		tb.Fatal(err)
	}
	n := &benchNet{cs: cs, ss: ss, saddr: netip.AddrFrom4([4]byte{10, 0, 0, 2})}
	var links []*linkpipe.Endpoint
	tb.Cleanup(func() {
		cs.Close()
		ss.Close()
		for _, l := range links {
			l.Close()
		}
	})
	for i := range paths {
		a, b := linkpipe.New(linkpipe.Config{MTU: 1500, Seed: int64(i + 1)})
		links = append(links, a, b)
		ca := netip.AddrFrom4([4]byte{10, byte(i + 1), 0, 1})
		if _, err := cs.AddNIC(fmt.Sprintf("bc%d", i), a, netip.PrefixFrom(ca, 32)); err != nil {
			tb.Fatal(err)
		}
		if _, err := ss.AddNIC(fmt.Sprintf("bs%d", i), b, netip.PrefixFrom(n.saddr, 32)); err != nil {
			tb.Fatal(err)
		}
		n.caddrs = append(n.caddrs, ca)
	}
	return n
}

func benchLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelError}))
}

// mptcpPair opens one MPTCP connection over every path of n and waits until
// all its subflows are established, so the timed part is the transfer only.
func (n *benchNet) mptcpPair(b *testing.B, ctx context.Context) (net.Conn, net.Conn) {
	b.Helper()
	client := New(n.cs, Config{Logger: benchLogger()})
	server := New(n.ss, Config{Logger: benchLogger()})
	var locals []Local
	for i, a := range n.caddrs {
		locals = append(locals, Local{Addr: a, ID: uint8(i + 1)})
	}
	client.SetLocals(locals)
	server.SetLocals([]Local{{Addr: n.saddr}})
	b.Cleanup(func() {
		client.Close()
		server.Close()
	})
	l, err := server.Listen(5001)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { l.Close() })
	cc, err := client.Dial(ctx, netip.AddrPortFrom(n.saddr, 5001))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(cc.Abort)
	sc, err := l.AcceptMPTCP()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(sc.Abort)
	if !cc.MultipathTCP() || !sc.MultipathTCP() {
		b.Fatal("connection fell back to plain TCP")
	}
	for _, c := range []*Conn{cc, sc} {
		for established(c) < len(n.caddrs) {
			if ctx.Err() != nil {
				b.Fatalf("subflows not established: %+v", c.Stats().Subflows)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	return cc, sc
}

func established(c *Conn) int {
	k := 0
	for _, s := range c.Stats().Subflows {
		if s.State == "established" {
			k++
		}
	}
	return k
}

// tcpPair opens one plain gVisor TCP connection (gonet) over the first path
// of n: the option layer is there, but no flow is registered with it.
func (n *benchNet) tcpPair(b *testing.B, ctx context.Context) (net.Conn, net.Conn) {
	b.Helper()
	addr := tcpip.FullAddress{Addr: tcpip.AddrFrom4(n.saddr.As4()), Port: 5001}
	l, err := gonet.ListenTCP(n.ss.S, addr, ipv4.ProtocolNumber)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { l.Close() })
	type accepted struct {
		c   net.Conn
		err error
	}
	ch := make(chan accepted, 1)
	go func() {
		c, err := l.Accept()
		ch <- accepted{c, err}
	}()
	cc, err := gonet.DialContextTCP(ctx, n.cs.S, addr, ipv4.ProtocolNumber)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cc.Close() })
	var a accepted
	select {
	case a = <-ch:
	case <-ctx.Done():
		b.Fatal("accept timed out")
	}
	if a.err != nil {
		b.Fatal(a.err)
	}
	b.Cleanup(func() { a.c.Close() })
	return cc, a.c
}

// transfer sends b.N chunks of 1 MiB from src to dst and reports goodput.
func transfer(b *testing.B, ctx context.Context, src, dst net.Conn) {
	b.Helper()
	const chunk = 1 << 20
	data := randomData(chunk, 7)
	type result struct {
		n   int64
		err error
	}
	got := make(chan result, 1)
	go func() {
		buf := make([]byte, 256<<10)
		var n int64
		for {
			k, err := dst.Read(buf)
			n += int64(k)
			if err == io.EOF {
				got <- result{n, nil}
				return
			}
			if err != nil {
				got <- result{n, err}
				return
			}
		}
	}()
	// A stuck transfer must not hang the benchmark: closing both ends
	// unblocks the reader and the writer.
	stop := context.AfterFunc(ctx, func() {
		src.Close()
		dst.Close()
	})
	defer stop()
	b.SetBytes(chunk)
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	for range b.N {
		if _, err := src.Write(data); err != nil {
			b.Fatalf("write: %v", err)
		}
	}
	cw, ok := src.(interface{ CloseWrite() error })
	if !ok {
		b.Fatalf("%T cannot half-close", src)
	}
	if err := cw.CloseWrite(); err != nil {
		b.Fatalf("close write: %v", err)
	}
	r := <-got
	elapsed := time.Since(start)
	b.StopTimer()
	if r.err != nil || r.n != int64(b.N)*chunk {
		b.Fatalf("received %d of %d bytes: %v", r.n, int64(b.N)*chunk, r.err)
	}
	b.ReportMetric(float64(r.n)*8/elapsed.Seconds()/1e9, "Gbit/s")
}

// BenchmarkTransferMPTCP is one MPTCP connection over one ideal path.
func BenchmarkTransferMPTCP(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	b.Cleanup(cancel)
	n := newBenchNet(b, 1)
	cc, sc := n.mptcpPair(b, ctx)
	transfer(b, ctx, cc, sc)
}

// BenchmarkTransferMPTCP2Paths is one MPTCP connection over two ideal paths.
func BenchmarkTransferMPTCP2Paths(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	b.Cleanup(cancel)
	n := newBenchNet(b, 2)
	cc, sc := n.mptcpPair(b, ctx)
	transfer(b, ctx, cc, sc)
}

// BenchmarkTransferPlainTCP is the baseline: plain gVisor TCP through the
// same stacks and link, the option layer passing every segment through.
func BenchmarkTransferPlainTCP(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	b.Cleanup(cancel)
	n := newBenchNet(b, 1)
	cc, sc := n.tcpPair(b, ctx)
	transfer(b, ctx, cc, sc)
}
