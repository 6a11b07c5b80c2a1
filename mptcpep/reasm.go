package mptcpep

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"sort"
	"sync"
)

const (
	// reasmBlockSize is the size of one storage block of a reassembly.
	// Blocks are allocated as data arrives, so an idle connection holds
	// almost nothing however large its window.
	reasmBlockSize = 16 << 10
	// reasmSpareBlocks bounds the freed blocks kept for reuse.
	reasmSpareBlocks = 4
	// reasmMaxSegments bounds the out-of-order ranges tracked. Together
	// with the window it bounds the memory a peer can make us hold.
	reasmMaxSegments = 4096
)

var (
	// ErrBeyondWindow reports bytes dropped because they lie beyond the
	// receive window.
	ErrBeyondWindow = errors.New("mptcpep: data beyond the receive window")
	// ErrTooManySegments reports a segment dropped because the table of
	// out-of-order ranges is full.
	ErrTooManySegments = errors.New("mptcpep: too many out-of-order segments")
	// ErrDataAfterFin reports bytes dropped because they lie at or beyond
	// the DATA_FIN.
	ErrDataAfterFin = errors.New("mptcpep: data beyond DATA_FIN")
	// ErrFinConflict reports a DATA_FIN that contradicts an earlier one or
	// data already received.
	ErrFinConflict = errors.New("mptcpep: conflicting DATA_FIN")
)

// reasmStats counts what Insert discarded, for the MIB.
type reasmStats struct {
	DupBytes        uint64 // bytes already received (below rcv_nxt or buffered)
	WindowDropBytes uint64 // bytes beyond the window
	FinDropBytes    uint64 // bytes at or beyond the DATA_FIN
	SegmentDrops    uint64 // inserts dropped because the range table was full
}

// reasmRange is a half-open range [start, end) of stream offsets.
type reasmRange struct{ start, end uint64 }

// reassembly is the connection-level receive buffer: it places bytes that
// arrive on any subflow by DSN, de-duplicates them (reinjections and
// MPTCP-level retransmissions deliver the same DSNs more than once, at
// other subflow offsets) and hands the application the in-order stream.
//
// Positions are kept as stream offsets relative to the initial DSN, so
// plain uint64 compares are safe there; incoming DSNs are converted through
// a wrap-safe signed distance to rcv_nxt.
//
// Bytes live in a ring of fixed-size blocks indexed by offset, written in
// place whether in order or not; a sorted slice of ranges records the
// out-of-order data. Accepted data is bounded by readOff+window, i.e. the
// window counts from the first unread byte, so memory stays within
// window (+ one block) whatever the peer sends and however slowly the
// application reads. With an advertised window of window-Buffered() the
// peer never hits that limit.
//
// Not safe for concurrent use: the owning connection calls it under its
// lock.
type reassembly struct {
	isn     uint64 // DSN of stream offset 0
	window  int
	maxSegs int

	readOff uint64       // next offset Read returns
	rcvOff  uint64       // first offset not received in order
	ooo     []reasmRange // sorted, disjoint, non-adjacent; all start > rcvOff
	oooLen  int          // bytes in ooo

	slots [][]byte // ring of blocks; block k of the stream is in slots[k%len]
	spare [][]byte
	// pool, when set, is shared by the connections of an Endpoint: blocks
	// beyond the spares go there instead of to the garbage collector.
	pool *sync.Pool

	finSet     bool
	finOff     uint64 // offset of the DATA_FIN
	finReached bool   // rcvOff reached finOff: the FIN consumed its DSN

	// resv marks [rcvOff, resvEnd) as being written by a subflow reader
	// outside the connection lock (Reserve/Commit); Insert keeps out.
	resv    bool
	resvEnd uint64

	stats reasmStats
}

// newReassembly returns a reassembly whose first byte has DSN initialDSN
// (IDSN+1 of the peer) and that buffers at most window bytes (minimum 1).
func newReassembly(initialDSN uint64, window int) *reassembly {
	window = max(window, 1)
	// Data lies in [readOff, readOff+window), which touches at most
	// ceil(window/bs)+1 consecutive blocks: with that many slots no two
	// live blocks share one.
	nslots := (window+reasmBlockSize-1)/reasmBlockSize + 1
	return &reassembly{
		isn:     initialDSN,
		window:  window,
		maxSegs: reasmMaxSegments,
		slots:   make([][]byte, nslots),
	}
}

