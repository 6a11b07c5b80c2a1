package main

import (
	"context"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/mptun/mptun/lab"
	"github.com/mptun/mptun/mptcpep"
	"github.com/mptun/mptun/netstack/cc"
)

func TestStatsLines(t *testing.T) {
	a := mptcpep.SubflowStats{Local: netip.MustParseAddrPort("10.0.0.2:4000"), Remote: netip.MustParseAddrPort("10.0.0.1:80"),
		State: "established", RTT: 21500 * time.Microsecond, Cwnd: 90}
	b := a
	b.Local = netip.MustParseAddrPort("10.0.1.2:4001")
	b.Backup = true
	for _, tc := range []struct {
		name       string
		prev, cur  mptcpep.ConnStats
		dt         time.Duration
		wantSubstr []string
	}{
		{
			name: "rates from deltas",
			prev: mptcpep.ConnStats{BytesSent: 1_000_000, Subflows: []mptcpep.SubflowStats{withBytes(a, 1_000_000, 0)}},
			cur:  mptcpep.ConnStats{BytesSent: 2_250_000, Subflows: []mptcpep.SubflowStats{withBytes(a, 2_250_000, 0)}},
			dt:   time.Second,
			wantSubstr: []string{
				"stats t=3.0s conn tx=10.0Mbit/s rx=0.0Mbit/s",
				"subflow 10.0.0.2:4000->10.0.0.1:80 established rtt=21.5ms cwnd=90 tx=10.0Mbit/s rx=0.0Mbit/s retrans=0",
			},
		},
		{
			// The connection line is the wire: the sum of the subflows,
			// not what the application handed over (BytesSent).
			name: "connection sums its subflows",
			prev: mptcpep.ConnStats{BytesSent: 0, Subflows: []mptcpep.SubflowStats{a, b}},
			cur:  mptcpep.ConnStats{BytesSent: 9_000_000, Subflows: []mptcpep.SubflowStats{withBytes(a, 1_000_000, 0), withBytes(b, 500_000, 0)}},
			dt:   time.Second,
			wantSubstr: []string{
				"conn tx=12.0Mbit/s rx=0.0Mbit/s",
				"subflow 10.0.0.2:4000->10.0.0.1:80 established rtt=21.5ms cwnd=90 tx=8.0Mbit/s",
				"subflow 10.0.1.2:4001->10.0.0.1:80 established backup rtt=21.5ms cwnd=90 tx=4.0Mbit/s",
			},
		},
		{
			name: "our congestion controller's state",
			prev: mptcpep.ConnStats{Subflows: []mptcpep.SubflowStats{a}},
			cur: mptcpep.ConnStats{Subflows: []mptcpep.SubflowStats{withCC(a, cc.Info{Name: "bbr", State: "probe_bw",
				PacingRate: 6_250_000, BtlBw: 6_312_500, MinRTT: 0.0205})}},
			dt: time.Second,
			wantSubstr: []string{
				"retrans=0 cc=bbr/probe_bw pacing=50.0Mbit/s bw=50.5Mbit/s minrtt=20.5ms",
			},
		},
		{
			name: "a new subflow counts from zero",
			prev: mptcpep.ConnStats{Subflows: []mptcpep.SubflowStats{a}},
			cur:  mptcpep.ConnStats{BytesReceived: 500_000, Subflows: []mptcpep.SubflowStats{a, withBytes(b, 0, 500_000)}},
			dt:   500 * time.Millisecond,
			wantSubstr: []string{
				"conn tx=0.0Mbit/s rx=8.0Mbit/s",
				"subflow 10.0.1.2:4001->10.0.0.1:80 established backup rtt=21.5ms cwnd=90 tx=0.0Mbit/s rx=8.0Mbit/s",
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out := strings.Join(statsLines(tc.prev, tc.cur, tc.dt, 3*time.Second), "\n")
			require.Len(t, strings.Split(out, "\n"), 1+len(tc.cur.Subflows))
			for _, s := range tc.wantSubstr {
				require.Contains(t, out, s)
			}
		})
	}
}

func withBytes(sf mptcpep.SubflowStats, tx, rx uint64) mptcpep.SubflowStats {
	sf.BytesSent, sf.BytesReceived = tx, rx
	return sf
}

// TestStatsWatchStops: lines come every interval, none after stop returns.
func TestStatsWatchStops(t *testing.T) {
	var calls atomic.Int64
	var buf lab.SyncBuffer
	stop := startStatsWatch(context.Background(), &buf, 10*time.Millisecond, func() mptcpep.ConnStats {
		calls.Add(1)
		return mptcpep.ConnStats{}
	})
	require.Eventually(t, func() bool { return calls.Load() >= 4 }, 5*time.Second, 5*time.Millisecond)
	stop()
	n := len(buf.String())
	require.Positive(t, n)
	require.Contains(t, buf.String(), "stats t=")
	time.Sleep(50 * time.Millisecond)
	require.Len(t, buf.String(), n, "written after stop")
}

func withCC(s mptcpep.SubflowStats, c cc.Info) mptcpep.SubflowStats {
	s.CC = c
	return s
}

func TestCCDefault(t *testing.T) {
	for cmd, want := range map[string]string{"connect": "bbr", "listen": "bbr", "client": "cubic", "server": "cubic"} {
		require.Equal(t, want, ccDefault(cmd), cmd)
	}
}
