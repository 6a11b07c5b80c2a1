// Package linkemu is a userspace link emulator: it forwards Ethernet frames
// between two interfaces through AF_PACKET sockets and applies, per
// direction, delay, jitter, random loss, a token-bucket rate limit with a
// bounded queue, and scripted outages. It exists because the machines this
// project benchmarks on have no tc netem.
package linkemu

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

// Outage takes a direction down from Start (relative to Emulator.Run) for
// Duration: every frame that arrives or is due for delivery meanwhile is dropped.
type Outage struct {
	Start    time.Duration
	Duration time.Duration
}

// ParseOutage parses "START+DURATION", e.g. "10s+5s".
func ParseOutage(s string) (Outage, error) {
	start, dur, ok := strings.Cut(s, "+")
	if !ok {
		return Outage{}, fmt.Errorf("outage %q: want START+DURATION, e.g. 10s+5s", s)
	}
	st, err := time.ParseDuration(start)
	if err != nil {
		return Outage{}, fmt.Errorf("outage %q start: %w", s, err)
	}
	d, err := time.ParseDuration(dur)
	if err != nil {
		return Outage{}, fmt.Errorf("outage %q duration: %w", s, err)
	}
	o := Outage{Start: st, Duration: d}
	if st < 0 || d <= 0 {
		return Outage{}, fmt.Errorf("outage %q: start must be >= 0 and duration > 0", s)
	}
	return o, nil
}

func (o Outage) String() string { return o.Start.String() + "+" + o.Duration.String() }

// Params describe one direction of a link. The zero value is a perfect link.
type Params struct {
	// Delay is the one-way propagation delay added to every frame.
	Delay time.Duration
	// Jitter adds a uniform random delay in [-Jitter, +Jitter]; frames are
	// never reordered (a frame leaves no earlier than its predecessor).
	Jitter time.Duration
	// Loss is the probability in [0,1] that a frame is dropped.
	Loss float64
	// Rate is the link rate in bit/s of Ethernet frame bytes; 0 is unlimited.
	Rate uint64
	// Burst is the token bucket depth in bytes (default two full frames).
	Burst int
	// QueueBytes bounds the bytes waiting for the rate limiter (tail drop).
	// Default: 50 ms at Rate, at least 64 KiB.
	QueueBytes int
	// Outages are scripted down periods.
	Outages []Outage
	// Seed makes the loss and jitter sequences reproducible (0: fixed default).
	Seed uint64
}

// Validate reports parameters the emulator cannot honour.
func (p Params) Validate() error {
	var errs []error
	if p.Delay < 0 || p.Jitter < 0 {
		errs = append(errs, errors.New("delay and jitter must be >= 0"))
	}
	if p.Jitter > p.Delay {
		errs = append(errs, fmt.Errorf("jitter %v larger than delay %v", p.Jitter, p.Delay))
	}
	if !(p.Loss >= 0 && p.Loss <= 1) { // also rejects NaN
		errs = append(errs, fmt.Errorf("loss %v outside [0,1]", p.Loss))
	}
	if p.Burst < 0 || p.QueueBytes < 0 {
		errs = append(errs, errors.New("burst and queue must be >= 0"))
	}
	for _, o := range p.Outages {
		if o.Start < 0 || o.Duration <= 0 {
			errs = append(errs, fmt.Errorf("outage %v: start must be >= 0 and duration > 0", o))
		}
	}
	return errors.Join(errs...)
}

const maxFrame = 1514

func (p Params) withDefaults() Params {
	if p.Burst == 0 {
		p.Burst = 2 * maxFrame
	}
	if p.QueueBytes == 0 && p.Rate > 0 {
		p.QueueBytes = max(64<<10, int(p.Rate/8/20))
	}
	if p.Seed == 0 {
		p.Seed = 0x6d746c // "mtl"
	}
	return p
}
