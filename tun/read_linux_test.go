package tun

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// TestReadChecksums: the reader hands packets to the stack with their
// checksums verified (by GRO or by the endpoint), unless trusted.
func TestReadChecksums(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		gro       bool
		trust     bool
		corrupt   bool
		delivered bool
	}{
		{"valid", false, false, false, true},
		{"valid gro", true, false, false, true},
		{"corrupt dropped", false, false, true, false},
		{"corrupt dropped by gro path", true, false, true, false},
		{"corrupt passes when trusted", false, true, true, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dev, peer := newFakeDev(t)
			ep, err := NewEndpoint(dev, Options{GRO: tc.gro, TrustRXChecksums: tc.trust})
			require.NoError(t, err)
			t.Cleanup(func() { _ = ep.Close() })
			require.False(t, ep.Offload())
			rec := newRecorder()
			ep.Attach(rec)

			bad := buildPacket(t, false, header.TCPProtocolNumber, []byte("payload"))
			if tc.corrupt {
				bad[len(bad)-1] ^= 1
			}
			good := buildPacket(t, true, header.UDPProtocolNumber, []byte("marker"))
			_, err = peer.Write(bad)
			require.NoError(t, err)
			_, err = peer.Write(good)
			require.NoError(t, err)

			want := 1
			if tc.delivered {
				want = 2
			}
			pkts := rec.wait(t, want)
			require.Len(t, pkts, want)
			require.Equal(t, good, pkts[len(pkts)-1])
			if tc.delivered {
				require.Equal(t, bad, pkts[0])
			}
			// Counters are updated after the batch was delivered.
			require.Eventually(t, func() bool { return ep.Stats().PacketsIn == 2 }, 5*time.Second, time.Millisecond)
			st := ep.Stats()
			require.Equal(t, uint64(len(bad)+len(good)), st.BytesIn)
			if tc.corrupt && !tc.trust {
				require.Equal(t, uint64(1), st.ChecksumErrors)
			} else {
				require.Zero(t, st.ChecksumErrors)
			}
		})
	}
}
