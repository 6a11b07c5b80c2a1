package tun

import (
	"context"
	"fmt"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// readyPoll is how often WaitReady re-checks the link; link set-up takes
// milliseconds, so a short interval keeps the wait short without load.
const readyPoll = 5 * time.Millisecond

// LinkState is what WaitReady checks; exported so callers can log it.
type LinkState struct {
	Exists  bool
	Up      bool   // IFF_UP: administratively up
	Running bool   // IFF_RUNNING/LOWER_UP: carrier, i.e. a reader is attached
	Qdisc   string // root qdisc kind; "noop" drops everything
}

// Ready reports whether the kernel will hand packets to the device.
func (s LinkState) Ready() bool {
	return s.Exists && s.Up && s.Running && s.Qdisc != "" && s.Qdisc != "noop"
}

// ReadLinkState reads the state of the link called name in the network
// namespace of the calling thread.
func ReadLinkState(name string) (LinkState, error) {
	l, err := netlink.LinkByName(name)
	if err != nil {
		if _, ok := err.(netlink.LinkNotFoundError); ok {
			return LinkState{}, nil
		}
		return LinkState{}, fmt.Errorf("tun: link %q: %w", name, err)
	}
	attrs := l.Attrs()
	st := LinkState{
		Exists:  true,
		Up:      attrs.RawFlags&unix.IFF_UP != 0,
		Running: attrs.RawFlags&unix.IFF_RUNNING != 0,
	}
	qds, err := netlink.QdiscList(l)
	if err != nil {
		return st, fmt.Errorf("tun: qdiscs of %q: %w", name, err)
	}
	for _, q := range qds {
		if q.Attrs().Parent == netlink.HANDLE_ROOT {
			st.Qdisc = q.Type()
		}
	}
	return st, nil
}

// WaitReady waits until the link called name, in the network namespace of
// the calling thread (lock the OS thread when that is not the process's
// namespace), is up, has carrier (a reader attached its file) and a real root
// qdisc. Until then the kernel drops what it routes to the device, and the
// first SYN is lost to a retransmission timeout. It returns the context's
// error, wrapped with the last state seen, if the link does not get ready.
func WaitReady(ctx context.Context, name string) error {
	t := time.NewTicker(readyPoll)
	defer t.Stop()
	for {
		st, err := ReadLinkState(name)
		if err != nil {
			return err
		}
		if st.Ready() {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("tun: link %q not ready (%+v): %w", name, st, ctx.Err())
		case <-t.C:
		}
	}
}
