package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/mptun/mptun/bond/client"
	"github.com/mptun/mptun/bond/server"
)

// writeClientMetrics writes the client's flow counters and the engine's
// MIB in Prometheus text format.
func writeClientMetrics(w io.Writer, st client.Stats, mib map[string]uint64) error {
	counters := []struct {
		name, help string
		v          uint64
	}{
		{"mptun_client_tcp_flows_total", "TCP flows carried to the concentrator", st.TCPFlows},
		{"mptun_client_tcp_refused_total", "TCP flows the concentrator refused (Error TLV)", st.TCPRefused},
		{"mptun_client_tcp_failed_total", "TCP flows whose upstream failed", st.TCPFailed},
		{"mptun_client_udp_associations_total", "UDP associations opened", st.UDPAssociations},
		{"mptun_client_udp_failed_total", "UDP associations that failed", st.UDPFailed},
		{"mptun_client_quic_rejected_total", "UDP/443 flows refused by the QUIC policy", st.QUICRejected},
		{"mptun_client_auth_refused_total", "flows refused for a wrong key (Error 32)", st.AuthRefused},
		{"mptun_client_bytes_up_total", "payload bytes from applications to the concentrator", st.BytesUp},
		{"mptun_client_bytes_down_total", "payload bytes from the concentrator to applications", st.BytesDown},
	}
	for _, c := range counters {
		if _, err := fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s counter\n%s %d\n", c.name, c.help, c.name, c.name, c.v); err != nil {
			return err
		}
	}
	for _, g := range []struct {
		name string
		v    int64
	}{{"mptun_client_tcp_active", st.TCPActive}, {"mptun_client_udp_active", st.UDPActive}} {
		if _, err := fmt.Fprintf(w, "# TYPE %s gauge\n%s %d\n", g.name, g.name, g.v); err != nil {
			return err
		}
	}
	return server.WriteMIB(w, mib)
}

// serveMetrics serves /metrics on addr, written by write, until the
// returned stop runs. Client and concentrator both use it.
func serveMetrics(ctx context.Context, addr string, write func(io.Writer) error, log *slog.Logger) (stop func(), err error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		if err := write(w); err != nil {
			log.Debug("metrics", "err", err)
		}
	})
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, BaseContext: func(net.Listener) context.Context { return ctx }}
	go func() {
		if err := hs.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server", "err", err)
		}
	}()
	return func() { _ = hs.Close() }, nil
}
