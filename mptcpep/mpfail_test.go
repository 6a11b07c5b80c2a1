package mptcpep

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	tcpheader "gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/mptun/mptun/netstack/linkpipe"
)

// corrupter is a middlebox that flips one payload byte (XOR 0xff) of one
// TCP data segment, the first to start after `after` payload bytes went
// through, and fixes the TCP checksum: TCP accepts the segment, only the
// DSS checksum can tell.
type corrupter struct {
	after int64
	seen  atomic.Int64
	done  atomic.Bool
}

func (c *corrupter) mangle(ip []byte) bool {
	tcp, _ := tcpOf(ip)
	if tcp == nil || c.done.Load() {
		return false
	}
	ihl := int(ip[0]&0xf) * 4
	total := int(binary.BigEndian.Uint16(ip[2:4]))
	off := int(tcp[12]>>4) * 4
	payload := total - ihl - off
	if payload < 64 {
		return false
	}
	if c.seen.Add(int64(payload))-int64(payload) < c.after {
		return false
	}
	if !c.done.CompareAndSwap(false, true) {
		return false
	}
	tcp[off+payload/2] ^= 0xff
	return true
}

// corruptWorld builds a world of n paths with DSS checksums on both sides
// and a corrupter on path 0, in front of the server (client->server data)
// or of the client.
func corruptWorld(t *testing.T, n int, inFrontOfServer bool, after int64) (*world, *corrupter, *middlebox) {
	cor := &corrupter{after: after}
	box := newMiddlebox(cor.mangle)
	mb := box.onPath(0)
	paths := make([]pathSpec, n)
	for i := range paths {
		paths[i] = pathSpec{delay: time.Millisecond, rateBps: 200_000_000}
	}
	o := worldOpts{paths: paths, ccfg: Config{Checksum: true}, scfg: Config{Checksum: true}}
	o.hookSide(inFrontOfServer, mb)
	return newWorldOpts(t, o), cor, box
}

// readAllCtx reads c to EOF (or error) in the background.
func readAllCtx(c *Conn) <-chan []byte {
	ch := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(c)
		ch <- b
	}()
	return ch
}

// oneByteFlipped reports an error unless got is want with exactly one byte
// inverted.
func oneByteFlipped(got, want []byte) error {
	if len(got) != len(want) {
		return fmt.Errorf("got %d bytes, want %d", len(got), len(want))
	}
	diff := 0
	for i := range got {
		if got[i] != want[i] {
			diff++
			if got[i] != ^want[i] {
				return fmt.Errorf("byte %d is %#x, want %#x or its inverse", i, got[i], want[i])
			}
		}
	}
	if diff != 1 {
		return fmt.Errorf("%d bytes differ, want exactly 1", diff)
	}
	return nil
}

