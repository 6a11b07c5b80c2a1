package linkemu

import (
	"math"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestShaperRateIsExact(t *testing.T) {
	tests := []struct {
		name  string
		rate  uint64
		frame int
	}{
		{"50M full frames", 50_000_000, 1514},
		{"20M small frames", 20_000_000, 100},
		{"1G", 1_000_000_000, 1514},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t0 := time.Unix(1000, 0)
			// A queue deep enough that offering everything at t0 drops nothing.
			s := newShaper(Params{Rate: tc.rate, QueueBytes: 1 << 30}, t0)
			const n = 10000
			var last time.Time
			for range n {
				at, v := s.admit(t0, tc.frame)
				require.Equal(t, Pass, v)
				require.False(t, at.Before(last), "frames must leave in order")
				last = at
			}
			// Burst bytes leave at once; the rest at exactly the rate.
			burst := float64(2 * maxFrame)
			want := (float64(n*tc.frame) - burst) * 8 / float64(tc.rate)
			require.InDelta(t, want, last.Sub(t0).Seconds(), want*0.001+float64(tc.frame)*8/float64(tc.rate))
		})
	}
}

func TestShaperQueueBound(t *testing.T) {
	t0 := time.Unix(1000, 0)
	s := newShaper(Params{Rate: 8_000_000, QueueBytes: 10_000, Burst: 1000}, t0)
	passed := 0
	for range 100 {
		if _, v := s.admit(t0, 1000); v == Pass {
			passed++
		} else {
			require.Equal(t, DropQueue, v)
		}
	}
	// One burst frame plus the backlog the queue holds.
	require.InDelta(t, 11, passed, 1)
	// After the queue drained (10 ms at 1 MB/s), frames pass again.
	_, v := s.admit(t0.Add(20*time.Millisecond), 1000)
	require.Equal(t, Pass, v)
}

func TestShaperDelayJitterNoReorder(t *testing.T) {
	t0 := time.Unix(1000, 0)
	s := newShaper(Params{Delay: 10 * time.Millisecond, Jitter: 5 * time.Millisecond}, t0)
	var last time.Time
	var minD, maxD time.Duration = time.Hour, 0
	// Sparse arrivals (wider apart than the jitter range) see the full
	// jitter distribution; dense ones are covered by the order check below.
	for i := range 2000 {
		now := t0.Add(time.Duration(i) * 20 * time.Millisecond)
		at, v := s.admit(now, 100)
		require.Equal(t, Pass, v)
		require.False(t, at.Before(last))
		last = at
		d := at.Sub(now)
		minD, maxD = min(minD, d), max(maxD, d)
	}
	require.GreaterOrEqual(t, minD, 5*time.Millisecond)
	require.Less(t, minD, 6*time.Millisecond)
	require.Greater(t, maxD, 14*time.Millisecond)
	require.LessOrEqual(t, maxD, 15*time.Millisecond)

	s = newShaper(Params{Delay: 10 * time.Millisecond, Jitter: 5 * time.Millisecond}, t0)
	last = time.Time{}
	for i := range 5000 {
		at, _ := s.admit(t0.Add(time.Duration(i)*10*time.Microsecond), 100)
		require.False(t, at.Before(last), "dense frames must not be reordered")
		last = at
	}

	s = newShaper(Params{Delay: 7 * time.Millisecond}, t0)
	at, _ := s.admit(t0.Add(time.Second), 60)
	require.Equal(t, t0.Add(time.Second+7*time.Millisecond), at)
}

func TestShaperLossStatistics(t *testing.T) {
	for _, loss := range []float64{0.01, 0.1, 0.5} {
		s := newShaper(Params{Loss: loss, Seed: 42}, time.Unix(0, 0))
		const n = 100000
		lost := 0
		for range n {
			if _, v := s.admit(time.Unix(1, 0), 100); v == DropLoss {
				lost++
			}
		}
		sd := math.Sqrt(n * loss * (1 - loss))
		require.InDelta(t, n*loss, float64(lost), 5*sd, "loss %v", loss)
	}
}

func TestShaperOutage(t *testing.T) {
	t0 := time.Unix(1000, 0)
	s := newShaper(Params{Outages: []Outage{{Start: time.Second, Duration: 500 * time.Millisecond}}}, t0)
	tests := []struct {
		at   time.Duration
		want Verdict
	}{
		{0, Pass}, {999 * time.Millisecond, Pass}, {time.Second, DropOutage},
		{1499 * time.Millisecond, DropOutage}, {1500 * time.Millisecond, Pass},
	}
	for _, tc := range tests {
		_, v := s.admit(t0.Add(tc.at), 100)
		require.Equal(t, tc.want, v, "at %v", tc.at)
	}
}

func TestParseOutageAndValidate(t *testing.T) {
	tests := []struct {
		in      string
		want    Outage
		wantErr bool
	}{
		{"10s+5s", Outage{10 * time.Second, 5 * time.Second}, false},
		{"0s+250ms", Outage{0, 250 * time.Millisecond}, false},
		{"10s", Outage{}, true},
		{"x+5s", Outage{}, true},
		{"1s+0s", Outage{}, true},
		{"-1s+2s", Outage{}, true},
	}
	for _, tc := range tests {
		got, err := ParseOutage(tc.in)
		if tc.wantErr {
			require.Error(t, err, tc.in)
			continue
		}
		require.NoError(t, err, tc.in)
		require.Equal(t, tc.want, got)
		require.Equal(t, tc.want, mustParse(t, got.String()))
	}
	require.Error(t, Params{Loss: 1.5}.Validate())
	require.Error(t, Params{Delay: time.Millisecond, Jitter: 2 * time.Millisecond}.Validate())
	require.Error(t, Params{Outages: []Outage{{Start: 0}}}.Validate())
	require.NoError(t, Params{Delay: 10 * time.Millisecond, Jitter: time.Millisecond, Loss: 0.01, Rate: 1e6}.Validate())
}

func mustParse(t *testing.T, s string) Outage {
	o, err := ParseOutage(s)
	require.NoError(t, err)
	return o
}

func BenchmarkShaperAdmit(b *testing.B) {
	t0 := time.Unix(1000, 0)
	s := newShaper(Params{Rate: 1e9, Delay: time.Millisecond, Jitter: 100 * time.Microsecond, Loss: 0.01}, t0)
	now := t0
	for b.Loop() {
		now = now.Add(12 * time.Microsecond)
		s.admit(now, 1514)
	}
}
