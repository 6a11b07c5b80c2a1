package client

import (
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/mptun/mptun/bond/convert"
)

// quicPort is where QUIC (HTTP/3) lives.
const quicPort = 443

// handleUDP runs in the packet path for the first datagram of a flow that
// has no endpoint yet; it must not block. Returning false makes the stack
// answer with ICMP port unreachable.
func (c *Client) handleUDP(r *udp.ForwarderRequest) bool {
	id := r.ID()
	dest := endpointAddr(id.LocalAddress, id.LocalPort)
	if c.ctx.Err() != nil {
		return false
	}
	if dest.Port() == quicPort && c.cfg.QUIC == QUICReject {
		c.c.quicRej.Add(1)
		return false
	}
	var wq waiter.Queue
	// The endpoint is connected to (app source, destination), so later
	// datagrams of the flow reach it directly, not the forwarder; it holds
	// this first datagram already.
	ep, err := r.CreateEndpoint(&wq)
	if err != nil {
		c.log.Debug("udp flow: create endpoint", "dest", dest, "err", err)
		return false
	}
	app := gonet.NewUDPConn(&wq, ep)
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		defer app.Close()
		up, err := c.open(convert.KindUDP, dest)
		if err != nil {
			c.c.udpFailed.Add(1)
			c.noteErr(err)
			c.log.Debug("udp association failed", "dest", dest, "err", err)
			return
		}
		defer up.Close()
		c.c.udpAssoc.Add(1)
		c.c.udpActive.Add(1)
		defer c.c.udpActive.Add(-1)
		c.log.Debug("udp association", "src", endpointAddr(id.RemoteAddress, id.RemotePort), "dest", dest)
		c.pumpUDP(app, up)
	}()
	return true
}

// pumpUDP moves datagrams both ways until either side fails, the
// association is idle for UDPIdle, or the client closes.
func (c *Client) pumpUDP(app *gonet.UDPConn, up Upstream) {
	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	done := make(chan struct{})
	var once sync.Once
	stop := func() {
		once.Do(func() {
			close(done)
			_ = app.Close()
			_ = up.Close()
		})
	}
	go func() {
		buf := make([]byte, convert.MaxDatagram)
		for {
			n, err := app.Read(buf)
			if err != nil {
				stop()
				return
			}
			last.Store(time.Now().UnixNano())
			if err := convert.WriteDatagram(up, buf[:n]); err != nil {
				stop()
				return
			}
			c.c.bytesUp.Add(uint64(n))
		}
	}()
	go func() {
		buf := make([]byte, convert.MaxDatagram)
		for {
			n, err := convert.ReadDatagram(up, buf)
			if err != nil {
				stop()
				return
			}
			last.Store(time.Now().UnixNano())
			if _, err := app.Write(buf[:n]); err != nil {
				stop()
				return
			}
			c.c.bytesDown.Add(uint64(n))
		}
	}()
	tick := min(c.cfg.UDPIdle/4, time.Second)
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case <-c.ctx.Done():
			stop()
			return
		case now := <-t.C:
			if now.Sub(time.Unix(0, last.Load())) >= c.cfg.UDPIdle {
				c.log.Debug("udp association idle, closing")
				stop()
				return
			}
		}
	}
}
