package hostnet

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"
)

// BenchmarkSetupClose measures the full plumbing cycle for two uplinks
// (TUNs, routes, rules, nft table), which bounds how fast mptun can start,
// stop and recover from an uplink change.
func BenchmarkSetupClose(b *testing.B) {
	requireRoot(b)
	tp := newTopo(b)
	for b.Loop() {
		require.NoError(b, inNS(tp.client, func() error {
			h, err := Setup(context.Background(), Config{Mode: ModeConnect, Instance: "bench",
				Uplinks: []UplinkSpec{{Iface: "c0"}, {Iface: "c1"}}})
			if err != nil {
				return err
			}
			return h.Close()
		}))
	}
}
