package mptcpep

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"

	"github.com/mptun/mptun/mptcpep/header"
	"github.com/mptun/mptun/mptcpep/mpkey"
	"github.com/mptun/mptun/netstack/linkpipe"
)

// TestSubflowLossReinjection takes path 0 down in the middle of a 32 MiB
// transfer each way: the data it carried must be reinjected on path 1 and
// the transfer complete intact. When the path comes back, it must carry
// data again.
func TestSubflowLossReinjection(t *testing.T) {
	for _, tc := range []struct {
		name    string
		rate    int64
		outage  time.Duration // 0: for good
		size    int
		timeout time.Duration
	}{
		{"down-for-good", 100_000_000, 0, 32 << 20, 20 * time.Second},
		// gVisor's RTO backoff keeps the returned path idle for up to
		// about the outage again (3.2 s seen): 32 MiB each way left only
		// ~12 MiB at the return, which path 1 alone could finish first
		// (the client then never used path 0 again: flaked). 48 MiB
		// leaves ~28 MiB, over 7 s on one path.
		{"down-3s-and-back", 30_000_000, 3 * time.Second, 48 << 20, 30 * time.Second},
	} {
		size := tc.size
		quarter := uint64(size / 4)
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), tc.timeout)
			defer cancel()
			p := pathSpec{delay: 2 * time.Millisecond, rateBps: tc.rate}
			w := newWorld(t, []pathSpec{p, p}, Config{}, Config{})
			cc, sc := dialAccept(t, ctx, w, 80)
			waitSubflows(t, cc, 2)
			waitSubflows(t, sc, 2)
			up, down := randomData(size, 11), randomData(size, 12)

			type snap struct{ cli, srv map[netip.Addr]uint64 }
			var atReturn snap
			returned := make(chan struct{})
			when(t, ctx, func() bool {
				// A quarter of each direction: both still have data in
				// flight on path 0 when it goes (a combined threshold let
				// one direction be nearly done and reinject nothing).
				return cc.Stats().BytesReceived >= quarter && sc.Stats().BytesReceived >= quarter
			}, func(ctx context.Context) {
				w.links[0][0].SetDown(true)
				if tc.outage == 0 {
					return
				}
				select {
				case <-ctx.Done():
					return
				case <-time.After(tc.outage):
				}
				atReturn = snap{bytesByPath(cc, true), bytesByPath(sc, false)}
				w.links[0][0].SetDown(false)
				close(returned)
				// How long gVisor's RTO backoff keeps the path idle after it
				// returned (for the log: the engine cannot shorten it).
				back := time.Now()
				a0 := w.clientAddrs[0]
				var cliBack, srvBack time.Duration
				for ctx.Err() == nil && (cliBack == 0 || srvBack == 0) {
					if cliBack == 0 && bytesByPath(cc, true)[a0] > atReturn.cli[a0] {
						cliBack = time.Since(back)
						t.Logf("path 0 carried new client data %v after its return", cliBack)
					}
					if srvBack == 0 && bytesByPath(sc, false)[a0] > atReturn.srv[a0] {
						srvBack = time.Since(back)
						t.Logf("path 0 carried new server data %v after its return", srvBack)
					}
					if os.Getenv("MPTUN_DEBUG_RESUME") != "" && int(time.Since(back)/time.Second) != int((time.Since(back)-5*time.Millisecond)/time.Second) {
						t.Logf("%v after return:\nclient %s\nserver %s", time.Since(back), debugSubflows(cc), debugSubflows(sc))
					}
					time.Sleep(5 * time.Millisecond)
				}
			})
			start := time.Now()
			if os.Getenv("MPTUN_DEBUG_CC") != "" {
				go func() {
					for ctx.Err() == nil {
						time.Sleep(time.Second)
						t.Logf("%v:\nclient %s\nserver %s", time.Since(start), debugSubflows(cc), debugSubflows(sc))
					}
				}()
			}
			exchange(t, ctx, cc, sc, up, down)
			t.Logf("transfer took %v\nclient %s\n%s\nserver %s\n%s", time.Since(start),
				summary(cc), mibString(&w.client.MIB), summary(sc), mibString(&w.server.MIB))
			require.True(t, w.links[0][0].IsDown() || tc.outage > 0, "the outage happened during the transfer")
			require.Positive(t, cc.Stats().Reinjected, "client reinjected what path 0 lost")
			require.Positive(t, sc.Stats().Reinjected, "server reinjected what path 0 lost")
			require.Positive(t, w.client.MIB.ReinjectedBytes.Load())
			if tc.outage == 0 {
				return
			}
			select {
			case <-returned:
			default:
				t.Fatal("the transfer ended before path 0 came back: make it longer")
			}
			after := snap{bytesByPath(cc, true), bytesByPath(sc, false)}
			for _, a := range w.clientAddrs {
				require.Greater(t, after.cli[a], atReturn.cli[a], "client sent on path %v after the return", a)
				require.Greater(t, after.srv[a], atReturn.srv[a], "server sent on path %v after the return", a)
			}
		})
	}
}