// TestMPFailInfiniteMapping corrupts one payload byte of one data segment
// on the only subflow, with DSS checksums on. The receiver sends MP_FAIL,
// the sender echoes it and sends an infinite mapping, and both fall back
// to TCP over the subflow (RFC 8684 3.7). The infinite mapping acts
// retroactively, so the failed mapping is not retransmitted: what the
// corrupted direction delivers is the sent data with exactly that one
// byte inverted (as plain TCP through that middlebox would deliver it,
// and as Linux does), everything before and after it intact, the length
// exact; the other direction is intact.
func TestMPFailInfiniteMapping(t *testing.T) {
	const size = 4 << 20
	for _, tc := range []struct {
		name string
		up   bool // corrupt client->server (else server->client)
	}{{"client-to-server", true}, {"server-to-client", false}} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			w, cor, box := corruptWorld(t, 1, tc.up, 1<<20)
			cc, sc := dialAccept(t, ctx, w, 90)
			up, down := randomData(size, 51), randomData(size, 52)
			gotUp, gotDown := readAllCtx(sc), readAllCtx(cc)
			werr := make(chan error, 2)
			write := func(c *Conn, b []byte) {
				_, err := c.Write(b)
				if err == nil {
					err = c.CloseWrite()
				}
				werr <- err
			}
			go write(cc, up)
			go write(sc, down)
			var bu, bd []byte
			for bu == nil || bd == nil {
				select {
				case bu = <-gotUp:
				case bd = <-gotDown:
				case err := <-werr:
					require.NoError(t, err)
				case <-ctx.Done():
					t.Fatalf("timed out:\nclient %s\n%s\nserver %s\n%s", summary(cc), mibString(&w.client.MIB), summary(sc), mibString(&w.server.MIB))
				}
			}
			t.Logf("client %s\nserver %s", mibString(&w.client.MIB), mibString(&w.server.MIB))
			require.EqualValues(t, 1, box.hits.Load(), "one segment corrupted")
			rcvE, sndE := w.server, w.client
			flipped, intact := bu, bd
			wantFlipped, wantIntact := up, down
			if !tc.up {
				rcvE, sndE = w.client, w.server
				flipped, intact = bd, bu
				wantFlipped, wantIntact = down, up
			}
			require.NoError(t, oneByteFlipped(flipped, wantFlipped), "the corrupted direction")
			require.True(t, bytes.Equal(intact, wantIntact), "the other direction is intact")
			require.True(t, cor.done.Load())
			// The receiver: one checksum failure, MP_FAIL out, the echo
			// and the infinite mapping in.
			require.EqualValues(t, 1, rcvE.MIB.DSSChecksumFail.Load())
			require.GreaterOrEqual(t, rcvE.MIB.MPFailTX.Load(), uint64(1))
			require.GreaterOrEqual(t, rcvE.MIB.MPFailRX.Load(), uint64(1), "the sender's echo")
			require.EqualValues(t, 1, rcvE.MIB.InfiniteMapRX.Load())
			require.Zero(t, rcvE.MIB.InfiniteMapTX.Load())
			// The sender: MP_FAIL in, its echo and the infinite mapping out.
			require.GreaterOrEqual(t, sndE.MIB.MPFailRX.Load(), uint64(1))
			require.EqualValues(t, 1, sndE.MIB.MPFailTX.Load(), "the echo")
			require.EqualValues(t, 1, sndE.MIB.InfiniteMapTX.Load())
			require.Zero(t, sndE.MIB.InfiniteMapRX.Load())
			for _, e := range []*Endpoint{rcvE, sndE} {
				require.EqualValues(t, 1, e.MIB.FallbackConns.Load())
				require.Zero(t, e.MIB.MPFailTimeout.Load())
				require.Zero(t, e.MIB.MPRstTX.Load())
			}
			require.Zero(t, sndE.MIB.DSSChecksumFail.Load())
			require.False(t, cc.MultipathTCP())
			require.False(t, sc.MultipathTCP())
			for _, c := range []*Conn{cc, sc} {
				select {
				case <-c.Done():
				case <-ctx.Done():
					t.Fatalf("connection not finished: %s", summary(c))
				}
			}
		})
	}
}

// TestMPFailTwoSubflows corrupts one segment on path 0 while two subflows
// carry data: the receiver resets that subflow (MP_FAIL and MP_TCPRST
// "middlebox interference" on the RST), the sender reinjects, and the data
// arrives intact over the other path; no fallback.
func TestMPFailTwoSubflows(t *testing.T) {
	const size = 16 << 20
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	w, _, box := corruptWorld(t, 2, true, 2<<20)
	cc, sc := dialAccept(t, ctx, w, 91)
	waitSubflows(t, cc, 2)
	waitSubflows(t, sc, 2)
	exchange(t, ctx, cc, sc, randomData(size, 61), randomData(size, 62))
	t.Logf("client %s\nserver %s", mibString(&w.client.MIB), mibString(&w.server.MIB))
	require.EqualValues(t, 1, box.hits.Load(), "one segment corrupted")
	require.EqualValues(t, 1, w.server.MIB.DSSChecksumFail.Load())
	require.EqualValues(t, 1, w.server.MIB.MPFailTX.Load())
	require.GreaterOrEqual(t, w.server.MIB.MPRstTX.Load(), uint64(1))
	require.EqualValues(t, 1, w.client.MIB.MPFailRX.Load(), "MP_FAIL on the RST")
	require.GreaterOrEqual(t, w.client.MIB.MPRstRX.Load(), uint64(1))
	require.Positive(t, w.client.MIB.ReinjectedBytes.Load())
	for _, e := range []*Endpoint{w.client, w.server} {
		require.Zero(t, e.MIB.InfiniteMapTX.Load())
		require.Zero(t, e.MIB.InfiniteMapRX.Load())
		require.Zero(t, e.MIB.FallbackConns.Load())
		require.Zero(t, e.MIB.MPFailTimeout.Load())
	}
	require.True(t, cc.MultipathTCP())
	require.True(t, sc.MultipathTCP())
}

