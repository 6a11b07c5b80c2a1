package main

// Shared by the mptun implementations (mptun_engine.go, mptun_tunnel.go):
// they run the mptun binary, never an engine of their own.

import (
	"github.com/mptun/mptun/lab"
)

// implConfig is what the mptun implementations need from the runner.
type implConfig struct {
	// MptunBin is the mptun binary (bin/mptun, built by make build).
	MptunBin string
	// Self is the bench binary, re-executed as the kernel peer (mpsink).
	Self string
	// LogDir keeps the whole stderr of every tunnel daemon (raw/ of the
	// results directory): a crash's full stack trace must survive the run.
	// Empty: a temporary directory.
	LogDir string
	// CCs are the congestion controllers the mptun implementations run
	// with (--cc), one row each; "" is the command's default.
	CCs []string
}

// ccName is the implementation's row name for controller cc: "mptun-engine"
// for the default, "mptun-engine/bbr" for a chosen one.
func ccName(base, cc string) string {
	if cc == "" {
		return base
	}
	return base + "/" + cc
}

// ccArgs is --cc for a chosen controller, nothing for the default.
func ccArgs(cc string) []string {
	if cc == "" {
		return nil
	}
	return []string{"--cc", cc}
}

// mptunExtra is added to the iperf3-compatible JSON of mptun transfers:
// what the kernel counters and iperf3 cannot see.
type mptunExtra struct {
	// Retrans is the retransmitted segments of mptun's subflows (gVisor
	// sends them, so the kernel's RetransSegs never count them).
	Retrans uint64 `json:"retrans"`
	// CPUSeconds is the user+system time of the mptun processes.
	CPUSeconds float64 `json:"cpu_s"`
	// MPTCP is false when the connection fell back to plain TCP.
	MPTCP    bool `json:"mptcp"`
	Subflows int  `json:"subflows"`
	// PeerMPTCP is whether the kernel peer's socket is MPTCP.
	PeerMPTCP bool `json:"peer_mptcp"`
	// PeerMIB is the kernel peer namespace's nonzero MPTcpExt counters.
	PeerMIB string `json:"peer_mib,omitempty"`
	Stats   any    `json:"stats,omitempty"`
	// Samples are mptun's --stats-every lines: per-subflow rate, RTT and
	// cwnd every half second (what showed a subflow stuck below its share).
	Samples []string `json:"samples,omitempty"`
	Stderr  string   `json:"stderr,omitempty"`
}

// uplinkArgs are --uplink flags for the client side of every path: the lab
// paths are on-link, so no gateway is needed.
func uplinkArgs(topo *lab.Topology, n int) []string {
	var out []string
	for _, p := range topo.Paths[:n] {
		out = append(out, "--uplink", p.ClientIf)
	}
	return out
}
