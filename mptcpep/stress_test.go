package mptcpep

import (
	"context"
	"io"
	"math/rand/v2"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/mptun/mptun/netstack/linkpipe"
)

// TestHandshakeStormUnderLoss opens many short connections at once over two
// lossy, reordering paths to one listener, as a concentrator sees them from
// many clients on bad links: lost SYN/ACKs, third ACKs and joins, duplicate
// SYNs in SYN-RCVD, resets of half-open subflows, aborts mid-handshake.
// Whatever arrives, no goroutine of the engine may panic (a concentrator
// serves every other client from the same process), and connections that
// complete must carry their bytes intact.
func TestHandshakeStormUnderLoss(t *testing.T) {
	if testing.Short() {
		t.Skip("storm of handshakes: not under -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	w := newWorld(t, []pathSpec{{}, {}}, Config{}, Config{})
	for i, l := range w.links {
		d := linkpipe.Direction{Delay: time.Duration(5+10*i) * time.Millisecond, Jitter: 4 * time.Millisecond,
			Reorder: true, Loss: 0.08}
		l[0].SetDirection(d)
		l[1].SetDirection(d)
	}
	ln, err := w.server.Listen(80)
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })

	// The server echoes what it reads until EOF, or aborts at once.
	var swg sync.WaitGroup
	t.Cleanup(swg.Wait)
	go func() {
		for k := 0; ; k++ {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			swg.Add(1)
			go func() {
				defer swg.Done()
				defer c.Close()
				if k%7 == 3 {
					if mc, ok := c.(*Conn); ok {
						mc.Abort()
					}
					return
				}
				_ = c.SetDeadline(time.Now().Add(20 * time.Second))
				_, _ = io.Copy(c, c)
			}()
		}
	}()

	const conns, parallel = 240, 24
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	var mu sync.Mutex
	intact, failed := 0, 0
	for i := range conns {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			r := rand.New(rand.NewPCG(uint64(i), 7))
			dctx, dcancel := context.WithTimeout(ctx, time.Duration(200+r.IntN(4000))*time.Millisecond)
			defer dcancel()
			c, err := w.client.Dial(dctx, netip.AddrPortFrom(w.serverAddrs[0], 80))
			if err != nil {
				mu.Lock()
				failed++
				mu.Unlock()
				return
			}
			defer c.Abort()
			if i%5 == 1 {
				return // abort while the join may still be in progress
			}
			data := randomData(1+r.IntN(64<<10), uint64(i))
			_ = c.SetDeadline(time.Now().Add(20 * time.Second))
			go func() {
				_, _ = c.Write(data)
				_ = c.CloseWrite()
			}()
			got, err := io.ReadAll(c)
			mu.Lock()
			defer mu.Unlock()
			if err == nil && len(got) == len(data) {
				require.Equal(t, data, got, "connection %d: echo differs", i)
				intact++
			} else {
				failed++
			}
		}()
	}
	wg.Wait()
	t.Logf("intact %d, failed %d (of %d; the server aborts every 7th)", intact, failed, conns)
	t.Logf("client MIB %s", mibString(&w.client.MIB))
	t.Logf("server MIB %s", mibString(&w.server.MIB))
	require.Greater(t, intact, conns/2, "most connections complete despite the loss")
	require.NotZero(t, w.server.MIB.MPJoinEstablished.Load(), "joins were made under loss")
}
