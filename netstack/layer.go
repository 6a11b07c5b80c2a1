package netstack

import (
	"fmt"
	"sync"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/nested"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// OptionBudget is the TCP option space the layer keeps free in every segment
// gVisor builds: the largest DSS (64-bit DATA_ACK and DSN, checksum) is 28
// bytes. The layer reports an MTU lowered by this much, so gVisor's segments
// plus our options still fit the real MTU.
const OptionBudget = 28

const maxTCPOptions = 40

// minAckOption is the smallest useful MPTCP option on a pure ACK: a DSS
// with a 32-bit DATA_ACK.
const minAckOption = 8

// outScratch is the per-segment working memory of Layer.outbound.
type outScratch struct {
	seg     Segment
	payload buffer.Buffer
	mp      [maxTCPOptions]byte
	optBuf  [maxTCPOptions * 2]byte
	hdr     [header.IPv6MinimumSize + header.TCPMinimumSize + maxTCPOptions]byte
	inPlace [header.IPv4MaximumHeaderSize + header.TCPHeaderMaximumSize]byte
}

// Layer is the MPTCP option layer of one NIC: a link endpoint between gVisor
// and the real link that adds MPTCP options to outgoing segments and shows
// incoming ones to their flow before gVisor sees them.
type Layer struct {
	nested.Endpoint
	lower stack.LinkEndpoint
	mux   *Mux

	// lastOut caches the flow of the last outgoing segment: a NIC usually
	// carries one busy flow, and the Mux's map lookup (read lock, hashing
	// two addresses) showed in profiles. Guarded by lastMu: the qdisc may
	// run several dispatch goroutines.
	lastMu  sync.Mutex
	lastOut Tuple
	lastE   *flowEntry

	// raw queues a packet built by the layer (headers in the payload)
	// behind what gVisor queued on the NIC: a control segment must not
	// overtake data segments that AddHeader already counted in the flow's
	// sndNxt, or its sequence number is ahead of the wire (Linux resets a
	// join whose fourth ACK does that). Set by Stack.AddNIC; nil writes
	// straight to the lower endpoint.
	raw func(proto tcpip.NetworkProtocolNumber, b buffer.Buffer) tcpip.Error
}

// lookupOut is Mux.lookup through the lastOut cache.
func (l *Layer) lookupOut(t Tuple) *flowEntry {
	l.lastMu.Lock()
	defer l.lastMu.Unlock()
	if e := l.lastE; e != nil && l.lastOut == t && !e.gone.Load() {
		return e
	}
	e := l.mux.lookup(t)
	l.lastOut, l.lastE = t, e
	return e
}

// NewLayer wraps lower.
func NewLayer(lower stack.LinkEndpoint, mux *Mux) *Layer {
	l := &Layer{lower: lower, mux: mux}
	l.Endpoint.Init(lower, l)
	return l
}

// MTU reports the lower MTU minus the option budget, so that gVisor sizes
// segments that still fit once the DSS option is added.
func (l *Layer) MTU() uint32 {
	m := l.lower.MTU()
	if m <= OptionBudget+header.IPv6MinimumSize+header.TCPMinimumSize {
		return m
	}
	return m - OptionBudget
}

// Capabilities hides checksum offload and GSO from gVisor: the layer needs
// real per-segment checksums to update them and individual segments to map.
func (l *Layer) Capabilities() stack.LinkEndpointCapabilities {
	return l.lower.Capabilities() &^ (stack.CapabilityTXChecksumOffload)
}

// MaxHeaderLength leaves room for a grown TCP header.
func (l *Layer) MaxHeaderLength() uint16 { return l.lower.MaxHeaderLength() + maxTCPOptions }

// DeliverNetworkPacket implements stack.NetworkDispatcher: it shows TCP
// segments of registered flows (and SYNs to accepting ports) to the engine.
func (l *Layer) DeliverNetworkPacket(proto tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	if !l.inbound(pkt) {
		l.mux.Stats.DroppedIn.Add(1)
		return
	}
	l.Endpoint.DeliverNetworkPacket(proto, pkt)
}

func (l *Layer) inbound(pkt *stack.PacketBuffer) bool {
	pd := pkt.Data()
	// Largest headers: IPv4 with 40 bytes of options (more than IPv6's 40)
	// and a full TCP header; less would let such a segment bypass its flow.
	b, ok := pd.PullUp(min(pd.Size(), header.IPv4MaximumHeaderSize+header.TCPHeaderMaximumSize))
	if !ok {
		return true
	}
	ip, err := parseIP(b)
	if err != nil || len(b) < ip.hdrLen+header.TCPMinimumSize {
		return true
	}
	tcp := header.TCP(b[ip.hdrLen:])
	off := int(tcp.DataOffset())
	if off < header.TCPMinimumSize || ip.hdrLen+off > len(b) {
		return true
	}
	t := Tuple{Local: addrPort(ip.dst, tcp.DestinationPort()), Remote: addrPort(ip.src, tcp.SourcePort())}
	e := l.mux.lookup(t)
	var acc Acceptor
	if e == nil {
		if tcp.Flags()&(header.TCPFlagSyn|header.TCPFlagAck) != header.TCPFlagSyn {
			l.mux.Stats.PassThroughIn.Add(1)
			return true
		}
		if acc = l.mux.acceptor(t.Local.Port()); acc == nil {
			l.mux.Stats.PassThroughIn.Add(1)
			return true
		}
	}
	// Verify the checksum before trusting any option: a corrupt segment
	// must not change MPTCP state. gVisor then skips its own check.
	var totalLen int
	if ip.ipv6 {
		totalLen = int(header.IPv6(b).PayloadLength())
	} else {
		totalLen = int(header.IPv4(b).TotalLength()) - ip.hdrLen
	}
	if totalLen < off || ip.hdrLen+totalLen > pd.Size() {
		l.mux.Stats.BadChecksumIn.Add(1)
		return false
	}
	// Link padding (short Ethernet frames) is not part of the segment: it
	// must not enter the checksum or the payload sum.
	if ip.hdrLen+totalLen < pd.Size() {
		pd.CapLength(ip.hdrLen + totalLen)
	}
	// A lower endpoint with RX checksum offload has verified it already
	// (tun checks what GRO did not): gVisor trusts it, and so can we.
	if !pkt.RXChecksumValidated && l.lower.Capabilities()&stack.CapabilityRXChecksumOffload == 0 {
		sum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, ip.src, ip.dst, uint16(totalLen))
		sum = checksum.Combine(sum, pd.ChecksumAtOffset(ip.hdrLen))
		if sum != 0xffff {
			l.mux.Stats.BadChecksumIn.Add(1)
			return false
		}
		pkt.RXChecksumValidated = true
	}
	// Segments come from a pool: passed to an interface they would
	// otherwise cost one heap allocation per packet.
	seg := l.mux.segPool.Get().(*Segment)
	*seg = Segment{
		Tuple:      t,
		Flags:      tcp.Flags(),
		Seq:        tcp.SequenceNumber(),
		Ack:        tcp.AckNumber(),
		Window:     tcp.WindowSize(),
		Options:    tcp[header.TCPMinimumSize:off],
		PayloadLen: totalLen - off,
		Via:        l,
		ipv6:       ip.ipv6,
		inData:     pd,
		inOff:      ip.hdrLen + off,
		hasIn:      true,
	}
	defer func() {
		*seg = Segment{}
		l.mux.segPool.Put(seg)
	}()
	l.mux.Stats.SegmentsIn.Add(1)
	if e == nil {
		return l.acceptSYN(acc, seg)
	}
	e.mu.Lock()
	e.via = l
	e.ipv6 = ip.ipv6
	e.mu.Unlock()
	return l.incoming(e.flow, seg)
}

