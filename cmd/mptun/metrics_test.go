package main

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/mptun/mptun/bond/client"
)

func TestClientMetrics(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	ln.Close()
	stop, err := serveMetrics(context.Background(), addr, func(w io.Writer) error {
		return writeClientMetrics(w, client.Stats{TCPFlows: 3, TCPActive: 1, AuthRefused: 2},
			map[string]uint64{"ConnsEstablished": 3, "MPJoinSYNTX": 4})
	}, slog.Default())
	require.NoError(t, err)
	t.Cleanup(stop)
	hc := &http.Client{Transport: &http.Transport{Proxy: nil}}
	resp, err := hc.Get("http://" + addr + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	body := string(b)
	for _, want := range []string{
		"# TYPE mptun_client_tcp_flows_total counter\nmptun_client_tcp_flows_total 3\n",
		"mptun_client_auth_refused_total 2\n",
		"# TYPE mptun_client_tcp_active gauge\nmptun_client_tcp_active 1\n",
		`mptun_mptcp_mib_total{counter="ConnsEstablished"} 3` + "\n",
		`mptun_mptcp_mib_total{counter="MPJoinSYNTX"} 4` + "\n",
	} {
		require.True(t, strings.Contains(body, want), "missing %q in\n%s", want, body)
	}
}
