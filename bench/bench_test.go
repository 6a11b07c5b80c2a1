package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mptun/mptun/lab"
	"github.com/stretchr/testify/require"
)

func TestParseIperf(t *testing.T) {
	raw, err := os.ReadFile("testdata/iperf3-mptcp-up.json")
	require.NoError(t, err)
	tests := []struct {
		name    string
		raw     []byte
		wantBps float64
		wantErr string
	}{
		{"real mptcpize run", raw, 56280094.63232829, ""},
		{"iperf3 error", []byte(`{"start":{},"end":{},"error":"unable to connect to server: Connection refused"}`), 0, "refused"},
		{"not json", []byte("iperf3: error"), 0, "JSON"},
		{"no end", []byte(`{"start":{}}`), 0, "no end"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r, err := parseIperf(tc.raw)
			if tc.wantErr != "" {
				require.ErrorContains(t, err, tc.wantErr)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.wantBps, r.End.SumReceived.BitsPerSecond)
			require.NotNil(t, r.End.SumSent.Retransmits)
			require.Equal(t, 162, *r.End.SumSent.Retransmits)
			require.InDelta(t, 0.7175622867688365, r.End.CPU.HostTotal, 1e-12)
			require.InDelta(t, 1.1260091708904145, r.End.CPU.RemoteTotal, 1e-12)
		})
	}
	require.True(t, refused([]byte(`{"error":"unable to connect to server: Connection refused"}`)))
	require.False(t, refused(raw))
}

func counters(tx0, rx0, tx1, rx1 uint64) []lab.PathCounters {
	return []lab.PathCounters{{TxBytes: tx0, RxBytes: rx0}, {TxBytes: tx1, RxBytes: rx1}}
}

func TestTimelineSharesAndFailover(t *testing.T) {
	// 1 s steps; path 0 carries 1.25 MB/s (10 Mbit/s) except in seconds 2-3.
	samples := []Sample{
		{0, counters(0, 0, 0, 0)},
		{time.Second, counters(1_250_000, 0, 1_250_000, 10)},
		{2 * time.Second, counters(2_500_000, 0, 2_500_000, 20)},
		{3 * time.Second, counters(2_500_000, 0, 2_500_000, 30)},
		{4 * time.Second, counters(2_500_000, 0, 3_000_000, 40)},
		{5 * time.Second, counters(3_750_000, 0, 4_250_000, 50)},
	}
	tl := timeline(samples, Upload)
	require.Equal(t, []float64{1, 2, 3, 4, 5}, tl.T)
	require.Equal(t, []float64{10, 10, 0, 0, 10}, tl.Paths[0])
	require.Equal(t, []float64{10, 10, 0, 4, 10}, tl.Paths[1])
	require.Equal(t, []float64{0, 0, 0, 0, 0}, timeline(samples, Download).Paths[0])

	sh := shares(samples, Upload)
	require.InDelta(t, 3.75/8.0, sh[0], 1e-9)
	require.InDelta(t, 4.25/8.0, sh[1], 1e-9)
	require.Equal(t, []float64{0, 1}, shares(samples, Download))
	require.Nil(t, shares(samples[:1], Upload))

	tests := []struct {
		from, to  time.Duration
		surviving float64
		want      time.Duration
	}{
		{2 * time.Second, 4 * time.Second, 10, 2 * time.Second}, // 0 then 4 Mbit/s: both below 5
		{2 * time.Second, 4 * time.Second, 8, time.Second},      // 4 is not below 4
		{0, 5 * time.Second, 10, 2 * time.Second},
		{4 * time.Second, 5 * time.Second, 10, 0},
	}
	for _, tc := range tests {
		require.Equal(t, tc.want, belowHalf(tl, tc.from, tc.to, tc.surviving), "%+v", tc)
	}
}

func TestProcParsers(t *testing.T) {
	snmp := "Ip: Forwarding DefaultTTL\nIp: 1 64\nTcp: RtoAlgorithm RtoMin RetransSegs InErrs\nTcp: 1 200 1234 0\nUdp: InDatagrams\nUdp: 5\n"
	v, err := parseSnmpTCP([]byte(snmp), "RetransSegs")
	require.NoError(t, err)
	require.Equal(t, uint64(1234), v)
	_, err = parseSnmpTCP([]byte(snmp), "Nope")
	require.Error(t, err)

	stat := "cpu  100 5 50 1000 20 1 4 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n"
	busy, err := parseProcStat([]byte(stat))
	require.NoError(t, err)
	require.Equal(t, 1600*time.Millisecond, busy) // (100+5+50+1+4) ticks
	_, err = parseProcStat([]byte("intr 1 2 3\n"))
	require.Error(t, err)
}