// acceptSYN asks acc about a SYN of a new flow (see Mux.contain).
func (l *Layer) acceptSYN(acc Acceptor, seg *Segment) (pass bool) {
	defer l.mux.contain(seg.Tuple, nil, &pass)
	f, drop := acc.SYN(seg)
	if f != nil {
		l.mux.Register(seg.Tuple, f)
	}
	return !drop
}

// incoming shows seg to its flow (see Mux.contain).
func (l *Layer) incoming(f Flow, seg *Segment) (pass bool) {
	defer l.mux.contain(seg.Tuple, f, &pass)
	return f.Incoming(seg)
}

// outgoing asks f for the options of seg; ok is false when f panicked
// (see Mux.contain).
func (l *Layer) outgoing(f Flow, seg *Segment, opt []byte) (n, cover int, ok bool) {
	defer l.mux.contain(seg.Tuple, f, &ok)
	n, cover = f.Outgoing(seg, opt)
	return n, cover, true
}

// handledMark tags a packet that AddHeader finished (options written in
// place, or not a flow of ours), so WritePackets passes it through. gVisor's
// TCP leaves PacketBuffer.Owner nil (it carries a socket's uid/gid for
// netfilter, which runs before the link endpoint); a packet that arrives
// with an Owner is left to WritePackets.
type handledMark struct{}

