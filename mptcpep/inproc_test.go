package mptcpep

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/mptun/mptun/netstack"
	"github.com/mptun/mptun/netstack/linkpipe"
)

// world is two gVisor stacks joined by one emulated link per path.
type world struct {
	client, server *Endpoint
	cstack, sstack *netstack.Stack
	links          [][2]*linkpipe.Endpoint
	clientAddrs    []netip.Addr
	serverAddrs    []netip.Addr
}

type pathSpec struct {
	delay   time.Duration
	rateBps int64
	loss    float64
	backup  bool
}

func testLogger(t *testing.T) *slog.Logger {
	lvl := slog.LevelWarn
	if os.Getenv("MPTUN_DEBUG") != "" {
		lvl = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
}

func newWorld(t *testing.T, paths []pathSpec, ccfg, scfg Config) *world {
	t.Helper()
	checkGoroutines(t)
	cs, err := netstack.New(netstack.Options{})
	require.NoError(t, err)
	ss, err := netstack.New(netstack.Options{})
	require.NoError(t, err)
	w := &world{cstack: cs, sstack: ss}
	var clocals, slocals []Local
	for i, p := range paths {
		d := linkpipe.Direction{Delay: p.delay, RateBps: p.rateBps, Loss: p.loss}
		a, b := linkpipe.New(linkpipe.Config{MTU: 1500, AtoB: d, BtoA: d, Seed: int64(i + 1)})
		// The server has one address, reachable over every path, as a
		// server on the Internet is from a client's uplinks.
		ca := netip.AddrFrom4([4]byte{10, byte(i + 1), 0, 1})
		sa := netip.AddrFrom4([4]byte{10, 0, 0, 2})
		_, err := cs.AddNIC(fmt.Sprintf("c%d", i), a, netip.PrefixFrom(ca, 32))
		require.NoError(t, err)
		_, err = ss.AddNIC(fmt.Sprintf("s%d", i), b, netip.PrefixFrom(sa, 32))
		require.NoError(t, err)
		w.links = append(w.links, [2]*linkpipe.Endpoint{a, b})
		w.clientAddrs = append(w.clientAddrs, ca)
		w.serverAddrs = append(w.serverAddrs, sa)
		clocals = append(clocals, Local{Addr: ca, ID: uint8(i + 1), Backup: p.backup})
	}
	slocals = append(slocals, Local{Addr: w.serverAddrs[0], ID: 0})
	ccfg.Logger = testLogger(t)
	scfg.Logger = testLogger(t)
	w.client = New(cs, ccfg)
	w.client.SetLocals(clocals)
	w.server = New(ss, scfg)
	w.server.SetLocals(slocals)
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
	return w
}

func randomData(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		v := r.Uint64()
		for k := 0; k < 8; k++ {
			b[i+k] = byte(v >> (8 * k))
		}
	}
	return b
}

// exchange sends up and down concurrently and checks both arrive intact
// (half-close on each side).
func exchange(t *testing.T, ctx context.Context, cc, sc *Conn, up, down []byte) {
	t.Helper()
	type result struct {
		sum [32]byte
		n   int
		err error
	}
	readAll := func(c *Conn, ch chan<- result) {
		h := sha256.New()
		n, err := io.Copy(h, c)
		var s [32]byte
		copy(s[:], h.Sum(nil))
		ch <- result{s, int(n), err}
	}
	writeAll := func(c *Conn, data []byte, ch chan<- error) {
		_, err := io.Copy(c, bytes.NewReader(data))
		if err == nil {
			err = c.CloseWrite()
		}
		ch <- err
	}
	srv, cli := make(chan result, 1), make(chan result, 1)
	werr := make(chan error, 2)
	go readAll(sc, srv)
	go readAll(cc, cli)
	go writeAll(cc, up, werr)
	go writeAll(sc, down, werr)
	for i := 0; i < 2; i++ {
		select {
		case err := <-werr:
			require.NoError(t, err)
		case <-ctx.Done():
			t.Fatalf("write timed out:\nclient %s\n%s\nserver %s\n%s", summary(cc), mibString(&cc.e.MIB), summary(sc), mibString(&sc.e.MIB))
		}
	}
	for _, x := range []struct {
		ch   chan result
		want []byte
		who  string
	}{{srv, up, "server"}, {cli, down, "client"}} {
		select {
		case r := <-x.ch:
			require.NoError(t, r.err, x.who)
			require.Equal(t, len(x.want), r.n, x.who)
			require.Equal(t, sha256.Sum256(x.want), r.sum, x.who)
		case <-ctx.Done():
			t.Fatalf("%s read timed out:\nclient %s\n%s\nserver %s\n%s", x.who, summary(cc), mibString(&cc.e.MIB), summary(sc), mibString(&sc.e.MIB))
		}
	}
}