// TestFallbackPlainTCPPeer talks to and from plain gVisor TCP (no MPTCP
// at all on the other side).
func TestFallbackPlainTCPPeer(t *testing.T) {
	const size = 8 << 20
	up, down := randomData(size, 21), randomData(size, 22)

	t.Run("plain-server", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		w := newWorld(t, []pathSpec{{}, {}}, Config{}, Config{})
		ln, err := gonet.ListenTCP(w.sstack.S, tcpip.FullAddress{Port: 81}, ipv4.ProtocolNumber)
		require.NoError(t, err)
		t.Cleanup(func() { ln.Close() })
		accepted := make(chan net.Conn, 1)
		go func() {
			c, err := ln.Accept()
			if err == nil {
				accepted <- c
			}
		}()
		cc, err := w.client.Dial(ctx, netip.AddrPortFrom(w.serverAddrs[0], 81))
		require.NoError(t, err)
		t.Cleanup(cc.Abort)
		require.False(t, cc.MultipathTCP())
		var sc net.Conn
		select {
		case sc = <-accepted:
		case <-ctx.Done():
			t.Fatal("plain server accepted nothing")
		}
		t.Cleanup(func() { sc.Close() })
		require.NoError(t, exchangeErr(ctx, cc, sc.(*gonet.TCPConn), up, down))
		require.EqualValues(t, 1, w.client.MIB.MPCapableFallbackACK.Load())
		require.EqualValues(t, 1, w.client.MIB.FallbackConns.Load())
		// No join was attempted for a connection that is plain TCP.
		require.Zero(t, w.client.MIB.MPJoinSYNTX.Load())
	})

	t.Run("plain-client", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		w := newWorld(t, []pathSpec{{}}, Config{}, Config{})
		l, err := w.server.Listen(82)
		require.NoError(t, err)
		t.Cleanup(func() { l.Close() })
		cc, err := gonet.DialContextTCP(ctx, w.cstack.S, tcpip.FullAddress{Addr: tcpip.AddrFrom4(w.serverAddrs[0].As4()), Port: 82}, ipv4.ProtocolNumber)
		require.NoError(t, err)
		t.Cleanup(func() { cc.Close() })
		sc, err := l.AcceptMPTCP()
		require.NoError(t, err)
		t.Cleanup(sc.Abort)
		require.False(t, sc.MultipathTCP())
		require.NoError(t, exchangeErr(ctx, cc, sc, up, down))
		require.EqualValues(t, 1, w.server.MIB.MPCapableFallbackSYN.Load())
		require.EqualValues(t, 1, w.server.MIB.FallbackConns.Load())
		require.Zero(t, w.server.MIB.ConnsEstablished.Load())
	})
}

// TestFastclose aborts one side: the other learns at once, and nothing is
// left running.
func TestFastclose(t *testing.T) {
	for _, who := range []string{"client-aborts", "server-aborts"} {
		t.Run(who, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			w := newWorld(t, []pathSpec{{}, {}}, Config{}, Config{})
			l, err := w.server.Listen(83)
			require.NoError(t, err)
			t.Cleanup(func() { l.Close() })
			runtime.GC()
			base := runtime.NumGoroutine()

			cc, err := w.client.Dial(ctx, netip.AddrPortFrom(w.serverAddrs[0], 83))
			require.NoError(t, err)
			t.Cleanup(cc.Abort)
			sc, err := l.AcceptMPTCP()
			require.NoError(t, err)
			t.Cleanup(sc.Abort)
			waitSubflows(t, cc, 2)
			waitSubflows(t, sc, 2)
			roundTrip(t, ctx, cc, sc, 1<<20, 31)

			aborter, victim := cc, sc
			amib, vmib := &w.client.MIB, &w.server.MIB
			if who == "server-aborts" {
				aborter, victim, amib, vmib = sc, cc, vmib, amib
			}
			readErr := make(chan error, 1)
			go func() {
				_, err := victim.Read(make([]byte, 100))
				readErr <- err
			}()
			start := time.Now()
			aborter.Abort()
			select {
			case err := <-readErr:
				require.ErrorIs(t, err, ErrFastclose)
				require.Less(t, time.Since(start), 2*time.Second)
			case <-time.After(2 * time.Second):
				t.Fatalf("the victim's Read did not return within 2 s: %s", summary(victim))
			}
			_, err = victim.Write([]byte("x"))
			require.Error(t, err)
			select {
			case <-victim.Done():
			case <-time.After(time.Second):
				t.Fatal("the victim connection is not done")
			}
			require.Positive(t, amib.MPFastcloseTX.Load())
			require.Positive(t, vmib.MPFastcloseRX.Load())
			// The aborted side forgets at once, the other after its subflows
			// had time to finish (closeSubflows keeps them 2 s).
			require.Eventually(t, func() bool { return len(w.client.Conns())+len(w.server.Conns()) == 0 }, 5*time.Second, 20*time.Millisecond)
			require.Eventually(t, func() bool { return runtime.NumGoroutine() <= base+2 }, 8*time.Second, 50*time.Millisecond,
				"goroutines: %d, before %d", runtime.NumGoroutine(), base)
		})
	}
}