func (handledMark) KUID() uint32 { return 0 }
func (handledMark) KGID() uint32 { return 0 }

// AddHeader implements stack.LinkEndpoint. gVisor's NIC calls it on the
// sending goroutine (under the TCP endpoint's lock) before the packet enters
// the qdisc, so the headers can be rewritten in gVisor's own packet: nobody
// else looks at it yet (after the qdisc the NIC still reads its size, which
// is why WritePackets, on the qdisc goroutine, must work on a clone). The
// segments that need a split, and lower links with their own link header,
// are left to WritePackets.
func (l *Layer) AddHeader(pkt *stack.PacketBuffer) {
	l.Endpoint.AddHeader(pkt)
	if pkt.Owner != nil || pkt.TransportProtocolNumber != header.TCPProtocolNumber || l.lower.MaxHeaderLength() != 0 {
		return
	}
	if l.outboundEarly(pkt) {
		pkt.Owner = handledMark{}
	}
}

// WritePackets implements stack.LinkEndpoint: segments of registered flows
// are rebuilt with their MPTCP options; everything else passes through.
func (l *Layer) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	var out stack.PacketBufferList
	var owned []*stack.PacketBuffer
	changed := false
	list := pkts.AsSlice()
	for i, pkt := range list {
		n := len(owned)
		if _, done := pkt.Owner.(handledMark); done {
			pkt.Owner = nil
		} else {
			owned = l.outbound(pkt, owned)
		}
		if len(owned) == n {
			// Unchanged or rewritten in place: the list is built only
			// once a packet is replaced (the usual batch needs none).
			if changed {
				out.PushBack(pkt)
			}
			continue
		}
		if !changed {
			changed = true
			for _, p := range list[:i] {
				out.PushBack(p)
			}
		}
		for _, p := range owned[n:] {
			out.PushBack(p)
		}
	}
	if !changed {
		return l.lower.WritePackets(pkts)
	}
	n, err := l.lower.WritePackets(out)
	for _, p := range owned {
		p.DecRef()
	}
	if err != nil {
		l.mux.Stats.WriteErrors.Add(1)
	}
	if n >= out.Len() {
		n = pkts.Len()
	} else if n > pkts.Len() {
		n = pkts.Len()
	}
	return n, err
}

// outPrep is what outboundEarly and outbound learn about a segment of a
// registered flow before writing it.
type outPrep struct {
	e        *flowEntry
	ip       ipInfo
	nh       []byte
	tcp      header.TCP
	t        Tuple
	plen     int
	base     []byte // gVisor's options, compacted
	sackFree []byte // the same without SACK blocks
	room     int    // option space offered to the flow
	opts     []byte // the options to send (after the flow's Outgoing)
	cover    int    // payload bytes they describe
}

// prepare parses pkt and, for a registered flow, asks it for its options.
// ok is false for a packet that passes through unchanged.
func (l *Layer) prepare(sc *outScratch, pkt *stack.PacketBuffer, p *outPrep) (ok bool) {
	nh, th := pkt.NetworkHeader().Slice(), pkt.TransportHeader().Slice()
	if len(th) < header.TCPMinimumSize || len(nh) == 0 {
		return false
	}
	ip, err := parseIP(nh)
	if err != nil {
		return false
	}
	tcp := header.TCP(th)
	t := Tuple{Local: addrPort(ip.src, tcp.SourcePort()), Remote: addrPort(ip.dst, tcp.DestinationPort())}
	e := l.lookupOut(t)
	if e == nil {
		l.mux.Stats.PassThroughOut.Add(1)
		return false
	}
	plen := pkt.Data().Size()
	origOpts := tcp.Options()
	e.noteOut(l, ip.ipv6, tcp, plen, origOpts)
	*p = outPrep{e: e, ip: ip, nh: nh, tcp: tcp, t: t, plen: plen}
	p.base = compactOptions(sc.optBuf[:0], origOpts, false)
	p.sackFree = compactOptions(sc.optBuf[maxTCPOptions:maxTCPOptions], origOpts, true)
	p.room = max(maxTCPOptions-len(p.base), maxTCPOptions-len(p.sackFree)) // may trim SACK blocks
	if keep := maxTCPOptions - len(p.base); plen == 0 && len(p.sackFree) < len(p.base) && keep >= minAckOption {
		// A pure ACK with SACK blocks: the sender's loss recovery needs
		// them more than a 64-bit DATA_ACK, so the flow gets only the room
		// that keeps them (it narrows its DSS to fit).
		p.room = keep
	}
	sc.seg = Segment{
		Tuple:      t,
		Flags:      tcp.Flags(),
		Seq:        tcp.SequenceNumber(),
		Ack:        tcp.AckNumber(),
		Window:     tcp.WindowSize(),
		Options:    origOpts,
		PayloadLen: plen,
		Via:        l,
		ipv6:       ip.ipv6,
		outData:    pkt.Data(),
		hasOut:     true,
	}
	n, cover, ok := l.outgoing(e.flow, &sc.seg, sc.mp[:p.room])
	if !ok {
		return false // the flow is gone: the segment passes as plain TCP
	}
	p.opts = l.withOptions(p.base, p.sackFree, sc.mp[:n])
	p.cover = cover
	return true
}

