package mptcpep

import (
	"errors"
	"time"

	"github.com/mptun/mptun/mptcpep/header"
	"github.com/mptun/mptun/mptcpep/mpkey"
	"github.com/mptun/mptun/netstack"
)

// rxOptions holds the MPTCP options of one incoming segment.
type rxOptions struct {
	mpc        header.MPCapable
	hasMPC     bool
	joinSYN    header.MPJoinSYN
	hasJoinSYN bool
	joinSA     header.MPJoinSYNACK
	hasJoinSA  bool
	joinACK    header.MPJoinACK
	hasJoinACK bool
	dss        header.DSS
	hasDSS     bool
	addAddr    header.AddAddr
	hasAddAddr bool
	rmAddr     header.RemoveAddr
	hasRmAddr  bool
	prio       header.MPPrio
	hasPrio    bool
	fail       header.MPFail
	hasFail    bool
	fastclose  header.MPFastclose
	hasFC      bool
	rst        header.MPTCPRst
	hasRst     bool
	wscale     int
}

// parseRx decodes the MPTCP options of a TCP options block. Malformed
// options are counted and ignored, the others still count.
func parseRx(opts []byte, mib *MIB) rxOptions {
	var r rxOptions
	r.wscale = -1
	err := header.WalkTCPOptions(opts, func(kind uint8, raw []byte) error {
		if kind == 3 && len(raw) == 3 { // window scale, needed for the connection-level window
			r.wscale = int(raw[2])
			return nil
		}
		if kind != header.TCPOptionMPTCP {
			return nil
		}
		st, ok := header.SubtypeOf(raw)
		if !ok {
			mib.OptionMalformed.Add(1)
			return nil
		}
		var err error
		switch st {
		case header.SubtypeMPCapable:
			if err = r.mpc.Decode(raw); err == nil {
				// Without H (HMAC-SHA256, the only method v1 defines)
				// the option is invalid and the connection is plain
				// TCP (RFC 8684 3.1). A newer version on a SYN is
				// answered with v1, as Linux does.
				if r.mpc.HMACSHA256 {
					r.hasMPC = true
				} else {
					mib.MPCapableUnsupported.Add(1)
				}
			}
		case header.SubtypeMPJoin:
			switch raw[1] {
			case header.MPJoinSYNLen:
				if err = r.joinSYN.Decode(raw); err == nil {
					r.hasJoinSYN = true
				}
			case header.MPJoinSYNACKLen:
				if err = r.joinSA.Decode(raw); err == nil {
					r.hasJoinSA = true
				}
			case header.MPJoinACKLen:
				if err = r.joinACK.Decode(raw); err == nil {
					r.hasJoinACK = true
				}
			default:
				err = header.ErrBadLength
			}
		case header.SubtypeDSS:
			if err = r.dss.Decode(raw); err == nil {
				r.hasDSS = true
			}
		case header.SubtypeAddAddr:
			if err = r.addAddr.Decode(raw); err == nil {
				r.hasAddAddr = true
			}
		case header.SubtypeRemoveAddr:
			if err = r.rmAddr.Decode(raw); err == nil {
				r.hasRmAddr = true
			}
		case header.SubtypeMPPrio:
			if err = r.prio.Decode(raw); err == nil {
				r.hasPrio = true
			}
		case header.SubtypeMPFail:
			if err = r.fail.Decode(raw); err == nil {
				r.hasFail = true
			}
		case header.SubtypeMPFastclose:
			if err = r.fastclose.Decode(raw); err == nil {
				r.hasFC = true
			}
		case header.SubtypeMPTCPRst:
			if err = r.rst.Decode(raw); err == nil {
				r.hasRst = true
			}
		default:
			err = header.ErrUnknownSubtype
		}
		if err != nil {
			mib.OptionMalformed.Add(1)
		}
		return nil
	})
	if err != nil {
		mib.OptionMalformed.Add(1)
	}
	return r
}