func TestScenarioDefinitions(t *testing.T) {
	sc := Scenarios(20 * time.Second)
	require.Len(t, sc, 7)
	require.True(t, sc[6].unlimited(), "scenario 7 is the unshaped one")
	for _, s := range sc[:6] {
		require.False(t, s.unlimited(), s.String())
	}
	rates := map[int]float64{1: 100e6, 2: 60e6, 3: 70e6, 4: 100e6, 5: 100e6}
	for _, s := range sc {
		if want, ok := rates[s.ID]; ok {
			require.Equal(t, want, s.pathRate(), s.String())
		}
	}
	require.Equal(t, 300*time.Millisecond, sc[2].Paths[1].Delay)
	require.Equal(t, 0.01, sc[3].Paths[1].Loss)
	pi, o, ok := sc[4].outage()
	require.True(t, ok)
	require.Equal(t, 0, pi)
	require.Equal(t, 10*time.Second, o.Start)
	require.Equal(t, 10*time.Second, o.Duration)
	require.Equal(t, 30*time.Second, sc[4].Duration)
	require.Len(t, sc[5].Paths, 3)
	require.NotEqual(t, sc[5].Paths[0].Rate, sc[5].Paths[1].Rate)
	for _, s := range sc {
		for _, p := range s.Paths {
			require.NoError(t, p.Params().Validate())
		}
	}

	tests := []struct {
		spec    string
		want    []int
		wantErr bool
	}{{"all", []int{1, 2, 3, 4, 5, 6, 7}, false}, {"3", []int{3}, false}, {"5, 1", []int{5, 1}, false}, {"8", nil, true}, {"x", nil, true}}
	for _, tc := range tests {
		got, err := selectScenarios(sc, tc.spec)
		if tc.wantErr {
			require.Error(t, err, tc.spec)
			continue
		}
		require.NoError(t, err)
		var ids []int
		for _, s := range got {
			ids = append(ids, s.ID)
		}
		require.Equal(t, tc.want, ids)
	}
	for in, want := range map[string]time.Duration{"10": 10 * time.Second, "2.5s": 2500 * time.Millisecond, "1m": time.Minute} {
		d, err := parseDuration(in)
		require.NoError(t, err)
		require.Equal(t, want, d)
	}
	for _, bad := range []string{"1s", "0.5", "soon"} {
		_, err := parseDuration(bad)
		require.Error(t, err, bad)
	}
}

func TestReportAndPlots(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "2026-01-01T000000Z")
	require.NoError(t, os.MkdirAll(dir, 0o755))
	sc := Scenarios(10 * time.Second)
	half := 1.5
	tl := Timeline{T: []float64{0.1, 0.2, 0.3}, Paths: [][]float64{{40, 0, 0}, {10, 20, 48}}}
	runs := []Run{
		{ScenarioID: 5, Scenario: "failover", Impl: "kernel-mptcp", Dir: Upload, GoodputMbit: 71.5, Ratio: 0.716, Shares: []float64{0.4, 0.6}, Retrans: 12, CPUPerGbit: 1.25, BelowHalf: &half, Timeline: tl, Raw: "raw/s5-kernel-mptcp-up.json"},
		{ScenarioID: 5, Scenario: "failover", Impl: "tcp-p0", Dir: Upload, Err: "iperf3: boom | bang"},
	}
	name, err := plotTimeline(dir, sc[4], runs[0])
	require.NoError(t, err)
	summary, err := plotSummary(dir, sc[4:5], runs, Upload)
	require.NoError(t, err)
	none, err := plotSummary(dir, sc[4:5], runs, Download)
	require.NoError(t, err)
	require.Empty(t, none, "no download runs, no chart")
	for _, p := range []string{name, summary} {
		st, err := os.Stat(filepath.Join(dir, p))
		require.NoError(t, err)
		require.Greater(t, st.Size(), int64(1000), p)
	}
	meta := Meta{Date: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), Command: "go run ./bench", Duration: 10 * time.Second, Machine: "test", Kernel: "Linux"}
	require.NoError(t, writeReport(dir, meta, sc[4:5], runs, []string{summary, name}))
	md, err := os.ReadFile(filepath.Join(dir, "results.md"))
	require.NoError(t, err)
	s := string(md)
	require.Contains(t, s, "| 5 | failover | kernel-mptcp | up | 71.5 | 0.72 | 40/60 | 12 | 1.25 | 1.5 | [json](raw/s5-kernel-mptcp-up.json) |")
	require.Contains(t, s, "error: iperf3: boom / bang")
	require.Contains(t, s, "down 5s for 5s")
	latest, err := os.ReadFile(filepath.Join(filepath.Dir(dir), "latest.md"))
	require.NoError(t, err)
	require.Contains(t, string(latest), "[json](2026-01-01T000000Z/raw/s5-kernel-mptcp-up.json)")
	require.Contains(t, string(latest), "![summary-up.png](2026-01-01T000000Z/summary-up.png)")
	require.FileExists(t, filepath.Join(dir, "results.json"))
}

