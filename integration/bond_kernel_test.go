package integration

import (
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestBondKernelConcentrator: `mptun server --kernel` terminates MPTCP with
// the kernel's own sockets, which do not expose the MPTCP keys, so the
// client authenticates with --unbound-auth. Without it the concentrator
// refuses the key-bound tag.
func TestBondKernelConcentrator(t *testing.T) {
	b := bondNewTopo(t, 0)
	srv := b.startServerWith(t, "--kernel", "--log-level", "info")

	t.Run("key-bound tag refused", func(t *testing.T) {
		cl := b.startClient(t, bondClientOpts{})
		_, err := b.dial(t, bondWebV4, bondEchoPort)
		require.Error(t, err, "a kernel-socket concentrator cannot check a key-bound tag")
		exited, _ := cl.stop(syscall.SIGTERM, 10*time.Second)
		require.True(t, exited)
	})
	t.Run("unbound-auth", func(t *testing.T) {
		cl := b.startClient(t, bondClientOpts{extra: []string{"--unbound-auth"}})
		for i := range 3 {
			require.NoError(t, bondEcho(b, bondWebV4, 256<<10, uint32(10+i)), "client: %s\nserver: %s", cl.stderr, srv.stderr)
		}
		st := b.status(t)
		require.NotEmpty(t, st.Uplinks)
	})
}
