package mptcpep

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// greedy grants every path a full chunk, ignoring its send buffer, so
// gVisor takes only part of most writes.
type greedy struct{}

func (greedy) Pick(paths []PathInfo) (int, int) {
	for i, p := range paths {
		if !p.Backup {
			return i, maxChunk
		}
	}
	return -1, 0
}

// TestShortWritesKeepMappings drives writes that gVisor takes only in
// part: the mapping of such a chunk is on the wire already (gVisor sends
// from inside Write), so the rest must follow on the same subflow at the
// same SSNs. A changed mapping would show as DSSMappingConflict at the
// receiver (Linux resets the subflow for it), lost bytes as a SHA-256
// mismatch.
func TestShortWritesKeepMappings(t *testing.T) {
	for _, tc := range []struct {
		name     string
		paths    []pathSpec
		checksum bool
	}{
		{"one path", []pathSpec{{}}, false},
		{"two paths, checksums", []pathSpec{{}, {delay: 2 * time.Millisecond}}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			cfg := Config{Scheduler: greedy{}, Checksum: tc.checksum}
			w := newWorld(t, tc.paths, cfg, Config{Scheduler: greedy{}})
			cc, sc := dialAccept(t, ctx, w, 80)
			waitSubflows(t, cc, len(tc.paths))
			waitSubflows(t, sc, len(tc.paths))
			// Send buffers smaller than a chunk (and no multiple of it).
			for _, c := range []*Conn{cc, sc} {
				c.mu.Lock()
				for _, sf := range c.subflows {
					sf.ep.SocketOptions().SetSendBufferSize(48<<10+100, false)
				}
				c.mu.Unlock()
			}
			up, down := randomData(16<<20, 3), randomData(16<<20, 4)
			exchange(t, ctx, cc, sc, up, down)
			for _, e := range []*Endpoint{w.client, w.server} {
				require.NotZero(t, e.MIB.SubflowShortWrites.Load(), "the test must produce short writes")
				require.Zero(t, e.MIB.DSSMappingConflict.Load(), mibString(&e.MIB))
				require.Zero(t, e.MIB.DSSNoMapping.Load(), mibString(&e.MIB))
				require.Zero(t, e.MIB.DSSChecksumFail.Load(), mibString(&e.MIB))
			}
		})
	}
}