func dialAccept(t *testing.T, ctx context.Context, w *world, port uint16) (*Conn, *Conn) {
	t.Helper()
	l, err := w.server.Listen(port)
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	cc, err := w.client.Dial(ctx, netip.AddrPortFrom(w.serverAddrs[0], port))
	require.NoError(t, err)
	t.Cleanup(cc.Abort)
	sc, err := l.AcceptMPTCP()
	require.NoError(t, err)
	t.Cleanup(sc.Abort)
	return cc, sc
}

func waitSubflows(t *testing.T, c *Conn, n int) {
	t.Helper()
	require.Eventually(t, func() bool {
		k := 0
		for _, s := range c.Stats().Subflows {
			if s.State == "established" {
				k++
			}
		}
		return k >= n
	}, 10*time.Second, 10*time.Millisecond, "subflows: %+v", c.Stats().Subflows)
}

func TestHandshakeAndSmallExchange(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	w := newWorld(t, []pathSpec{{}}, Config{}, Config{})
	cc, sc := dialAccept(t, ctx, w, 80)
	require.True(t, cc.MultipathTCP())
	require.True(t, sc.MultipathTCP())
	exchange(t, ctx, cc, sc, []byte("hello from the client"), []byte("hello from the server"))
	require.EqualValues(t, 1, w.server.MIB.MPCapableSYNRX.Load())
	require.EqualValues(t, 1, w.client.MIB.MPCapableSYNACKRX.Load())
	require.Zero(t, w.client.MIB.FallbackConns.Load())
	require.Zero(t, w.server.MIB.FallbackConns.Load())
}

func TestJoinAndTransfer(t *testing.T) {
	for _, tc := range []struct {
		name     string
		paths    []pathSpec
		size     int
		checksum bool
	}{
		{"two-paths-64MiB", []pathSpec{{}, {}}, 64 << 20, false},
		{"two-paths-delay-loss", []pathSpec{{delay: 5 * time.Millisecond, loss: 0.01}, {delay: 10 * time.Millisecond}}, 8 << 20, false},
		{"checksum", []pathSpec{{}, {}}, 16 << 20, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			w := newWorld(t, tc.paths, Config{Checksum: tc.checksum}, Config{})
			cc, sc := dialAccept(t, ctx, w, 80)
			waitSubflows(t, cc, len(tc.paths))
			waitSubflows(t, sc, len(tc.paths))
			up, down := randomData(tc.size, 1), randomData(tc.size, 2)
			exchange(t, ctx, cc, sc, up, down)
			st := cc.Stats()
			for _, s := range st.Subflows {
				require.NotZero(t, s.BytesSent, "every subflow carries data: %+v", st.Subflows)
			}
			require.EqualValues(t, len(tc.paths)-1, w.server.MIB.MPJoinEstablished.Load())
			require.Zero(t, w.server.MIB.MPJoinACKHMACFail.Load())
			require.Zero(t, w.client.MIB.DSSChecksumFail.Load())
			require.Zero(t, w.server.MIB.DSSChecksumFail.Load())
			if tc.checksum {
				require.True(t, sc.Stats().Checksum)
			}
		})
	}
}

// summary is a compact description of a connection for failure messages.
func summary(c *Conn) string {
	st := c.Stats()
	s := fmt.Sprintf("sent=%d recv=%d reinj=%d sndbuf=%d rcvbuf=%d fin(sent=%v acked=%v recv=%v) subflows=%d",
		st.BytesSent, st.BytesReceived, st.Reinjected, st.SendBuffered, st.RecvBuffered,
		st.DataFinSent, st.DataFinAcked, st.DataFinRecv, len(st.Subflows))
	for i, f := range st.Subflows {
		if i >= 6 {
			s += "\n  ..."
			break
		}
		s += fmt.Sprintf("\n  %v->%v %s tx=%d rx=%d reinj=%d rtt=%v cwnd=%d stale=%v err=%q",
			f.Local, f.Remote, f.State, f.BytesSent, f.BytesReceived, f.Reinjected, f.RTT, f.Cwnd, f.Stale, f.Error)
	}
	return s
}

func mibString(m *MIB) string {
	var out []string
	for k, v := range m.Snapshot() {
		if v != 0 {
			out = append(out, fmt.Sprintf("%s=%d", k, v))
		}
	}
	sort.Strings(out)
	return strings.Join(out, " ")
}