// RcvNxt returns the next DSN expected in order: the value to send as
// DATA_ACK. Once the DATA_FIN is reached it includes the FIN's DSN.
func (r *reassembly) RcvNxt() uint64 {
	n := r.isn + r.rcvOff
	if r.finReached {
		n++
	}
	return n
}

// Readable returns the number of in-order bytes Read can return.
func (r *reassembly) Readable() int { return int(r.rcvOff - r.readOff) }

// Buffered returns all bytes held, in order and out of order; the receive
// window to advertise is Window()-Buffered().
func (r *reassembly) Buffered() int { return r.Readable() + r.oooLen }

// WindowEnd returns the DSN where the receive window ends: Insert drops
// bytes at or beyond it.
func (r *reassembly) WindowEnd() uint64 { return r.isn + r.readOff + uint64(r.window) }

// Window returns the buffer limit given to newReassembly.
func (r *reassembly) Window() int { return r.window }

// OutOfOrder returns the number of out-of-order ranges held.
func (r *reassembly) OutOfOrder() int { return len(r.ooo) }

// Stats returns the counts of discarded data.
func (r *reassembly) Stats() reasmStats { return r.stats }

// EOF reports whether the DATA_FIN was reached and all data read.
func (r *reassembly) EOF() bool { return r.finReached && r.readOff == r.rcvOff }

// Insert places data, whose first byte has DSN dsn, and returns how many
// bytes were new. It copies what it keeps, so the caller may reuse data.
// Bytes already received are counted in Stats().DupBytes and are not an
// error. Bytes beyond the window or the DATA_FIN are dropped and reported
// by ErrBeyondWindow or ErrDataAfterFin (wrapped; the bytes inside are
// still accepted); a new out-of-order range when the range table is full
// is dropped whole with ErrTooManySegments.
func (r *reassembly) Insert(dsn uint64, data []byte) (int, error) {
	if len(data) == 0 {
		return 0, nil
	}
	d := dsnDiff(dsn, r.isn+r.rcvOff)
	if d < 0 {
		if d <= -int64(len(data)) {
			r.stats.DupBytes += uint64(len(data))
			return 0, nil
		}
		r.stats.DupBytes += uint64(-d)
		data = data[-d:]
		d = 0
	}

	// The limit is relative to rcvOff here, so a DSN far away cannot
	// overflow the offset arithmetic.
	limit, limitErr := r.acceptLimit()
	var err error
	if uint64(d)+uint64(len(data)) > limit {
		keep := 0
		if uint64(d) < limit {
			keep = int(limit - uint64(d))
		}
		dropped := uint64(len(data) - keep)
		if limitErr == ErrDataAfterFin {
			r.stats.FinDropBytes += dropped
		} else {
			r.stats.WindowDropBytes += dropped
		}
		err = fmt.Errorf("dropped %d bytes at DSN %d: %w", dropped, dsn+uint64(keep), limitErr)
		data = data[:keep]
		if keep == 0 {
			return 0, err
		}
	}

	start := r.rcvOff + uint64(d)
	end := start + uint64(len(data))
	if r.resv && start < r.resvEnd {
		// A reader fills these bytes in place right now (the same DSNs
		// mapped on its subflow): the copy here is a duplicate.
		skip := min(r.resvEnd, end) - start
		r.stats.DupBytes += skip
		data, start = data[skip:], start+skip
		if len(data) == 0 {
			return 0, err
		}
	}

	// Fast path: in order with nothing out of order.
	if start == r.rcvOff && len(r.ooo) == 0 {
		r.store(start, data)
		r.advance(end)
		return len(data), err
	}

	// Ranges [i, j) overlap or touch [start, end).
	i := sort.Search(len(r.ooo), func(k int) bool { return r.ooo[k].end >= start })
	j := i
	for j < len(r.ooo) && r.ooo[j].start <= end {
		j++
	}
	if i == j && start != r.rcvOff && len(r.ooo) >= r.maxSegs {
		r.stats.SegmentDrops++
		return 0, fmt.Errorf("%d bytes at DSN %d: %w", len(data), dsn, ErrTooManySegments)
	}

	// Copy only the gaps: bytes already held stay as first received.
	added := 0
	cur := start
	for _, rg := range r.ooo[i:j] {
		if rg.start > cur {
			r.store(cur, data[cur-start:rg.start-start])
			added += int(rg.start - cur)
		}
		cur = max(cur, rg.end)
	}
	if cur < end {
		r.store(cur, data[cur-start:])
		added += int(end - cur)
	}
	r.stats.DupBytes += uint64(len(data) - added)

	merged := reasmRange{start, end}
	if j > i {
		merged.start = min(merged.start, r.ooo[i].start)
		merged.end = max(merged.end, r.ooo[j-1].end)
	}
	if start == r.rcvOff {
		// Joins the in-order data: i is 0, drop the ranges it absorbed.
		for _, rg := range r.ooo[:j] {
			r.oooLen -= int(rg.end - rg.start)
		}
		r.ooo = slices.Delete(r.ooo, 0, j)
		r.advance(merged.end)
		return added, err
	}
	r.oooLen += added
	switch {
	case j == i:
		r.ooo = slices.Insert(r.ooo, i, merged)
	default:
		r.ooo[i] = merged
		r.ooo = slices.Delete(r.ooo, i+1, j)
	}
	return added, err
}

