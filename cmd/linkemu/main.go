// Command linkemu emulates a link between two interfaces of one network
// namespace: it forwards Ethernet frames both ways through AF_PACKET sockets
// with per-direction delay, jitter, loss, rate, queue and scripted outages.
//
//	linkemu -netns mtl-e -a c0 -b s0 -link rate=50M,delay=10ms -ba loss=1% -outage 10s+5s
//
// -link applies to both directions; -ab and -ba are applied on top of it for
// one direction (A to B, B to A). Stop it with SIGINT or SIGTERM.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/mptun/mptun/lab"
	"github.com/mptun/mptun/lab/linkemu"
)

type outageFlags []linkemu.Outage

func (o *outageFlags) String() string { return fmt.Sprint(*o) }
func (o *outageFlags) Set(s string) error {
	v, err := linkemu.ParseOutage(s)
	if err != nil {
		return err
	}
	*o = append(*o, v)
	return nil
}

func main() {
	if err := run(); err != nil {
		slog.Error("linkemu", "err", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		ifA      = flag.String("a", "", "interface A (required)")
		ifB      = flag.String("b", "", "interface B (required)")
		nsName   = flag.String("netns", "", "named network namespace to run in (default: current)")
		both     = flag.String("link", "", "settings for both directions: rate=50M,delay=10ms,jitter=1ms,loss=1%,queue=BYTES,outage=10s+5s")
		ab       = flag.String("ab", "", "extra settings for A->B (same keys; override -link)")
		ba       = flag.String("ba", "", "extra settings for B->A")
		offloads = flag.Bool("offloads-off", true, "turn off GRO/GSO/TSO/checksum offloads of both interfaces with ethtool")
		every    = flag.Duration("stats", 0, "log counters at this interval (0: only at exit)")
		duration = flag.Duration("duration", 0, "stop after this long (0: run until signalled)")
		outages  outageFlags
	)
	flag.Var(&outages, "outage", "START+DURATION outage of both directions, repeatable")
	flag.Parse()
	if *ifA == "" || *ifB == "" {
		flag.Usage()
		return errors.New("-a and -b are required")
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	abP, err := linkemu.ParseParams(joinSettings(*both, *ab))
	if err != nil {
		return fmt.Errorf("-link/-ab: %w", err)
	}
	baP, err := linkemu.ParseParams(joinSettings(*both, *ba))
	if err != nil {
		return fmt.Errorf("-link/-ba: %w", err)
	}
	abP.Outages = append(abP.Outages, outages...)
	baP.Outages = append(baP.Outages, outages...)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *duration)
		defer cancel()
	}
	cfg := linkemu.Config{IfA: *ifA, IfB: *ifB, AtoB: abP, BtoA: baP, Logger: log}
	var emu *linkemu.Emulator
	open := func() error {
		var err error
		emu, err = linkemu.Open(cfg)
		return err
	}
	ns := &lab.NS{Name: *nsName}
	if *offloads {
		for _, dev := range []string{*ifA, *ifB} {
			if err := lab.DisableOffloads(ctx, ns, dev); err != nil {
				return err
			}
		}
	}
	if err := ns.Do(open); err != nil {
		return err
	}
	log.Info("linkemu running", "a", *ifA, "b", *ifB, "ab", fmt.Sprintf("%+v", abP), "ba", fmt.Sprintf("%+v", baP))
	if *every > 0 {
		go func() {
			tk := time.NewTicker(*every)
			defer tk.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-tk.C:
					log.Info("stats", "ab", emu.Stats(linkemu.AtoB), "ba", emu.Stats(linkemu.BtoA))
				}
			}
		}()
	}
	err = emu.Run(ctx)
	log.Info("linkemu stopped", "ab", emu.Stats(linkemu.AtoB), "ba", emu.Stats(linkemu.BtoA))
	return err
}

func joinSettings(a, b string) string {
	return strings.Trim(a+","+b, ",")
}