// TestNetConnSemantics checks deadlines and half-close as net.Conn users
// expect them.
func TestNetConnSemantics(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	w := newWorld(t, []pathSpec{{}}, Config{SendBuffer: 1 << 20}, Config{ReceiveBuffer: 1 << 20})
	cc, sc := dialAccept(t, ctx, w, 84)

	// A read deadline ends a Read that has nothing to read.
	require.NoError(t, cc.SetReadDeadline(time.Now().Add(100*time.Millisecond)))
	start := time.Now()
	_, err := cc.Read(make([]byte, 10))
	require.ErrorIs(t, err, os.ErrDeadlineExceeded)
	var ne net.Error
	require.True(t, errors.As(err, &ne) && ne.Timeout())
	require.Less(t, time.Since(start), time.Second)
	// A deadline in the past fails at once; clearing it makes Read wait
	// again (it returns the data sent afterwards).
	require.NoError(t, cc.SetReadDeadline(time.Now().Add(-time.Second)))
	_, err = cc.Read(make([]byte, 10))
	require.ErrorIs(t, err, os.ErrDeadlineExceeded)
	require.NoError(t, cc.SetReadDeadline(time.Time{}))

	// The peer's half-close: data first, then io.EOF (repeatably), while
	// our direction still works.
	msg := []byte("the last words before the DATA_FIN")
	_, err = sc.Write(msg)
	require.NoError(t, err)
	require.NoError(t, sc.CloseWrite())
	got, err := io.ReadAll(cc)
	require.NoError(t, err)
	require.Equal(t, msg, got)
	n, err := cc.Read(make([]byte, 10))
	require.Zero(t, n)
	require.ErrorIs(t, err, io.EOF)
	_, err = cc.Write([]byte("reply"))
	require.NoError(t, err)
	buf := make([]byte, 5)
	_, err = io.ReadFull(sc, buf)
	require.NoError(t, err)
	require.Equal(t, "reply", string(buf))

	// Write after our own CloseWrite fails.
	require.NoError(t, cc.CloseWrite())
	_, err = cc.Write([]byte("too late"))
	require.ErrorIs(t, err, net.ErrClosed)
	_, err = sc.Read(make([]byte, 10))
	require.ErrorIs(t, err, io.EOF)
	select {
	case <-cc.Done():
	case <-ctx.Done():
		t.Fatalf("no orderly end: %s", summary(cc))
	}

	// A write deadline ends a Write the peer does not drain.
	cc2, sc2 := dialAccept(t, ctx, w, 85)
	_ = sc2
	require.NoError(t, cc2.SetWriteDeadline(time.Now().Add(300*time.Millisecond)))
	big := bytes.Repeat([]byte{7}, 64<<20)
	start = time.Now()
	n, err = cc2.Write(big)
	require.ErrorIs(t, err, os.ErrDeadlineExceeded)
	require.Less(t, n, len(big))
	require.Less(t, time.Since(start), 3*time.Second)
}