// TestRunnerEndToEnd measures one short single-path transfer through the
// emulator and checks the numbers are those of a 50 Mbit/s path.
func TestRunnerEndToEnd(t *testing.T) {
	lab.NeedRoot(t)
	if _, err := os.Stat("/usr/bin/iperf3"); err != nil {
		t.Fatalf("iperf3 missing (scripts/install-deps.sh): %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dir := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "raw"), 0o755))
	var progress strings.Builder
	r := &runner{dir: dir, log: nil, progress: &progress, dirs: []Direction{Upload, Download},
		implFilter: func(n string) bool { return n == "tcp-p1" }}
	r.log = discardLogger()
	sc := Scenarios(3 * time.Second)[0]
	runs, err := r.scenario(ctx, sc)
	require.NoError(t, err)
	require.Len(t, runs, 2)
	for _, run := range runs {
		require.Empty(t, run.Err)
		t.Logf("%s %s: %.1f Mbit/s shares %v", run.Impl, run.Dir, run.GoodputMbit, run.Shares)
		require.Less(t, run.GoodputMbit, 51.0, "a 50 Mbit/s path cannot carry more")
		require.Greater(t, run.GoodputMbit, 20.0)
		require.Greater(t, run.Shares[1], 0.95, "tcp-p1 must use path 1")
		require.NotEmpty(t, run.Timeline.T)
		require.FileExists(t, filepath.Join(dir, run.Raw))
	}
	require.Contains(t, progress.String(), "tcp-p1")
}

func TestParseProcPidStat(t *testing.T) {
	tests := []struct {
		name    string
		raw     string
		want    float64
		wantErr bool
	}{
		{"plain", "1234 (mptun) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9 0 100 0 0", 3.25, false},
		{"name with spaces and parens", "77 (a) b (c)) R 1 77 77 0 -1 0 0 0 0 0 1 2 0 0 20 0 1 0 5 0 0", 0.03, false},
		{"truncated", "1 (x) S 1 2 3", 0, true},
		{"no name", "1 x S", 0, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseProcPidStat([]byte(tc.raw))
			if tc.wantErr {
				require.Error(t, err)
				return
			}
			require.NoError(t, err)
			require.InDelta(t, tc.want, got, 1e-9)
		})
	}
}

func TestSynthIperfRoundTrip(t *testing.T) {
	raw, err := synthIperf(125_000_000, 10, 2, 0, mptunExtra{Retrans: 7, CPUSeconds: 1.5, MPTCP: true, Subflows: 2})
	require.NoError(t, err)
	r, err := parseIperf(raw)
	require.NoError(t, err)
	require.InDelta(t, 100e6, r.End.SumReceived.BitsPerSecond, 1e-6)
	require.InDelta(t, 20.0, r.End.CPU.HostTotal, 1e-9, "2 s of CPU in 10 s is 20 %")
	require.NotNil(t, r.Mptun)
	require.Equal(t, uint64(7), r.Mptun.Retrans)
	require.True(t, r.Mptun.MPTCP)

	_, err = synthIperf(0, 10, 0, 0, mptunExtra{})
	require.ErrorContains(t, err, "no data")
}

func TestCountUntilEOF(t *testing.T) {
	var last uint64
	n, secs, err := countUntilEOF(strings.NewReader(strings.Repeat("x", 1<<20)), func(v uint64) { last = v })
	require.NoError(t, err)
	require.Equal(t, uint64(1<<20), n)
	require.Equal(t, n, last)
	require.GreaterOrEqual(t, secs, 0.0)

	_, _, err = countUntilEOF(strings.NewReader(""), nil)
	require.ErrorContains(t, err, "before any data")
}

func TestParseConnectStats(t *testing.T) {
	stderr := "time=x level=WARN msg=hello\n{\n  \"conn\": {\"MPTCP\": true, \"Subflows\": [{\"Retransmits\": 3}, {\"Retransmits\": 4}]},\n  \"mib\": {\"ConnsEstablished\": 1}\n}\n"
	st, err := parseConnectStats(stderr)
	require.NoError(t, err)
	require.True(t, st.Conn.MPTCP)
	require.Len(t, st.Conn.Subflows, 2)
	require.Equal(t, uint64(4), st.Conn.Subflows[1].Retransmits)
	require.Equal(t, uint64(1), st.MIB["ConnsEstablished"])

	_, err = parseConnectStats("mptun connect: dial: refused\n")
	require.ErrorContains(t, err, "no --stats JSON")

	// --stats-every lines before the JSON are kept as samples and do not
	// disturb it.
	withSamples := "stats t=0.5s conn tx=1.0Mbit/s rx=0.0Mbit/s reinjected=0\n" +
		"stats t=0.5s subflow 198.18.0.2:1->10.0.0.1:80 established rtt=1.0ms cwnd=10 tx=1.0Mbit/s rx=0.0Mbit/s retrans=0\n" + stderr
	require.Equal(t, []string{
		"stats t=0.5s conn tx=1.0Mbit/s rx=0.0Mbit/s reinjected=0",
		"stats t=0.5s subflow 198.18.0.2:1->10.0.0.1:80 established rtt=1.0ms cwnd=10 tx=1.0Mbit/s rx=0.0Mbit/s retrans=0",
	}, sampleLines(withSamples))
	st, err = parseConnectStats(withSamples)
	require.NoError(t, err)
	require.Len(t, st.Conn.Subflows, 2)
	require.Empty(t, sampleLines(stderr))
}

func TestComparisonAndTargetTables(t *testing.T) {
	sc := Scenarios(10 * time.Second)
	sel := []Scenario{sc[0], sc[6]}
	runs := []Run{
		{ScenarioID: 1, Impl: "tcp-p0", Dir: Upload, GoodputMbit: 47},
		{ScenarioID: 1, Impl: "kernel-mptcp", Dir: Upload, GoodputMbit: 92, Ratio: 0.92, Retrans: 10},
		{ScenarioID: 1, Impl: "mptun-engine", Dir: Upload, GoodputMbit: 46, Ratio: 0.46, Retrans: 3},
		{ScenarioID: 1, Impl: "mptun-tunnel", Dir: Upload, Err: "boom"},
		{ScenarioID: 1, Impl: "mptun-engine/bbr", Dir: Upload, GoodputMbit: 92, Ratio: 0.92},
		{ScenarioID: 7, Impl: "mptun-plain", Dir: Download, GoodputMbit: 2000, MptunCPUPerGbit: 0.5},
		{ScenarioID: 7, Impl: "mptun-engine", Dir: Download, GoodputMbit: 1800, MptunCPUPerGbit: 0.6},
	}
	var b strings.Builder
	writeComparison(&b, sel, runs)
	writeTargets(&b, sel, runs)
	out := b.String()
	// A column per controller the mptun implementations ran with.
	require.Contains(t, out, "| best single path | kernel-mptcp | mptun-engine | mptun-engine/bbr | mptun-tunnel | engine retrans")
	require.Contains(t, out, "| 1 | two-equal | up | 47.0 | 92.0 | 46.0 (0.50) | 92.0 (1.00) | - | 3 (10) | - |")
	require.Contains(t, out, "| mptun-engine | down | 1800 | 0.90 | 0.000 | 0.600 | 1.20 |")
	require.Contains(t, out, "| mptun-engine | 46.0 | 46 | 0.0 | 0 |")
	require.NotContains(t, out, "| 1 | two-equal | down |", "no runs for down: no row")
}

func TestSendForOverLoopback(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	type res struct {
		n   uint64
		err error
	}
	got := make(chan res, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- res{err: err}
			return
		}
		defer c.Close()
		n, _, err := countUntilEOF(c, nil)
		got <- res{n, err}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	n, secs, err := sendFor(c.(*net.TCPConn), 200*time.Millisecond)
	require.NoError(t, err)
	require.InDelta(t, 0.2, secs, 0.15)
	r := <-got
	require.NoError(t, r.err)
	require.Equal(t, n, r.n, "everything sent before the half-close arrives")
}

func TestImplementationsPerController(t *testing.T) {
	sc := Scenarios(10 * time.Second)
	names := func(s Scenario, ccs ...string) []string {
		var out []string
		for _, i := range implementations(s, implConfig{CCs: ccs}) {
			out = append(out, i.Name)
		}
		return out
	}
	require.Equal(t, []string{"tcp-p0", "tcp-p1", "kernel-mptcp", "mptun-engine", "mptun-tunnel"}, names(sc[0]))
	// The satellite scenario also runs mptun over the satellite alone.
	require.Equal(t, []string{"tcp-p0", "tcp-p1", "kernel-mptcp",
		"mptun-engine/bbr", "mptun-p1/bbr", "mptun-engine/cubic", "mptun-p1/cubic",
		"mptun-tunnel/bbr", "mptun-tunnel/cubic"}, names(sc[2], "bbr", "cubic"))
	require.Equal(t, "s3-mptun-p1-bbr-up.json", fmt.Sprintf("s%d-%s-%s.json", 3, fileSafe("mptun-p1/bbr"), Upload))
}
