package mptcpep

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/mptun/mptun/netstack/linkpipe"
)

// dssMangler is a middlebox on the client's NIC of path 1 that, once armed,
// rewrites the DSS options of data segments the client receives there.
func dssMangler(armed *atomic.Bool, rewrite func(raw []byte) bool) func(i int) linkpipe.Hook {
	return func(i int) linkpipe.Hook {
		if i != 1 {
			return nil
		}
		return newMiddlebox(func(ip []byte) bool {
			tcp, opts := tcpOf(ip)
			if tcp == nil || !armed.Load() || len(ip) <= int(ip[0]&0xf)*4+int(tcp[12]>>4)*4 {
				return false // not armed, or no payload
			}
			hit := false
			walkOpts(opts, func(kind byte, raw []byte) {
				if kind == 30 && len(raw) > 2 && raw[2]>>4 == 2 && rewrite(raw) {
					hit = true
				}
			})
			return hit
		}).hook
	}
}

// TestDSSMappingErrorsResetSubflow: data that no mapping covers, and a
// mapping without the DSS checksum the connection negotiated, are protocol
// errors (RFC 8684 3.3): the subflow is reset with MP_TCPRST while the
// other one carries on, and the stream arrives intact through it.
func TestDSSMappingErrorsResetSubflow(t *testing.T) {
	for _, tc := range []struct {
		name     string
		checksum bool
		rewrite  func(raw []byte) bool
		counter  func(m *MIB) uint64
	}{
		{"data-without-mapping", false, func(raw []byte) bool {
			for k := range raw {
				raw[k] = 1 // NOP: the whole DSS is gone
			}
			return true
		}, func(m *MIB) uint64 { return m.DSSNoMappingReset.Load() }},
		{"mapping-without-checksum", true, func(raw []byte) bool {
			if raw[3]&0x04 == 0 || raw[1] < 10 { // no mapping (M flag)
				return false
			}
			n := len(raw)
			raw[1] -= 2 // drop the trailing checksum
			raw[n-2], raw[n-1] = 1, 1
			return true
		}, func(m *MIB) uint64 { return m.DSSChecksumMissing.Load() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
			defer cancel()
			var armed atomic.Bool
			w := newWorldOpts(t, worldOpts{
				paths:      []pathSpec{{delay: time.Millisecond}, {delay: time.Millisecond}},
				ccfg:       Config{Checksum: tc.checksum},
				hookClient: dssMangler(&armed, tc.rewrite),
			})
			cc, sc := dialAccept(t, ctx, w, 87)
			waitSubflows(t, cc, 2)
			armed.Store(true)
			exchange(t, ctx, cc, sc, randomData(4<<20, 51), randomData(8<<20, 52))
			require.NotZero(t, tc.counter(&w.client.MIB), "client MIB %s", mibString(&w.client.MIB))
			require.NotZero(t, w.server.MIB.MPRstRX.Load(), "the server saw the MP_TCPRST")
			require.True(t, cc.MultipathTCP(), "no fallback: the other subflow carried on")
			require.Zero(t, w.client.MIB.FallbackConns.Load())
		})
	}
}
