package mptcpep

import (
	"io"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// writeToIov bounds the blocks (16 KiB each) one writev takes.
const writeToIov = 16

// WriteTo implements io.WriterTo, which io.Copy prefers: it writes the
// received bytes to w straight from the reassembly's blocks, without the
// copy into a Read buffer, and several blocks per writev when w is a file
// or socket (os.Stdout in `mptun connect`).
func (c *Conn) WriteTo(w io.Writer) (int64, error) {
	if c.fb != nil {
		return io.Copy(w, struct{ io.Reader }{c.fb})
	}
	// The blocks being written must not be discarded (and recycled) by a
	// concurrent Read.
	c.rmu.Lock()
	defer c.rmu.Unlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	var total int64
	var iov [writeToIov][]byte
	for {
		if c.fallback && c.fb != nil {
			c.mu.Unlock()
			n, err := io.Copy(w, struct{ io.Reader }{c.fb})
			c.mu.Lock()
			return total + n, err
		}
		if c.rcv.Readable() > 0 {
			bufs := c.rcv.PeekBlocks(iov[:0], len(iov))
			c.mu.Unlock()
			n, err := writeBlocks(w, bufs)
			c.mu.Lock()
			clear(iov[:])
			c.rcv.Discard(n)
			total += int64(n)
			c.wakeReadersLocked()
			if err != nil {
				return total, err
			}
			continue
		}
		if err := c.readEndLocked(); err != nil {
			if err == io.EOF {
				err = nil // io.WriterTo ends at EOF without an error
			}
			return total, err
		}
		if err := c.waitLocked(c.readDeadline); err != nil {
			return total, err
		}
	}
}

// writeBlocks writes bufs to w, with one writev when w has a file
// descriptor, and returns how many bytes went out.
func writeBlocks(w io.Writer, bufs [][]byte) (int, error) {
	if sc, ok := w.(syscall.Conn); ok && len(bufs) > 1 {
		if rc, err := sc.SyscallConn(); err == nil {
			var n int
			var werr error
			err := rc.Write(func(fd uintptr) bool {
				for {
					n, werr = unix.Writev(int(fd), bufs)
					if werr != unix.EINTR {
						break
					}
				}
				// EAGAIN on a non-blocking descriptor: wait for the poller.
				return werr != unix.EAGAIN
			})
			if err == nil {
				err = werr
			}
			if err != nil {
				return max(n, 0), os.NewSyscallError("writev", err)
			}
			if n == 0 {
				return 0, io.ErrShortWrite
			}
			return n, nil
		}
	}
	n := 0
	for _, b := range bufs {
		k, err := w.Write(b)
		n += k
		if err != nil {
			return n, err
		}
		if k < len(b) {
			return n, io.ErrShortWrite
		}
	}
	return n, nil
}
