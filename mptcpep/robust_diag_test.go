package mptcpep

import (
	"fmt"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
)

// debugSubflows describes the subflows with gVisor's view of their TCP
// state (recovery state, RTO, cwnd): what diagnosing a stuck subflow needs.
// Set MPTUN_DEBUG_RESUME to log it during TestSubflowLossReinjection.
func debugSubflows(c *Conn) string {
	c.mu.Lock()
	sfs := append([]*subflow(nil), c.subflows...)
	c.mu.Unlock()
	s := ""
	for _, sf := range sfs {
		c.mu.Lock()
		infl, age, st, stale := sf.inflight(), time.Since(sf.lastAckMove), sf.state, sf.stale
		c.mu.Unlock()
		var ti tcpip.TCPInfoOption
		if sf.ep != nil {
			_ = sf.ep.GetSockOpt(&ti)
		}
		in := sf.sample()
		s += fmt.Sprintf("\n   %v %v inflight=%d ackAge=%v stale=%v retrans=%d tcpstate=%v castate=%v rto=%v cwnd=%d ssthresh=%d reorder=%v",
			sf.tuple, st, infl, age.Round(time.Millisecond), stale, in.retrans, ti.State, ti.CcState, ti.RTO, ti.SndCwnd, ti.SndSsthresh, ti.ReorderSeen)
		if ci := sf.ccInfo(); ci.Name != "" {
			s += fmt.Sprintf(" cc=%s/%s pacing=%.1fMbit/s bw=%.1fMbit/s minrtt=%.1fms losses=%d rtos=%d probertts=%d",
				ci.Name, ci.State, float64(ci.PacingRate)*8/1e6, float64(ci.BtlBw)*8/1e6, ci.MinRTT*1e3, ci.LossEvents, ci.RTOs, ci.ProbeRTTs)
		}
	}
	return s
}