// Outgoing implements netstack.Flow: it writes the MPTCP options of a
// segment gVisor sends on this subflow.
func (sf *subflow) Outgoing(seg *netstack.Segment, opt []byte) (int, int) {
	c := sf.c
	mib := &c.e.MIB
	c.mu.Lock()
	defer c.mu.Unlock()
	if seg.RST() {
		if sf.resetReason() >= 0 && len(opt) >= header.MPTCPRstLen {
			mib.MPRstTX.Add(1)
			return header.MPTCPRst{Reason: uint8(sf.resetReason())}.Encode(opt), 0
		}
		return 0, 0
	}
	if c.fail.txInf && !seg.SYN() && seg.PayloadLen > 0 && sf.issKnown {
		// The infinite mapping we owe after the peer's MP_FAIL.
		if n, cover, ok := sf.infiniteMapOutLocked(seg, seg.Seq-sf.iss, opt); ok {
			return n, cover
		}
	}
	// Bytes before the infinite mapping (gVisor retransmitting a segment
	// sent earlier) keep their own mapping: sent bare, a data segment
	// overtook the infinite mapping and Linux fell back on "data without
	// DSS" instead (DssFallback, TestInteropMPFail/mptun-sends, ~1 run in
	// 10 here).
	if c.fallback && !sf.beforeInfiniteLocked(seg) {
		return 0, 0
	}
	if seg.SYN() {
		sf.iss, sf.issKnown = seg.Seq, true
		var o header.Option
		switch {
		case !seg.ACK() && sf.initial:
			// Outgoing may be asked twice about one SYN (AddHeader,
			// then WritePackets); retransmissions are an RTO (1 s at
			// first) apart.
			if now := time.Now(); sf.synTries == 0 || now.Sub(sf.synAt) > 100*time.Millisecond {
				sf.synTries, sf.synAt = sf.synTries+1, now
			}
			if sf.synTries > maxMPCapableSYNs {
				// Two SYNs with MP_CAPABLE went unanswered: a middlebox
				// may drop them. The next goes as plain TCP, as Linux
				// does (mptcp_active_detect_blackhole).
				mib.MPCapableSYNDrop.Add(1)
				c.fallback = true
				return 0, 0
			}
			mib.MPCapableSYNTX.Add(1)
			o = header.MPCapable{Version: 1, HMACSHA256: true, ChecksumRequired: c.e.cfg.Checksum}
		case !seg.ACK():
			mib.MPJoinSYNTX.Add(1)
			o = header.MPJoinSYN{Backup: sf.backup, AddrID: sf.localID, Token: c.remoteToken, Nonce: sf.localNonce}
		case sf.initial:
			o = header.MPCapable{Version: 1, HMACSHA256: true, ChecksumRequired: c.csum, NumKeys: 1, SenderKey: uint64(c.localKey),
				NoMoreSubflows: c.e.cfg.DenyJoinInitialAddr}
		default:
			o = header.MPJoinSYNACK{Backup: sf.backup, AddrID: sf.localID, Nonce: sf.localNonce,
				HMAC: mpkey.JoinSYNACKHMAC(c.localKey, c.remoteKey, sf.localNonce, sf.remoteNonce)}
		}
		if o.Len() > len(opt) {
			mib.OptionNoRoom.Add(1)
			return 0, 0
		}
		return o.Encode(opt), 0
	}
	if !sf.issKnown {
		return 0, 0
	}
	rel := seg.Seq - sf.iss
	// A joining initiator's third ACK carries the full HMAC; the subflow
	// carries no data before the peer's fourth ACK.
	if !sf.initial && sf.active && sf.state == sfPreEstablished {
		if seg.PayloadLen == 0 {
			sf.joinAckSent = true
			sf.joinAckAt = time.Now()
			o := header.MPJoinACK{HMAC: mpkey.JoinACKHMAC(c.localKey, c.remoteKey, sf.localNonce, sf.remoteNonce)}
			return o.Encode(opt), 0
		}
	}
	// The initiator repeats its keys until the peer's DSS proves it got
	// them: on pure ACKs, and as the data-carrying MP_CAPABLE on the first
	// data segment (a DSS there makes Linux fall back).
	if sf.initial && sf.active && !c.peerConfirmed {
		if seg.PayloadLen == 0 {
			o := header.MPCapable{Version: 1, HMACSHA256: true, ChecksumRequired: c.csum, NumKeys: 2,
				SenderKey: uint64(c.localKey), ReceiverKey: uint64(c.remoteKey)}
			return o.Encode(opt), 0
		}
		if rel == 1 {
			if m, ok := sf.tx.Find(1); ok && m.SSN == 1 {
				sf.tx.Seal(1)
				o := header.MPCapable{Version: 1, HMACSHA256: true, ChecksumRequired: c.csum, NumKeys: 2,
					SenderKey: uint64(c.localKey), ReceiverKey: uint64(c.remoteKey),
					HasDataLen: true, DataLen: uint16(m.Len)}
				if c.csum {
					o.HasChecksum = true
					o.Checksum = header.MPCapableChecksum(c.localIDSN, uint16(m.Len), m.Sum)
				}
				if o.Len() <= len(opt) {
					return o.Encode(opt), min(seg.PayloadLen, m.Len)
				}
			}
		}
	}
	// No DATA_ACK before the peer's key: a passive subflow whose third
	// ACK was lost acknowledges TCP data before it knows the peer's IDSN.
	d := header.DSS{HasDataAck: c.rcv != nil, DataAck64: true}
	if c.rcv != nil {
		d.DataAck = c.rcv.RcvNxt()
	}
	cover := 0
	if seg.PayloadLen > 0 {
		if n := int32(min(seg.PayloadLen, maxSegLen)); n > sf.maxSeg.Load() {
			sf.maxSeg.Store(n) // only this goroutine (under c.mu) writes it
		}
		if m, ok := sf.tx.Find(rel); ok {
			sf.tx.Seal(rel)
			d.HasMapping, d.DSN64, d.DSN, d.SSN, d.DataLen = true, true, m.DSN, m.SSN, uint16(m.Len)
			if c.csum {
				d.HasChecksum = true
				d.Checksum = header.DSSChecksum(m.DSN, m.SSN, uint16(m.Len), m.Sum)
			}
			cover = min(seg.PayloadLen, int(m.SSN+uint32(m.Len)-rel))
		} else if ssnLT(rel, sf.acked) {
			// gVisor retransmitted bytes whose ACK we saw first: the
			// peer has them, no mapping needed.
			mib.RetransAckedTX.Add(1)
		} else {
			mib.DSSNoMappingTX.Add(1)
		}
	}
	if d.Len() > len(opt) {
		d.DataAck64 = false
	}
	if d.Len() > len(opt) {
		d.DSN64 = false
	}
	if d.Len() > len(opt) {
		d.HasDataAck = false
	}
	if d.Len() > len(opt) {
		mib.OptionNoRoom.Add(1)
		return 0, 0
	}
	if !d.HasDataAck && !d.HasMapping {
		return 0, cover
	}
	if d.HasDataAck {
		c.lastDataAckTx = d.DataAck
	}
	return d.Encode(opt), cover
}

