package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"

	"github.com/mptun/mptun/hostnet"
	"github.com/mptun/mptun/mptcpep"
)

func cmdConnect(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	f := newCmdFlags("connect")
	timeout := f.fs.Duration("timeout", 10*time.Second, "connection set-up timeout")
	plain := f.fs.Bool("plain", false, "plain TCP from the first uplink over the same userspace stack and TUN, no MPTCP (the baseline for the option layer's cost)")
	if err := f.parse(args, 1, "HOST:PORT", stderr); err != nil {
		return err
	}
	remote, err := netip.ParseAddrPort(f.fs.Arg(0))
	if err != nil {
		return usageError{fmt.Errorf("destination %q: %w", f.fs.Arg(0), err)}
	}
	eng, err := f.startEngine(ctx, hostnet.ModeConnect, 0)
	if err != nil {
		return err
	}
	defer eng.Close()
	eng.WatchUplinks(ctx)
	ep := eng.Endpoint()
	dctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	if *plain {
		u := eng.Uplinks()[0]
		proto := ipv4.ProtocolNumber
		if remote.Addr().Is6() {
			proto = ipv6.ProtocolNumber
		}
		// The same receive buffer an MPTCP subflow gets, so the baseline
		// differs only by the option layer and the meta-socket.
		var rb tcpip.TCPReceiveBufferSizeRangeOption
		if err := ep.Stack().S.TransportProtocolOption(tcp.ProtocolNumber, &rb); err == nil {
			rb.Default = ep.SubflowReceiveBuffer()
			if err := ep.Stack().S.SetTransportProtocolOption(tcp.ProtocolNumber, &rb); err != nil {
				return fmt.Errorf("plain: receive buffer: %s", err)
			}
		}
		pc, err := gonet.DialTCPWithBind(dctx, ep.Stack().S,
			tcpip.FullAddress{Addr: tcpip.AddrFromSlice(u.StackAddr.AsSlice())},
			tcpip.FullAddress{Addr: tcpip.AddrFromSlice(remote.Addr().AsSlice()), Port: remote.Port()}, proto)
		if err != nil {
			return fmt.Errorf("dial %v: %w", remote, err)
		}
		defer pc.Close()
		return pipe(ctx, pc, stdin, stdout)
	}
	conn, err := ep.Dial(dctx, remote)
	cancel()
	if err != nil {
		return err
	}
	stopStats := startStatsWatch(ctx, stderr, f.every, conn.Stats)
	err = pipe(ctx, conn, stdin, stdout)
	stopStats()
	if f.stats {
		printStats(stderr, conn, ep)
	}
	conn.Close()
	return err
}

// halfCloser is a connection with half-close (an MPTCP or a TCP one).
type halfCloser interface {
	net.Conn
	CloseWrite() error
}

// pipe copies stdin to conn (then half-closes) and conn to stdout, and
// returns when both directions are done.
func pipe(ctx context.Context, conn halfCloser, stdin io.Reader, stdout io.Writer) error {
	up := make(chan error, 1)
	down := make(chan error, 1)
	go func() {
		_, err := io.Copy(conn, stdin)
		if err == nil {
			err = conn.CloseWrite()
		}
		up <- err
	}()
	go func() {
		_, err := io.Copy(stdout, conn)
		down <- err
	}()
	var upDone, downDone bool
	for !upDone || !downDone {
		select {
		case err := <-up:
			if err != nil {
				return fmt.Errorf("sending: %w", err)
			}
			upDone = true
		case err := <-down:
			if err != nil {
				return fmt.Errorf("receiving: %w", err)
			}
			downDone = true
		case <-ctx.Done():
			if a, ok := conn.(interface{ Abort() }); ok {
				a.Abort()
			} else {
				conn.Close()
			}
			return ctx.Err()
		}
	}
	// Let the DATA_FIN exchange finish so the peer sees a clean end.
	if d, ok := conn.(interface{ Done() <-chan struct{} }); ok {
		select {
		case <-d.Done():
		case <-time.After(3 * time.Second):
		case <-ctx.Done():
		}
	}
	return nil
}

func printStats(w io.Writer, conn *mptcpep.Conn, ep *mptcpep.Endpoint) {
	out := struct {
		Conn mptcpep.ConnStats `json:"conn"`
		MIB  map[string]uint64 `json:"mib"`
	}{conn.Stats(), nonZero(ep.MIB.Snapshot())}
	b, _ := json.MarshalIndent(out, "", "  ")
	fmt.Fprintln(w, string(b))
}

func nonZero(m map[string]uint64) map[string]uint64 {
	for k, v := range m {
		if v == 0 {
			delete(m, k)
		}
	}
	return m
}
