package mptcpep

import (
	"github.com/mptun/mptun/netstack"
	"github.com/mptun/mptun/netstack/cc"
)

var _ netstack.CongestionControlled = (*subflow)(nil)

// CongestionControl implements netstack.CongestionControlled: the
// endpoint's choice for every subflow, counting in its MIB. Called by gVisor
// under the subflow endpoint's lock: reads only the immutable config.
func (sf *subflow) CongestionControl() (string, cc.Events) {
	m := &sf.c.e.MIB
	return sf.c.e.cfg.CongestionControl, cc.Events{LossEvents: &m.CCLossEvents, RTOs: &m.CCRTOs,
		ProbeRTTs: &m.CCProbeRTTs, StartupExits: &m.CCStartupExits}
}

// ControllerCreated implements netstack.CongestionControlled.
func (sf *subflow) ControllerCreated(r cc.Reporter) {
	if r != nil {
		sf.cc.Store(&r)
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
