package mptcpep

import (
	"errors"
	"fmt"
	"sync"
)

// sendBlockSize is the size of one storage block of a sendBuffer. Large
// enough that per-block bookkeeping is negligible, small enough that a
// connection with little data in flight holds little memory.
const sendBlockSize = 64 << 10

// sendSpareBlocks bounds the blocks a sendBuffer keeps for reuse after Ack
// frees them, so steady streaming allocates nothing while an idle
// connection holds at most this much beyond its data.
const sendSpareBlocks = 2

// ErrAckBeyondEnd is returned by sendBuffer.Ack for a DATA_ACK that
// acknowledges data never sent. The caller counts it and ignores the ack.
var ErrAckBeyondEnd = errors.New("mptcpep: DATA_ACK beyond the end of sent data")

// sendBuffer holds the connection-level outgoing byte stream from una (the
// lowest DSN the peer has not DATA_ACKed) to end, at most capacity bytes.
// Bytes stay until DATA_ACKed because any subflow may have to reinject
// them.
//
// Storage is a queue of fixed-size blocks, so Write and Ack cost O(bytes
// copied) and O(blocks freed) without moving data. A sendBuffer is not
// safe for concurrent use: the owning connection calls it under its lock.
type sendBuffer struct {
	una      uint64     // DSN of the first byte in blocks[0][head]
	length   int        // bytes stored
	capacity int        // limit on length
	head     int        // offset of una inside blocks[0]
	blocks   [][]byte   // each len sendBlockSize; the last one may be partly used
	spare    [][]byte   // freed blocks kept for reuse, at most sendSpareBlocks
	pool     *sync.Pool // shared by an Endpoint's connections, when set
	pins     int        // while > 0, Ack keeps freed blocks (see Pin)
}

// newSendBuffer returns an empty buffer whose first byte will carry DSN isn
// (the IDSN+1 of the connection) and that holds at most capacity bytes.
func newSendBuffer(isn uint64, capacity int) *sendBuffer {
	return &sendBuffer{una: isn, capacity: max(capacity, 0)}
}

// Una returns the lowest unacknowledged DSN.
func (b *sendBuffer) Una() uint64 { return b.una }

// End returns the DSN following the last byte written.
func (b *sendBuffer) End() uint64 { return b.una + uint64(b.length) }

// Len returns the number of bytes stored (written and not yet acked).
func (b *sendBuffer) Len() int { return b.length }

// Free returns how many more bytes Write accepts.
func (b *sendBuffer) Free() int { return max(b.capacity-b.length, 0) }

// Capacity returns the limit on stored bytes.
func (b *sendBuffer) Capacity() int { return b.capacity }

// SetCapacity changes the limit (send-buffer tuning). Lowering it below
// Len keeps the stored bytes; Free stays 0 until acks bring Len below it.
func (b *sendBuffer) SetCapacity(n int) { b.capacity = max(n, 0) }

// Write appends up to Free() bytes of p and returns how many it took.
func (b *sendBuffer) Write(p []byte) int {
	p = p[:min(len(p), b.Free())]
	n := len(p)
	for len(p) > 0 {
		used := (b.head + b.length) % sendBlockSize
		if used == 0 && b.tailFull() {
			b.blocks = append(b.blocks, b.newBlock())
		}
		last := b.blocks[len(b.blocks)-1]
		c := copy(last[used:], p)
		p = p[c:]
		b.length += c
	}
	return n
}

// Tail returns free space right after the stored bytes (the rest of the
// last block, or a new one), at most Free() bytes, for a caller that
// fills it in place and then calls Commit. Nothing else may append in
// between, and the buffer must stay pinned (Pin) while the slice is
// filled without the owner's lock.
func (b *sendBuffer) Tail() []byte {
	free := b.Free()
	if free == 0 {
		return nil
	}
	used := (b.head + b.length) % sendBlockSize
	if used == 0 && b.tailFull() {
		b.blocks = append(b.blocks, b.newBlock())
	}
	last := b.blocks[len(b.blocks)-1]
	return last[used:min(sendBlockSize, used+free)]
}

