package tun

import (
	"errors"
	"os"
	"runtime"
	"time"

	wgtun "golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/stack/gro"
)

// readLoop reads batches from the device and delivers them to d through an
// embedded GRO, flushed after every batch so that no packet waits for the
// next read.
func (e *Endpoint) readLoop(d stack.NetworkDispatcher, stop <-chan struct{}) {
	defer e.wg.Done()
	defer e.alive.Add(-1)
	defer func() {
		select {
		case <-stop:
			e.clearDeadline()
		default:
		}
	}()
	var g gro.GRO
	g.Init(e.opts.GRO)
	g.Dispatcher = &validatingDispatcher{NetworkDispatcher: d, e: e}

	n := e.readBufs
	views := make([]*buffer.View, n)
	bufs := make([][]byte, n)
	sizes := make([]int, n)
	defer func() {
		for _, v := range views {
			if v != nil {
				v.Release()
			}
		}
	}()
	var viewSize int
	for {
		select {
		case <-stop:
			return
		default:
		}
		// Buffers hold one segment each; a device MTU change resizes them.
		if want := int(e.devMTU.Load()); want != viewSize {
			viewSize = want
			for i, v := range views {
				if v != nil {
					v.Release()
					views[i] = nil
				}
			}
		}
		for i := range views {
			if views[i] == nil {
				views[i] = buffer.NewViewSize(viewSize)
			}
			bufs[i] = views[i].AsSlice()
		}
		cnt, err := e.dev.Read(bufs, sizes, 0)
		if err != nil {
			switch {
			case errors.Is(err, os.ErrDeadlineExceeded):
				// Our stop, or the deadline of a previous attachment whose
				// reader has not cleared it yet: yield, then look at stop.
				runtime.Gosched()
				continue
			case errors.Is(err, os.ErrClosed):
				e.log.Debug("tun: device closed, reader exits")
				return
			case errors.Is(err, wgtun.ErrTooManySegments):
				// cnt segments are valid; the rest of the super-packet is lost.
				e.stats.drops.Add(1)
			default:
				e.stats.readErrors.Add(1)
				e.log.Debug("tun: read", "err", err)
				// Do not spin on a persistent error.
				select {
				case <-stop:
					return
				case <-time.After(time.Millisecond):
				}
				continue
			}
		}
		if cnt == 0 {
			continue
		}
		e.stats.readBatches.Add(1)
		e.delivering.Add(1)
		var pkts, bytes uint64
		for i := 0; i < cnt; i++ {
			size := sizes[i]
			if size <= 0 || size > len(bufs[i]) {
				e.stats.drops.Add(1)
				continue
			}
			var proto tcpip.NetworkProtocolNumber
			switch header.IPVersion(bufs[i][:size]) {
			case header.IPv4Version:
				proto = header.IPv4ProtocolNumber
			case header.IPv6Version:
				proto = header.IPv6ProtocolNumber
			default:
				e.stats.drops.Add(1)
				continue
			}
			v := views[i]
			views[i] = nil
			v.CapLength(size)
			pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
				Payload: buffer.MakeWithView(v),
			})
			pkt.NetworkProtocolNumber = proto
			pkt.RXChecksumValidated = e.opts.TrustRXChecksums
			g.Enqueue(pkt)
			pkt.DecRef()
			pkts++
			bytes += uint64(size)
		}
		g.Flush()
		e.delivering.Add(-1)
		e.stats.packetsIn.Add(pkts)
		e.stats.bytesIn.Add(bytes)
	}
}

// validatingDispatcher checks the checksums of packets that GRO did not
// validate before they reach the NIC, which will mark them validated.
type validatingDispatcher struct {
	stack.NetworkDispatcher
	e *Endpoint
}

// DeliverNetworkPacket implements stack.NetworkDispatcher.
func (v *validatingDispatcher) DeliverNetworkPacket(proto tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	if !pkt.RXChecksumValidated {
		// One view per packet read from the device, so this does not copy.
		b, ok := pkt.Data().PullUp(pkt.Data().Size())
		if !ok || !validChecksums(b) {
			v.e.stats.checksumErrors.Add(1)
			return
		}
	}
	v.NetworkDispatcher.DeliverNetworkPacket(proto, pkt)
}
