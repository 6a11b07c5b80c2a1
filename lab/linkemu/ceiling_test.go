package linkemu_test

import (
	"context"
	"encoding/json"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/mptun/mptun/lab"
	"github.com/mptun/mptun/lab/linkemu"
	"github.com/stretchr/testify/require"
)

func cpuSelf(b *testing.B) time.Duration {
	var ru syscall.Rusage
	require.NoError(b, syscall.Getrusage(syscall.RUSAGE_SELF, &ru))
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkCeiling measures what the emulator itself can forward: one TCP
// flow (iperf3, separate processes) through an unshaped path. The emulator
// is the only work in this process, so RUSAGE_SELF is its CPU cost.
//
//	go test ./lab/linkemu -run '^$' -bench Ceiling -benchtime 5x
func BenchmarkCeiling(b *testing.B) {
	lab.NeedRoot(b)
	if _, err := exec.LookPath("iperf3"); err != nil {
		b.Fatalf("iperf3 missing (scripts/install-deps.sh): %v", err)
	}
	for _, mtu := range []int{1500, 9000} {
		b.Run("mtu"+strconv.Itoa(mtu), func(b *testing.B) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			topo, err := lab.New(ctx, lab.Spec{Prefix: "mtl", MTU: mtu, Paths: []lab.Path{{}}})
			require.NoError(b, err)
			b.Cleanup(func() { require.NoError(b, topo.Close()) })
			port := "5299"
			srv := topo.Server.Command(ctx, "iperf3", "-s", "-p", port)
			require.NoError(b, srv.Start())
			b.Cleanup(func() { _ = srv.Process.Kill(); _ = srv.Wait() })
			time.Sleep(200 * time.Millisecond)
			const size = 200 << 20
			b.SetBytes(size)
			var bits float64
			cpu0 := cpuSelf(b)
			for b.Loop() {
				out, err := topo.Client.Run(ctx, "iperf3", "-c", topo.Paths[0].ServerAddr.String(), "-p", port, "-n", strconv.Itoa(size), "-J")
				require.NoError(b, err, string(out))
				var res struct {
					End struct {
						SumReceived struct {
							Bytes float64 `json:"bytes"`
						} `json:"sum_received"`
					} `json:"end"`
				}
				require.NoError(b, json.Unmarshal(out, &res))
				bits += res.End.SumReceived.Bytes * 8
			}
			cpu := cpuSelf(b) - cpu0
			b.Logf("emulator: ab %+v ba %+v", topo.Paths[0].Emulator.Stats(linkemu.AtoB), topo.Paths[0].Emulator.Stats(linkemu.BtoA))
			b.ReportMetric(bits/b.Elapsed().Seconds()/1e6, "Mbit/s")
			b.ReportMetric(cpu.Seconds()/(bits/1e9), "cpu-s/Gbit")
			b.ReportMetric(cpu.Seconds()/b.Elapsed().Seconds()*100, "emu-cpu-%")
		})
	}
}
