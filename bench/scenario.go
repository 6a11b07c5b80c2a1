package main

import (
	"fmt"
	"time"

	"github.com/mptun/mptun/lab"
	"github.com/mptun/mptun/lab/linkemu"
)

// Scenario is one declarative benchmark topology.
type Scenario struct {
	ID    int
	Name  string
	Paths []lab.Path
	// Duration of each transfer.
	Duration time.Duration
	// Timeline asks for a goodput-over-time plot per path.
	Timeline bool
	// MptunAlone are paths `mptun connect` also runs over alone
	// ("mptun-p<i>"): what its subflow congestion control gets from one
	// hard path (the satellite) beside the kernel's single TCP flow.
	MptunAlone []int
}

// pathRate is the sum of the path rates, the ideal multipath goodput.
func (s Scenario) pathRate() float64 {
	var r float64
	for _, p := range s.Paths {
		r += float64(p.Rate)
	}
	return r
}

// unlimited is a scenario of Direct paths only (no emulator, no rate):
// throughput and CPU of the implementations themselves.
func (s Scenario) unlimited() bool {
	for _, p := range s.Paths {
		if !p.Direct {
			return false
		}
	}
	return len(s.Paths) > 0
}

// outage returns the first scripted outage of any path, if any.
func (s Scenario) outage() (path int, o linkemu.Outage, ok bool) {
	for i, p := range s.Paths {
		if len(p.Outages) > 0 {
			return i, p.Outages[0], true
		}
	}
	return 0, linkemu.Outage{}, false
}

func mbit(m float64) uint64 { return uint64(m * 1e6) }

func path(name string, rateMbit float64, delay time.Duration, loss float64) lab.Path {
	return lab.Path{Name: name, Rate: mbit(rateMbit), Delay: delay, Loss: loss}
}

// Scenarios returns the benchmark scenarios for transfers of duration d.
// The failover scenario runs 1.5 d with its first path down from d/2 to d
// (10 s to 20 s of 30 s at the default d = 20 s).
func Scenarios(d time.Duration) []Scenario {
	ms := time.Millisecond
	fail := path("a", 50, 10*ms, 0)
	fail.Outages = []linkemu.Outage{{Start: d / 2, Duration: d / 2}}
	return []Scenario{
		{ID: 1, Name: "two-equal", Duration: d, Paths: []lab.Path{path("a", 50, 10*ms, 0), path("b", 50, 10*ms, 0)}},
		{ID: 2, Name: "wifi-lte", Duration: d, Paths: []lab.Path{path("wifi", 40, 5*ms, 0), path("lte", 20, 40*ms, 0)}},
		{ID: 3, Name: "terrestrial-satellite", Duration: d, Timeline: true, MptunAlone: []int{1}, Paths: []lab.Path{path("terr", 50, 10*ms, 0), path("sat", 20, 300*ms, 0)}},
		{ID: 4, Name: "lossy", Duration: d, Paths: []lab.Path{path("a", 50, 10*ms, 0.01), path("b", 50, 10*ms, 0.01)}},
		{ID: 5, Name: "failover", Duration: d * 3 / 2, Timeline: true, Paths: []lab.Path{fail, path("b", 50, 10*ms, 0)}},
		{ID: 6, Name: "three-unequal", Duration: d, Paths: []lab.Path{path("a", 50, 10*ms, 0), path("b", 20, 20*ms, 0), path("c", 10, 30*ms, 0)}},
		// One plain veth pair, offloads on: what one connection of each
		// implementation can do on this CPU (the emulator would be the limit).
		{ID: 7, Name: "unlimited", Duration: d, Paths: []lab.Path{{Name: "direct", Direct: true}}},
	}
}

func (s Scenario) String() string { return fmt.Sprintf("%d-%s", s.ID, s.Name) }
