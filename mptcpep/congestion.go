package mptcpep

import (
	"github.com/mptun/mptun/netstack"
	"github.com/mptun/mptun/netstack/cc"
)

var _ netstack.CongestionControlled = (*subflow)(nil)

// CongestionControl implements netstack.CongestionControlled: the
// endpoint's choice for every subflow, counting in its MIB, coupled within
// the connection. Called by gVisor under the subflow endpoint's lock: reads
// only what is immutable after the connection's creation.
func (sf *subflow) CongestionControl() (string, cc.Options) {
	m := &sf.c.e.MIB
	return sf.c.e.cfg.CongestionControl, cc.Options{
		Events: cc.Events{LossEvents: &m.CCLossEvents, RTOs: &m.CCRTOs, ProbeRTTs: &m.CCProbeRTTs, StartupExits: &m.CCStartupExits},
		Group:  sf.c.ccGroup,
	}
}

// ControllerCreated implements netstack.CongestionControlled.
func (sf *subflow) ControllerCreated(r cc.Reporter) {
	if r != nil {
		sf.cc.Store(&r)
	}
}

// closeController lets the subflow's controller release what it shares
// (its place in the connection's coupling group).
func (sf *subflow) closeController() {
	if r := sf.cc.Load(); r != nil {
		if c, ok := (*r).(cc.Closer); ok {
			c.Close()
		}
	}
}

// ccInfo is the subflow's controller's report, zero when gVisor's own
// controller runs.
func (sf *subflow) ccInfo() cc.Info {
	if r := sf.cc.Load(); r != nil {
		return (*r).Info()
	}
	return cc.Info{}
}