// TestOptionStripping puts a middlebox on one path that removes the MPTCP
// options (kind 30) from some segments: the connection must fall back to
// plain TCP cleanly on both sides and carry the data intact.
func TestOptionStripping(t *testing.T) {
	const size = 8 << 20
	for _, tc := range []struct {
		name string
		// server: the middlebox sits in front of the server (strips what
		// the client sends), else in front of the client.
		server bool
		strip  func(flags byte, nth int) bool // nth: index of the TCP segment in that direction
		// wantServerFallbackSYN: the server saw a SYN without MP_CAPABLE.
		wantServerFallbackSYN bool
		// afterHandshake: the client learns of the fallback only from
		// the server's DSS-less answers (RFC 8684 3.7).
		afterHandshake bool
	}{
		{"syn", true, func(f byte, _ int) bool { return f&tcpFlagSYN != 0 }, true, false},
		{"syn-ack", false, func(f byte, _ int) bool { return f&(tcpFlagSYN|tcpFlagACK) == tcpFlagSYN|tcpFlagACK }, false, false},
		{"every-segment-to-client", false, func(byte, int) bool { return true }, false, false},
		// Only the third ACK: the server falls back at once, the client
		// when the server acknowledges its data without DSS.
		{"third-ack", true, func(_ byte, n int) bool { return n == 1 }, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			var nth atomic.Int64
			box := newMiddlebox(func(ip []byte) bool {
				tcp, opts := tcpOf(ip)
				if tcp == nil {
					return false
				}
				n := int(nth.Add(1) - 1)
				return tc.strip(tcp[13], n) && stripMPTCP(opts)
			})
			mb := box.onPath(0)
			o := worldOpts{paths: []pathSpec{{delay: time.Millisecond}, {delay: time.Millisecond}}}
			o.hookSide(tc.server, mb)
			w := newWorldOpts(t, o)
			cc, sc := dialAccept(t, ctx, w, 86)
			require.Positive(t, box.hits.Load(), "the middlebox stripped something")
			exchange(t, ctx, cc, sc, randomData(size, 41), randomData(size, 42))
			// A stripped third ACK is only noticed by the client when the
			// server's answers lack DSS options (RFC 8684 3.7), so the
			// sides agree by the end, not necessarily at once.
			require.False(t, cc.MultipathTCP(), "client fell back")
			require.False(t, sc.MultipathTCP(), "server fell back")
			require.EqualValues(t, 1, w.client.MIB.FallbackConns.Load())
			require.EqualValues(t, 1, w.server.MIB.FallbackConns.Load())
			if tc.afterHandshake {
				require.EqualValues(t, 1, w.client.MIB.MPCapableFallbackData.Load())
				require.Zero(t, w.client.MIB.MPJoinSYNTX.Load())
				require.EqualValues(t, 1, w.server.MIB.MPCapableFallbackACK.Load())
				return
			}
			require.EqualValues(t, 1, w.client.MIB.MPCapableFallbackACK.Load())
			if tc.wantServerFallbackSYN {
				require.EqualValues(t, 1, w.server.MIB.MPCapableFallbackSYN.Load())
			} else {
				require.EqualValues(t, 1, w.server.MIB.MPCapableFallbackACK.Load())
			}
			// A fallen-back connection never tries to join.
			require.Zero(t, w.client.MIB.MPJoinSYNTX.Load())
			require.Empty(t, w.client.Conns())
			require.Empty(t, w.server.Conns())
		})
	}
}

// TestJoinRefused checks the joins a server must refuse: an unknown
// token, a wrong HMAC in the third ACK, and one subflow too many. The
// connection itself keeps working on its initial subflow.
func TestJoinRefused(t *testing.T) {
	for _, tc := range []struct {
		name  string
		scfg  Config
		setup func(o *worldOpts) // middleboxes
		// tamper runs on the established connection, before the second
		// uplink is offered to the path manager.
		tamper func(cc *Conn)
		check  func(t *testing.T, w *world)
	}{
		{
			name: "unknown-token",
			tamper: func(cc *Conn) {
				cc.mu.Lock()
				cc.remoteToken ^= 0x5a5a5a5a // the join names a connection the server does not have
				cc.mu.Unlock()
			},
			check: func(t *testing.T, w *world) {
				require.Positive(t, w.server.MIB.MPJoinNoTokenFound.Load())
				require.Positive(t, w.server.MIB.MPRstTX.Load())
				require.Positive(t, w.client.MIB.MPRstRX.Load(), "the client saw the reset")
			},
		},
		{
			name: "bad-third-ack-hmac",
			setup: func(o *worldOpts) {
				// A middlebox in front of the server corrupts the HMAC of
				// MP_JOIN third ACKs.
				o.hookServer = func(i int) linkpipe.Hook {
					return newMiddlebox(func(ip []byte) bool {
						_, opts := tcpOf(ip)
						hit := false
						walkOpts(opts, func(kind byte, raw []byte) {
							if kind == 30 && raw[2]>>4 == 1 && len(raw) == 24 {
								raw[4] ^= 0xff
								hit = true
							}
						})
						return hit
					}).hook
				}
			},
			check: func(t *testing.T, w *world) {
				require.Positive(t, w.server.MIB.MPJoinACKHMACFail.Load())
				require.Positive(t, w.server.MIB.MPRstTX.Load())
				require.Zero(t, w.server.MIB.MPJoinEstablished.Load())
			},
		},
		{
			name: "beyond-max-subflows",
			scfg: Config{MaxSubflows: 1},
			check: func(t *testing.T, w *world) {
				require.Positive(t, w.server.MIB.MPJoinRejected.Load())
				require.Zero(t, w.server.MIB.MPJoinEstablished.Load())
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			o := worldOpts{paths: []pathSpec{{}, {}}, scfg: tc.scfg}
			if tc.setup != nil {
				tc.setup(&o)
			}
			w := newWorldOpts(t, o)
			all := []Local{{Addr: w.clientAddrs[0], ID: 1}, {Addr: w.clientAddrs[1], ID: 2}}
			w.client.SetLocals(all[:1])
			cc, sc := dialAccept(t, ctx, w, 87)
			if tc.tamper != nil {
				tc.tamper(cc)
			}
			w.client.SetLocals(all)
			require.Eventually(t, func() bool {
				return w.server.MIB.MPJoinSYNRX.Load() > 0 && (w.server.MIB.MPRstTX.Load() > 0 || w.server.MIB.MPJoinRejected.Load() > 0)
			}, 10*time.Second, 5*time.Millisecond, "no refused join: client %s\n%s\nserver %s", summary(cc), mibString(&w.client.MIB), mibString(&w.server.MIB))
			// The refused subflow never becomes usable on either side.
			require.Eventually(t, func() bool {
				for _, c := range []*Conn{cc, sc} {
					n := 0
					for _, s := range c.Stats().Subflows {
						if s.State != "closed" {
							n++
						}
					}
					if n != 1 {
						return false
					}
				}
				return true
			}, 5*time.Second, 5*time.Millisecond, "client %s\nserver %s", summary(cc), summary(sc))
			tc.check(t, w)
			require.True(t, cc.MultipathTCP())
			exchange(t, ctx, cc, sc, randomData(1<<20, 51), randomData(1<<20, 52))
			for _, s := range cc.Stats().Subflows {
				if s.Local.Addr() == w.clientAddrs[1] {
					require.Zero(t, s.BytesSent, "a refused subflow carried data: %+v", s)
				}
			}
		})
	}
}

