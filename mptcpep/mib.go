package mptcpep

import (
	"reflect"
	"sync/atomic"
)

// MIB counts protocol events and errors of an Endpoint, in the spirit of
// Linux's MPTcpExt counters: they make interop problems visible.
type MIB struct {
	MPCapableSYNTX        atomic.Uint64
	MPCapableSYNRX        atomic.Uint64
	MPCapableSYNACKRX     atomic.Uint64
	MPCapableACKRX        atomic.Uint64
	MPCapableDataRX       atomic.Uint64
	MPCapableFallbackSYN  atomic.Uint64 // peer's SYN had no (usable) MP_CAPABLE
	MPCapableFallbackACK  atomic.Uint64 // SYN/ACK or third ACK without MP_CAPABLE
	MPCapableFallbackData atomic.Uint64 // peer answered data without DSS: fell back after the handshake
	MPCapableBadKey       atomic.Uint64
	MPCapableSYNDrop      atomic.Uint64 // MP_CAPABLE left off a SYN retransmission (two went unanswered): plain TCP
	MPCapableUnsupported  atomic.Uint64 // MP_CAPABLE without H (HMAC-SHA256): plain TCP
	FlowPanics            atomic.Uint64 // a subflow's option handling panicked: its connection was aborted
	CCLossEvents          atomic.Uint64 // our congestion controller saw a subflow enter loss recovery
	CCRTOs                atomic.Uint64 // ... a retransmission timeout
	CCProbeRTTs           atomic.Uint64 // ... BBR drained its queue to measure the min RTT
	CCStartupExits        atomic.Uint64 // ... BBR's Startup found the pipe full
	MPCapableKeyWait      atomic.Uint64 // accepted before the peer's key (its data-carrying MP_CAPABLE lost): waited for it
	MPJoinSYNTX           atomic.Uint64
	MPJoinSYNRX           atomic.Uint64
	MPJoinSYNACKRX        atomic.Uint64
	MPJoinSYNACKHMACFail  atomic.Uint64
	MPJoinACKRX           atomic.Uint64
	MPJoinACKHMACFail     atomic.Uint64
	MPJoinNoTokenFound    atomic.Uint64
	MPJoinRejected        atomic.Uint64 // limits
	JoinsProhibited       atomic.Uint64 // a join the peer refused for good (MP_TCPRST 3, not transient): not retried
	MPJoinEstablished     atomic.Uint64
	DSSRX                 atomic.Uint64
	DSSMappingRX          atomic.Uint64
	DSSMappingConflict    atomic.Uint64
	DSSMappingDropped     atomic.Uint64 // table full or out of window
	DSSNoMapping          atomic.Uint64 // data without a mapping
	DSSNoMappingReset     atomic.Uint64 // ... and its subflow was reset (another one carries on)
	DSSChecksumMissing    atomic.Uint64 // a mapping without the negotiated DSS checksum: subflow reset
	DSSNoMappingTX        atomic.Uint64 // a segment gVisor sent holds bytes without a mapping
	SubflowShortWrites    atomic.Uint64 // gVisor took part of a chunk: the rest is owed to that subflow
	PeerWindowFull        atomic.Uint64 // data waiting, but the peer's connection-level window is full
	RetransAckedTX        atomic.Uint64 // gVisor resent bytes the peer had already acknowledged
	DSSChecksumFail       atomic.Uint64
	DataAckRX             atomic.Uint64
	DataAckInvalid        atomic.Uint64
	DataAckTX             atomic.Uint64 // pure ACKs sent for DATA_ACK updates
	DataFinTX             atomic.Uint64
	DataFinRX             atomic.Uint64
	DupDataBytes          atomic.Uint64
	RxInPlaceReads        atomic.Uint64 // subflow reads placed straight into the reassembly (in order)
	WindowDropBytes       atomic.Uint64
	OFOSegmentDrops       atomic.Uint64
	ReinjectedBytes       atomic.Uint64
	MPTCPRetransmits      atomic.Uint64 // connection-level retransmissions of the DATA_ACK head
	AddAddrRX             atomic.Uint64
	AddAddrTX             atomic.Uint64
	AddAddrEchoRX         atomic.Uint64
	AddAddrHMACFail       atomic.Uint64
	RemoveAddrRX          atomic.Uint64
	RemoveAddrTX          atomic.Uint64
	MPPrioRX              atomic.Uint64
	MPPrioTX              atomic.Uint64
	MPFailRX              atomic.Uint64
	MPFailTX              atomic.Uint64
	MPFailTimeout         atomic.Uint64 // no answer to our MP_FAIL: connection reset
	InfiniteMapTX         atomic.Uint64 // infinite mapping sent (fell back after the peer's MP_FAIL)
	InfiniteMapRX         atomic.Uint64 // infinite mapping received
	MPFastcloseRX         atomic.Uint64
	MPFastcloseTX         atomic.Uint64
	MPRstRX               atomic.Uint64
	MPRstTX               atomic.Uint64
	OptionMalformed       atomic.Uint64
	OptionNoRoom          atomic.Uint64
	FallbackConns         atomic.Uint64
	ConnsEstablished      atomic.Uint64
	SubflowsEstablished   atomic.Uint64
	SubflowsClosed        atomic.Uint64
	SubflowErrors         atomic.Uint64
	TokenCollisions       atomic.Uint64
	PendingSYNDropped     atomic.Uint64
}

// Snapshot returns every counter by name.
func (m *MIB) Snapshot() map[string]uint64 {
	out := make(map[string]uint64)
	v := reflect.ValueOf(m).Elem()
	t := v.Type()
	for i := 0; i < v.NumField(); i++ {
		c, ok := v.Field(i).Addr().Interface().(*atomic.Uint64)
		if ok {
			out[t.Field(i).Name] = c.Load()
		}
	}
	return out
}
