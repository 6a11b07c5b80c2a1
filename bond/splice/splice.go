// Package splice copies one direction of a relayed stream with TCP's
// half-close: the source's EOF becomes a FIN (CloseWrite) on the
// destination, while the other direction goes on. Both ends of the bonding
// tunnel relay their flows with it (bond/client between the app's gVisor
// connection and the MPTCP upstream, bond/server between the client's
// connection and the destination's).
package splice

import (
	"errors"
	"io"
)

// CloseWriter is a connection that can half-close: TCP, MPTCP, gonet.
type CloseWriter interface{ CloseWrite() error }

// ErrNoHalfClose is returned for a destination that cannot half-close:
// the source's EOF cannot be passed on without closing it whole.
var ErrNoHalfClose = errors.New("splice: destination cannot half-close")

// CloseWrite half-closes w, or returns ErrNoHalfClose.
func CloseWrite(w any) error {
	cw, ok := w.(CloseWriter)
	if !ok {
		return ErrNoHalfClose
	}
	return cw.CloseWrite()
}

// Copy copies src to dst through buf until src's EOF, then half-closes dst
// (CloseWrite). It returns the bytes written and the first error: a read
// error other than EOF, a write error, or the half-close's (ErrNoHalfClose
// when dst has none); nil after a clean half-close. onRead, if not nil,
// sees the size of every read before its bytes are written (activity and
// byte counters of a relay).
//
// Reads and writes go through buf rather than io.Copy's ReadFrom/WriteTo:
// those would hand the copy to whichever side implements them, with its
// own buffer size, and skip onRead.
func Copy(dst io.Writer, src io.Reader, buf []byte, onRead func(n int)) (int64, error) {
	var total int64
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if onRead != nil {
				onRead(n)
			}
			w, werr := dst.Write(buf[:n])
			total += int64(w)
			if werr != nil {
				return total, werr
			}
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				return total, err
			}
			return total, CloseWrite(dst)
		}
	}
}
