package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/mptun/mptun/lab"
)

// iperfResult is the part of iperf3's JSON output the report uses.
type iperfResult struct {
	End struct {
		SumSent struct {
			Bytes         float64 `json:"bytes"`
			BitsPerSecond float64 `json:"bits_per_second"`
			Retransmits   *int    `json:"retransmits"`
		} `json:"sum_sent"`
		SumReceived struct {
			Bytes         float64 `json:"bytes"`
			Seconds       float64 `json:"seconds"`
			BitsPerSecond float64 `json:"bits_per_second"`
		} `json:"sum_received"`
		CPU struct {
			HostTotal   float64 `json:"host_total"`
			RemoteTotal float64 `json:"remote_total"`
		} `json:"cpu_utilization_percent"`
	} `json:"end"`
	Error string `json:"error"`
	// Mptun is set by the mptun implementations.
	Mptun *mptunExtra `json:"mptun"`
}

func parseIperf(raw []byte) (iperfResult, error) {
	var r iperfResult
	if err := json.Unmarshal(raw, &r); err != nil {
		return r, fmt.Errorf("iperf3 JSON: %w", err)
	}
	if r.Error != "" {
		return r, fmt.Errorf("iperf3: %s", r.Error)
	}
	if r.End.SumReceived.Seconds <= 0 {
		return r, errors.New("iperf3 JSON has no end.sum_received")
	}
	return r, nil
}

func iperfError(out []byte) string {
	var r iperfResult
	if json.Unmarshal(out, &r) == nil && r.Error != "" {
		return r.Error
	}
	return strings.TrimSpace(string(out))
}

func refused(out []byte) bool { return strings.Contains(iperfError(out), "refused") }

// Sample is the client-side counters of every path at one instant, T after
// the start of the transfer.
type Sample struct {
	T        time.Duration
	Counters []lab.PathCounters
}

// sampleCounters records path counters every interval until ctx ends.
func sampleCounters(ctx context.Context, topo *lab.Topology, start time.Time, every time.Duration) ([]Sample, error) {
	tk := time.NewTicker(every)
	defer tk.Stop()
	var out []Sample
	for {
		c, err := topo.Counters()
		if err != nil {
			return out, err
		}
		out = append(out, Sample{T: time.Since(start), Counters: c})
		select {
		case <-ctx.Done():
			return out, nil
		case <-tk.C:
		}
	}
}

// Timeline is per-path wire throughput in Mbit/s between consecutive samples.
type Timeline struct {
	T     []float64   // seconds, end of each interval
	Paths [][]float64 // [path][interval]
}

// timeline turns samples into rates; up counts client transmit bytes,
// down client receive bytes.
func timeline(samples []Sample, dir Direction) Timeline {
	var tl Timeline
	if len(samples) < 2 {
		return tl
	}
	tl.Paths = make([][]float64, len(samples[0].Counters))
	for k := 1; k < len(samples); k++ {
		a, b := samples[k-1], samples[k]
		dt := (b.T - a.T).Seconds()
		if dt <= 0 {
			continue
		}
		tl.T = append(tl.T, b.T.Seconds())
		for i := range b.Counters {
			d := b.Counters[i].TxBytes - a.Counters[i].TxBytes
			if dir == Download {
				d = b.Counters[i].RxBytes - a.Counters[i].RxBytes
			}
			tl.Paths[i] = append(tl.Paths[i], float64(d)*8/dt/1e6)
		}
	}
	return tl
}

// shares is each path's fraction of the bytes moved in direction dir.
func shares(samples []Sample, dir Direction) []float64 {
	if len(samples) < 2 {
		return nil
	}
	first, last := samples[0].Counters, samples[len(samples)-1].Counters
	out := make([]float64, len(first))
	var total float64
	for i := range first {
		d := float64(last[i].TxBytes - first[i].TxBytes)
		if dir == Download {
			d = float64(last[i].RxBytes - first[i].RxBytes)
		}
		out[i] = d
		total += d
	}
	if total > 0 {
		for i := range out {
			out[i] /= total
		}
	}
	return out
}

// belowHalf is how long, during the outage [from, to), the total throughput
// stayed below half of what the surviving paths could carry (Mbit/s).
func belowHalf(tl Timeline, from, to time.Duration, survivingMbit float64) time.Duration {
	var below time.Duration
	prev := 0.0
	for k, t := range tl.T {
		start := prev
		prev = t
		if start < from.Seconds() || t > to.Seconds()+1e-9 {
			continue
		}
		var sum float64
		for i := range tl.Paths {
			sum += tl.Paths[i][k]
		}
		if sum < survivingMbit/2 {
			below += time.Duration((t - start) * float64(time.Second))
		}
	}
	return below
}

// retransSegs reads Tcp RetransSegs of a namespace (subflows included).
func retransSegs(ns *lab.NS) (uint64, error) {
	raw, err := ns.ReadProc("snmp")
	if err != nil {
		return 0, err
	}
	return parseSnmpTCP(raw, "RetransSegs")
}

func parseSnmpTCP(raw []byte, field string) (uint64, error) {
	sc := bufio.NewScanner(bytes.NewReader(raw))
	var header []string
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 || f[0] != "Tcp:" {
			continue
		}
		if header == nil {
			header = f
			continue
		}
		for i, h := range header {
			if h == field && i < len(f) {
				v, err := strconv.ParseUint(f[i], 10, 64)
				if err != nil {
					return 0, fmt.Errorf("snmp %s: %w", field, err)
				}
				return v, nil
			}
		}
	}
	return 0, fmt.Errorf("snmp: no Tcp %s", field)
}

// cpuBusy is the machine's busy CPU time (all cores) from /proc/stat.
func cpuBusy() (time.Duration, error) {
	raw, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, fmt.Errorf("read /proc/stat: %w", err)
	}
	return parseProcStat(raw)
}

func parseProcStat(raw []byte) (time.Duration, error) {
	line, _, _ := bytes.Cut(raw, []byte("\n"))
	f := strings.Fields(string(line))
	if len(f) < 6 || f[0] != "cpu" {
		return 0, errors.New("/proc/stat: no cpu line")
	}
	var busy uint64
	for i, s := range f[1:] {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/stat: %w", err)
		}
		// idle and iowait are columns 4 and 5; guest time is already in user.
		if i == 3 || i == 4 || i >= 8 {
			continue
		}
		busy += v
	}
	const userHZ = 100 // USER_HZ is 100 on every Linux ABI Go supports
	return time.Duration(busy) * time.Second / userHZ, nil
}

// selfCPU is this process's CPU time: the emulators and the runner.
func selfCPU() (time.Duration, error) {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0, fmt.Errorf("getrusage: %w", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), nil
}
