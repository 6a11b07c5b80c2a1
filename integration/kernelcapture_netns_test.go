package integration

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// kcRun runs a command (ip, sysctl) and fails the test with its output.
func kcRun(t *testing.T, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	require.NoError(t, err, "%s: %s", strings.Join(args, " "), out)
}

// kcNewNetns creates a named network namespace deleted in t.Cleanup.
func kcNewNetns(t *testing.T, name string) {
	t.Helper()
	// A leftover from a crashed earlier run would make "add" fail.
	_ = exec.Command("ip", "netns", "del", name).Run()
	kcRun(t, "ip", "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
}

// kcInNetns runs fn on a fresh OS thread switched into the named netns.
// Sockets created by fn stay in that namespace and may be used from any
// goroutine afterwards. The thread is never unlocked, so the Go runtime
// destroys it when the goroutine ends instead of reusing it elsewhere.
func kcInNetns(name string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		f, err := os.Open(filepath.Join("/var/run/netns", name))
		if err != nil {
			errc <- fmt.Errorf("open netns %s: %w", name, err)
			return
		}
		err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
		f.Close()
		if err != nil {
			errc <- fmt.Errorf("setns %s: %w", name, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// kcFrame is one captured Ethernet frame.
type kcFrame struct {
	data []byte
}

// kcCapture captures all frames of every interface of a namespace with an
// AF_PACKET socket (both directions, GSO super-packets unsplit).
type kcCapture struct {
	fd     int
	mu     sync.Mutex
	frames []kcFrame
	stop   chan struct{}
	done   chan struct{}
}

func kcStartCapture(t *testing.T, netns string) *kcCapture {
	t.Helper()
	c := &kcCapture{fd: -1, stop: make(chan struct{}), done: make(chan struct{})}
	proto := int(htons(unix.ETH_P_ALL))
	err := kcInNetns(netns, func() error {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
		if err != nil {
			return fmt.Errorf("AF_PACKET socket: %w", err)
		}
		c.fd = fd
		return nil
	})
	require.NoError(t, err)
	// Short receive timeout so the reader notices stop promptly.
	tv := unix.Timeval{Usec: 50_000}
	require.NoError(t, unix.SetsockoptTimeval(c.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv))
	require.NoError(t, unix.SetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 8<<20))
	go c.loop()
	t.Cleanup(func() { c.Stop() })
	return c
}

func (c *kcCapture) loop() {
	defer close(c.done)
	buf := make([]byte, 70000)
	stopping := false
	for {
		if !stopping {
			select {
			case <-c.stop:
				stopping = true
			default:
			}
		}
		flags := 0
		if stopping {
			// Drain what is already queued, then quit.
			flags = unix.MSG_DONTWAIT
		}
		n, _, err := unix.Recvfrom(c.fd, buf, flags)
		if err != nil {
			if errors.Is(err, unix.EINTR) || (errors.Is(err, unix.EAGAIN) && !stopping) {
				continue
			}
			return
		}
		f := kcFrame{data: append([]byte(nil), buf[:n]...)}
		c.mu.Lock()
		c.frames = append(c.frames, f)
		c.mu.Unlock()
	}
}

// Stop ends the capture (idempotent) and returns the frames.
func (c *kcCapture) Stop() []kcFrame {
	select {
	case <-c.stop:
	default:
		close(c.stop)
		<-c.done
		unix.Close(c.fd)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.frames
}

// Snapshot returns the frames captured so far.
func (c *kcCapture) Snapshot() []kcFrame {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]kcFrame(nil), c.frames...)
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// kcSegment is a decoded IPv4/TCP segment.
type kcSegment struct {
	src, dst     [4]byte
	sport, dport uint16
	seq, ack     uint32
	flags        uint8
	opts         []byte
	payload      []byte
}

const (
	kcTCPFlagSYN = 0x02
	kcTCPFlagACK = 0x10
)

// kcDecode extracts IPv4/TCP from an Ethernet frame.
func kcDecode(frame []byte) (kcSegment, bool) {
	var s kcSegment
	if len(frame) < 14 || binary.BigEndian.Uint16(frame[12:]) != unix.ETH_P_IP {
		return s, false
	}
	ip := frame[14:]
	if len(ip) < 20 || ip[0]>>4 != 4 || ip[9] != unix.IPPROTO_TCP {
		return s, false
	}
	ihl := int(ip[0]&0xf) * 4
	total := int(binary.BigEndian.Uint16(ip[2:]))
	if total == 0 || total > len(ip) { // GSO frames may carry 0; trust the frame
		total = len(ip)
	}
	if ihl < 20 || total < ihl+20 {
		return s, false
	}
	copy(s.src[:], ip[12:16])
	copy(s.dst[:], ip[16:20])
	tcp := ip[ihl:total]
	doff := int(tcp[12]>>4) * 4
	if doff < 20 || doff > len(tcp) {
		return s, false
	}
	s.sport = binary.BigEndian.Uint16(tcp[0:])
	s.dport = binary.BigEndian.Uint16(tcp[2:])
	s.seq = binary.BigEndian.Uint32(tcp[4:])
	s.ack = binary.BigEndian.Uint32(tcp[8:])
	s.flags = tcp[13]
	s.opts = tcp[20:doff]
	s.payload = tcp[doff:]
	return s, true
}
