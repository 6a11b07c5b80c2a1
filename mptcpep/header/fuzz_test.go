package header

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// roundTrip checks that a parsed option re-encodes to bytes that parse to
// the same value.
func roundTrip(t *testing.T, o Option) {
	t.Helper()
	b := make([]byte, 64)
	n := o.Encode(b)
	require.Equal(t, o.Len(), n, "%#v", o)
	again, err := Parse(b[:n])
	require.NoError(t, err, "re-encoded %#v as % x", o, b[:n])
	require.Equal(t, o, again)
}

func FuzzParse(f *testing.F) {
	for _, o := range allVariants() {
		b := make([]byte, o.Len())
		o.Encode(b)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		o, err := Parse(b)
		if err != nil {
			require.Nil(t, o)
			return
		}
		roundTrip(t, o)
	})
}

func FuzzWalkTCPOptions(f *testing.F) {
	f.Add([]byte{2, 4, 5, 0xb4, 1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2, 30, 8, 0x20, 0x01, 0, 0, 0, 9})
	f.Add([]byte{1, 1, 30, 3, 0x51, 30, 4, 0x90, 0, 0})
	f.Add([]byte{30, 12, 0x10, 0x01, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4})
	f.Fuzz(func(t *testing.T, opts []byte) {
		var mptcp [][]byte
		werr := WalkTCPOptions(opts, func(kind uint8, raw []byte) error {
			require.GreaterOrEqual(t, len(raw), 2)
			require.Equal(t, kind, raw[0])
			require.Equal(t, int(raw[1]), len(raw))
			if kind == TCPOptionMPTCP {
				mptcp = append(mptcp, raw)
			}
			return nil
		})
		parsed, err := ParseMPTCP(opts)
		if werr != nil {
			require.ErrorIs(t, err, ErrMalformedOptions)
		}
		good := 0
		for _, raw := range mptcp {
			if o, err := Parse(raw); err == nil {
				require.Equal(t, o, parsed[good])
				good++
			}
		}
		require.Len(t, parsed, good)
		for _, o := range parsed {
			roundTrip(t, o)
		}
	})
}
