package mptcpep

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/mptun/mptun/netstack/linkpipe"
)

// TestSubflowMSSFromWire checks that the scheduler's MSS of a subflow is
// the payload of its full segments on the wire. gVisor answers 536 for a
// connected endpoint's MaxSegOption; sizing the grant with that let a
// subflow have only ~0.65 of its cwnd in flight, and one path of two 50
// Mbit/s ones ran at 39 Mbit/s for seconds after slow start.
func TestSubflowMSSFromWire(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var wireMax [2]atomic.Int64
	w := newWorldOpts(t, worldOpts{
		paths: []pathSpec{{}, {delay: time.Millisecond}},
		hookServer: func(i int) linkpipe.Hook {
			return newMiddlebox(func(ip []byte) bool {
				tcp, opts := tcpOf(ip)
				if tcp == nil {
					return false
				}
				ihl := int(ip[0]&0xf) * 4
				total := int(ip[2])<<8 | int(ip[3])
				n := int64(total - ihl - 20 - len(opts))
				if n > wireMax[i].Load() {
					wireMax[i].Store(n)
				}
				return false
			}).hook
		},
	})
	cc, sc := dialAccept(t, ctx, w, 80)
	waitSubflows(t, cc, 2)
	waitSubflows(t, sc, 2)
	exchange(t, ctx, cc, sc, randomData(8<<20, 5), randomData(1<<10, 6))

	cc.mu.Lock()
	sfs := append([]*subflow(nil), cc.subflows...)
	cc.mu.Unlock()
	require.Len(t, sfs, 2)
	for _, sf := range sfs {
		i := int(sf.uplinkID) - 1
		want := int(wireMax[i].Load())
		require.NotZero(t, sf.bytesTx, "path %d carried no data", i)
		require.NotEqual(t, defaultMSS, want, "the wire must show a measured MSS, not the default")
		require.Equal(t, want, sf.sample().mss, "path %d", i)
	}
}