// TestBackupPath checks that a backup path stays (almost) idle while the
// regular one works and carries the transfer once it is gone.
func TestBackupPath(t *testing.T) {
	const size = 8 << 20
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	w := newWorld(t, []pathSpec{{delay: time.Millisecond}, {delay: time.Millisecond, backup: true}}, Config{}, Config{})
	cc, sc := dialAccept(t, ctx, w, 88)
	waitSubflows(t, cc, 2)
	waitSubflows(t, sc, 2)
	for _, s := range sc.Stats().Subflows {
		if s.Remote.Addr() == w.clientAddrs[1] {
			require.True(t, s.RemoteBackup, "the server knows the join is a backup: %+v", s)
		}
	}

	roundTrip(t, ctx, cc, sc, size, 61)
	cli, srv := bytesByPath(cc, true), bytesByPath(sc, false)
	regular, backup := w.clientAddrs[0], w.clientAddrs[1]
	t.Logf("regular path up: client sent %v, server sent %v", cli, srv)
	require.GreaterOrEqual(t, cli[regular], uint64(size))
	require.GreaterOrEqual(t, srv[regular], uint64(size))
	require.LessOrEqual(t, cli[backup], uint64(size/100), "client used the backup path")
	require.LessOrEqual(t, srv[backup], uint64(size/100), "server used the backup path")

	w.links[0][0].SetDown(true)
	exchange(t, ctx, cc, sc, randomData(size, 63), randomData(size, 64))
	cli2, srv2 := bytesByPath(cc, true), bytesByPath(sc, false)
	t.Logf("regular path down: client sent %v, server sent %v", cli2, srv2)
	require.GreaterOrEqual(t, cli2[backup]-cli[backup], uint64(size), "the backup path carried the client's data")
	require.GreaterOrEqual(t, srv2[backup]-srv[backup], uint64(size), "the backup path carried the server's data")
}

