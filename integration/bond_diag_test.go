package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/mptun/mptun/bond/client"
)

// TestBondDiag (MPTUN_BONDDIAG=1) runs TestBond's upload and then its
// download at once (without waiting for the upload's tail) and logs the
// download and upload rates per 100 ms and, every 500 ms, the tbf queues
// and drops, the client's subflows and both MIBs. Diagnostic only:
// MPTUN_DIAG_GAP=2s waits between them, MPTUN_DIAG_NOUPLOAD=1 skips the
// upload, MPTUN_DIAG_PCAP=DIR captures SYNs and pure ACKs on the router's
// downlinks (the client's advertised windows).
func TestBondDiag(t *testing.T) {
	if os.Getenv("MPTUN_BONDDIAG") == "" {
		t.Skip("diagnostic: set MPTUN_BONDDIAG=1")
	}
	gap, _ := time.ParseDuration(os.Getenv("MPTUN_DIAG_GAP"))
	b := bondNewTopo(t, 50)
	srv := b.startServerWith(t, "--log-level", "debug", "--metrics", "127.0.0.1:9477")
	b.startClient(t, bondClientOpts{})
	defer func() {
		for _, l := range strings.Split(srv.stderr.String(), "\n") {
			if strings.Contains(l, "stale") || strings.Contains(l, "WARN") || strings.Contains(l, "ERROR") {
				t.Log("srv: " + l)
			}
		}
	}()

	if dir := os.Getenv("MPTUN_DIAG_PCAP"); dir != "" {
		for _, dev := range []string{"r1", "r2"} {
			cmd := b.rtr.Command(context.Background(), "tcpdump", "-i", dev, "-n", "-s", "120", "-w", dir+"/"+dev+".pcap",
				"tcp and (tcp[tcpflags] & tcp-syn != 0 or ip[2:2] - ((ip[0]&0xf)<<2) - ((tcp[12]&0xf0)>>2) == 0)")
			require.NoError(t, cmd.Start())
			t.Cleanup(func() { _ = cmd.Process.Signal(os.Interrupt); _ = cmd.Wait() })
		}
		time.Sleep(time.Second)
	}
	start := time.Now()
	var down atomic.Int64
	stopMon := make(chan struct{})
	monDone := make(chan struct{})
	go func() {
		defer close(monDone)
		b.monitor(t, start, &down, stopMon)
	}()

	if os.Getenv("MPTUN_DIAG_NOUPLOAD") == "" {
		c, err := b.dial(t, bondWebV4, bondSinkPort)
		require.NoError(t, err)
		stop := make(chan struct{})
		go bondFlood(c, stop)
		time.Sleep(8 * time.Second)
		close(stop)
		c.Close()
		t.Logf("%6.2f upload closed", time.Since(start).Seconds())
	}
	time.Sleep(gap)
	c, err := b.dial(t, bondWebV4, bondSourcePort)
	require.NoError(t, err)
	t.Logf("%6.2f download dialed", time.Since(start).Seconds())
	go bondDrain(c, &down)
	go func() {
		var fast []string
		ld, lu := down.Load(), b.sinkBytes.Load()
		for range 100 {
			time.Sleep(100 * time.Millisecond)
			d, u := down.Load(), b.sinkBytes.Load()
			fast = append(fast, fmt.Sprintf("%.0f/%.0f", float64(d-ld)*8/0.1/1e6, float64(u-lu)*8/0.1/1e6))
			ld, lu = d, u
		}
		t.Logf("download/upload per 100 ms from the dial: %s", strings.Join(fast, " "))
	}()
	rates := bondSample(down.Load, time.Second, bondAfter(8*time.Second))
	c.Close()
	t.Logf("download per second: %.1f", rates)
	time.Sleep(3 * time.Second)
	close(stopMon)
	<-monDone
}

var tcDevRe = regexp.MustCompile(`(?s)qdisc tbf \S+ dev (\S+) .*?dropped (\d+).*?backlog (\d+)b`)