// maxMPCapableSYNs is how many SYNs of a connection carry MP_CAPABLE.
const maxMPCapableSYNs = 2

// errChecksumMissing ends a subflow that sent a mapping without the DSS
// checksum the connection requires.
const errChecksumMissing = errString("mptcp: DSS mapping without the required checksum")

// Incoming implements netstack.Flow: it reads the MPTCP options of a
// segment that arrived on this subflow before gVisor processes it.
func (sf *subflow) Incoming(seg *netstack.Segment) bool {
	c := sf.c
	mib := &c.e.MIB
	r := parseRx(seg.Options, mib)
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	if r.hasRst {
		mib.MPRstRX.Add(1)
		sf.rstReason, sf.rstTransient = int(r.rst.Reason), r.rst.Transient
	}
	if r.hasFC {
		mib.MPFastcloseRX.Add(1)
		if mpkey.Key(r.fastclose.ReceiverKey) == c.localKey {
			c.fastclosedLocked()
		}
	}
	if seg.RST() {
		if r.hasFail && !c.infinite {
			// Linux resets a subflow with MP_FAIL on the RST when
			// another subflow carries on.
			mib.MPFailRX.Add(1)
			c.mpFailInLocked(sf, r.fail.DSN)
		}
		return true
	}
	if c.infinite {
		if r.hasFail {
			mib.MPFailRX.Add(1) // an echo behind the infinite mapping
		}
		c.infiniteAckLocked(sf, seg)
		return true
	}
	if c.fallback {
		return true
	}
	if seg.SYN() && seg.ACK() {
		return sf.synAckIn(seg, &r)
	}
	if seg.SYN() {
		return true // a retransmitted SYN; the acceptor saw the first
	}
	if seg.ACK() && sf.issKnown {
		rel := seg.Ack - sf.iss
		if ssnLT(sf.acked, rel) {
			sf.acked = rel
			sf.tx.Ack(rel)
			sf.lastAckMove = now
			if sf.stale {
				sf.stale = false
			}
			if c.hasPendingData() {
				c.kickLocked()
			}
		}
	}
	// A peer that answers our data without any DSS fell back to TCP (RFC
	// 8684 3.7): a middlebox stripped the options of our third ACK, say.
	if sf.initial && sf.active && !c.peerConfirmed && !r.hasDSS && !r.hasMPC && sf.issKnown &&
		sf.state == sfEstablished && (seg.PayloadLen > 0 || ssnLT(1, seg.Ack-sf.iss)) {
		if c.fallBackLocked(sf) {
			c.infiniteAckLocked(sf, seg)
			return true
		}
	}
	switch {
	case sf.state == sfSynRcvd && sf.initial:
		// The third ACK of the MP_CAPABLE handshake (or the first data).
		if r.hasMPC && r.mpc.NumKeys == 2 {
			if mpkey.Key(r.mpc.ReceiverKey) != c.localKey {
				mib.MPCapableBadKey.Add(1)
				return false
			}
			c.setRemoteKeyLocked(mpkey.Key(r.mpc.SenderKey))
			c.csum = c.csum || r.mpc.ChecksumRequired
			sf.state = sfEstablished
			mib.MPCapableACKRX.Add(1)
			if r.mpc.HasDataLen && r.mpc.DataLen > 0 {
				mib.MPCapableDataRX.Add(1)
				c.peerConfirmed = true
				sf.addRxMapping(rxMapping{SSN: 1, DSN: c.remoteIDSN + 1, Len: int(r.mpc.DataLen),
					HasCsum: r.mpc.HasChecksum, Checksum: r.mpc.Checksum})
			}
			c.keyArrivedLocked(sf, seg)
		} else if c.remoteKeyKnown {
			sf.state = sfEstablished
		}
		// A DSS without the key (later data overtook the lost
		// data-carrying MP_CAPABLE) leaves the subflow waiting for it:
		// without the key no DSN can be placed, and no DATA_ACK sent.
	case sf.state == sfSynRcvd && !sf.initial:
		if !r.hasJoinACK {
			mib.MPJoinRejected.Add(1)
			c.resetSubflowLocked(sf, header.RstReasonMPTCPError, seg)
			return false
		}
		mib.MPJoinACKRX.Add(1)
		want := mpkey.JoinACKHMAC(c.remoteKey, c.localKey, sf.remoteNonce, sf.localNonce)
		if want != r.joinACK.HMAC {
			mib.MPJoinACKHMACFail.Add(1)
			c.resetSubflowLocked(sf, header.RstReasonMPTCPError, seg)
			return false
		}
		sf.state = sfEstablished
		sf.needAck = true // the fourth ACK
		mib.MPJoinEstablished.Add(1)
		mib.SubflowsEstablished.Add(1)
		c.kickLocked()
	case sf.state == sfPreEstablished && sf.active && sf.joinAckSent:
		// Any ACK after our third ACK is the peer's fourth ACK.
		sf.state = sfEstablished
		mib.MPJoinEstablished.Add(1)
		mib.SubflowsEstablished.Add(1)
		c.kickLocked()
	case sf.state == sfSynSent && sf.initial:
		sf.state = sfEstablished
	}
	if r.hasMPC && r.mpc.NumKeys == 2 && r.mpc.HasDataLen && sf.initial && !sf.active && sf.rx.Len() == 0 && sf.readSSN == 1 && r.mpc.DataLen > 0 {
		// A retransmitted data-carrying MP_CAPABLE.
		sf.addRxMapping(rxMapping{SSN: 1, DSN: c.remoteIDSN + 1, Len: int(r.mpc.DataLen), HasCsum: r.mpc.HasChecksum, Checksum: r.mpc.Checksum})
	}
	if r.hasDSS && c.csum && c.remoteKeyKnown && !c.infinite && r.dss.HasMapping && r.dss.DataLen > 0 && !r.dss.HasChecksum {
		// The connection negotiated DSS checksums (RFC 8684 3.3): a
		// mapping without one is a protocol error, as in Linux.
		mib.DSSChecksumMissing.Add(1)
		c.abortSubflowLocked(sf, rstOption(header.RstReasonMPTCPError, false), errChecksumMissing)
		return false
	}
	if r.hasDSS {
		c.dssInLocked(sf, seg, &r.dss)
	}
	if r.hasAddAddr {
		c.addAddrInLocked(sf, &r.addAddr)
	}
	if r.hasRmAddr {
		mib.RemoveAddrRX.Add(1)
		c.removeAddrInLocked(r.rmAddr.AddrIDs)
	}
	if r.hasPrio {
		mib.MPPrioRX.Add(1)
		sf.remoteBackup = r.prio.Backup
		c.kickLocked()
	}
	if r.hasFail {
		mib.MPFailRX.Add(1)
		c.mpFailInLocked(sf, r.fail.DSN)
	}
	return true
}

