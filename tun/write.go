package tun

import (
	"encoding/binary"
	"errors"
	"os"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

const (
	// writeOffset is the headroom in front of every packet passed to
	// Device.Write: wireguard-go writes the virtio-net header (10 bytes)
	// there and rejects smaller offsets on offload devices.
	writeOffset = 16

	// gsoMaxSize bounds gVisor's super-segments so that headers still fit
	// in one 64 KiB TUN write.
	gsoMaxSize = maxPacket - minSegmentOverhead

	// virtio-net header (linux/virtio_net.h), little-endian.
	virtioNetHdrLen        = 10
	virtioNetHdrFNeedsCsum = 1
	virtioNetHdrGSOTCPv4   = 1
	virtioNetHdrGSOTCPv6   = 4
)

// WritePackets implements stack.LinkWriter. It does not release pkts: the
// caller (the qdisc) owns them.
func (e *Endpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	list := pkts.AsSlice()
	if len(list) == 0 {
		return 0, nil
	}
	e.wmu.Lock()
	defer e.wmu.Unlock()
	if e.wclosed {
		e.stats.drops.Add(uint64(len(list)))
		return 0, &tcpip.ErrClosedForSend{}
	}
	if e.wstore == nil {
		// Allocated on first use: batch*64 KiB is not small, and an endpoint
		// that never sends should not pay for it.
		e.wstore = make([][]byte, e.batch)
		for i := range e.wstore {
			e.wstore[i] = make([]byte, writeOffset, writeOffset+maxPacket)
		}
		e.wbufs = make([][]byte, 0, e.batch)
	}
	written := 0
	for len(list) > 0 {
		chunk := list[:min(len(list), e.batch)]
		list = list[len(chunk):]
		n, err := e.writeChunk(chunk)
		written += n
		if err != nil {
			e.stats.drops.Add(uint64(len(chunk) - n + len(list)))
			return written, err
		}
	}
	return written, nil
}

func (e *Endpoint) writeChunk(chunk []*stack.PacketBuffer) (int, tcpip.Error) {
	// Device.Write appends to and swaps the slices it gets, so the slice
	// headers are rebuilt from wstore on every call.
	bufs := e.wbufs[:0]
	var bytes uint64
	written := 0
	for i, pkt := range chunk {
		b := e.wstore[i][:writeOffset]
		for _, s := range pkt.AsSlices() {
			b = append(b, s...)
		}
		bytes += uint64(len(b) - writeOffset)
		if pkt.GSOOptions.Type != stack.GSONone {
			// Keep the order: what is queued goes first.
			if err := e.flush(bufs); err != nil {
				return written, err
			}
			written += len(bufs)
			bufs = bufs[:0]
			if err := e.writeGSO(pkt, b); err != nil {
				return written, err
			}
			written++
			continue
		}
		bufs = append(bufs, b)
	}
	if err := e.flush(bufs); err != nil {
		return written, err
	}
	written += len(bufs)
	e.stats.packetsOut.Add(uint64(written))
	e.stats.bytesOut.Add(bytes)
	return written, nil
}

// flush writes bufs with one Device.Write call.
func (e *Endpoint) flush(bufs [][]byte) tcpip.Error {
	if len(bufs) == 0 {
		return nil
	}
	e.stats.writeBatches.Add(1)
	if _, err := e.dev.Write(bufs, writeOffset); err != nil {
		e.stats.writeErrors.Add(1)
		if errors.Is(err, os.ErrClosed) {
			return &tcpip.ErrClosedForSend{}
		}
		// Some packets of the batch may have been written; the device does
		// not say which, and TCP recovers the rest.
		e.log.Debug("tun: write", "err", err, "packets", len(bufs))
		return &tcpip.ErrAborted{}
	}
	return nil
}

// writeGSO writes one gVisor super-segment with its own virtio-net header
// straight to the device file: wireguard-go's Write only accepts plain
// packets. b holds the packet after writeOffset bytes of headroom.
func (e *Endpoint) writeGSO(pkt *stack.PacketBuffer, b []byte) tcpip.Error {
	gso := pkt.GSOOptions
	var h [virtioNetHdrLen]byte
	if gso.NeedsCsum {
		h[0] = virtioNetHdrFNeedsCsum
		binary.LittleEndian.PutUint16(h[6:], gso.L3HdrLen)
		binary.LittleEndian.PutUint16(h[8:], gso.CsumOffset)
	}
	binary.LittleEndian.PutUint16(h[2:], uint16(pkt.HeaderSize()))
	if pkt.Data().Size() > int(gso.MSS) {
		switch gso.Type {
		case stack.GSOTCPv4:
			h[1] = virtioNetHdrGSOTCPv4
		case stack.GSOTCPv6:
			h[1] = virtioNetHdrGSOTCPv6
		default:
			e.stats.drops.Add(1)
			return &tcpip.ErrNotSupported{}
		}
		binary.LittleEndian.PutUint16(h[4:], gso.MSS)
	}
	frame := b[writeOffset-virtioNetHdrLen:]
	copy(frame, h[:])
	e.stats.writeBatches.Add(1)
	if _, err := e.file.Write(frame); err != nil {
		e.stats.writeErrors.Add(1)
		if errors.Is(err, os.ErrClosed) {
			return &tcpip.ErrClosedForSend{}
		}
		e.log.Debug("tun: gso write", "err", err, "len", len(frame))
		return &tcpip.ErrAborted{}
	}
	return nil
}

// GSOMaxSize implements stack.GSOEndpoint.
func (e *Endpoint) GSOMaxSize() uint32 {
	if e.opts.HostGSO {
		return gsoMaxSize
	}
	return 0
}

// SupportedGSO implements stack.GSOEndpoint: host GSO only with
// Options.HostGSO.
func (e *Endpoint) SupportedGSO() stack.SupportedGSO {
	if e.opts.HostGSO {
		return stack.HostGSOSupported
	}
	return stack.GSONotSupported
}
