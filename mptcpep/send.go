package mptcpep

import (
	"io"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
)

// maxChunk is the most the scheduler hands one subflow at a time.
const maxChunk = maxMappingLen // one chunk is one mapping, so its checksum is exact

// Write implements net.Conn.
func (c *Conn) Write(p []byte) (int, error) {
	if c.fb != nil {
		return c.fb.Write(p)
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	total := 0
	for len(p) > 0 {
		if err := c.writeErrLocked(); err != nil {
			return total, err
		}
		if n := c.snd.Write(p); n > 0 {
			total += n
			p = p[n:]
			c.stats.bytesSent += uint64(n)
			c.kickLocked()
			continue
		}
		if err := c.waitLocked(c.writeDeadline); err != nil {
			return total, err
		}
	}
	return total, nil
}

// writeErrLocked is why Write and ReadFrom can take no more data, or nil.
func (c *Conn) writeErrLocked() error {
	if c.writeClosed || c.err == io.EOF {
		return ErrClosed
	}
	return c.err
}

// ReadFrom implements io.ReaderFrom: it reads from r straight into the
// send buffer, so io.Copy to a Conn costs one copy less than through
// Write (as many as plain TCP through gVisor's gonet).
func (c *Conn) ReadFrom(r io.Reader) (int64, error) {
	if c.fb != nil {
		return io.Copy(struct{ io.Writer }{c.fb}, r)
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	var total int64
	for {
		if err := c.writeErrLocked(); err != nil {
			return total, err
		}
		tail := c.snd.Tail()
		if len(tail) == 0 {
			if err := c.waitLocked(c.writeDeadline); err != nil {
				return total, err
			}
			continue
		}
		// The tail's block stays in place while pinned (an Ack cannot
		// recycle it), and only this writer appends (wmu).
		c.snd.Pin()
		c.mu.Unlock()
		n, err := r.Read(tail)
		c.mu.Lock()
		n = max(min(n, len(tail)), 0)
		c.snd.Commit(n)
		c.snd.Unpin()
		if n > 0 {
			total += int64(n)
			c.stats.bytesSent += uint64(n)
			c.kickLocked()
		}
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// run is the connection's control goroutine: it schedules data onto
// subflows, sends the segments gVisor does not (DATA_ACK updates, DATA_FIN,
// fourth ACKs, ADD_ADDR) and runs the timers. It ends with the connection.
func (c *Conn) run() {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	var rd chunkReader
	for {
		c.runActions()
		c.push(&rd)
		next := c.control()
		c.runActions()
		d := time.Hour
		if !next.IsZero() {
			d = max(time.Until(next), 200*time.Microsecond)
		}
		timer.Reset(d)
		select {
		case <-c.kick:
		case <-timer.C:
		case <-c.done:
			c.runActions()
			c.closeSubflows()
			c.linger()
			return
		}
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
	}
}

// runActions runs work queued under the lock that must run without it
// (gVisor endpoint calls, raw sends).
func (c *Conn) runActions() {
	c.mu.Lock()
	acts := c.actions
	c.actions = nil
	c.mu.Unlock()
	for _, a := range acts {
		a()
	}
}

// closeSubflows closes what is left when the connection is finished.
func (c *Conn) closeSubflows() {
	c.mu.Lock()
	var eps []tcpip.Endpoint
	for _, sf := range c.subflows {
		if sf.ep != nil && sf.state != sfClosed {
			eps = append(eps, sf.ep)
			sf.state = sfClosed
		}
	}
	c.mu.Unlock()
	for _, ep := range eps {
		ep.Close()
	}
}

// lingerTime is how long a finished connection keeps its flows.
const lingerTime = 2 * time.Second

// linger keeps the flows registered while gVisor finishes the subflow FIN
// exchange, so its segments still carry DATA_ACKs, then lets the endpoint
// forget the connection. Abort cuts it short.
func (c *Conn) linger() {
	t := time.NewTimer(lingerTime)
	defer t.Stop()
	select {
	case <-t.C:
	case <-c.reap:
	}
	c.mu.Lock()
	for _, sf := range c.subflows {
		c.e.st.Mux.Unregister(sf.tuple)
	}
	c.mu.Unlock()
	c.e.forget(c)
}

func (c *Conn) hasPendingData() bool {
	if len(c.reinjectQ) > 0 || (c.snd != nil && dsnLT(c.sndNxt, c.snd.End())) {
		return true
	}
	for _, sf := range c.subflows {
		if sf.owed.Len > 0 && sf.usable() {
			return true
		}
	}
	return false
}

// push hands connection data to subflows until nothing is left or no
// subflow has room. rd is reused for every chunk.
func (c *Conn) push(rd *chunkReader) {
	for iter := 0; iter < 512; iter++ {
		c.mu.Lock()
		if (c.fallback && !c.infinite) || c.isDone() || !c.hasPendingData() {
			c.mu.Unlock()
			return
		}
		live := make([]*subflow, 0, len(c.subflows))
		for _, sf := range c.subflows {
			if sf.usable() {
				live = append(live, sf)
			}
		}
		c.mu.Unlock()
		if len(live) == 0 {
			return
		}
		infos := make([]sfInfo, len(live))
		for i, sf := range live {
			infos[i] = sf.sample()
		}

		c.mu.Lock()
		for i, sf := range live {
			sf.info = infos[i]
		}
		sf, dsn, n, owed := c.owedLocked(live)
		reinj := false
		if !owed {
			var ok bool
			dsn, n, reinj, ok = c.nextChunkLocked()
			if !ok {
				c.mu.Unlock()
				return
			}
			var allowance int
			sf, allowance = c.pickLocked(live)
			if sf == nil {
				c.mu.Unlock()
				return
			}
			n = min(n, allowance)
		}
		n = min(n, maxChunk)
		// The chunk goes to gVisor straight from the send buffer's blocks,
		// pinned so that a DATA_ACK arriving meanwhile cannot recycle them.
		rd.reset()
		for rd.Len() < n && len(rd.parts) < cap(rd.parts) {
			p := c.snd.Peek(dsn+uint64(rd.Len()), n-rd.Len())
			if len(p) == 0 {
				break
			}
			rd.add(p)
		}
		n = rd.Len()
		if n == 0 {
			c.mu.Unlock()
			return
		}
		if owed {
			// The mapping is on the wire already: only the bytes go now.
			sf.owed.DSN += uint64(n)
			sf.owed.Len -= n
		} else {
			var sum uint16
			if c.csum {
				sum = rd.sum(n)
			}
			if err := sf.tx.AddSum(sf.wrote, dsn, n, sum); err != nil {
				c.mu.Unlock()
				return
			}
			sf.wrote += uint32(n)
			if reinj {
				c.reinjectQ[0].DSN += uint64(n)
				c.reinjectQ[0].Len -= n
				if c.reinjectQ[0].Len <= 0 {
					c.reinjectQ = c.reinjectQ[1:]
				}
				sf.reinjTx += uint64(n)
				c.stats.reinjected += uint64(n)
				c.e.MIB.ReinjectedBytes.Add(uint64(n))
			} else {
				if c.snd.Una() == c.sndNxt {
					c.lastProgress = time.Now()
				}
				c.sndNxt += uint64(n)
			}
		}
		if sf.lastAckMove.IsZero() || sf.inflight() == n {
			sf.lastAckMove = time.Now()
		}
		ep := sf.ep
		c.snd.Pin()
		c.mu.Unlock()

		m, err := ep.Write(rd, tcpip.WriteOptions{})
		c.mu.Lock()
		c.snd.Unpin()
		sf.bytesTx += uint64(m)
		if int(m) < n {
			// gVisor took less than the scheduler expected. Its segments
			// may already have announced the whole mapping (they leave
			// from inside Write), and a peer rejects a changed mapping
			// (Linux resets the subflow), so the rest is owed to this
			// subflow, at the SSNs the mapping gave it.
			c.e.MIB.SubflowShortWrites.Add(1)
			rest := span{DSN: dsn + uint64(m), Len: n - int(m)}
			if owed {
				sf.owed = span{DSN: rest.DSN, Len: rest.Len + sf.owed.Len}
			} else {
				sf.owed = rest
			}
			c.mu.Unlock()
			if err != nil {
				if _, wb := err.(*tcpip.ErrWouldBlock); !wb {
					c.e.log.Debug("mptcp: subflow write", "subflow", sf.tuple.String(), "err", err.String())
				}
			}
			return
		}
		c.mu.Unlock()
	}
}

// owedLocked returns a live subflow that owes the rest of a chunk it took
// only partly (see push), with the bytes it owes.
func (c *Conn) owedLocked(live []*subflow) (*subflow, uint64, int, bool) {
	for _, sf := range live {
		if sf.owed.Len > 0 && sf.info.sndFree > 0 {
			return sf, sf.owed.DSN, sf.owed.Len, true
		}
	}
	return nil, 0, 0, false
}

// nextChunkLocked picks what to send next: reinjections first, then new
// data within the peer's connection-level window.
func (c *Conn) nextChunkLocked() (dsn uint64, n int, reinj, ok bool) {
	una := c.snd.Una()
	for len(c.reinjectQ) > 0 {
		s := &c.reinjectQ[0]
		end := s.DSN + uint64(s.Len)
		if dsnLEQ(end, una) || s.Len <= 0 {
			c.reinjectQ = c.reinjectQ[1:]
			continue
		}
		if dsnLT(s.DSN, una) {
			s.Len = int(end - una)
			s.DSN = una
		}
		if dsnLEQ(c.sndNxt, s.DSN) {
			// Not sent yet at all: the normal path will send it.
			c.reinjectQ = c.reinjectQ[1:]
			continue
		}
		if dsnLT(c.sndNxt, end) {
			s.Len = int(c.sndNxt - s.DSN)
		}
		return s.DSN, min(s.Len, maxChunk), true, true
	}
	end := c.snd.End()
	if !dsnLT(c.sndNxt, end) {
		return 0, 0, false, false
	}
	n = int(min(end-c.sndNxt, maxChunk))
	if w := dsnDiff(c.sndEdge, c.sndNxt); w < int64(n) {
		if w <= 0 {
			c.e.MIB.PeerWindowFull.Add(1)
			return 0, 0, false, false
		}
		n = int(w)
	}
	return c.sndNxt, n, false, true
}

// pickLocked asks the scheduler for a subflow and how much it may take.
func (c *Conn) pickLocked(live []*subflow) (*subflow, int) {
	// A subflow owing the rest of a chunk takes nothing new before it.
	ready := live[:0:0]
	for _, sf := range live {
		if sf.owed.Len == 0 {
			ready = append(ready, sf)
		}
	}
	live = ready
	paths := make([]PathInfo, len(live))
	for i, sf := range live {
		paths[i] = sf.pathInfo()
	}
	i, n := c.e.cfg.Scheduler.Pick(paths)
	if i < 0 || i >= len(live) || n <= 0 {
		return nil, 0
	}
	return live[i], n
}

// reinjectLocked queues what sf carried and the peer did not DATA_ACK.
func (c *Conn) reinjectLocked(sf *subflow) {
	una := c.snd.Una()
	for _, s := range sf.tx.Unacked() {
		end := s.DSN + uint64(s.Len)
		if dsnLEQ(end, una) {
			continue
		}
		if dsnLT(s.DSN, una) {
			s.Len -= int(una - s.DSN)
			s.DSN = una
		}
		c.reinjectQ = append(c.reinjectQ, s)
	}
}

// chunkReader is a tcpip.Payloader over the send-buffer slices of one
// chunk (at most maxChunk bytes, so at most two blocks; three parts leave
// slack for an unaligned start).
type chunkReader struct {
	parts [][]byte
	store [3][]byte
	off   int // bytes already read
	n     int // total bytes
}

func (r *chunkReader) reset() {
	clear(r.store[:])
	r.parts = r.store[:0]
	r.off, r.n = 0, 0
}

func (r *chunkReader) add(p []byte) {
	r.parts = append(r.parts, p)
	r.n += len(p)
}

// Len implements tcpip.Payloader: the bytes not read yet.
func (r *chunkReader) Len() int { return r.n - r.off }

// Read implements io.Reader.
func (r *chunkReader) Read(b []byte) (int, error) {
	if r.off >= r.n {
		return 0, io.EOF
	}
	done := 0
	skip := r.off
	for _, p := range r.parts {
		if skip >= len(p) {
			skip -= len(p)
			continue
		}
		k := copy(b[done:], p[skip:])
		done += k
		skip = 0
		if done == len(b) {
			break
		}
	}
	r.off += done
	return done, nil
}

// sum is the ones'-complement sum of the chunk's first n bytes.
func (r *chunkReader) sum(n int) uint16 {
	var cs checksum.Checksumer
	for _, p := range r.parts {
		if n <= 0 {
			break
		}
		k := min(n, len(p))
		cs.Add(p[:k])
		n -= k
	}
	return cs.Checksum()
}
