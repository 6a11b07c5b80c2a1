package mptcpep

import (
	"net/netip"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"

	"github.com/mptun/mptun/mptcpep/mpkey"
	"github.com/mptun/mptun/netstack/cc"
)

// Diagnostics, and the three views of a subflow, each for its reader:
// sfInfo is what the scheduler samples from gVisor outside the connection
// lock (RTT, cwnd, MSS, free send buffer); PathInfo is what a Scheduler
// sees when it picks; SubflowStats is the exported snapshot for
// Conn.Stats, --stats and mptun status.

// ConnStats describes a connection and its subflows.
type ConnStats struct {
	Local, Remote string
	MPTCP         bool
	LocalToken    uint32
	RemoteToken   uint32
	Checksum      bool
	BytesSent     uint64 // accepted from the application (Write, ReadFrom), not yet necessarily on the wire
	BytesReceived uint64 // delivered by the subflows into the reassembly, duplicates included
	Reinjected    uint64 // bytes sent again on another subflow
	SendBuffered  int    // not yet acknowledged by DATA_ACK
	RecvBuffered  int    // in the reassembly, not yet read
	DataFinSent   bool
	DataFinAcked  bool
	DataFinRecv   bool
	Subflows      []SubflowStats
}

// Stats returns a snapshot of the connection's state.
func (c *Conn) Stats() ConnStats {
	if c.fb != nil {
		// A closed gVisor endpoint has no addresses any more.
		s := ConnStats{}
		if a := c.fb.LocalAddr(); a != nil {
			s.Local = a.String()
		}
		if a := c.fb.RemoteAddr(); a != nil {
			s.Remote = a.String()
		}
		return s
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	s := ConnStats{
		MPTCP: !c.fallback, LocalToken: c.localToken, RemoteToken: c.remoteToken, Checksum: c.csum,
		BytesSent: c.stats.bytesSent, BytesReceived: c.stats.bytesReceived, Reinjected: c.stats.reinjected,
		DataFinSent: c.writeClosed, DataFinAcked: c.finAcked,
	}
	if c.snd != nil {
		s.SendBuffered = c.snd.Len()
	}
	if c.rcv != nil {
		s.RecvBuffered = c.rcv.Buffered()
		_, s.DataFinRecv = c.rcv.FinDSN()
	}
	if len(c.subflows) > 0 {
		s.Local, s.Remote = c.subflows[0].tuple.Local.String(), c.subflows[0].tuple.Remote.String()
	}
	for _, sf := range c.subflows {
		s.Subflows = append(s.Subflows, sf.stats())
	}
	return s
}

// Keys returns the connection's local and remote MPTCP keys (zero for a
// connection that fell back to TCP). Applications bind authentication to
// them so that it cannot be replayed on another connection.
func (c *Conn) Keys() (local, remote mpkey.Key) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fallback || !c.remoteKeyKnown {
		return 0, 0
	}
	return c.localKey, c.remoteKey
}

// sfInfo is what the scheduler knows of a subflow's TCP state, sampled
// from gVisor outside the connection lock.
type sfInfo struct {
	rtt      time.Duration
	cwnd     uint32
	mss      int
	sndFree  int
	retrans  uint64
	state    tcpip.EndpointState
	sampled  time.Time
	sampleOK bool
}

// sample reads the subflow's TCP state from gVisor. It must not run under
// the connection lock: gVisor's endpoint lock may be held by a goroutine
// that waits for it in the option layer.
func (sf *subflow) sample() sfInfo {
	var in sfInfo
	ep := sf.ep
	if ep == nil {
		return in
	}
	var ti tcpip.TCPInfoOption
	if err := ep.GetSockOpt(&ti); err == nil {
		in.rtt = ti.RTT
		in.cwnd = ti.SndCwnd
		in.state = ti.State
		in.sampleOK = true
	}
	queued, err := ep.GetSockOptInt(tcpip.SendQueueSizeOption)
	if err != nil {
		queued = 0
	}
	in.sndFree = int(ep.SocketOptions().GetSendBufferSize()) - queued
	// Until data went out; after small writes only it is low, and the
	// scheduler's floor of 536 grants enough for a full segment to show.
	in.mss = int(sf.maxSeg.Load())
	if in.mss == 0 {
		in.mss = defaultMSS
	}
	if st, ok := ep.Stats().(*tcp.Stats); ok {
		in.retrans = st.SendErrors.Retransmits.Value()
	}
	in.sampled = time.Now()
	return in
}

// pathInfo is what the scheduler sees of sf: its last sample (sf.info)
// and what the connection knows of it. Call with c.mu held.
func (sf *subflow) pathInfo() PathInfo {
	return PathInfo{
		RTT:      sf.info.rtt,
		Cwnd:     sf.info.cwnd,
		MSS:      sf.info.mss,
		Inflight: sf.inflight(),
		SendFree: sf.info.sndFree,
		Backup:   sf.isBackup(),
	}
}

// SubflowStats describes one subflow.
type SubflowStats struct {
	Local, Remote netip.AddrPort
	LocalID       uint8
	RemoteID      uint8
	State         string
	Backup        bool
	RemoteBackup  bool
	Initial       bool
	RTT           time.Duration
	Cwnd          uint32
	BytesSent     uint64
	BytesReceived uint64
	Reinjected    uint64
	Retransmits   uint64
	Stale         bool
	Error         string
	// CC is the report of the congestion controller when it is one of
	// ours (netstack/cc); zero when gVisor's own runs.
	CC cc.Info
}

func (sf *subflow) stats() SubflowStats {
	s := SubflowStats{
		Local: sf.tuple.Local, Remote: sf.tuple.Remote,
		LocalID: sf.localID, RemoteID: sf.remoteID,
		State: sf.state.String(), Backup: sf.backup, RemoteBackup: sf.remoteBackup,
		Initial: sf.initial, RTT: sf.info.rtt, Cwnd: sf.info.cwnd,
		BytesSent: sf.bytesTx, BytesReceived: sf.bytesRx, Reinjected: sf.reinjTx,
		Retransmits: sf.info.retrans, Stale: sf.stale, CC: sf.ccInfo(),
	}
	if sf.err != nil {
		s.Error = sf.err.Error()
	}
	return s
}