// Reserve appends to dst the place of up to want in-order bytes starting
// at DSN dsn, one slice per block, for a subflow reader to read them into
// without the connection lock (one copy less than Insert). It appends
// nothing unless dsn is rcv_nxt and nothing else is reserved; the place
// ends at the window, the DATA_FIN and the first out-of-order range.
// Until Commit, Insert treats those bytes as held.
func (r *reassembly) Reserve(dst [][]byte, dsn uint64, want int) [][]byte {
	if r.resv || r.finReached || dsn != r.isn+r.rcvOff {
		return dst
	}
	limit, _ := r.acceptLimit()
	if len(r.ooo) > 0 {
		limit = min(limit, r.ooo[0].start-r.rcvOff)
	}
	end := r.rcvOff + min(uint64(max(want, 0)), limit)
	if end == r.rcvOff {
		return dst
	}
	r.resv, r.resvEnd = true, end
	return r.appendBlocks(dst, r.rcvOff, end, math.MaxInt)
}

// acceptLimit is how many bytes from rcv_nxt the reassembly may take: up
// to the window's end, or the DATA_FIN if that comes first (limitErr says
// which).
func (r *reassembly) acceptLimit() (limit uint64, limitErr error) {
	limit, limitErr = r.readOff+uint64(r.window)-r.rcvOff, ErrBeyondWindow
	if r.finSet && r.finOff-r.rcvOff < limit {
		limit, limitErr = r.finOff-r.rcvOff, ErrDataAfterFin
	}
	return limit, limitErr
}

// appendBlocks appends to dst the storage of stream offsets [off, end),
// one slice per block, at most max slices; missing blocks are allocated.
func (r *reassembly) appendBlocks(dst [][]byte, off, end uint64, max int) [][]byte {
	for off < end && len(dst) < max {
		slot := int((off / reasmBlockSize) % uint64(len(r.slots)))
		if r.slots[slot] == nil {
			r.slots[slot] = r.newBlock()
		}
		o := off % reasmBlockSize
		n := min(end-off, reasmBlockSize-o)
		dst = append(dst, r.slots[slot][o:o+n:o+n])
		off += n
	}
	return dst
}

// Commit ends a reservation: the first n of its bytes were written and
// are now received in order.
func (r *reassembly) Commit(n int) {
	if !r.resv {
		return
	}
	r.resv = false
	end := r.rcvOff + min(uint64(max(n, 0)), r.resvEnd-r.rcvOff)
	if r.finSet {
		end = min(end, r.finOff)
	}
	if len(r.ooo) > 0 && r.ooo[0].start <= end {
		// Data that arrived meanwhile right after the reservation.
		end = max(end, r.ooo[0].end)
		r.oooLen -= int(r.ooo[0].end - r.ooo[0].start)
		r.ooo = slices.Delete(r.ooo, 0, 1)
	}
	r.advance(end)
}

// advance moves rcvOff to end (all bytes below it are present) and notes
// reaching the DATA_FIN.
func (r *reassembly) advance(end uint64) {
	r.rcvOff = end
	if r.finSet && r.rcvOff == r.finOff {
		r.finReached = true
	}
}

// store copies data to its place at stream offset off.
func (r *reassembly) store(off uint64, data []byte) {
	for len(data) > 0 {
		slot := int((off / reasmBlockSize) % uint64(len(r.slots)))
		blk := r.slots[slot]
		if blk == nil {
			blk = r.newBlock()
			r.slots[slot] = blk
		}
		c := copy(blk[off%reasmBlockSize:], data)
		data = data[c:]
		off += uint64(c)
	}
}

