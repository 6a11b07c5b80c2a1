package main

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/mptun/mptun/hostnet"
)

func cmdListen(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	f := newCmdFlags("listen")
	once := f.fs.Bool("once", false, "exit after the first connection")
	f.withDenyJoinInitial()
	if err := f.parse(args, 1, ":PORT", stderr); err != nil {
		return err
	}
	p := strings.TrimPrefix(f.fs.Arg(0), ":")
	port, err := strconv.ParseUint(p, 10, 16)
	if err != nil || port == 0 {
		return usageError{fmt.Errorf("port %q: want :1-65535", f.fs.Arg(0))}
	}
	log := f.log
	eng, err := f.startEngine(ctx, hostnet.ModeListen, uint16(port))
	if err != nil {
		return err
	}
	defer eng.Close()
	eng.WatchUplinks(ctx)
	l, err := eng.Endpoint().Listen(uint16(port))
	if err != nil {
		return err
	}
	defer l.Close()
	go func() {
		<-ctx.Done()
		l.Close()
	}()
	// stdin goes to the first connection only; later ones just print.
	in := stdin
	for {
		conn, err := l.AcceptMPTCP()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return err
		}
		log.Info("accepted", "remote", conn.RemoteAddr(), "mptcp", conn.MultipathTCP())
		stopStats := startStatsWatch(ctx, stderr, f.every, conn.Stats)
		err = pipe(ctx, conn, in, stdout)
		stopStats()
		if f.stats {
			printStats(stderr, conn, eng.Endpoint())
		}
		conn.Close()
		in = strings.NewReader("")
		if *once || err != nil {
			return err
		}
	}
}
