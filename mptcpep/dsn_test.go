package mptcpep

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestExpandDSN32(t *testing.T) {
	tests := []struct {
		name string
		v    uint32
		near uint64
		want uint64
	}{
		{"same", 0x1234, 0x5_0000_1234, 0x5_0000_1234},
		{"slightly ahead", 0x2000, 0x5_0000_1000, 0x5_0000_2000},
		{"slightly behind", 0x1000, 0x5_0000_2000, 0x5_0000_1000},
		{"ahead across 32-bit wrap", 0x10, 0x5_ffff_fff0, 0x6_0000_0010},
		{"behind across 32-bit wrap", 0xffff_fff0, 0x6_0000_0010, 0x5_ffff_fff0},
		{"ahead across 64-bit wrap", 0x5, math.MaxUint64 - 2, 5},
		{"behind across 64-bit wrap", 0xffff_fffe, 3, math.MaxUint64 - 1},
		{"max forward distance", 0x7fff_ffff, 0x1_0000_0000, 0x1_7fff_ffff},
		{"tie resolves down", 0x8000_0000, 0x1_0000_0000, 0x8000_0000},
		{"zero near", 0, 0, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.Equal(t, tt.want, expandDSN32(tt.v, tt.near))
		})
	}
}

func TestExpandDSN32Property(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for range 100000 {
		near := rng.Uint64()
		// Any DSN within (-2^31, 2^31) of near is recovered exactly.
		delta := int64(rng.Int32())
		if rng.IntN(2) == 0 {
			delta = -delta
		}
		if delta == math.MinInt32 {
			continue
		}
		want := near + uint64(delta)
		require.Equal(t, want, expandDSN32(uint32(want), near), "near %#x delta %d", near, delta)
	}
}

func TestSeqCompare(t *testing.T) {
	tests := []struct {
		name      string
		a, b      uint64
		lt, leq   bool
		diff      int64
		ssnA      uint32
		ssnB      uint32
		ssnLT     bool
		ssnLEQRes bool
	}{
		{"less", 1, 2, true, true, -1, 1, 2, true, true},
		{"equal", 7, 7, false, true, 0, 7, 7, false, true},
		{"greater", 9, 2, false, false, 7, 9, 2, false, false},
		{"wrapped less", math.MaxUint64, 0, true, true, -1, math.MaxUint32, 0, true, true},
		{"wrapped greater", 1, math.MaxUint64 - 1, false, false, 3, 1, math.MaxUint32 - 1, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.Equal(t, tt.lt, dsnLT(tt.a, tt.b))
			require.Equal(t, tt.leq, dsnLEQ(tt.a, tt.b))
			require.Equal(t, tt.diff, dsnDiff(tt.a, tt.b))
			require.Equal(t, tt.ssnLT, ssnLT(tt.ssnA, tt.ssnB))
			require.Equal(t, tt.ssnLEQRes, ssnLEQ(tt.ssnA, tt.ssnB))
		})
	}
}