// synAckIn handles the SYN/ACK answering our SYN.
func (sf *subflow) synAckIn(seg *netstack.Segment, r *rxOptions) bool {
	c := sf.c
	mib := &c.e.MIB
	sf.irs, sf.irsKnown = seg.Seq, true
	if r.wscale >= 0 {
		sf.peerWScale = uint8(min(r.wscale, 14))
	}
	if sf.initial {
		if !r.hasMPC || r.mpc.NumKeys != 1 {
			mib.MPCapableFallbackACK.Add(1)
			c.fallback = true
			return true
		}
		mib.MPCapableSYNACKRX.Add(1)
		if r.mpc.NoMoreSubflows {
			// C flag: the peer takes no joins to this address and port.
			ra := c.remoteAddrs[0]
			ra.noJoin = true
			c.remoteAddrs[0] = ra
		}
		c.setRemoteKeyLocked(mpkey.Key(r.mpc.SenderKey))
		c.csum = c.e.cfg.Checksum || r.mpc.ChecksumRequired
		sf.state = sfEstablished
		return true
	}
	if !r.hasJoinSA {
		mib.MPJoinRejected.Add(1)
		c.resetSubflowLocked(sf, header.RstReasonMPTCPError, seg)
		return false
	}
	mib.MPJoinSYNACKRX.Add(1)
	want := mpkey.JoinSYNACKHMAC(c.remoteKey, c.localKey, r.joinSA.Nonce, sf.localNonce)
	if want != r.joinSA.HMAC {
		mib.MPJoinSYNACKHMACFail.Add(1)
		c.resetSubflowLocked(sf, header.RstReasonMPTCPError, seg)
		return false
	}
	sf.remoteNonce = r.joinSA.Nonce
	sf.remoteID = r.joinSA.AddrID
	sf.remoteBackup = r.joinSA.Backup
	sf.state = sfPreEstablished
	return true
}

// addRxMapping records a mapping announced by the peer, counting problems.
func (sf *subflow) addRxMapping(m rxMapping) {
	mib := &sf.c.e.MIB
	if ssnLT(m.SSN+uint32(m.Len), sf.readSSN) || m.Len == 0 {
		return // already consumed: a retransmission
	}
	// A mapping far outside the connection window is bogus.
	c := sf.c
	lo := c.rcv.RcvNxt()
	if d := dsnDiff(m.DSN, lo); d > int64(c.rcvWindow())+(1<<20) || d < -(1<<31) {
		mib.DSSMappingDropped.Add(1)
		return
	}
	if err := sf.rx.Add(m); err != nil {
		switch {
		case errors.Is(err, ErrMappingConflict):
			mib.DSSMappingConflict.Add(1)
		default:
			mib.DSSMappingDropped.Add(1)
		}
		return
	}
	mib.DSSMappingRX.Add(1)
}

func (sf *subflow) resetReason() int {
	if sf.err != nil {
		return header.RstReasonMPTCPError
	}
	return -1
}
