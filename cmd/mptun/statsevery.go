package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/mptun/mptun/mptcpep"
)

// startStatsWatch runs watchStats when every > 0; the returned stop waits
// for its last line, so nothing is written after it returns.
func startStatsWatch(ctx context.Context, w io.Writer, every time.Duration, stats func() mptcpep.ConnStats) (stop func()) {
	if every <= 0 {
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		watchStats(ctx, w, every, stats)
	}()
	return func() {
		cancel()
		<-done
	}
}

// watchStats writes one line per subflow every interval until ctx ends
// (`--stats-every`): what a user watching a bonded transfer asks first is
// how each path is doing right now, not at the end.
func watchStats(ctx context.Context, w io.Writer, every time.Duration, stats func() mptcpep.ConnStats) {
	t := time.NewTicker(every)
	defer t.Stop()
	start := time.Now()
	prev, prevAt := stats(), start
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			cur := stats()
			for _, line := range statsLines(prev, cur, now.Sub(prevAt), now.Sub(start)) {
				fmt.Fprintln(w, line)
			}
			prev, prevAt = cur, now
		}
	}
}

// statsLines formats cur with rates over dt since prev (subflows matched
// by their addresses; a new one counts from zero).
func statsLines(prev, cur mptcpep.ConnStats, dt, since time.Duration) []string {
	type key struct{ l, r string }
	old := make(map[key]mptcpep.SubflowStats, len(prev.Subflows))
	for _, sf := range prev.Subflows {
		old[key{sf.Local.String(), sf.Remote.String()}] = sf
	}
	secs := dt.Seconds()
	if secs <= 0 {
		secs = 1
	}
	rate := func(now, before uint64) float64 {
		if now < before {
			return 0
		}
		return float64(now-before) * 8 / secs / 1e6
	}
	// The connection line sums the subflows: the bonded rate on the wire
	// (ConnStats.BytesSent counts what the application handed over, which
	// runs ahead of the wire while the send buffer fills).
	lines := make([]string, 1, len(cur.Subflows)+1)
	var tx, rx float64
	for _, sf := range cur.Subflows {
		p := old[key{sf.Local.String(), sf.Remote.String()}]
		backup := ""
		if sf.Backup || sf.RemoteBackup {
			backup = " backup"
		}
		stx, srx := rate(sf.BytesSent, p.BytesSent), rate(sf.BytesReceived, p.BytesReceived)
		tx, rx = tx+stx, rx+srx
		line := fmt.Sprintf("stats t=%.1fs subflow %v->%v %s%s rtt=%.1fms cwnd=%d tx=%.1fMbit/s rx=%.1fMbit/s retrans=%d",
			since.Seconds(), sf.Local, sf.Remote, sf.State, backup, float64(sf.RTT)/float64(time.Millisecond), sf.Cwnd,
			stx, srx, sf.Retransmits)
		if c := sf.CC; c.Name != "" {
			line += fmt.Sprintf(" cc=%s/%s pacing=%.1fMbit/s bw=%.1fMbit/s minrtt=%.1fms",
				c.Name, c.State, float64(c.PacingRate)*8/1e6, float64(c.BtlBw)*8/1e6, c.MinRTT*1e3)
		}
		lines = append(lines, line)
	}
	lines[0] = fmt.Sprintf("stats t=%.1fs conn tx=%.1fMbit/s rx=%.1fMbit/s reinjected=%d",
		since.Seconds(), tx, rx, cur.Reinjected)
	return lines
}