// TestMPFailUnanswered: the sender ignores MP_FAIL (no echo, no infinite
// mapping). The receiver resets the connection with MP_TCPRST "middlebox
// interference" once its MP_FAIL timeout expires, and both sides end with
// a clear error.
func TestMPFailUnanswered(t *testing.T) {
	const timeout = time.Second
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	w, cor, _ := corruptWorld(t, 1, true, 1<<20)
	w.client.ignoreMPFail = true
	w.server.mpFailTimeout = timeout
	cc, sc := dialAccept(t, ctx, w, 92)
	// Keep data flowing until the connection dies.
	go func() {
		buf := randomData(1<<20, 71)
		for {
			if _, err := cc.Write(buf); err != nil {
				return
			}
		}
	}()
	go func() { _, _ = io.Copy(io.Discard, sc) }()
	var failedAt time.Time
	require.Eventually(t, func() bool {
		if w.server.MIB.DSSChecksumFail.Load() > 0 && failedAt.IsZero() {
			failedAt = time.Now()
		}
		return !failedAt.IsZero()
	}, 20*time.Second, time.Millisecond)
	for _, c := range []*Conn{sc, cc} {
		select {
		case <-c.Done():
		case <-ctx.Done():
			t.Fatalf("connection not reset: %s\nclient %s\nserver %s", summary(c), mibString(&w.client.MIB), mibString(&w.server.MIB))
		}
	}
	took := time.Since(failedAt)
	t.Logf("reset %v after the checksum failure\nclient %s\nserver %s", took, mibString(&w.client.MIB), mibString(&w.server.MIB))
	require.True(t, cor.done.Load())
	require.Less(t, took, timeout+2*time.Second, "reset within the bound")
	require.GreaterOrEqual(t, took, timeout-100*time.Millisecond, "not before the timeout")
	_, err := sc.Read(make([]byte, 1))
	for errors.Is(err, nil) {
		_, err = sc.Read(make([]byte, 64<<10))
	}
	require.ErrorIs(t, err, ErrMPFailTimeout)
	_, err = cc.Write([]byte("x"))
	require.ErrorIs(t, err, ErrReset)
	require.EqualValues(t, 1, w.server.MIB.MPFailTimeout.Load())
	require.GreaterOrEqual(t, w.server.MIB.MPFailTX.Load(), uint64(1))
	require.GreaterOrEqual(t, w.server.MIB.MPRstTX.Load(), uint64(1))
	require.GreaterOrEqual(t, w.client.MIB.MPRstRX.Load(), uint64(1))
	cc.mu.Lock()
	reason := cc.subflows[0].rstReason
	cc.mu.Unlock()
	require.EqualValues(t, 0x06, reason, "MP_TCPRST reason: middlebox interference")
	for _, e := range []*Endpoint{w.client, w.server} {
		require.Zero(t, e.MIB.InfiniteMapTX.Load())
		require.Zero(t, e.MIB.InfiniteMapRX.Load())
		require.Zero(t, e.MIB.FallbackConns.Load())
	}
}

// finGate is a middlebox on a path that, while hold is set, drops every
// segment to the client that acknowledges the FIN the client sent: the
// peer's ACK of our FIN never arrives. noteFIN watches the client's
// segments, toClient is the hook in front of the client.
type finGate struct {
	hold    atomic.Bool
	finEnd  atomic.Uint64 // 1<<32 | sequence number after our FIN (0: no FIN yet)
	dropped atomic.Uint64
}

