package linkemu

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestParseParams(t *testing.T) {
	tests := []struct {
		in      string
		want    Params
		wantErr bool
	}{
		{"", Params{}, false},
		{"rate=50M,delay=10ms", Params{Rate: 50_000_000, Delay: 10 * time.Millisecond}, false},
		{"rate=1.5Gbit, loss=1%, jitter=0s", Params{Rate: 1_500_000_000, Loss: 0.01}, false},
		{"loss=0.25,queue=1000,burst=3000,seed=9", Params{Loss: 0.25, QueueBytes: 1000, Burst: 3000, Seed: 9}, false},
		{"outage=10s+5s,outage=20s+1s", Params{Outages: []Outage{{10 * time.Second, 5 * time.Second}, {20 * time.Second, time.Second}}}, false},
		{"rate=800k", Params{Rate: 800_000}, false},
		{"rate=fast", Params{}, true},
		{"rate=-1M", Params{}, true},
		{"delay", Params{}, true},
		{"colour=red", Params{}, true},
		{"loss=2", Params{}, true},
		{"delay=1ms,jitter=2ms", Params{}, true},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseParams(tc.in)
			if tc.wantErr {
				require.Error(t, err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.want, got)
		})
	}
}

// FuzzParseParams checks that any accepted setting string yields valid
// parameters and never panics.
func FuzzParseParams(f *testing.F) {
	for _, s := range []string{"rate=50M,delay=10ms,loss=1%", "outage=1s+2s", "jitter=1ms,delay=2ms", "rate=1e3k", "loss=NaN"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseParams(s)
		if err != nil {
			return
		}
		require.NoError(t, p.Validate())
		require.False(t, p.Loss != p.Loss, "NaN loss accepted")
	})
}
