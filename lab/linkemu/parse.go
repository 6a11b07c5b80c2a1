package linkemu

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// ParseRate parses a rate in bit/s with an optional k/M/G suffix (powers of
// 1000) and an optional "bit" or "bps" unit: "50M", "1.5Gbit", "800k".
func ParseRate(s string) (uint64, error) {
	v := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSpace(s), "bit"), "bps")
	mult := 1.0
	if v != "" {
		switch v[len(v)-1] {
		case 'k', 'K':
			mult = 1e3
		case 'm', 'M':
			mult = 1e6
		case 'g', 'G':
			mult = 1e9
		}
		if mult != 1 {
			v = v[:len(v)-1]
		}
	}
	f, err := strconv.ParseFloat(v, 64)
	if err != nil {
		return 0, fmt.Errorf("rate %q: %w", s, err)
	}
	r := f * mult
	if r < 0 || r > 1e12 || r != r {
		return 0, fmt.Errorf("rate %q out of range", s)
	}
	return uint64(r), nil
}

// ParseParams parses a comma-separated list of key=value settings, e.g.
// "rate=50M,delay=10ms,jitter=1ms,loss=0.01,queue=100000,burst=3028,
// outage=10s+5s,seed=7". outage may repeat; loss also accepts "1%".
func ParseParams(s string) (Params, error) {
	var p Params
	for field := range strings.SplitSeq(s, ",") {
		field = strings.TrimSpace(field)
		if field == "" {
			continue
		}
		k, v, ok := strings.Cut(field, "=")
		if !ok {
			return Params{}, fmt.Errorf("link setting %q: want key=value", field)
		}
		var err error
		switch k {
		case "rate":
			p.Rate, err = ParseRate(v)
		case "delay":
			p.Delay, err = time.ParseDuration(v)
		case "jitter":
			p.Jitter, err = time.ParseDuration(v)
		case "loss":
			if pct, isPct := strings.CutSuffix(v, "%"); isPct {
				p.Loss, err = strconv.ParseFloat(pct, 64)
				p.Loss /= 100
			} else {
				p.Loss, err = strconv.ParseFloat(v, 64)
			}
		case "queue":
			p.QueueBytes, err = strconv.Atoi(v)
		case "burst":
			p.Burst, err = strconv.Atoi(v)
		case "seed":
			p.Seed, err = strconv.ParseUint(v, 10, 64)
		case "outage":
			var o Outage
			o, err = ParseOutage(v)
			p.Outages = append(p.Outages, o)
		default:
			return Params{}, fmt.Errorf("link setting %q: unknown key %q", field, k)
		}
		if err != nil {
			return Params{}, fmt.Errorf("link setting %q: %w", field, err)
		}
	}
	if err := p.Validate(); err != nil {
		return Params{}, err
	}
	return p, nil
}