func (g *finGate) noteFIN(b []byte) {
	if len(b) >= tcpheader.IPv4MinimumSize && b[0]>>4 == 4 {
		if tcp, _ := tcpOf(b); tcp != nil && tcp[13]&uint8(tcpheader.TCPFlagFin) != 0 {
			payload := int(binary.BigEndian.Uint16(b[2:4])) - int(b[0]&0xf)*4 - int(tcp[12]>>4)*4
			end := binary.BigEndian.Uint32(tcp[4:8]) + uint32(payload) + 1
			g.finEnd.Store(1<<32 | uint64(end))
		}
	}
}

func (g *finGate) toClient(b []byte) bool {
	fe := g.finEnd.Load()
	if fe == 0 || !g.hold.Load() || len(b) < tcpheader.IPv4MinimumSize || b[0]>>4 != 4 {
		return true
	}
	if tcp, _ := tcpOf(b); tcp != nil && tcp[13]&uint8(tcpheader.TCPFlagAck) != 0 &&
		int32(binary.BigEndian.Uint32(tcp[8:12])-uint32(fe)) >= 0 {
		g.dropped.Add(1)
		return false
	}
	return true
}

// TestMPFailFinAcked: after the fallback the TCP FIN is the DATA_FIN, so
// the connection is finished only once the peer acknowledged the FIN, not
// when it acknowledged the data. The peer's own DATA_FIN came before the
// fallback (Linux as receiver did that in the interop test: its half
// close went out as a DSS DATA_FIN, then it found the checksum failure).
// Finished as soon as the data is acknowledged and the FIN handed to
// gVisor, mptun exits, and the peer's ACK of the FIN draws an RST from the
// host, which can reach Linux before its application has read the EOF
// (EPIPE instead of EOF).
func TestMPFailFinAcked(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cor := &corrupter{after: 1 << 20}
	gate := &finGate{}
	gate.hold.Store(true)
	w := newWorldOpts(t, worldOpts{
		paths: []pathSpec{{delay: time.Millisecond, rateBps: 200_000_000}},
		ccfg:  Config{Checksum: true}, scfg: Config{Checksum: true},
		hookServer: func(int) linkpipe.Hook {
			box := newMiddlebox(cor.mangle)
			return func(b []byte) bool {
				gate.noteFIN(b) // the client's segments
				return box.hook(b)
			}
		},
		hookClient: func(int) linkpipe.Hook { return gate.toClient },
	})
	cc, sc := dialAccept(t, ctx, w, 93)
	require.NoError(t, sc.CloseWrite()) // the server's DATA_FIN, before the fallback
	gotUp := readAllCtx(sc)
	up := randomData(4<<20, 81)
	_, err := cc.Write(up)
	require.NoError(t, err)
	// The FIN goes alone once all data is acknowledged (as mptun's did
	// against Linux), so an ACK of the data alone can tell "finished".
	require.Eventually(t, func() bool { return cc.Stats().SendBuffered == 0 }, 20*time.Second, time.Millisecond,
		"data acknowledged: %s", summary(cc))
	require.Zero(t, gate.finEnd.Load(), "no FIN before CloseWrite")
	require.NoError(t, cc.CloseWrite())
	select {
	case b := <-gotUp:
		require.NoError(t, oneByteFlipped(b, up))
	case <-ctx.Done():
		t.Fatalf("server did not read to EOF: %s\nclient %s\nserver %s", summary(sc), mibString(&w.client.MIB), mibString(&w.server.MIB))
	}
	require.True(t, cor.done.Load())
	require.EqualValues(t, 1, w.client.MIB.InfiniteMapTX.Load())
	require.EqualValues(t, 1, w.server.MIB.InfiniteMapRX.Load())
	// The server read the FIN; its ACKs of it are dropped.
	select {
	case <-cc.Done():
		t.Fatalf("the client finished with its FIN unacknowledged: %s", summary(cc))
	case <-time.After(500 * time.Millisecond):
	}
	require.Positive(t, gate.dropped.Load(), "the server acknowledged the FIN (dropped)")
	require.False(t, cc.Stats().DataFinAcked)
	gate.hold.Store(false) // gVisor retransmits the FIN; its ACK passes now
	select {
	case <-cc.Done():
	case <-ctx.Done():
		t.Fatalf("the client did not finish once its FIN was acknowledged: %s", summary(cc))
	}
	require.True(t, cc.Stats().DataFinAcked)
}
