package main

// The kernel baselines: tcp-pN (single-path TCP) and kernel-mptcp, both
// iperf3 in the lab namespaces.

import (
	"context"
	"strconv"

	"github.com/mptun/mptun/lab"
)

// singlePathTCP is plain kernel TCP over path i alone.
func singlePathTCP(i int) Impl {
	return Impl{
		Name: "tcp-p" + strconv.Itoa(i),
		Transfer: func(ctx context.Context, env Env) ([]byte, error) {
			p := env.Topo.Paths[i]
			return iperf3Transfer(ctx, env, iperf3Opts{Server: p.ServerAddr.String(), Bind: p.ClientAddr.String()})
		},
	}
}

// kernelMPTCP is Linux MPTCP through mptcpize, one subflow endpoint per
// extra path (kernel path manager).
func kernelMPTCP() Impl {
	return Impl{
		Name:  "kernel-mptcp",
		Setup: func(ctx context.Context, topo *lab.Topology) error { return topo.EnableKernelMPTCP(ctx) },
		Transfer: func(ctx context.Context, env Env) ([]byte, error) {
			p := env.Topo.Paths[0]
			return iperf3Transfer(ctx, env, iperf3Opts{
				Server: p.ServerAddr.String(), Bind: p.ClientAddr.String(),
				Wrap: []string{"mptcpize", "run"},
			})
		},
	}
}