func (l *Layer) getScratch() *outScratch { return l.mux.outPool.Get().(*outScratch) }

func (l *Layer) putScratch(sc *outScratch) {
	sc.payload.Release()
	sc.seg = Segment{}
	l.mux.outPool.Put(sc)
}

// outboundEarly is AddHeader's part of outbound: it reports true when pkt
// is done (rewritten in place, or not ours). A segment that needs a split
// is left to outbound, which asks the flow again (Outgoing is idempotent
// for a segment: it seals the same mapping and reports the same cover).
func (l *Layer) outboundEarly(pkt *stack.PacketBuffer) bool {
	sc := l.getScratch()
	defer l.putScratch(sc)
	var p outPrep
	if !l.prepare(sc, pkt, &p) {
		return true
	}
	if p.cover > 0 && p.cover < p.plen {
		return false
	}
	if _, ok := l.rewriteHeaders(sc, pkt, p.ip, p.nh, p.tcp, p.opts, p.plen, false); !ok {
		return false
	}
	l.mux.Stats.SegmentsOut.Add(1)
	l.mux.Stats.RewrittenInPlace.Add(1)
	return true
}

// outbound appends the packets that replace pkt to owned (none: send pkt).
func (l *Layer) outbound(pkt *stack.PacketBuffer, owned []*stack.PacketBuffer) []*stack.PacketBuffer {
	if pkt.TransportProtocolNumber != header.TCPProtocolNumber {
		return owned
	}
	// Per-segment scratch comes from a pool: handed to the flow through an
	// interface, it would otherwise escape to the heap on every segment.
	sc := l.getScratch()
	defer l.putScratch(sc)
	var p outPrep
	if !l.prepare(sc, pkt, &p) {
		return owned
	}
	l.mux.Stats.SegmentsOut.Add(1)
	e, ip, nh, tcp, t, plen := p.e, p.ip, p.nh, p.tcp, p.t, p.plen
	seq, flags, origOpts := tcp.SequenceNumber(), tcp.Flags(), tcp.Options()
	base, sackFree, room, opts, cover := p.base, p.sackFree, p.room, p.opts, p.cover
	mp := &sc.mp
	seg := &sc.seg
	var n int
	if cover <= 0 || cover >= plen {
		// The common case: one mapping covers the segment. gVisor's packet
		// is reused and only its headers change (on a clone when they
		// grow: see rewriteHeaders).
		if np, ok := l.rewriteHeaders(sc, pkt, ip, nh, tcp, opts, plen, true); ok {
			l.mux.Stats.RewrittenInPlace.Add(1)
			if np != nil {
				owned = append(owned, np)
			}
			return owned
		}
		owned = append(owned, l.rebuild(sc, pkt.Data().ToBuffer(), nh, ip, t, seq, flags, tcp, opts))
		return owned
	}

	// A segment spanning two mappings is split where the first ends: the
	// pieces are new packets sharing the payload.
	sc.payload = pkt.Data().ToBuffer()
	payload := &sc.payload
	for first := true; ; first = false {
		segFlags := flags
		if !first {
			// Continuation of a split: only the first piece may carry SYN.
			segFlags &^= header.TCPFlagSyn
			*seg = Segment{
				Tuple:      t,
				Flags:      segFlags,
				Seq:        seq,
				Ack:        tcp.AckNumber(),
				Window:     tcp.WindowSize(),
				Options:    origOpts,
				PayloadLen: int(payload.Size()),
				Via:        l,
				ipv6:       ip.ipv6,
				payload:    payload,
			}
			n, cover, _ = l.outgoing(e.flow, seg, mp[:room]) // zero when it panicked: the rest goes whole
			opts = l.withOptions(base, sackFree, mp[:n])
		}
		var part buffer.Buffer
		if cover > 0 && cover < int(payload.Size()) {
			l.mux.Stats.SegmentsSplit.Add(1)
			part = payload.Clone()
			part.Truncate(int64(cover))
			payload.TrimFront(int64(cover))
			// FIN and PSH belong to the last piece only.
			segFlags &^= header.TCPFlagFin | header.TCPFlagPsh
		} else {
			part = payload.Clone()
			payload.Truncate(0)
		}
		owned = append(owned, l.rebuild(sc, part, nh, ip, t, seq, segFlags, tcp, opts))
		seq += uint32(cover)
		if payload.Size() == 0 {
			break
		}
	}
	return owned
}

