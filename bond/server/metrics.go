package server

import (
	"bufio"
	"fmt"
	"io"
	"sort"
	"strings"
)

// WriteMetrics writes the counters in the Prometheus text exposition
// format (version 0.0.4), followed by mib (the MPTCP engine's counters,
// may be nil) as mptun_mptcp_mib_total{counter="..."}.
func (s *Server) WriteMetrics(w io.Writer, mib map[string]uint64) error {
	bw := bufio.NewWriter(w)
	type metric struct {
		name, typ, help string
		v               int64
	}
	u := func(x uint64) int64 { return int64(x) }
	m := &s.M
	for _, x := range []metric{
		{"mptun_server_accepted_total", "counter", "Connections accepted.", u(m.Accepted.Load())},
		{"mptun_server_auth_failures_total", "counter", "Connections refused for a wrong, missing or unbound authenticator.", u(m.AuthFailures.Load())},
		{"mptun_server_bad_requests_total", "counter", "Connections whose request was malformed, unsupported or late.", u(m.BadRequests.Load())},
		{"mptun_server_refused_destinations_total", "counter", "Requests for destinations refused by policy.", u(m.RefusedDestinations.Load())},
		{"mptun_server_limit_rejected_total", "counter", "Connections refused by a connection limit.", u(m.LimitRejected.Load())},
		{"mptun_server_dial_failures_total", "counter", "Destinations that could not be reached.", u(m.DialFailures.Load())},
		{"mptun_server_tcp_flows_total", "counter", "TCP flows relayed.", u(m.TCPFlows.Load())},
		{"mptun_server_udp_associations_total", "counter", "UDP associations relayed.", u(m.UDPAssociations.Load())},
		{"mptun_server_idle_closed_total", "counter", "Flows closed for idleness.", u(m.IdleClosed.Load())},
		{"mptun_server_udp_datagrams_up_total", "counter", "Datagrams from clients to destinations.", u(m.UDPDatagramsUp.Load())},
		{"mptun_server_udp_datagrams_down_total", "counter", "Datagrams from destinations to clients.", u(m.UDPDatagramsDown.Load())},
		{"mptun_server_bytes_up_total", "counter", "Payload bytes from clients to destinations.", u(m.BytesUp.Load())},
		{"mptun_server_bytes_down_total", "counter", "Payload bytes from destinations to clients.", u(m.BytesDown.Load())},
		{"mptun_server_active_connections", "gauge", "Client connections being served.", m.Active.Load()},
	} {
		fmt.Fprintf(bw, "# HELP %s %s\n# TYPE %s %s\n%s %d\n", x.name, x.help, x.name, x.typ, x.name, x.v)
	}
	if err := WriteMIB(bw, mib); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("server: write metrics: %w", err)
	}
	return nil
}

// WriteMIB writes the MPTCP engine's counters (nil or empty: nothing) as
// mptun_mptcp_mib_total{counter="..."} in the Prometheus text format. The
// client's metrics endpoint writes them the same way.
func WriteMIB(w io.Writer, mib map[string]uint64) error {
	if len(mib) == 0 {
		return nil
	}
	names := make([]string, 0, len(mib))
	for k := range mib {
		names = append(names, k)
	}
	sort.Strings(names)
	if _, err := fmt.Fprintf(w, "# HELP mptun_mptcp_mib_total MPTCP engine counters.\n# TYPE mptun_mptcp_mib_total counter\n"); err != nil {
		return fmt.Errorf("server: write metrics: %w", err)
	}
	for _, k := range names {
		if _, err := fmt.Fprintf(w, "mptun_mptcp_mib_total{counter=\"%s\"} %d\n", labelEscape(k), mib[k]); err != nil {
			return fmt.Errorf("server: write metrics: %w", err)
		}
	}
	return nil
}

func labelEscape(s string) string {
	return strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`).Replace(s)
}
