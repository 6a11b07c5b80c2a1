package linkemu

import (
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// batch is the number of frames moved per recvmmsg/sendmmsg call.
const batch = 64

// bufSize holds any frame of an interface with offloads off and MTU <= 9000.
const bufSize = 9216

// mmsghdr mirrors struct mmsghdr (x/sys/unix has no wrapper for *mmsg).
type mmsghdr struct {
	hdr unix.Msghdr
	len uint32
	_   [4]byte
}

// packetSock is an AF_PACKET socket bound to one interface, integrated with
// the Go poller so reads block without a thread and Close unblocks them.
type packetSock struct {
	name string
	f    *os.File
	rc   syscall.RawConn
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// openPacketSock must run in the network namespace that owns ifname.
func openPacketSock(ifname string) (*packetSock, error) {
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		return nil, fmt.Errorf("interface %s: %w", ifname, err)
	}
	proto := htons(unix.ETH_P_ALL)
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, int(proto))
	if err != nil {
		return nil, fmt.Errorf("AF_PACKET socket: %w", err)
	}
	fail := func(what string, err error) (*packetSock, error) {
		unix.Close(fd)
		return nil, fmt.Errorf("%s on %s: %w", what, ifname, err)
	}
	// Without this we would read back every frame we send on this socket.
	if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_IGNORE_OUTGOING, 1); err != nil {
		return fail("PACKET_IGNORE_OUTGOING", err)
	}
	// Frames are addressed to the far end's MAC, not ours.
	mreq := &unix.PacketMreq{Ifindex: int32(ifi.Index), Type: unix.PACKET_MR_PROMISC}
	if err := unix.SetsockoptPacketMreq(fd, unix.SOL_PACKET, unix.PACKET_ADD_MEMBERSHIP, mreq); err != nil {
		return fail("promiscuous mode", err)
	}
	// Large buffers absorb scheduling hiccups of a shared CPU; FORCE needs
	// root, fall back to the capped variant.
	for _, opt := range [][2]int{{unix.SO_RCVBUFFORCE, unix.SO_RCVBUF}, {unix.SO_SNDBUFFORCE, unix.SO_SNDBUF}} {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, opt[0], 8<<20); err != nil {
			_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, opt[1], 8<<20)
		}
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: proto, Ifindex: ifi.Index}); err != nil {
		return fail("bind", err)
	}
	f := os.NewFile(uintptr(fd), "packet:"+ifname)
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("raw conn %s: %w", ifname, err)
	}
	return &packetSock{name: ifname, f: f, rc: rc}, nil
}

func (s *packetSock) Close() error { return s.f.Close() }

// kernelDrops returns, and resets, the number of frames the kernel dropped
// because this socket's receive buffer was full: the emulator fell behind.
func (s *packetSock) kernelDrops() (uint64, error) {
	var st *unix.TpacketStats
	var gerr error
	err := s.rc.Control(func(fd uintptr) {
		st, gerr = unix.GetsockoptTpacketStats(int(fd), unix.SOL_PACKET, unix.PACKET_STATISTICS)
	})
	if err = errors.Join(err, gerr); err != nil {
		return 0, fmt.Errorf("PACKET_STATISTICS %s: %w", s.name, err)
	}
	return uint64(st.Drops), nil
}

// mmsgs is per-goroutine scratch space for batched calls.
type mmsgs struct {
	hdrs [batch]mmsghdr
	iovs [batch]unix.Iovec
}

// readBatch blocks until at least one frame is available and fills bufs[i]
// with frame i, setting lens[i]. It returns the number of frames read.
func (s *packetSock) readBatch(m *mmsgs, bufs [][]byte, lens []int) (int, error) {
	n := min(len(bufs), batch)
	for i := range n {
		m.iovs[i].Base = &bufs[i][0]
		m.iovs[i].SetLen(len(bufs[i]))
		m.hdrs[i] = mmsghdr{}
		m.hdrs[i].hdr.Iov = &m.iovs[i]
		m.hdrs[i].hdr.Iovlen = 1
	}
	var got int
	var serr error
	err := s.rc.Read(func(fd uintptr) bool {
		r, _, e := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&m.hdrs[0])), uintptr(n), unix.MSG_DONTWAIT, 0, 0)
		if e == unix.EAGAIN {
			return false
		}
		if e != 0 {
			serr = e
		} else {
			got = int(r)
		}
		return true
	})
	if err != nil {
		return 0, fmt.Errorf("read %s: %w", s.name, err)
	}
	if serr != nil {
		return 0, fmt.Errorf("recvmmsg %s: %w", s.name, serr)
	}
	for i := range got {
		lens[i] = int(m.hdrs[i].len)
	}
	return got, nil
}

// writeBatch sends every frame in frames. Frames the kernel rejects
// individually (e.g. ENOBUFS) are counted as dropped, like a full NIC ring.
func (s *packetSock) writeBatch(m *mmsgs, frames [][]byte) (dropped int, err error) {
	for len(frames) > 0 {
		n := min(len(frames), batch)
		for i := range n {
			m.iovs[i].Base = &frames[i][0]
			m.iovs[i].SetLen(len(frames[i]))
			m.hdrs[i] = mmsghdr{}
			m.hdrs[i].hdr.Iov = &m.iovs[i]
			m.hdrs[i].hdr.Iovlen = 1
		}
		var sent int
		var serr error
		werr := s.rc.Write(func(fd uintptr) bool {
			r, _, e := unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&m.hdrs[0])), uintptr(n), unix.MSG_DONTWAIT, 0, 0)
			if e == unix.EAGAIN {
				return false
			}
			if e != 0 {
				serr = e
			} else {
				sent = int(r)
			}
			return true
		})
		if werr != nil {
			return dropped, fmt.Errorf("write %s: %w", s.name, werr)
		}
		if serr != nil {
			if errors.Is(serr, unix.ENOBUFS) || errors.Is(serr, unix.EMSGSIZE) || errors.Is(serr, unix.ENETDOWN) || errors.Is(serr, unix.ENXIO) {
				// Skip the offending frame and keep going.
				dropped++
				frames = frames[1:]
				continue
			}
			return dropped, fmt.Errorf("sendmmsg %s: %w", s.name, serr)
		}
		frames = frames[sent:]
	}
	return dropped, nil
}