// withOptions appends the flow's options mp to gVisor's compacted options
// (base), falling back to the SACK-free block (sackFree) when that makes
// them fit, and to no MPTCP option at all when nothing does. The result
// aliases the scratch behind base or sackFree.
func (l *Layer) withOptions(base, sackFree, mp []byte) []byte {
	opts := base
	if len(base)+len(mp) > maxTCPOptions {
		opts = sackFree
		l.mux.Stats.SACKTrimmed.Add(1)
	}
	if len(opts)+len(mp) > maxTCPOptions {
		l.mux.Stats.NoRoomForOptions.Add(1)
		mp = nil
	}
	return append(opts, mp...)
}

// rebuild makes a new packet with payload part (taking it over) and
// headers built from scratch, with a checksum over the payload.
func (l *Layer) rebuild(sc *outScratch, part buffer.Buffer, nh []byte, ip ipInfo, t Tuple, seq uint32, flags header.TCPFlags, tcp header.TCP, opts []byte) *stack.PacketBuffer {
	ttl := uint8(64)
	if ip.ipv6 {
		ttl = header.IPv6(nh).HopLimit()
	} else {
		ttl = header.IPv4(nh).TTL()
	}
	sum := part.Checksum(0)
	hdr := buildHeadersInto(sc.hdr[:], ip.ipv6, t, seq, tcp.AckNumber(), flags, tcp.WindowSize(), opts, int(part.Size()), sum, ttl)
	return l.newPacket(ip.ipv6, hdr, part)
}