// tcStats returns the tbf drops and backlog bytes per device in ns.
func tcStats(ns string) map[string][2]int {
	out, err := exec.Command("tc", "-n", ns, "-s", "qdisc", "show").Output()
	m := map[string][2]int{}
	if err != nil {
		return m
	}
	for _, x := range tcDevRe.FindAllSubmatch(out, -1) {
		d, _ := strconv.Atoi(string(x[2]))
		bl, _ := strconv.Atoi(string(x[3]))
		m[string(x[1])] = [2]int{d, bl}
	}
	return m
}

func (b *bondTopo) monitor(t *testing.T, start time.Time, down *atomic.Int64, stop <-chan struct{}) {
	tk := time.NewTicker(500 * time.Millisecond)
	defer tk.Stop()
	lastDown, lastSink := down.Load(), b.sinkBytes.Load()
	lastDrops := map[string]int{}
	lastMIB := map[string]uint64{}
	lastSrv := map[string]uint64{}
	last := time.Now()
	for {
		select {
		case <-stop:
			return
		case <-tk.C:
		}
		now := time.Now()
		dt := now.Sub(last).Seconds()
		last = now
		d, s := down.Load(), b.sinkBytes.Load()
		var sb strings.Builder
		fmt.Fprintf(&sb, "%6.2f down %5.1f up %5.1f |", now.Sub(start).Seconds(),
			float64(d-lastDown)*8/dt/1e6, float64(s-lastSink)*8/dt/1e6)
		lastDown, lastSink = d, s
		tc := tcStats(b.rtr.Name)
		for k, v := range tcStats(b.cli.Name) {
			tc[k] = v
		}
		for _, dev := range []string{"r1", "r2", "u1", "u2"} {
			v := tc[dev]
			fmt.Fprintf(&sb, " %s q%3dk d%d", dev, v[1]/1000, v[0]-lastDrops[dev])
			lastDrops[dev] = v[0]
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		st, err := queryStatus(ctx, b.socket())
		cancel()
		if err == nil {
			sb.WriteString(" |")
			for _, cs := range st.Conns {
				fmt.Fprintf(&sb, " [%s tx%d rx%d", strings.TrimPrefix(cs.Local, "198.18."), cs.BytesSent>>20, cs.BytesReceived>>20)
				for _, sf := range cs.Subflows {
					fmt.Fprintf(&sb, " (%s rtt%.0f cw%d rtx%d tx%.0f rx%.0f)", sf.State, sf.RTTms, sf.Cwnd, sf.Retransmits, float64(sf.TxBps)/1e6, float64(sf.RxBps)/1e6)
				}
				sb.WriteString("]")
			}
			var ch []string
			for k, v := range st.MIB {
				if v != lastMIB[k] && k != "DSSRX" && k != "DSSMappingRX" && k != "DataAckRX" {
					ch = append(ch, fmt.Sprintf("%s+%d", k, v-lastMIB[k]))
				}
				lastMIB[k] = v
			}
			fmt.Fprintf(&sb, " mib %v", ch)
		}
		var sm []string
		_ = b.srv.Do(func() error {
			c, err := net.DialTimeout("tcp", "127.0.0.1:9477", time.Second)
			if err != nil {
				sm = append(sm, err.Error())
				return err
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(time.Second))
			_, _ = io.WriteString(c, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
			body, _ := io.ReadAll(c)
			for _, l := range strings.Split(string(body), "\n") {
				if !strings.HasPrefix(l, "mptun_mptcp_mib_total{") {
					continue
				}
				var k string
				var v uint64
				l = strings.TrimPrefix(l, `mptun_mptcp_mib_total{counter="`)
				i := strings.Index(l, `"}`)
				if i < 0 {
					continue
				}
				k = l[:i]
				v, _ = strconv.ParseUint(strings.TrimSpace(l[i+2:]), 10, 64)
				if v != lastSrv[k] && k != "DSSRX" && k != "DSSMappingRX" && k != "DataAckRX" {
					sm = append(sm, fmt.Sprintf("%s+%d", k, v-lastSrv[k]))
				}
				lastSrv[k] = v
			}
			return nil
		})
		fmt.Fprintf(&sb, " srvmib %v", sm)
		t.Log(sb.String())
	}
}

func queryStatus(ctx context.Context, sock string) (client.Status, error) {
	var st client.Status
	raw, err := client.QueryControl(ctx, sock)
	if err != nil {
		return st, err
	}
	err = json.Unmarshal(raw, &st)
	return st, err
}