// TestAddAddr: the server announces a second address that the client can
// reach over path 1 only; the client joins it. A forged announcement
// (bad HMAC) is ignored.
func TestAddAddr(t *testing.T) {
	t.Run("announce-and-join", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		second := netip.AddrFrom4([4]byte{10, 0, 1, 2})
		w := newWorldOpts(t, worldOpts{
			paths:       []pathSpec{{delay: time.Millisecond}, {delay: time.Millisecond}},
			serverExtra: map[int][]netip.Addr{1: {second}},
		})
		w.server.SetAnnounce([]Local{{Addr: second, ID: 5}})
		cc, sc := dialAccept(t, ctx, w, 89)
		joined := func(c *Conn, local, remote netip.Addr) bool {
			for _, s := range c.Stats().Subflows {
				if s.State == "established" && s.Local.Addr() == local && s.Remote.Addr() == remote {
					return true
				}
			}
			return false
		}
		require.Eventually(t, func() bool { return joined(cc, w.clientAddrs[1], second) }, 10*time.Second, 5*time.Millisecond,
			"client %s\n%s\nserver %s", summary(cc), mibString(&w.client.MIB), mibString(&w.server.MIB))
		require.Eventually(t, func() bool { return joined(sc, second, w.clientAddrs[1]) }, 5*time.Second, 5*time.Millisecond)
		require.Positive(t, w.server.MIB.AddAddrTX.Load())
		require.Positive(t, w.client.MIB.AddAddrRX.Load())
		require.Eventually(t, func() bool { return w.server.MIB.AddAddrEchoRX.Load() > 0 }, 5*time.Second, 5*time.Millisecond)
		require.Zero(t, w.client.MIB.AddAddrHMACFail.Load())
		// The server names the address it announced in its join answer.
		for _, s := range cc.Stats().Subflows {
			if s.Remote.Addr() == second && s.State == "established" {
				require.EqualValues(t, 5, s.RemoteID)
			}
		}
		exchange(t, ctx, cc, sc, randomData(4<<20, 71), randomData(4<<20, 72))
		var viaSecond uint64
		for _, s := range sc.Stats().Subflows {
			if s.Local.Addr() == second {
				viaSecond += s.BytesSent + s.BytesReceived
			}
		}
		require.Positive(t, viaSecond, "the announced address carried data: %s", summary(sc))
	})

	// The client's only address is its initial subflow's: its join to the
	// announced address must name it ID 0, the ID the server already has
	// for it (its uplink ID 1 there would give one address two IDs).
	t.Run("join-from-initial-address-is-id-0", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		second := netip.AddrFrom4([4]byte{10, 0, 1, 2})
		w := newWorldOpts(t, worldOpts{
			paths:       []pathSpec{{delay: time.Millisecond}},
			serverExtra: map[int][]netip.Addr{0: {second}},
		})
		w.server.SetAnnounce([]Local{{Addr: second, ID: 5}})
		cc, sc := dialAccept(t, ctx, w, 91)
		waitSubflows(t, sc, 2)
		for _, s := range sc.Stats().Subflows {
			require.Equal(t, w.clientAddrs[0], s.Remote.Addr())
			require.Zero(t, s.RemoteID, "the client's initial address is ID 0 on every subflow: %+v", sc.Stats().Subflows)
		}
		for _, s := range cc.Stats().Subflows {
			require.Zero(t, s.LocalID, "%+v", cc.Stats().Subflows)
		}
		roundTrip(t, ctx, cc, sc, 256<<10, 74)
	})

	// A listener that takes no joins to its initial address says so with
	// the C flag; the client then joins only the announced address.
	t.Run("c-flag-no-joins-to-initial-address", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		second := netip.AddrFrom4([4]byte{10, 0, 1, 2})
		w := newWorldOpts(t, worldOpts{
			paths:       []pathSpec{{delay: time.Millisecond}, {delay: time.Millisecond}},
			scfg:        Config{DenyJoinInitialAddr: true},
			serverExtra: map[int][]netip.Addr{1: {second}},
		})
		w.server.SetAnnounce([]Local{{Addr: second, ID: 5}})
		cc, sc := dialAccept(t, ctx, w, 94)
		waitSubflows(t, sc, 2)
		roundTrip(t, ctx, cc, sc, 1<<20, 77)
		time.Sleep(1200 * time.Millisecond) // a join the PM would make comes within 1 s
		for i, s := range sc.Stats().Subflows {
			if i > 0 {
				require.Equal(t, second, s.Local.Addr(), "joins go to the announced address only: %+v", sc.Stats().Subflows)
			}
		}
		require.Zero(t, w.server.MIB.MPJoinRejected.Load(), "the client honoured the C flag")
		for i, s := range cc.Stats().Subflows {
			if i > 0 {
				require.Equal(t, second, s.Remote.Addr(), "the client tried no join to the initial address: %+v", cc.Stats().Subflows)
			}
		}
	})

	t.Run("bad-hmac", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		w := newWorld(t, []pathSpec{{}}, Config{}, Config{})
		cc, sc := dialAccept(t, ctx, w, 90)
		roundTrip(t, ctx, cc, sc, 64<<10, 73)
		forged := header.AddAddr{AddrID: 9, Addr: netip.AddrFrom4([4]byte{10, 9, 9, 9}), HMAC: 0x0123456789abcdef}
		sc.mu.Lock()
		tuple := sc.subflows[0].tuple
		// The right HMAC for another address: a replay must fail as well.
		replay := header.AddAddr{AddrID: 9, Addr: netip.AddrFrom4([4]byte{10, 9, 9, 10}),
			HMAC: mpkey.AddAddrHMAC(sc.localKey, sc.remoteKey, 9, netip.AddrFrom4([4]byte{10, 9, 9, 9}), 0)}
		sc.mu.Unlock()
		for _, a := range []header.AddAddr{forged, replay} {
			b := make([]byte, a.Len())
			a.Encode(b)
			require.NoError(t, w.server.st.Mux.SendACK(tuple, b))
		}
		require.Eventually(t, func() bool { return w.client.MIB.AddAddrHMACFail.Load() == 2 }, 5*time.Second, 5*time.Millisecond,
			"%s", mibString(&w.client.MIB))
		require.EqualValues(t, 2, w.client.MIB.AddAddrRX.Load())
		cc.mu.Lock()
		_, added := cc.remoteAddrs[9]
		echoes := len(cc.pendingEcho)
		cc.mu.Unlock()
		require.False(t, added, "a forged address was added")
		require.Zero(t, echoes)
		// No echo and no join follow; the connection is unharmed.
		exchange(t, ctx, cc, sc, randomData(1<<20, 74), randomData(1<<20, 75))
		require.Zero(t, w.server.MIB.AddAddrEchoRX.Load())
		require.Zero(t, w.client.MIB.MPJoinSYNTX.Load())
	})
}

