package linkemu

import (
	"math/rand/v2"
	"time"
)

// Verdict is what the shaper decided for one frame.
type Verdict uint8

// Verdicts of shaper.admit.
const (
	Pass Verdict = iota
	DropLoss
	DropQueue
	DropOutage
)

// shaper holds the per-direction link model. It is pure (time is passed in)
// so that the model can be tested exactly, without sockets or root.
type shaper struct {
	p   Params
	rng *rand.Rand
	// epoch is what outages are relative to; the emulator may move it.
	epoch time.Time

	// Token bucket state as of tbTime: the bucket is evaluated at the
	// departure time of the previous frame, which makes it a virtual-time
	// FIFO and lets us compute each frame's departure on arrival.
	tbTime      time.Time
	tbTokens    float64
	lastDepart  time.Time
	lastDeliver time.Time
}

func newShaper(p Params, epoch time.Time) *shaper {
	p = p.withDefaults()
	return &shaper{
		p:        p,
		rng:      rand.New(rand.NewPCG(p.Seed, p.Seed^0x9e3779b97f4a7c15)),
		epoch:    epoch,
		tbTime:   epoch,
		tbTokens: float64(p.Burst),
	}
}

// down reports whether a scripted outage covers t.
func (s *shaper) down(t time.Time) bool { return downAt(s.p.Outages, s.epoch, t) }

// downAt is shared with the writer goroutine, which must not touch the shaper.
func downAt(outages []Outage, epoch, t time.Time) bool {
	el := t.Sub(epoch)
	for _, o := range outages {
		if el >= o.Start && el < o.Start+o.Duration {
			return true
		}
	}
	return false
}

// admit decides the fate of a frame of size bytes arriving at now and, when
// it passes, the time it must be delivered at.
func (s *shaper) admit(now time.Time, size int) (time.Time, Verdict) {
	if s.down(now) {
		return time.Time{}, DropOutage
	}
	if s.p.Loss > 0 && s.rng.Float64() < s.p.Loss {
		return time.Time{}, DropLoss
	}
	depart := now
	if s.p.Rate > 0 {
		bytesPerSec := float64(s.p.Rate) / 8
		if s.lastDepart.After(now) {
			backlog := s.lastDepart.Sub(now).Seconds() * bytesPerSec
			if int(backlog)+size > s.p.QueueBytes {
				return time.Time{}, DropQueue
			}
		}
		t0 := now
		if s.lastDepart.After(t0) {
			t0 = s.lastDepart
		}
		tokens := min(float64(s.p.Burst), s.tbTokens+t0.Sub(s.tbTime).Seconds()*bytesPerSec)
		depart = t0
		if tokens >= float64(size) {
			tokens -= float64(size)
		} else {
			depart = t0.Add(time.Duration((float64(size) - tokens) / bytesPerSec * float64(time.Second)))
			tokens = 0
		}
		s.tbTime, s.tbTokens, s.lastDepart = depart, tokens, depart
	}
	deliver := depart.Add(s.p.Delay)
	if s.p.Jitter > 0 {
		deliver = deliver.Add(time.Duration((s.rng.Float64()*2 - 1) * float64(s.p.Jitter)))
		if deliver.Before(depart) {
			deliver = depart
		}
	}
	if deliver.Before(s.lastDeliver) {
		deliver = s.lastDeliver // no reordering
	}
	s.lastDeliver = deliver
	return deliver, Pass
}
