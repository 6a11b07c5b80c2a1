package main

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/mptun/mptun/bond/client"
)

func TestPrintStatusShowsCongestionControl(t *testing.T) {
	st := &client.Status{Name: "mptun0", PID: 7, Server: "192.0.2.1:7000", Started: time.Now(), Interval: 1,
		Conns: []client.ConnStatus{{Local: "10.0.0.2:4000", Remote: "192.0.2.1:7000", MPTCP: true, Subflows: []client.SubflowStatus{
			{Local: "10.0.0.2:4000", State: "established", RTTms: 21.5, Cwnd: 180, CC: "bbr", CCState: "probe_bw",
				PacingBps: 49_500_000, BtlBwBps: 50_000_000, MinRTTms: 20},
			{Local: "10.0.1.2:4001", State: "established", RTTms: 40, Cwnd: 30},
		}}}}
	var b strings.Builder
	require.NoError(t, printStatus(&b, st))
	out := b.String()
	require.Contains(t, out, "CC")
	require.Regexp(t, `10\.0\.0\.2:4000\s+established.*bbr/probe_bw\s+49\.5\s+50\.0\s+20\.0`, out)
	require.Regexp(t, `10\.0\.1\.2:4001\s+established.*\s-\s+-\s+-\s+-\n`, out)
}
