package mptcpep

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestCongestionControlPerEndpoint: an endpoint's Config.CongestionControl
// reaches every subflow's gVisor sender; the controller reports in the
// subflow stats and counts its events in the MIB. The peer keeps gVisor's
// own controller (no report, no counts).
func TestCongestionControlPerEndpoint(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p := pathSpec{delay: 10 * time.Millisecond, rateBps: 50_000_000, loss: 0.01}
	w := newWorld(t, []pathSpec{p, p}, Config{CongestionControl: "bbr"}, Config{})
	cc, sc := dialAccept(t, ctx, w, 80)
	waitSubflows(t, cc, 2)
	exchange(t, ctx, cc, sc, randomData(16<<20, 31), randomData(256<<10, 32))

	for _, s := range cc.Stats().Subflows {
		require.Equal(t, "bbr", s.CC.Name, "client subflow %v", s.Local)
		require.NotZero(t, s.CC.BtlBw)
		require.NotZero(t, s.CC.MinRTT)
	}
	for _, s := range sc.Stats().Subflows {
		require.Empty(t, s.CC.Name, "server subflow %v runs gVisor's cubic", s.Local)
	}
	m := &w.client.MIB
	require.Positive(t, m.CCStartupExits.Load(), mibString(m))
	require.Positive(t, m.CCLossEvents.Load(), "1 %% loss: %s", mibString(m))
	require.Zero(t, w.server.MIB.CCLossEvents.Load()+w.server.MIB.CCStartupExits.Load(), mibString(&w.server.MIB))
}