// TestManyConnections runs 50 connections at once over two paths, each
// moving 256 KiB both ways.
func TestManyConnections(t *testing.T) {
	const (
		conns = 50
		size  = 256 << 10
	)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	w := newWorld(t, []pathSpec{{delay: time.Millisecond}, {delay: time.Millisecond}}, Config{}, Config{})
	l, err := w.server.Listen(91)
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	down := randomData(size, 80)

	// The server reads each connection to its end and answers with down.
	got := make(chan [32]byte, conns)
	srvErr := make(chan error, conns)
	go func() {
		for i := 0; i < conns; i++ {
			c, err := l.AcceptMPTCP()
			if err != nil {
				srvErr <- err
				return
			}
			go func() {
				defer c.Close()
				werr := make(chan error, 1)
				go func() {
					_, err := c.Write(down)
					if err == nil {
						err = c.CloseWrite()
					}
					werr <- err
				}()
				h := sha256.New()
				n, err := io.Copy(h, c)
				if err == nil && n != size {
					err = fmt.Errorf("server read %d bytes", n)
				}
				if err == nil {
					err = <-werr
				}
				if err != nil {
					srvErr <- err
					return
				}
				var s [32]byte
				copy(s[:], h.Sum(nil))
				got <- s
			}()
		}
	}()

	want := make(map[[32]byte]bool)
	cliErr := make(chan error, conns)
	var clients []*Conn
	for i := 0; i < conns; i++ {
		up := randomData(size, uint64(100+i))
		want[sha256.Sum256(up)] = true
		c, err := w.client.Dial(ctx, netip.AddrPortFrom(w.serverAddrs[0], 91))
		require.NoError(t, err)
		t.Cleanup(c.Abort)
		clients = append(clients, c)
		go func() {
			werr := make(chan error, 1)
			go func() {
				_, err := c.Write(up)
				if err == nil {
					err = c.CloseWrite()
				}
				werr <- err
			}()
			b, err := io.ReadAll(c)
			if err == nil && !bytes.Equal(b, down) {
				err = fmt.Errorf("client got %d bytes, not the server's data", len(b))
			}
			if err == nil {
				err = <-werr
			}
			cliErr <- err
		}()
	}
	for i := 0; i < 2*conns; i++ {
		select {
		case err := <-cliErr:
			require.NoError(t, err)
		case err := <-srvErr:
			require.NoError(t, err)
		case s := <-got:
			require.True(t, want[s], "the server received data no client sent")
			delete(want, s)
		case <-ctx.Done():
			t.Fatalf("timed out with %d transfers missing; client MIB %s\nserver MIB %s", len(want), mibString(&w.client.MIB), mibString(&w.server.MIB))
		}
	}
	require.Empty(t, want)
	require.EqualValues(t, conns, w.server.MIB.ConnsEstablished.Load())
	require.Zero(t, w.client.MIB.FallbackConns.Load())
	t.Logf("joins established: %d of %d; client MIB %s", w.server.MIB.MPJoinEstablished.Load(), conns, mibString(&w.client.MIB))
	require.Positive(t, w.server.MIB.MPJoinEstablished.Load())
	for _, c := range clients {
		select {
		case <-c.Done():
		case <-ctx.Done():
			t.Fatalf("connection not finished: %s", summary(c))
		}
	}
}

// TestMPCapableWithoutHMACFlag: an MP_CAPABLE without the H flag
// (HMAC-SHA256) is invalid, and the connection is plain TCP (RFC 8684
// 3.1), whichever side's option lacks it.
func TestMPCapableWithoutHMACFlag(t *testing.T) {
	for _, tc := range []struct {
		name   string
		server bool // clear H on what the server receives (the SYN), else on the SYN/ACK
	}{{"syn", true}, {"syn-ack", false}} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			box := newMiddlebox(func(ip []byte) bool {
				tcp, opts := tcpOf(ip)
				if tcp == nil || tcp[13]&tcpFlagSYN == 0 {
					return false
				}
				hit := false
				walkOpts(opts, func(kind byte, raw []byte) {
					if kind == 30 && len(raw) >= 4 && raw[2]>>4 == 0 {
						raw[3] &^= 0x01 // H
						hit = true
					}
				})
				return hit
			})
			mb := box.onPath(0)
			o := worldOpts{paths: []pathSpec{{delay: time.Millisecond}, {delay: time.Millisecond}}}
			o.hookSide(tc.server, mb)
			w := newWorldOpts(t, o)
			cc, sc := dialAccept(t, ctx, w, 88)
			require.Positive(t, box.hits.Load())
			exchange(t, ctx, cc, sc, randomData(1<<20, 61), randomData(1<<20, 62))
			require.False(t, cc.MultipathTCP())
			require.False(t, sc.MultipathTCP())
			m := &w.client.MIB
			if tc.server {
				m = &w.server.MIB
			}
			require.EqualValues(t, 1, m.MPCapableUnsupported.Load())
			require.Zero(t, w.client.MIB.MPJoinSYNTX.Load(), "no joins for plain TCP")
		})
	}
}