func (r *reassembly) newBlock() []byte {
	if n := len(r.spare); n > 0 {
		blk := r.spare[n-1]
		r.spare[n-1] = nil
		r.spare = r.spare[:n-1]
		return blk
	}
	if r.pool != nil {
		if b, ok := r.pool.Get().(*[]byte); ok {
			return *b
		}
	}
	return make([]byte, reasmBlockSize)
}

// Peek returns the in-order bytes that are contiguous in memory at the
// read position (possibly fewer than Readable), without copying. The slice
// is valid until the next Discard, Read or Trim.
func (r *reassembly) Peek() []byte {
	n := r.rcvOff - r.readOff
	if n == 0 {
		return nil
	}
	blk := r.slots[(r.readOff/reasmBlockSize)%uint64(len(r.slots))]
	o := r.readOff % reasmBlockSize
	n = min(n, reasmBlockSize-o)
	return blk[o : o+n : o+n]
}

// PeekBlocks appends to dst the in-order bytes at the read position as
// up to max slices, one per block, without copying; like Peek's, they are
// valid until the next Discard, Read or Trim.
func (r *reassembly) PeekBlocks(dst [][]byte, max int) [][]byte {
	return r.appendBlocks(dst, r.readOff, r.rcvOff, max)
}

// Discard consumes up to n in-order bytes and returns how many it
// consumed.
func (r *reassembly) Discard(n int) int {
	n = min(n, r.Readable())
	if n <= 0 {
		return 0
	}
	from := r.readOff
	r.readOff += uint64(n)
	// Free blocks the read position has left behind.
	for k := from / reasmBlockSize; k < r.readOff/reasmBlockSize; k++ {
		slot := int(k % uint64(len(r.slots)))
		if blk := r.slots[slot]; blk != nil {
			r.slots[slot] = nil
			if len(r.spare) < reasmSpareBlocks {
				r.spare = append(r.spare, blk)
			} else if r.pool != nil {
				r.pool.Put(&blk)
			}
		}
	}
	return n
}

// Read copies in-order bytes into p and returns how many it copied.
func (r *reassembly) Read(p []byte) int {
	n := 0
	for n < len(p) {
		b := r.Peek()
		if len(b) == 0 {
			break
		}
		c := copy(p[n:], b)
		r.Discard(c)
		n += c
	}
	return n
}

// Trim releases memory an idle connection does not need: the spare blocks,
// and the block at the read position when nothing is buffered.
func (r *reassembly) Trim() {
	clear(r.spare)
	r.spare = r.spare[:0]
	if r.Buffered() == 0 {
		clear(r.slots)
	}
}

// SetFin records a DATA_FIN at DSN dsn: the stream ends before dsn, and
// the FIN itself occupies dsn, so RcvNxt becomes dsn+1 once all data
// below it is in. A repeated identical DATA_FIN is fine; one that differs
// from an earlier one, or lies below data already received, returns
// ErrFinConflict; one beyond the window returns ErrBeyondWindow.
func (r *reassembly) SetFin(dsn uint64) error {
	if r.finSet {
		if dsn != r.isn+r.finOff {
			return fmt.Errorf("DATA_FIN at %d, earlier at %d: %w", dsn, r.isn+r.finOff, ErrFinConflict)
		}
		return nil
	}
	d := dsnDiff(dsn, r.isn+r.rcvOff)
	if d < 0 {
		return fmt.Errorf("DATA_FIN at %d below rcv_nxt %d: %w", dsn, r.RcvNxt(), ErrFinConflict)
	}
	if uint64(d) > r.readOff+uint64(r.window)-r.rcvOff {
		return fmt.Errorf("DATA_FIN at %d: %w", dsn, ErrBeyondWindow)
	}
	off := r.rcvOff + uint64(d)
	if n := len(r.ooo); n > 0 && r.ooo[n-1].end > off {
		return fmt.Errorf("DATA_FIN at %d below buffered data: %w", dsn, ErrFinConflict)
	}
	r.finSet = true
	r.finOff = off
	if off == r.rcvOff {
		r.finReached = true
	}
	return nil
}

// FinDSN returns the DSN of the DATA_FIN, if one was set.
func (r *reassembly) FinDSN() (uint64, bool) { return r.isn + r.finOff, r.finSet }
