package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/mptun/mptun/hostnet"
)

func cmdListen(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("listen", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cf commonFlags
	cf.register(fs)
	once := fs.Bool("once", false, "exit after the first connection")
	if err := fs.Parse(args); err != nil {
		return usageError{err}
	}
	if fs.NArg() != 1 {
		return usageError{fmt.Errorf("want exactly one :PORT, got %d arguments", fs.NArg())}
	}
	p := strings.TrimPrefix(fs.Arg(0), ":")
	port, err := strconv.ParseUint(p, 10, 16)
	if err != nil || port == 0 {
		return usageError{fmt.Errorf("port %q: want :1-65535", fs.Arg(0))}
	}
	log, err := newLogger(cf.logLevel, stderr)
	if err != nil {
		return err
	}
	eng, err := startEngine(ctx, hostnet.ModeListen, &cf, uint16(port), log)
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
		stopStats := startStatsWatch(ctx, stderr, cf.every, conn.Stats)
		err = pipe(ctx, conn, in, stdout)
		stopStats()
		if cf.stats {
			printStats(stderr, conn, eng.Endpoint())
		}
		conn.Close()
		in = strings.NewReader("")
		if *once || err != nil {
			return err
		}
	}
}