// Commit appends the first n bytes of the slice Tail returned.
func (b *sendBuffer) Commit(n int) { b.length += n }

// tailFull reports whether the stored bytes end exactly at the end of the
// last block (or there is no block), so the next byte needs a new block.
func (b *sendBuffer) tailFull() bool {
	return b.head+b.length == len(b.blocks)*sendBlockSize
}

func (b *sendBuffer) newBlock() []byte {
	if n := len(b.spare); n > 0 {
		blk := b.spare[n-1]
		b.spare[n-1] = nil
		b.spare = b.spare[:n-1]
		return blk
	}
	if b.pool != nil {
		if p, ok := b.pool.Get().(*[]byte); ok {
			return *p
		}
	}
	return make([]byte, sendBlockSize)
}

func (b *sendBuffer) releaseBlock(blk []byte) {
	if len(b.spare) < sendSpareBlocks {
		b.spare = append(b.spare, blk)
	} else if b.pool != nil {
		b.pool.Put(&blk)
	}
}

// Ack frees every byte below dsn and returns how many it freed. An ack at
// or below Una is old (reordered DATA_ACKs are normal) and frees nothing.
// An ack beyond End returns ErrAckBeyondEnd and changes nothing.
func (b *sendBuffer) Ack(dsn uint64) (int, error) {
	d := dsnDiff(dsn, b.una)
	if d <= 0 {
		return 0, nil
	}
	if d > int64(b.length) {
		return 0, fmt.Errorf("ack %d, una %d, end %d: %w", dsn, b.una, b.End(), ErrAckBeyondEnd)
	}
	n := int(d)
	b.una = dsn
	b.length -= n
	b.head += n
	if b.pins == 0 {
		b.release()
	}
	return n, nil
}

// Pin keeps every block in place, even when Ack frees its bytes, until the
// matching Unpin: slices from Peek stay intact, so they can be handed to
// gVisor without the connection lock and without a copy.
func (b *sendBuffer) Pin() { b.pins++ }

// Unpin ends a Pin and frees the blocks acked meanwhile.
func (b *sendBuffer) Unpin() {
	b.pins--
	if b.pins == 0 {
		b.release()
	}
}

// release frees the blocks entirely behind head.
func (b *sendBuffer) release() {
	// Drop whole blocks now behind head; the block holding the tail stays
	// (Write appends to it) unless everything was acked.
	drop := b.head / sendBlockSize
	if b.length == 0 {
		// Restart at the beginning of a block so the next Write does not
		// start in the middle of a block that is otherwise wasted.
		drop = len(b.blocks)
	}
	if drop > 0 {
		for i := range drop {
			b.releaseBlock(b.blocks[i])
			b.blocks[i] = nil
		}
		k := copy(b.blocks, b.blocks[drop:])
		clear(b.blocks[k:])
		b.blocks = b.blocks[:k]
		if b.length == 0 {
			b.head = 0
		} else {
			b.head -= drop * sendBlockSize
		}
	}
}

// Peek returns up to maxLen stored bytes starting at dsn, without copying.
// The result is the contiguous part only: it stops at a block boundary, so
// callers loop to gather more. It returns nil when dsn is outside
// [Una, End). The slice aliases the buffer and stays valid until an Ack
// frees those bytes; the caller must not modify it.
func (b *sendBuffer) Peek(dsn uint64, maxLen int) []byte {
	d := dsnDiff(dsn, b.una)
	if d < 0 || d >= int64(b.length) || maxLen <= 0 {
		return nil
	}
	pos := b.head + int(d)
	blk := b.blocks[pos/sendBlockSize]
	off := pos % sendBlockSize
	n := min(maxLen, sendBlockSize-off, b.length-int(d))
	return blk[off : off+n : off+n]
}