// rewriteHeaders gives gVisor's packet the TCP options opts without
// touching its payload: the IP and TCP headers move forward into the
// headroom MaxHeaderLength reserved (claimed as the packet's link header,
// which a lower endpoint without link header never uses: it reads the
// packet as bytes), and the TCP checksum is updated from gVisor's
// (RFC 1624) instead of summing the payload again.
//
// With onClone (WritePackets, after the qdisc) grown headers go on a
// shallow clone (np) sharing the payload: gVisor's NIC still reads the
// original's size after handing it to the qdisc, so its header bookkeeping
// must not change under it. AddHeader, before the qdisc, changes pkt itself.
// ok is false when the packet does not allow the rewrite (no headroom,
// GSO, a link header below); the caller then rebuilds the packet.
func (l *Layer) rewriteHeaders(sc *outScratch, pkt *stack.PacketBuffer, ip ipInfo, nh []byte, tcp header.TCP, opts []byte, plen int, onClone bool) (np *stack.PacketBuffer, ok bool) {
	if pkt.GSOOptions.Type != stack.GSONone || l.lower.MaxHeaderLength() != 0 {
		return nil, false
	}
	oldTCPLen := int(tcp.DataOffset())
	if oldTCPLen != len(tcp) || len(nh) != ip.hdrLen {
		return nil, false
	}
	newTCPLen := header.TCPMinimumSize + (len(opts)+3)&^3
	// Never shrink: the headers cannot move back, so a shorter block is
	// padded with NOPs to the old length.
	newTCPLen = max(newTCPLen, oldTCPLen)
	grow := newTCPLen - oldTCPLen
	// No link header yet (HeaderSize is what was pushed: IP and TCP; this
	// avoids a PullUp per segment).
	if grow > pkt.AvailableHeaderBytes() || pkt.HeaderSize() != len(nh)+len(tcp) {
		return nil, false
	}

	// gVisor's checksum covers pseudo-header, TCP header and payload, so
	// the payload's sum is what remains after taking the other two out.
	oldPseudo := header.PseudoHeaderChecksum(header.TCPProtocolNumber, ip.src, ip.dst, uint16(oldTCPLen+plen))
	payloadSum := ^checksum.Checksum(tcp, oldPseudo)

	// Build the new headers in a scratch buffer, then scatter them over the
	// three adjacent header slices (link room, IP, TCP).
	total := ip.hdrLen + newTCPLen
	b := sc.inPlace[:total]
	copy(b, nh)
	th := header.TCP(b[ip.hdrLen:])
	copy(th, tcp[:header.TCPMinimumSize])
	o := th[header.TCPMinimumSize:]
	k := copy(o, opts)
	for i := k; i < len(o); i++ {
		o[i] = header.TCPOptionNOP
	}
	th.SetDataOffset(uint8(newTCPLen))
	th.SetChecksum(0)
	if ip.ipv6 {
		header.IPv6(b).SetPayloadLength(uint16(newTCPLen + plen))
	} else {
		v4 := header.IPv4(b)
		v4.SetTotalLength(uint16(total + plen))
		v4.SetChecksum(0)
		v4.SetChecksum(^v4.CalculateChecksum())
	}
	sum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, ip.src, ip.dst, uint16(newTCPLen+plen))
	sum = checksum.Combine(sum, payloadSum)
	th.SetChecksum(^checksum.Checksum(th, sum))

	if grow > 0 {
		dst := pkt
		if onClone {
			np = pkt.Clone()
			dst = np
		}
		lh := dst.LinkHeader().Push(grow)
		b = b[copy(lh, b):]
		// Push may have given the packet its own copy of the header bytes
		// (copy-on-write, always so for a clone); the payload stays shared.
		// Usually the headroom is in front of the old headers, in place.
		if ext := lh[:cap(lh)]; len(ext) < grow+len(nh) || &ext[grow] != &nh[0] {
			nh, tcp = dst.NetworkHeader().Slice(), dst.TransportHeader().Slice()
		}
	}
	b = b[copy(nh, b):]
	copy(tcp, b)
	return np, true
}

func (l *Layer) newPacket(ipv6 bool, hdr []byte, payload buffer.Buffer) *stack.PacketBuffer {
	ipLen := header.IPv4MinimumSize
	proto := header.IPv4ProtocolNumber
	if ipv6 {
		ipLen = header.IPv6MinimumSize
		proto = header.IPv6ProtocolNumber
	}
	np := stack.NewPacketBuffer(stack.PacketBufferOptions{
		ReserveHeaderBytes: int(l.lower.MaxHeaderLength()) + len(hdr),
		Payload:            payload,
	})
	copy(np.TransportHeader().Push(len(hdr)-ipLen), hdr[ipLen:])
	np.TransportProtocolNumber = header.TCPProtocolNumber
	copy(np.NetworkHeader().Push(ipLen), hdr[:ipLen])
	np.NetworkProtocolNumber = proto
	return np
}

// SendRaw sends a segment without payload built from scratch (used for
// resets of flows gVisor never knew, and by sendControl).
func (l *Layer) SendRaw(ipv6 bool, t Tuple, seq, ack uint32, flags header.TCPFlags, wnd uint16, opts []byte) error {
	hdr := buildHeaders(ipv6, t, seq, ack, flags, wnd, opts, 0, 0, 64)
	if l.raw != nil {
		proto := header.IPv4ProtocolNumber
		if ipv6 {
			proto = header.IPv6ProtocolNumber
		}
		if err := l.raw(proto, buffer.MakeWithData(hdr)); err != nil {
			l.mux.Stats.WriteErrors.Add(1)
			return fmt.Errorf("netstack: send control segment on %v: %s", t, err)
		}
		l.mux.Stats.ControlSent.Add(1)
		return nil
	}
	pkt := l.newPacket(ipv6, hdr, buffer.Buffer{})
	defer pkt.DecRef()
	var list stack.PacketBufferList
	list.PushBack(pkt)
	if _, err := l.lower.WritePackets(list); err != nil {
		l.mux.Stats.WriteErrors.Add(1)
		return fmt.Errorf("netstack: send control segment on %v: %s", t, err)
	}
	l.mux.Stats.ControlSent.Add(1)
	return nil
}
