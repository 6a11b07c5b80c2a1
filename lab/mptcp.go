package lab

import (
	"context"
	"fmt"
	"strconv"
)

// EnableKernelMPTCP configures the kernel path manager for one subflow per
// path: the client gets a "subflow" endpoint for every path but the first
// (the initial subflow uses path 0), and both ends accept enough subflows.
// Sockets still have to ask for MPTCP (IPPROTO_MPTCP, mptcpize, or Go's
// SetMultipathTCP).
func (t *Topology) EnableKernelMPTCP(ctx context.Context) error {
	n := strconv.Itoa(max(len(t.Paths), 2))
	for _, ns := range []*NS{t.Client, t.Server} {
		if err := ns.WriteSysctl("net/mptcp/enabled", "1"); err != nil {
			return err
		}
		if err := ipCmd(ctx, "-n", ns.Name, "mptcp", "limits", "set", "subflow", n, "add_addr_accepted", n); err != nil {
			return fmt.Errorf("lab: mptcp limits: %w", err)
		}
	}
	for _, p := range t.Paths[1:] {
		if err := ipCmd(ctx, "-n", t.Client.Name, "mptcp", "endpoint", "add", p.ClientAddr.String(), "dev", p.ClientIf, "subflow"); err != nil {
			return fmt.Errorf("lab: mptcp endpoint for path %d: %w", p.Index, err)
		}
	}
	return nil
}
