package server

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/mptun/mptun/bond/convert"
	"github.com/mptun/mptun/bond/splice"
)

// idleWatch closes a flow after idle of silence. Activity is a timestamp
// stored by the copy loops, so a busy flow costs no timer resets.
type idleWatch struct {
	idle  time.Duration
	last  atomic.Int64 // unix nanoseconds of the last activity
	timer *time.Timer
	fired atomic.Bool
}

func newIdleWatch(idle time.Duration, onIdle func()) *idleWatch {
	w := &idleWatch{idle: idle}
	w.touch()
	var check func()
	check = func() {
		silent := time.Duration(time.Now().UnixNano() - w.last.Load())
		if silent >= w.idle {
			w.fired.Store(true)
			onIdle()
			return
		}
		w.timer.Reset(w.idle - silent)
	}
	w.timer = time.AfterFunc(idle, check)
	return w
}

func (w *idleWatch) touch() { w.last.Store(time.Now().UnixNano()) }

func (w *idleWatch) stop() { w.timer.Stop() }

// splice copies both ways until both directions ended. A direction that
// reaches EOF half-closes its destination; an error ends both.
func (s *Server) splice(c, d net.Conn, log *slog.Logger) {
	var once sync.Once
	abort := func() {
		once.Do(func() {
			c.Close()
			d.Close()
		})
	}
	w := newIdleWatch(s.cfg.TCPIdle, func() {
		s.M.IdleClosed.Add(1)
		abort()
	})
	defer w.stop()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		s.copyHalf(d, c, &s.M.BytesUp, w, abort)
	}()
	s.copyHalf(c, d, &s.M.BytesDown, w, abort)
	wg.Wait()
	abort()
	log.Debug("flow done", "idle_closed", w.fired.Load())
}

// copyHalf copies src to dst and half-closes dst at src's EOF; anything
// else ends the flow both ways.
func (s *Server) copyHalf(dst, src net.Conn, count *atomic.Uint64, w *idleWatch, abort func()) {
	_, err := splice.Copy(dst, src, make([]byte, 64<<10), func(n int) {
		w.touch()
		count.Add(uint64(n))
	})
	if err != nil {
		abort()
	}
}

// udpAssociation relays framed datagrams between the client stream c and
// the connected UDP socket d until the client ends the stream, an error
// occurs or the association is idle.
func (s *Server) udpAssociation(c, d net.Conn, log *slog.Logger) {
	var once sync.Once
	abort := func() {
		once.Do(func() {
			c.Close()
			d.Close()
		})
	}
	w := newIdleWatch(s.cfg.UDPIdle, func() {
		s.M.IdleClosed.Add(1)
		abort()
	})
	defer w.stop()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		// Destination to client.
		defer wg.Done()
		buf := make([]byte, 2+convert.MaxDatagram)
		for {
			n, err := d.Read(buf[2:])
			if err != nil {
				// An ICMP port unreachable surfaces as ECONNREFUSED on a
				// connected socket; the association survives it, as UDP does.
				if errors.Is(err, syscall.ECONNREFUSED) {
					continue
				}
				abort()
				return
			}
			w.touch()
			s.M.UDPDatagramsDown.Add(1)
			s.M.BytesDown.Add(uint64(n))
			b, _ := convert.AppendDatagram(buf[:0], buf[2:2+n]) // in place: the header fills the gap
			if _, err := c.Write(b); err != nil {
				abort()
				return
			}
		}
	}()
	buf := make([]byte, convert.MaxDatagram)
	for {
		n, err := convert.ReadDatagram(c, buf)
		if errors.Is(err, io.ErrShortBuffer) {
			continue
		}
		if err != nil {
			break
		}
		w.touch()
		s.M.UDPDatagramsUp.Add(1)
		s.M.BytesUp.Add(uint64(n))
		if _, err := d.Write(buf[:n]); err != nil && !errors.Is(err, syscall.ECONNREFUSED) {
			log.Debug("udp send", "err", err)
		}
	}
	abort()
	wg.Wait()
}