// TestMPCapableSYNBlackhole: a firewall drops SYNs that carry MPTCP
// options. After two such SYNs the client retries as plain TCP (as Linux
// does) and the connection works, without MPTCP.
func TestMPCapableSYNBlackhole(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	box := &middlebox{drop: func(ip []byte) bool {
		tcp, opts := tcpOf(ip)
		if tcp == nil || tcp[13]&tcpFlagSYN == 0 {
			return false
		}
		mp := false
		walkOpts(opts, func(kind byte, _ []byte) { mp = mp || kind == 30 })
		return mp
	}}
	w := newWorldOpts(t, worldOpts{
		paths:      []pathSpec{{delay: time.Millisecond}},
		hookServer: func(int) linkpipe.Hook { return box.hook },
	})
	start := time.Now()
	cc, sc := dialAccept(t, ctx, w, 92)
	t.Logf("connected after %v", time.Since(start).Round(time.Millisecond))
	require.False(t, cc.MultipathTCP())
	require.False(t, sc.MultipathTCP())
	require.EqualValues(t, 2, box.hits.Load(), "two MP_CAPABLE SYNs were dropped")
	require.EqualValues(t, 2, w.client.MIB.MPCapableSYNTX.Load())
	require.EqualValues(t, 1, w.client.MIB.MPCapableSYNDrop.Load())
	roundTrip(t, ctx, cc, sc, 256<<10, 75)
}

// TestJoinRefusalReasons: a listener at its subflow limit refuses a join
// with MP_TCPRST "administratively prohibited", transient; the client
// retries such a join later. Told the refusal is permanent (a middlebox
// clears the T flag here), it stops asking for that pair.
func TestJoinRefusalReasons(t *testing.T) {
	for _, tc := range []struct {
		name      string
		permanent bool
	}{{"transient-retried", false}, {"permanent-not-retried", true}} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			var rsts atomic.Int64
			var seen atomic.Uint32 // flags<<8 | reason of the last MP_TCPRST
			mb := func(i int) linkpipe.Hook {
				if i != 1 {
					return nil
				}
				return newMiddlebox(func(ip []byte) bool {
					tcp, opts := tcpOf(ip)
					if tcp == nil {
						return false
					}
					hit := false
					walkOpts(opts, func(kind byte, raw []byte) {
						if kind == 30 && len(raw) == 4 && raw[2]>>4 == 8 {
							rsts.Add(1)
							seen.Store(uint32(raw[2]&0x0f)<<8 | uint32(raw[3]))
							if tc.permanent {
								raw[2] &^= 0x0f
								hit = true
							}
						}
					})
					return hit
				}).hook
			}
			w := newWorldOpts(t, worldOpts{
				paths:      []pathSpec{{delay: time.Millisecond}, {delay: time.Millisecond}},
				scfg:       Config{MaxSubflows: 1},
				hookClient: mb,
			})
			cc, sc := dialAccept(t, ctx, w, 93)
			require.Eventually(t, func() bool { return rsts.Load() >= 1 }, 5*time.Second, 5*time.Millisecond)
			require.EqualValues(t, 1<<8|header.RstReasonAdminProhibited, seen.Load(),
				"the listener's MP_TCPRST: administratively prohibited, transient")
			time.Sleep(2500 * time.Millisecond) // the PM retries a failed pair after 0.5 s, 1 s, ...
			joins := w.client.MIB.MPJoinSYNTX.Load()
			if tc.permanent {
				require.EqualValues(t, 1, joins, "a permanent refusal is not retried")
				require.EqualValues(t, 1, w.client.MIB.JoinsProhibited.Load())
			} else {
				require.GreaterOrEqual(t, joins, uint64(2), "a transient refusal is retried")
				require.Zero(t, w.client.MIB.JoinsProhibited.Load())
			}
			require.Positive(t, w.server.MIB.MPJoinRejected.Load())
			roundTrip(t, ctx, cc, sc, 256<<10, 76)
		})
	}
}
